"""The Parquet writer builds its Arrow columns from buffers (export/parquet.py `arrow_table`): the same
table `pa.Table.from_pylist` gives, without the pandas import that `pa.array` triggers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from rmskit.export.parquet import JSON_FIELDS, TEXT_FIELDS, arrow_schema, arrow_table


def _rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        row: dict = {k: f"{k} {i} — naïve ünïcode ☂" if i % 3 else "" for k in TEXT_FIELDS}
        row["image"] = {"bytes": bytes([0, 255, i % 256]) * (i + 1) if i % 4 else b"", "path": f"img{i}.jpg"}
        row["rounds"] = i % 5
        for k in JSON_FIELDS:
            row[k] = None if (i + len(k)) % 2 else '{"a": [1, 2], "b": "x"}'
        rows.append(row)
    return rows


def test_arrow_table_equals_from_pylist() -> None:
    schema = arrow_schema()
    for n in (1, 7, 100):
        rows = _rows(n)
        got = arrow_table(rows, schema)
        want = pa.Table.from_pylist(rows, schema=schema)
        assert got.schema.equals(want.schema, check_metadata=True)
        assert got.equals(want)
        assert got.column("checks").null_count == want.column("checks").null_count
    assert arrow_table(_rows(7), schema).column("checks").null_count > 0  # the validity bitmap is used


def test_unexpected_values_fall_back_to_pa_array() -> None:
    """A null int, a float column: not the export's shapes, so `pa.array` builds them, as before."""
    schema = pa.schema([("n", pa.int32()), ("s", pa.string()), ("f", pa.float64())])
    rows = [{"n": None, "s": "x", "f": 1.5}, {"n": 2, "s": None, "f": None}]
    assert arrow_table(rows, schema).equals(pa.Table.from_pylist(rows, schema=schema))


def test_bytes_in_a_string_column_still_get_pyarrows_utf8_check() -> None:
    schema = pa.schema([("s", pa.string())])
    assert arrow_table([{"s": "ok"}, {"s": b"fine"}], schema).column("s").to_pylist() == ["ok", "fine"]
    with pytest.raises(pa.ArrowInvalid):
        arrow_table([{"s": b"\xff\xfe"}], schema)


def test_writing_parquet_does_not_import_pandas(tmp_path) -> None:
    code = (
        "import sys, pyarrow.parquet as pq\n"
        "from rmskit.export.parquet import arrow_schema, arrow_table\n"
        "from tests.test_export_arrow import _rows\n"
        f"pq.write_table(arrow_table(_rows(20), arrow_schema()), {str(tmp_path / 'x.parquet')!r})\n"
        "print('pandas' in sys.modules)\n"
    )
    root = Path(__file__).resolve().parents[1]  # `tests.test_export_arrow` imports from the repo root
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "False"


def test_every_column_but_the_image_bytes_is_compressed(tmp_path) -> None:
    """pyarrow leaves a column missing from a per-column codec map uncompressed: the map names them all."""
    import pyarrow.parquet as pq

    from rmskit.export.parquet import compression

    schema = arrow_schema()
    with pq.ParquetWriter(tmp_path / "x.parquet", schema, compression=compression(schema)) as w:
        w.write_table(arrow_table(_rows(20), schema))
    meta = pq.ParquetFile(tmp_path / "x.parquet").metadata.row_group(0)
    codecs = {meta.column(i).path_in_schema: meta.column(i).compression for i in range(meta.num_columns)}
    assert codecs.pop("image.bytes") == "UNCOMPRESSED"
    assert set(codecs.values()) == {"ZSTD"} and len(codecs) == len(TEXT_FIELDS) + len(JSON_FIELDS) + 2


@pytest.mark.parametrize("readv", [True, False])
def test_image_bytes_read_into_one_buffer_make_the_column_from_pylist_makes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, readv: bool
) -> None:
    """`_Images`: each row group's image files read into one reused buffer, grown past its first size
    (2 MB) within a group; empty files; a file shorter than its stated size gives what it has; the
    column equals `from_pylist`'s. A column is a view of the buffer, valid until `clear` (the writer
    writes each group before the next is read)."""
    import os

    from rmskit.export.parquet import _Images

    if not readv:  # as on Windows: a file object's readinto instead
        monkeypatch.delattr(os, "readv")
    typ = arrow_schema().field("image").type
    blobs = [os.urandom(n) for n in (0, 1, 700_000, 1_500_000, 3_000_000, 5)]
    paths = []
    for i, b in enumerate(blobs):
        p = tmp_path / f"{i}.bin"
        p.write_bytes(b)
        paths.append(p)

    def add(images: _Images, i: int, size: int | None = None) -> int:
        fd = os.open(paths[i], os.O_RDONLY)
        try:
            return images.add(fd, len(blobs[i]) if size is None else size, f"img{i}.jpg")
        finally:
            os.close(fd)

    images = _Images()
    assert [add(images, i) for i in range(3)] == [len(b) for b in blobs[:3]]
    first = images.column(typ)

    def want(idx: list[int]) -> pa.Array:
        return pa.array([{"bytes": blobs[i], "path": f"img{i}.jpg"} for i in idx], type=typ)

    assert first.equals(want([0, 1, 2]))
    del first
    images.clear()
    assert [add(images, i) for i in range(3, 6)] == [len(b) for b in blobs[3:]]  # grows: a new buffer
    assert add(images, 1, size=10) == 1  # the file holds less than was said: what it has
    assert images.column(typ).equals(want([3, 4, 5, 1]))
