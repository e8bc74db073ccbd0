"""HF `datasets` parquet layout: data/<split>-NNNNN-of-MMMMM.parquet with an Image feature.

Written with pyarrow in small row groups, streaming image bytes, so memory stays flat for tens of
thousands of photos; the schema carries the `datasets` features metadata, so
`load_dataset("parquet", ...)` decodes the image column to PIL images. Nested contract fields
(checks, models, prompt_versions, scenario, edited) are JSON strings: their keys vary per sample."""

from __future__ import annotations

import json
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


def _row(
    sample: Sample, image_bytes: bytes, image_name: str, base: dict[str, Any] | None = None
) -> dict[str, Any]:
    """`base`: the sample's `base_row`, made ahead (export/memo.py) and the caller's to complete."""
    row = base if base is not None else base_row(sample)
    row["image"] = {"bytes": image_bytes, "path": image_name}
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


def arrow_table(rows: list[dict[str, Any]], schema: Any) -> Any:
    """`pa.Table.from_pylist(rows, schema=schema)`, column by column from buffers (see `_column`)."""
    import pyarrow as pa

    return pa.Table.from_arrays(
        [_column([r.get(f.name) for r in rows], f.type) for f in schema], schema=schema
    )


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


def warm(image_bytes: int = 2_000_000) -> None:
    """One write of a row group like the export's (its schema, codecs, dictionary columns, ~2 MB of image
    bytes) into memory. The finish worker calls it while the run goes on: the first export in a process
    took ~25 ms more CPU than the next (median of 5 fresh processes, 99 vs 74 ms, a 384-sample run)."""
    import io

    import pyarrow.parquet as pq

    schema = arrow_schema()
    rows = [{"id": "warm", "image": {"bytes": b"\0" * image_bytes, "path": "warm.jpg"}, "rounds": 1}]
    codecs: Any = compression(schema)
    dictionary: Any = list(DICTIONARY)
    with pq.ParquetWriter(io.BytesIO(), schema, compression=codecs, use_dictionary=dictionary) as writer:
        writer.write_table(arrow_table(rows, schema))


class _SplitWriter:
    """Shards of one split: row groups of ROW_GROUP rows, a new shard past SHARD_BYTES of images."""

    def __init__(self, data_dir: Path, split: str, schema: Any) -> None:
        import pyarrow.parquet as pq

        self._pq = pq
        self.data_dir, self.split, self.schema = data_dir, split, schema
        self.shards: list[Path] = []
        self.batch: list[dict[str, Any]] = []
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
            self.writer.write_table(arrow_table(self.batch, self.schema))
        self.batch = []

    def add(self, row: dict[str, Any], nbytes: int) -> None:
        if self.shard_bytes and self.shard_bytes + nbytes > SHARD_BYTES:
            self._flush()
            self.writer.close()
            self.writer = self._open()
        self.batch.append(row)
        self.shard_bytes += nbytes
        if len(self.batch) >= ROW_GROUP:
            self._flush()

    def close(self) -> list[str]:
        """Finish and give the shards their final `<split>-NNNNN-of-MMMMM.parquet` names."""
        self._flush()
        self.writer.close()
        names = []
        for i, path in enumerate(self.shards):
            final = self.data_dir / f"{self.split}-{i:05d}-of-{len(self.shards):05d}.parquet"
            path.rename(final)
            names.append(final.name)
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
        with open(self.prep.image_files[sample.image_sha256], "rb") as fh:  # not a Path: ~5 ms per 400
            data = fh.read()
        name = self.prep.image_name(sample.image_sha256)
        if isinstance(sample, HeldSample):
            row = sample.row
            row["image"] = {"bytes": data, "path": name}
        else:
            row = _row(sample, data, name, self.prep.samples.memo_rows.pop(sample.id, None))
        out.add(row, len(data))

    def close(self) -> dict[str, list[str]]:
        """Split -> file names, in SPLITS order."""
        return {split: self.writers[split].close() for split in SPLITS if split in self.writers}
