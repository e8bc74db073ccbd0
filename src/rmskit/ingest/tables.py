"""Tabular sources: parquet files and folders of parquet shards (read in small batches, one shard at a
time), HF `save_to_disk` datasets and hub datasets (`hf://ORG/NAME[:SPLIT]`, streamed). A row carries
image bytes, a `{bytes, path}` struct, a decoded image or a path; the other columns become the
annotation. A corrupt shard or row is one refusal, never the end of the run."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image

from rmskit.config import IngestConfig
from rmskit.ingest.base import Item, read_head, resolve_listed_path, walk_files
from rmskit.ingest.rows import PATH_KEYS, row_annotation

IMAGE_COLUMN_NAMES = ("image", "img", "picture", "photo", "image_bytes", "jpg", "png")
_META_SUFFIXES = (".md", ".json", ".txt", ".gitattributes")


def image_column_by_name(columns: list[str]) -> str | None:
    lower = {str(c).lower(): c for c in columns}
    for cand in (*IMAGE_COLUMN_NAMES, *PATH_KEYS):
        if cand in lower:
            return lower[cand]
    return None


def _image_column_from_features(features: Any) -> str | None:
    import datasets

    for name, feat in features.items():
        if isinstance(feat, datasets.Image):
            return name
    return image_column_by_name(list(features))


def row_item(
    row: dict[str, Any], col: str, root_s: str, rel: str, root: Path | None, cfg: IngestConfig
) -> Item:
    """One table row -> an Item; never raises: a row of unexpected shape is one refusal."""
    try:
        return _row_item(row, col, root_s, rel, root, cfg)
    except Exception as exc:  # any type can sit in any column of a custom dataset
        return Item(root_s, rel, refused=f"unusable row: {type(exc).__name__}: {exc}")


def _row_item(
    row: dict[str, Any], col: str, root_s: str, rel: str, root: Path | None, cfg: IngestConfig
) -> Item:
    value = row.get(col)
    try:
        ann = row_annotation({k: v for k, v in row.items() if k != col})
    except (RecursionError, ValueError, TypeError):
        return Item(root_s, rel, refused="unusable annotation columns in this row")
    if isinstance(value, dict):
        data = value.get("bytes")
        if isinstance(data, (bytes, bytearray, memoryview)) and data:
            return Item(root_s, rel, data=bytes(data), annotation=ann)
        if data not in (None, b"", ""):
            return Item(
                root_s, rel, refused=f"image bytes are a {type(data).__name__}, not bytes", annotation=ann
            )
        value = value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return Item(root_s, rel, data=bytes(value), annotation=ann)
    if isinstance(value, Image.Image):
        buf = io.BytesIO()
        value.save(buf, format="PNG")  # an already decoded image (custom datasets): re-encode losslessly
        return Item(root_s, rel, data=buf.getvalue(), annotation=ann)
    if isinstance(value, str) and value:
        if root is None:  # hub datasets: paths point into the datasets cache
            p = Path(value)
            if p.is_file():
                return Item(root_s, rel, file=p, annotation=ann)
            return Item(root_s, rel, refused=f"image path {value!r} not found", annotation=ann)
        real, _, reason = resolve_listed_path(value, root, root, cfg)
        return Item(root_s, rel, file=real, refused=reason, annotation=ann)
    return Item(root_s, rel, refused=f"no image in column {col!r}", annotation=ann)


def _undecoded(ds: Any, col: str) -> Any:
    """Ask `datasets` for the raw {bytes, path} instead of decoded PIL images: our decoder applies the
    safety checks, and decoding twice would waste time."""
    import datasets

    if isinstance(ds.features.get(col) if ds.features else None, datasets.Image):
        return ds.cast_column(col, datasets.Image(decode=False))
    return ds


def _is_parquet(path: Path) -> bool:
    try:
        return read_head(path, 4) == b"PAR1"
    except OSError:
        return False


def is_parquet_folder(root: Path) -> bool:
    """The first data file (not hidden, not metadata) decides: parquet, or a folder of images."""
    for path, rel, _ in walk_files(root):
        if path is None or rel.rsplit("/", 1)[-1].lower().endswith(_META_SUFFIXES):
            continue
        return _is_parquet(path)
    return False


def parquet_image_column(schema: Any) -> str | None:
    import pyarrow as pa

    meta = schema.metadata or {}
    if b"huggingface" in meta:
        try:
            feats = json.loads(meta[b"huggingface"]).get("info", {}).get("features", {})
            for name, f in feats.items():
                if isinstance(f, dict) and f.get("_type") == "Image":
                    return name
        except (ValueError, RecursionError, AttributeError):
            pass
    for fld in schema:
        if pa.types.is_struct(fld.type) and fld.type.get_field_index("bytes") >= 0:
            return fld.name
    return image_column_by_name(schema.names)


def parquet_file_items(f: Path, rel_file: str, root: Path, cfg: IngestConfig) -> Iterator[Item]:
    """Every row of one parquet file, read 16 rows at a time (rows carry image bytes)."""
    import pyarrow.parquet as pq

    root_s = str(root)
    try:
        pf = pq.ParquetFile(f)
    except Exception as exc:  # a corrupt shard is one refusal, not the end of the run
        yield Item(root_s, rel_file, refused=f"unreadable parquet file: {exc}")
        return
    col = parquet_image_column(pf.schema_arrow)
    if col is None:
        yield Item(root_s, rel_file, refused="parquet file has no image column")
        return
    i = 0
    try:
        for batch in pf.iter_batches(batch_size=16):
            for row in batch.to_pylist():
                yield row_item(row, col, root_s, f"{rel_file}#{i}", root, cfg)
                i += 1
    except Exception as exc:
        yield Item(root_s, f"{rel_file}#{i}", refused=f"unreadable parquet data: {exc}")


@dataclass
class ParquetSource:
    """One parquet file, or a folder of parquet shards listed lazily (the first rows are read before
    the last shard is listed)."""

    kind: ClassVar[str] = "parquet"
    spec: str
    path: Path

    def count(self) -> int:
        import pyarrow.parquet as pq

        files = [self.path] if self.path.is_file() else [f for f, _, _ in walk_files(self.path) if f]
        n = 0
        for f in files:
            try:
                n += pq.ParquetFile(f).metadata.num_rows if _is_parquet(f) else 0
            except Exception:  # a corrupt shard: one refusal when ingested
                n += 1
        return n

    def items(self, cfg: IngestConfig) -> Iterator[Item]:
        if self.path.is_file():
            yield from parquet_file_items(self.path, self.path.name, self.path.parent, cfg)
            return
        for f, rel, reason in walk_files(self.path):
            if f is None:
                yield Item(str(self.path), rel, refused=reason)
            elif _is_parquet(f):
                yield from parquet_file_items(f, rel, self.path, cfg)


def _load_error(spec: str, exc: Exception) -> ValueError:
    return ValueError(f"source {spec}: cannot load dataset ({type(exc).__name__}: {exc})")


@dataclass
class HFDiskSource:
    """A `datasets.save_to_disk` folder (a Dataset or a DatasetDict); opened when resolved so an
    unusable one fails before anything is ingested."""

    kind: ClassVar[str] = "hf_disk"
    spec: str
    path: Path
    dataset: Any = None

    @staticmethod
    def is_dataset_dir(path: Path) -> bool:
        return (path / "dataset_dict.json").is_file() or (
            (path / "dataset_info.json").is_file() and (path / "state.json").is_file()
        )

    def open(self) -> None:
        import datasets

        try:
            self.dataset = datasets.load_from_disk(str(self.path))
        except Exception as exc:
            raise _load_error(self.spec, exc) from None

    def count(self) -> int:
        import datasets

        if self.dataset is None:
            self.open()
        obj: Any = self.dataset
        parts = [obj[n] for n in obj] if isinstance(obj, datasets.DatasetDict) else [obj]
        return sum(len(p) for p in parts)

    def items(self, cfg: IngestConfig) -> Iterator[Item]:
        import datasets

        obj = self.dataset
        splits = (
            [(n, obj[n]) for n in sorted(obj)] if isinstance(obj, datasets.DatasetDict) else [("data", obj)]
        )
        root_s = str(self.path)
        for split, ds in splits:
            col = _image_column_from_features(ds.features)
            if col is None:
                yield Item(root_s, f"{split}", refused=f"split {split!r} has no image column")
                continue
            for i, row in enumerate(_undecoded(ds, col)):
                yield row_item(row, col, root_s, f"{split}#{i}", self.path, cfg)


@dataclass
class HFHubSource:
    """`hf://ORG/NAME[:SPLIT]`, loaded with `streaming=True`: rows arrive as the shards download."""

    kind: ClassVar[str] = "hf_hub"
    spec: str
    repo: str
    split: str | None
    dataset: Any = None

    def open(self) -> None:
        import datasets

        try:
            self.dataset = datasets.load_dataset(self.repo, split=self.split, streaming=True)
        except Exception as exc:
            raise _load_error(self.spec, exc) from None

    def count(self) -> None:
        return None  # a stream: unknown until read

    def items(self, cfg: IngestConfig) -> Iterator[Item]:
        import datasets

        obj = self.dataset
        root_s = f"hf://{self.repo}"
        if isinstance(obj, (datasets.IterableDatasetDict, datasets.DatasetDict)):
            streams = [(name, obj[name]) for name in sorted(obj)]
        else:
            streams = [(self.split, obj)]
        for split, ds in streams:
            col = (_image_column_from_features(ds.features) if ds.features else None) or "image"
            for i, row in enumerate(_undecoded(ds, col)):
                yield row_item(row, col, root_s, f"{split}#{i}", None, cfg)
