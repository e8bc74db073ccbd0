"""HF `datasets` parquet layout: data/<split>-NNNNN-of-MMMMM.parquet with an Image feature.

Written with pyarrow in small row groups, streaming image bytes, so memory stays flat for tens of
thousands of photos; the schema carries the `datasets` features metadata, so
`load_dataset("parquet", ...)` decodes the image column to PIL images. Nested contract fields
(checks, models, prompt_versions, scenario, edited) are JSON strings: their keys vary per sample."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rmskit.export.prepare import HeldSample, Prepared
from rmskit.records import Sample

SPLITS = ("train", "test")
ROW_GROUP = 100  # rows per row group, as the Hub's own image datasets use
SHARD_BYTES = 500_000_000  # start a new shard past this many image bytes
JSON_FIELDS = ("checks", "models", "prompt_versions", "scenario", "edited")
# Dictionary-encoded columns: the ones whose values repeat across samples. pyarrow's default tries every
# column, hashing each photo's bytes and each distinct text to learn they do not repeat (331 rows, 8 MB:
# 20.3 -> 16.8 ms per write).
DICTIONARY = ("kind", "label", "category", "license", "source_url", "rounds", "models", "prompt_versions")
TEXT_FIELDS = (
    "id",
    "image_sha256",
    "source_path",
    "query",
    "response",
    "label",
    "kind",
    "category",
    "license",
    "source_url",
)


def features() -> Any:
    from datasets import Features, Image, Value

    cols: dict[str, Any] = {"id": Value("string"), "image": Image()}
    cols.update({k: Value("string") for k in TEXT_FIELDS if k != "id"})
    cols["rounds"] = Value("int32")
    cols.update({k: Value("string") for k in JSON_FIELDS})
    return Features(cols)


def arrow_schema() -> Any:
    """`features().arrow_schema`, built with pyarrow alone: the same columns and the same `huggingface`
    metadata (tests compare them), without importing `datasets` and pandas (~120 MB) into a build."""
    import pyarrow as pa

    def value(dtype: str) -> dict[str, str]:
        return {"dtype": dtype, "_type": "Value"}

    types: dict[str, Any] = {
        "id": pa.string(),
        "image": pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    }
    feats: dict[str, Any] = {"id": value("string"), "image": {"_type": "Image"}}
    for k in TEXT_FIELDS[1:]:
        types[k], feats[k] = pa.string(), value("string")
    types["rounds"], feats["rounds"] = pa.int32(), value("int32")
    for k in JSON_FIELDS:
        types[k], feats[k] = pa.string(), value("string")
    meta = {"huggingface": json.dumps({"info": {"features": feats}})}
    return pa.schema(list(types.items()), metadata=meta)


def base_row(sample: Sample) -> dict[str, Any]:
    """A sample's row but its image (which the split and the image's name do not change)."""
    row: dict[str, Any] = {k: getattr(sample, k) for k in TEXT_FIELDS}
    row["rounds"] = sample.rounds
    for k in JSON_FIELDS:
        val = getattr(sample, k)
        row[k] = None if val is None else json.dumps(val, ensure_ascii=False, sort_keys=True)
    return row


def _column(values: list[Any], typ: Any) -> Any:
    """One Arrow column built from its buffers. `pa.array` (and `Table.from_pylist`) import pandas the
    first time they run, only to ask whether the values are a pandas object: ~0.35 s of CPU and ~35 MB
    in a build's finish, for nothing. Types other than the export's (string, binary, int32, struct of
    those) and columns past 32-bit offsets go through `pa.array` as before."""
    import numpy as np
    import pyarrow as pa

    n = len(values)
    if pa.types.is_struct(typ) and all(isinstance(v, dict) for v in values):
        kids = [_column([v.get(f.name) for v in values], f.type) for f in typ]
        return pa.StructArray.from_arrays(kids, fields=list(typ))
    if pa.types.is_int32(typ) and all(isinstance(v, int) for v in values):
        return pa.Array.from_buffers(
            typ, n, [None, pa.py_buffer(np.asarray(values, dtype=np.int32).tobytes())]
        )
    kind = str if pa.types.is_string(typ) else bytes if pa.types.is_binary(typ) else None
    # str only for strings: bytes there would skip pyarrow's UTF-8 check
    if kind is not None and all(v is None or isinstance(v, kind) for v in values):
        data = [v.encode("utf-8") if isinstance(v, str) else v for v in values]
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum([0 if d is None else len(d) for d in data], out=offsets[1:])
        if offsets[-1] < 2**31:
            valid = np.array([d is not None for d in data])
            mask = None if valid.all() else pa.py_buffer(np.packbits(valid, bitorder="little").tobytes())
            body = pa.py_buffer(b"".join(d for d in data if d))
            return pa.Array.from_buffers(
                typ, n, [mask, pa.py_buffer(offsets.astype(np.int32).tobytes()), body]
            )
    return pa.array(values, type=typ)


def arrow_table(rows: list[dict[str, Any]], schema: Any, image: Any = None) -> Any:
    """`pa.Table.from_pylist(rows, schema=schema)`, column by column from buffers (see `_column`);
    `image`: the image column made already (`_Images.column`), the rows' own "image" then unread."""
    import pyarrow as pa

    cols = [
        image if image is not None and f.name == "image" else _column([r.get(f.name) for r in rows], f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(cols, schema=schema)


def _read_into(fd: int, view: memoryview) -> int:
    if hasattr(os, "readv"):
        return os.readv(fd, [view])
    with open(fd, "rb", buffering=0, closefd=False) as fh:  # no readv (Windows)
        return fh.readinto(view) or 0


class _Images:
    """The image bytes of one row group, read from their files straight into one buffer that is kept
    for the next group: no bytes object per image, no join into a second copy (the image column was
    5.8 of the 9.4 ms the export's Arrow tables took for 384 rows of ~20 KB photos). The buffer is a
    numpy array: unlike a bytearray it is not zero-filled when made or grown."""

    def __init__(self) -> None:
        import numpy as np

        self._np = np
        self._buf = np.empty(0, dtype=np.uint8)
        self._ends: list[int] = [0]
        self._names: list[str] = []

    def add(self, fd: int, size: int, name: str) -> int:
        """Append `size` bytes (its fstat's) of the open file `fd`; returns how many were read (fewer only
        when it shrank since)."""
        start = at = self._ends[-1]
        if start + size > len(self._buf):
            # grown (rare): the used part copied into a new, larger one
            new = self._np.empty(max(2 * len(self._buf), start + size, 1 << 21), dtype=self._np.uint8)
            new[:start] = self._buf[:start]
            self._buf = new
        view = self._buf.data  # a memoryview
        while at < start + size and (got := _read_into(fd, view[at : start + size])):
            at += got
        self._ends.append(at)
        self._names.append(name)
        return at - start

    def column(self, typ: Any) -> Any:
        """The group's `image` struct column (bytes, path), its bytes a view of the buffer: written
        before the buffer is reused (`clear`)."""
        import pyarrow as pa

        np = self._np
        n = len(self._names)
        ends = np.asarray(self._ends, dtype=np.int64)
        body = self._buf[: int(ends[-1])]
        kids = []
        for f in typ:
            if f.name == "bytes" and ends[-1] < 2**31:
                offsets = pa.py_buffer(ends.astype(np.int32).tobytes())
                kids.append(pa.Array.from_buffers(f.type, n, [None, offsets, pa.py_buffer(body.data)]))
            elif f.name == "bytes":
                kids.append(
                    _column([body[a:b].tobytes() for a, b in zip(ends[:-1], ends[1:], strict=True)], f.type)
                )
            else:
                kids.append(_column(list(self._names) if f.name == "path" else [None] * n, f.type))
        return pa.StructArray.from_arrays(kids, fields=list(typ))

    def clear(self) -> None:
        self._ends = [0]
        self._names = []


def compression(schema: Any) -> dict[str, str]:
    """zstd for every column but the image bytes: JPEG/PNG data is compressed already (zstd saved 1% on
    200 distinct photos, at ~40% of the writer's time), so it is stored as is."""
    cols: dict[str, str] = {}
    for f in schema:
        if f.name == "image":
            cols.update({f"image.{sub.name}": "none" if sub.name == "bytes" else "zstd" for sub in f.type})
        else:
            cols[f.name] = "zstd"
    return cols


class _SplitWriter:
    """Shards of one split: row groups of ROW_GROUP rows, a new shard past SHARD_BYTES of images. A group's
    image files are read when it is written. `keep_buffer=False` lets their buffer go after each group:
    a dataset written during a run (export/online.py) would hold a group's worth of photos per split
    between its writes (2-4 MB each, bench/peers job (b))."""

    def __init__(self, data_dir: Path, split: str, schema: Any, keep_buffer: bool = True) -> None:
        import pyarrow.parquet as pq

        self._pq = pq
        self.data_dir, self.split, self.schema = data_dir, split, schema
        self.keep_buffer = keep_buffer
        self.shards: list[Path] = []
        self.batch: list[dict[str, Any]] = []
        self.files: list[tuple[str, int, str]] = []  # the batch's images: (file, size, dataset name)
        self.images = _Images()
        self.shard_bytes = 0
        self.writer = self._open()

    def _open(self) -> Any:
        path = self.data_dir / f".{self.split}-{len(self.shards):05d}.partial"
        self.shards.append(path)
        self.shard_bytes = 0
        codecs: Any = compression(self.schema)  # pyarrow takes a per-column dict; its stubs say str
        dictionary: Any = list(DICTIONARY)  # a list of columns, which pyarrow takes; its stubs say bool
        return self._pq.ParquetWriter(path, self.schema, compression=codecs, use_dictionary=dictionary)

    def _flush(self) -> None:
        if self.batch:
            for path, size, name in self.files:
                fd = os.open(path, os.O_RDONLY)  # a str, not a Path: ~5 ms per 400
                try:
                    self.images.add(fd, size, name)
                finally:
                    os.close(fd)
            image = self.images.column(self.schema.field("image").type)
            self.writer.write_table(arrow_table(self.batch, self.schema, image))
            del image  # the buffer's view, before the buffer is reused
        self.batch = []
        self.files = []
        self.images.clear()
        if not self.keep_buffer:
            self.images = _Images()

    def add(self, row: dict[str, Any], image: str, name: str) -> None:
        """`row` but its image, the file `image` (read when its group is written), named `name` in the
        dataset."""
        size = os.stat(image).st_size
        if self.shard_bytes and self.shard_bytes + size > SHARD_BYTES:
            self._flush()
            self.writer.close()
            self.writer = self._open()
        self.batch.append(row)
        self.files.append((image, size, name))
        self.shard_bytes += size
        if len(self.batch) >= ROW_GROUP:
            self._flush()

    def names(self) -> list[str]:
        """The shards' final `<split>-NNNNN-of-MMMMM.parquet` names (fixed once the last row is added)."""
        return [f"{self.split}-{i:05d}-of-{len(self.shards):05d}.parquet" for i in range(len(self.shards))]

    def close(self) -> list[str]:
        """Finish and give the shards their final names."""
        self._flush()
        self.writer.close()
        names = self.names()
        for path, name in zip(self.shards, names, strict=True):
            path.rename(self.data_dir / name)
        return names


class ParquetSink:
    """The splits' shards, fed the kept samples one at a time in any split order (one pass over the
    ledger can feed the JSONL and the card's digest as well). A split that gets no sample gets no file:
    `datasets` refuses to load a split with no rows, so it must not appear in the card's configs either."""

    def __init__(self, prep: Prepared, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.prep, self.data_dir, self.schema = prep, data_dir, arrow_schema()
        self.writers: dict[str, _SplitWriter] = {}

    def add(self, sample: Sample | HeldSample) -> None:
        if sample.split not in SPLITS:
            return
        out = self.writers.get(sample.split)
        if out is None:
            out = self.writers[sample.split] = _SplitWriter(self.data_dir, sample.split, self.schema)
        if isinstance(sample, HeldSample):
            row = sample.row
        else:
            row = self.prep.samples.memo_rows.pop(sample.id, None) or base_row(sample)
        sha = sample.image_sha256
        out.add(row, self.prep.image_files[sha], self.prep.image_name(sha))

    def close(self) -> dict[str, list[str]]:
        """Split -> file names, in SPLITS order."""
        return {split: self.writers[split].close() for split in SPLITS if split in self.writers}
