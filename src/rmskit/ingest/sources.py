"""Image sources: folders, JSONL/CSV/JSON manifests, COCO annotation files, HF datasets / parquet.

`iter_sources` resolves every source argument first (an unusable one raises ValueError before any
image is read), then streams `ImageRecord | Rejection` one at a time: listings and manifests are read
lazily, only one image is decoded at a time, and the only state kept across items is the set of
sha256 digests already seen (identical bytes collapse to one image; later copies are recorded as
rejections "duplicate of ...").

Each source kind is one small reader behind the `Source` protocol (ingest/base.py): `FolderSource`,
`ImageFileSource` (ingest/folder.py), `ManifestSource` (JSONL, JSON array, CSV/TSV;
ingest/manifest.py), `CocoSource` (ingest/coco.py), `ParquetSource`, `HFDiskSource`, `HFHubSource`
(ingest/tables.py). `resolve_source` picks the reader by content, never by extension:
- `SCHEMES`: `hf://ORG/NAME[:SPLIT]`, a hub dataset streamed with `datasets`;
- `DIR_SNIFFERS`, in order: an HF `save_to_disk` dataset (dataset_info.json + state.json, or
  dataset_dict.json), a folder of parquet files, else a folder of images walked recursively;
- a brace pattern over shards (`shards/{000..099}.tar`): `ShardsSource` (ingest/shards.py), lazy;
- `FILE_SNIFFERS`, in order: parquet (PAR1 magic), a WebDataset tar shard, an image, JSON (a COCO object with an "images"
  list, a JSONL manifest, a JSON array manifest), a CSV/TSV manifest whose header names a path
  column (path, image, file_name, filename, file, image_path, img).

Manifests and COCO files resolve image paths against their own folder (COCO also tries the usual
layouts); append `::DIR` to name the image root explicitly
(`annotations/captions_val2017.json::/data/coco/val2017`). Every path must stay inside its root.
A source whose content is hostile (JSON nested too deeply to parse) is one refusal with a reason, and
the other sources go on; a reader that fails part-way is one refusal for the rest of that source."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from rmskit.config import IngestConfig
from rmskit.ingest.base import Item, JSONTooDeep, Source, load_json_file, loads_json, read_head
from rmskit.ingest.coco import CocoSource, merge_coco
from rmskit.ingest.decode import ImageRefused, decode_bytes, looks_like_text, read_file_capped, sha256_hex
from rmskit.ingest.folder import FolderSource, ImageFileSource
from rmskit.ingest.manifest import ManifestSource, header_columns
from rmskit.ingest.rows import PATH_KEYS
from rmskit.ingest.shards import ShardsSource, is_shard_pattern, is_tar, require_webdataset
from rmskit.ingest.tables import HFDiskSource, HFHubSource, ParquetSource, is_parquet_folder
from rmskit.records import Annotation, ImageRecord, Rejection
from rmskit.textsafe import safe_text

log = logging.getLogger(__name__)

__all__ = ["Source", "iter_sources", "resolve_source", "source_exists", "split_spec"]


@dataclass
class RefusedSource:
    """A source that exists but whose content is refused as a whole: one Rejection, the run goes on."""

    kind: ClassVar[str] = "refused"
    spec: str
    path: Path
    reason: str

    def count(self) -> int:
        return 0

    def items(self, cfg: IngestConfig) -> Iterator[Item]:
        yield Item(str(self.path.parent), self.path.name, refused=self.reason)


# ----------------------------------------------------------------------------------------------
# sniffing: one function per kind, tried in order


def _sniff_parquet_file(spec: str, path: Path, head: bytes, root: Path | None) -> Source | None:
    return ParquetSource(spec, path) if head.startswith(b"PAR1") else None


def _sniff_tar(spec: str, path: Path, head: bytes, root: Path | None) -> Source | None:
    if not is_tar(head):
        return None
    require_webdataset(spec)
    return ShardsSource(spec, [path], path.parent)


def _sniff_image(spec: str, path: Path, head: bytes, root: Path | None) -> Source | None:
    return ImageFileSource.sniff(spec, path, head)


def _manifest(spec: str, path: Path, fmt: Any, root: Path | None, **kw: Any) -> ManifestSource:
    return ManifestSource(spec, path, fmt, root or path.parent, root or path.parent, **kw)


def _sniff_json(spec: str, path: Path, head: bytes, root: Path | None) -> Source | None:
    text = head.decode("utf-8", "ignore").lstrip("\ufeff \t\r\n")
    if text.startswith("["):
        try:
            doc = load_json_file(path)
        except JSONTooDeep as exc:
            return RefusedSource(spec, path, f"not ingested: {exc}")
        if not isinstance(doc, list):
            raise ValueError(f"source {path}: not a JSON array of records")
        return _manifest(spec, path, "json", root, doc=doc)
    if not text.startswith("{"):
        return None
    try:  # the first line alone: a JSONL manifest, or a one-line COCO file
        obj = loads_json(text.split("\n", 1)[0].strip())
    except ValueError:
        obj = None
    if isinstance(obj, dict):
        return (
            _coco(spec, path, obj, root)
            if isinstance(obj.get("images"), list)
            else _manifest(spec, path, "jsonl", root)
        )
    try:
        doc = load_json_file(path)
    except JSONTooDeep:  # each line is then read on its own, and the deep one refused with a reason
        return _manifest(spec, path, "jsonl", root)
    except ValueError:
        with open(path, encoding="utf-8-sig", errors="replace") as fh:  # a JSONL line longer than the head
            line = fh.readline()
        try:
            if isinstance(loads_json(line), dict):
                return _manifest(spec, path, "jsonl", root)
        except JSONTooDeep:
            return _manifest(spec, path, "jsonl", root)
        except ValueError:
            pass
        raise
    if isinstance(doc, dict) and isinstance(doc.get("images"), list):
        return _coco(spec, path, doc, root)
    if isinstance(doc, dict) and any(k in {str(x).lower() for x in doc} for k in PATH_KEYS):
        return _manifest(spec, path, "jsonl", root)  # one record, longer than the sniffed head
    raise ValueError(f"source {path}: a JSON object without an 'images' list (not COCO, not JSONL)")


def _coco(spec: str, path: Path, doc: dict[str, Any], root: Path | None) -> Source:
    try:
        return CocoSource.from_doc(spec, path, doc, root)
    except RecursionError:
        return RefusedSource(spec, path, "not ingested: COCO values nested too deeply")


def _sniff_csv(spec: str, path: Path, head: bytes, root: Path | None) -> Source | None:
    text = head.decode("utf-8", "ignore").lstrip("\ufeff \t\r\n")
    first_line = text.split("\n", 1)[0]
    if not (looks_like_text(head) and first_line.strip()):
        return None
    cols, delim = header_columns(first_line)
    if any(k in cols for k in PATH_KEYS):
        return _manifest(spec, path, "csv", root, delimiter=delim)
    raise ValueError(
        f"source {path}: looks like a text/CSV file but its header has no path column "
        f"(one of: {', '.join(PATH_KEYS)}); header was {safe_text(first_line[:200])!r}"
    )


FileSniffer = Callable[[str, Path, bytes, "Path | None"], "Source | None"]
FILE_SNIFFERS: list[FileSniffer] = [_sniff_parquet_file, _sniff_tar, _sniff_image, _sniff_json, _sniff_csv]


def _sniff_hf_disk(spec: str, path: Path) -> Source | None:
    return HFDiskSource(spec, path) if HFDiskSource.is_dataset_dir(path) else None


def _sniff_parquet_dir(spec: str, path: Path) -> Source | None:
    return ParquetSource(spec, path) if is_parquet_folder(path) else None


DIR_SNIFFERS: list[Callable[[str, Path], Source | None]] = [
    _sniff_hf_disk,
    _sniff_parquet_dir,
    lambda spec, path: FolderSource(spec, path),
]


def _hf_hub(spec: str) -> Source:
    repo, _, split = spec[len("hf://") :].partition(":")
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", repo):
        raise ValueError(f"source {spec}: expected hf://ORG/NAME[:SPLIT]")
    return HFHubSource(spec, repo, split or None)


SCHEMES: dict[str, Callable[[str], Source]] = {"hf://": _hf_hub}


# ----------------------------------------------------------------------------------------------
# resolving a source argument


def split_spec(spec: str) -> tuple[str, Path | None]:
    """`manifest.jsonl::IMAGE_DIR` -> (manifest.jsonl, IMAGE_DIR); a path that exists as written
    (even with '::' in its name) is never split."""
    if os.path.lexists(spec) or "::" not in spec:
        return spec, None
    target, _, root_arg = spec.rpartition("::")
    return target, Path(root_arg).expanduser()


def source_exists(spec: str) -> bool:
    """What a CLI can check before anything runs: a scheme source (hf://...), or an existing path,
    and for `FILE::IMAGE_DIR` an existing file and an existing image folder."""
    if any(spec.startswith(s) for s in SCHEMES):
        return True
    target, root = split_spec(spec)
    if not os.path.lexists(target) and is_shard_pattern(target):
        try:
            return ShardsSource.from_pattern(target) is not None
        except ValueError:
            return False
    return Path(target).expanduser().exists() and (root is None or root.is_dir())


def resolve_source(spec: str) -> Source:
    """Pick the reader for one source argument; raises ValueError when it is unusable."""
    for scheme, make in SCHEMES.items():
        if spec.startswith(scheme):
            return make(spec)
    target, root_arg = split_spec(spec)
    if root_arg is None and not os.path.lexists(target) and is_shard_pattern(target):
        return ShardsSource.from_pattern(target)
    root = root_arg.resolve() if root_arg is not None else None
    if root is not None and not root.is_dir():
        raise ValueError(f"source {spec}: image root {root_arg} is not a directory")
    path = Path(target).expanduser()
    if not path.exists():
        raise ValueError(f"source {target}: does not exist")
    path = path.resolve()
    if path.is_dir():
        if root is not None:
            raise ValueError(f"source {spec}: '::ROOT' applies to manifest and COCO files, not folders")
        for sniff_dir in DIR_SNIFFERS:
            if (src := sniff_dir(spec, path)) is not None:
                return src
    if not path.is_file():
        raise ValueError(f"source {target}: not a regular file or directory")
    try:
        head = read_head(path)
    except OSError as exc:
        raise ValueError(f"source {path}: cannot read ({exc.strerror or exc})") from None
    if not head:
        raise ValueError(f"source {path}: empty file")
    for sniff in FILE_SNIFFERS:
        if (src := sniff(spec, path, head, root)) is not None:
            if root is not None and not getattr(src, "accepts_root", False):
                raise ValueError(f"source {spec}: '::ROOT' applies to manifest and COCO files only")
            return src
    raise ValueError(f"source {path}: unknown format (not an image, manifest, COCO file, dataset or parquet)")


# ----------------------------------------------------------------------------------------------
# reading, hashing and decoding what the readers propose


def _guarded(src: Source, cfg: IngestConfig) -> Iterator[Item]:
    """A reader that fails part-way (a bug, a disk error) costs the rest of that source, reported as
    one refusal, never the run."""
    try:
        yield from src.items(cfg)
    except Exception as exc:
        log.exception("reading source %s failed", safe_text(src.spec))
        where = getattr(src, "path", None) or getattr(src, "root", None)
        root = str(where.parent if where is not None and where.is_file() else where or src.spec)
        reason = f"reading this source stopped: {type(exc).__name__}: {exc}"
        yield Item(root, ".", refused=reason)


def _generate(
    resolved: list[Source], cfg: IngestConfig, cache_dir: Path
) -> Iterator[ImageRecord | Rejection]:
    seen: dict[str, tuple[str, str]] = {}  # sha256 -> (source_root, source_path) of the first copy
    for src in resolved:
        for item in _guarded(src, cfg):
            yield _process(item, cfg, cache_dir, seen)


def _refuse(item: Item, reason: str) -> Rejection:
    # Reasons are shown to people and may quote untrusted names or parser messages: escape them.
    return Rejection(source_root=item.root, path=item.rel, reason=safe_text(reason, max_len=2000))


def _process(
    item: Item, cfg: IngestConfig, cache_dir: Path, seen: dict[str, tuple[str, str]]
) -> ImageRecord | Rejection:
    if item.refused is not None:
        return _refuse(item, item.refused)
    try:
        if item.data is not None:
            data, name = item.data, None
        else:
            assert item.file is not None
            data, name = read_file_capped(item.file, cfg), item.file.name
        sha = sha256_hex(data)
        if sha in seen:  # before decoding: an identical copy costs one read and one hash
            first_root, first_path = seen[sha]
            where = first_path if first_root == item.root else f"{first_path} in {first_root}"
            return _refuse(item, f"duplicate of {where} (identical bytes)")
        dec = decode_bytes(data, cfg, cache_dir, sha256=sha, name=name)
    except ImageRefused as exc:
        return _refuse(item, exc.reason)
    except Exception as exc:  # never let one item end the run
        log.exception("unexpected error ingesting %s", safe_text(item.rel))
        return _refuse(item, f"internal error: {type(exc).__name__}: {exc}")
    seen[sha] = (item.root, item.rel)
    return ImageRecord(
        sha256=dec.sha256,
        phash=dec.phash,
        source_root=item.root,
        source_path=item.rel,
        path=dec.path,
        width=dec.width,
        height=dec.height,
        orig_format=dec.orig_format,
        orig_mode=dec.orig_mode,
        annotation=item.annotation or Annotation(),
    )


def iter_sources(sources: list[str], cfg: IngestConfig, cache_dir: Path) -> Iterator[ImageRecord | Rejection]:
    """Stream accepted images and refusals from every source, in order. Raises ValueError at call
    time (before anything is read) when a source argument is unusable; never raises for a bad item."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [str(sources)]
    resolved = [resolve_source(str(s)) for s in sources]
    for src in resolved:
        opener = getattr(src, "open", None)
        if callable(opener):  # datasets are opened now, so an unusable one fails before any work
            opener()
    return _generate(merge_coco(resolved), cfg, Path(cache_dir))
