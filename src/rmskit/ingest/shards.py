"""Sharded sources that need not fit in memory or on one listing: WebDataset tar shards and parquet
shards, given as one tar file or as a brace pattern (`shards/{000..099}.tar`,
`data/train-{00000..00009}.parquet`).

Ingest is lazy: a pattern is expanded without touching the disk, each shard is opened only when the
previous one is done, and a tar shard is streamed member by member (`tarfile` "r|" mode, grouped into
samples by the `webdataset` library's key rules), so the first image is decoded before the last shard
is even looked at. Only local files are read: URLs and `pipe:` commands are refused at resolve time.
A missing or corrupt shard, an oversized member or a sample without an image is one refusal each."""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from rmskit.config import IngestConfig
from rmskit.ingest.base import Item, loads_json, read_head
from rmskit.ingest.rows import row_annotation
from rmskit.ingest.tables import parquet_file_items

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "image", "img")
_BRACE = re.compile(r"\{[^{}]*\.\.[^{}]*\}|\{[^{}]*,[^{}]*\}")
MAX_SHARDS = 1_000_000  # a pattern expanding further is a typo, not a dataset


def is_shard_pattern(spec: str) -> bool:
    return bool(_BRACE.search(spec))


def require_webdataset(spec: str) -> None:
    """Checked when the source is resolved, without importing it (webdataset imports torch)."""
    import importlib.util

    if importlib.util.find_spec("webdataset") is None or importlib.util.find_spec("braceexpand") is None:
        raise ValueError(
            f"source {spec}: tar shards need the webdataset extra: pip install 'rmskit[webdataset]'"
        )


def is_tar(head: bytes) -> bool:
    return len(head) >= 262 and head[257:262] == b"ustar"


def expand_pattern(spec: str) -> list[str]:
    """Brace expansion as WebDataset does it (`{000..099}`, `{a,b}`); no file system access."""
    from braceexpand import braceexpand

    out: list[str] = []
    for s in braceexpand(spec):
        out.append(s)
        if len(out) > MAX_SHARDS:
            raise ValueError(f"source {spec}: the pattern expands to more than {MAX_SHARDS:,} shards")
    return out


def _members(path: Path, cfg: IngestConfig, errors: list[tuple[str, str]]) -> Iterator[dict[str, Any]]:
    """Regular members of a tar shard as webdataset file samples; an oversized member is skipped
    and reported (its bytes are never read)."""
    with open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r|*") as tar:
        for m in tar:
            if not m.isreg():
                continue
            if m.size > cfg.max_file_bytes:
                errors.append((m.name, f"tar member too large: {m.size:,} bytes (max_file_bytes)"))
                continue
            f = tar.extractfile(m)
            if f is not None:
                yield {"fname": m.name, "data": f.read(), "__url__": str(path)}


def _annotation(sample: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    raw = sample.get("json")
    if isinstance(raw, bytes):
        try:
            doc = loads_json(raw.decode("utf-8", "replace"))
        except ValueError:
            doc = None
        if isinstance(doc, dict):
            row.update(doc)
    for k in ("txt", "caption", "text"):
        if isinstance(sample.get(k), bytes) and "caption" not in row:
            row["caption"] = sample[k].decode("utf-8", "replace").strip()
    return row


def tar_items(path: Path, rel_file: str, root: Path, cfg: IngestConfig) -> Iterator[Item]:
    """One WebDataset shard: each sample (files sharing a key) with an image is one item."""
    from webdataset.tariterators import group_by_keys

    root_s = str(root)
    errors: list[tuple[str, str]] = []

    def keep_going(exc: Exception) -> bool:  # duplicate names and the like: report, go on
        errors.append(("?", f"{type(exc).__name__}: {exc}"))
        return True

    try:
        for sample in group_by_keys(_members(path, cfg, errors), handler=keep_going):
            while errors:
                name, reason = errors.pop(0)
                yield Item(root_s, f"{rel_file}#{name}", refused=reason)
            key = f"{rel_file}#{sample['__key__']}"
            image = next((sample[s] for s in IMAGE_SUFFIXES if isinstance(sample.get(s), bytes)), None)
            if image is None:
                yield Item(root_s, key, refused="sample has no image file (.jpg, .png, .webp, ...)")
                continue
            try:
                ann = row_annotation(_annotation(sample))
            except (ValueError, TypeError, RecursionError):
                ann = None
            yield Item(root_s, key, data=image, annotation=ann)
    except (tarfile.TarError, OSError, EOFError) as exc:
        yield Item(root_s, rel_file, refused=f"unreadable tar shard: {type(exc).__name__}: {exc}")
    for name, reason in errors:
        yield Item(root_s, f"{rel_file}#{name}", refused=reason)


def shard_items(path: Path, rel_file: str, root: Path, cfg: IngestConfig) -> Iterator[Item]:
    """A shard of either kind, told apart by its first bytes when it is opened."""
    try:
        head = read_head(path, 512)
    except OSError as exc:
        yield Item(str(root), rel_file, refused=f"cannot open shard: {exc.strerror or exc}")
        return
    if head.startswith(b"PAR1"):
        yield from parquet_file_items(path, rel_file, root, cfg)
    elif is_tar(head):
        yield from tar_items(path, rel_file, root, cfg)
    else:
        yield Item(str(root), rel_file, refused="shard is neither a tar (WebDataset) nor a parquet file")


@dataclass
class ShardsSource:
    """One tar file, or a brace pattern over tar / parquet shards (expanded, not listed)."""

    kind: ClassVar[str] = "shards"
    spec: str
    shards: list[Path]
    root: Path  # where the shards live; samples are named <shard>#<key> relative to it

    @classmethod
    def from_pattern(cls, spec: str) -> ShardsSource:
        if "://" in spec or spec.startswith("pipe:"):
            raise ValueError(f"source {spec}: only local shards are read (no URLs or pipe: commands)")
        require_webdataset(spec)
        shards = [Path(s).expanduser().absolute() for s in expand_pattern(spec)]
        if not shards[0].is_file():  # a typo is caught now; later shards are opened when reached
            raise ValueError(f"source {spec}: first shard {shards[0]} does not exist")
        return cls(spec, shards, shards[0].parent)

    def count(self) -> int | None:
        return None  # unknown without reading every shard

    def items(self, cfg: IngestConfig) -> Iterator[Item]:
        for shard in self.shards:
            try:
                rel = shard.relative_to(self.root).as_posix()
            except ValueError:
                rel = str(shard)
            yield from shard_items(shard, rel, self.root, cfg)
