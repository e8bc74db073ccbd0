"""Property-based tests for every ingest parser of untrusted input: JSONL / JSON / CSV manifests,
COCO files, parquet files and dataset rows. Whatever the content, ingest yields only records and
refusals with a reason (or, at call time, a clear `ValueError` naming the source); it never raises
anything else, never accepts a file outside its root, and never shows raw control characters."""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
from pathlib import Path

import pytest
from fuzzing import deep_json, json_values
from hypothesis import example, given
from hypothesis import strategies as st
from PIL import Image
from skimage import data as skdata

from rmskit.config import IngestConfig
from rmskit.ingest.sources import _process, iter_sources
from rmskit.ingest.tables import row_item
from rmskit.records import ImageRecord, Rejection
from rmskit.textsafe import safe_text

CFG = IngestConfig()
_n = itertools.count()


def _jpeg(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).resize((96, 72)).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """base/root: a real photo, a subfolder, a non-image, symlinks out of the root and dangling;
    base/outside.jpg is a real photo that must never be accepted."""
    base = tmp_path_factory.mktemp("fuzz")
    root = base / "root"
    (root / "sub").mkdir(parents=True)
    (root / "ok.jpg").write_bytes(_jpeg(skdata.chelsea()))
    (root / "sub" / "ok2.jpg").write_bytes(_jpeg(skdata.coffee()))
    (root / "notimg.jpg").write_text("just text")
    (base / "outside.jpg").write_bytes(_jpeg(skdata.astronaut()))
    os.symlink(base / "outside.jpg", root / "link_out.jpg")
    os.symlink(root / "missing.jpg", root / "dangling.jpg")
    return root


NAMES = [
    "ok.jpg", "sub/ok2.jpg", "./ok.jpg", "sub/../ok.jpg", "../outside.jpg", "sub/../../outside.jpg",
    "/etc/passwd", "http://example.com/a.jpg", "file:///etc/passwd", "ok.jpg\x00.png", "\x1b]0;x\x07.jpg",
    "a" * 5000, "", " ", ".", "..", "sub", "link_out.jpg", "dangling.jpg", "notimg.jpg", "ok.jpg\n",
    "\udcff.jpg", "sub/" * 300 + "x.jpg",
]  # fmt: skip
paths = st.sampled_from(NAMES) | st.text(max_size=30)
records = st.fixed_dictionaries(
    {},
    optional={
        "path": paths | json_values,
        "file_name": paths,
        "caption": json_values,
        "captions": json_values,
        "objects": json_values,
        "license": json_values,
        "url": json_values,
        "author": json_values,
    },
)


def check(items, root: Path) -> None:
    """The properties every ingest result must have."""
    base = root.parent.resolve()
    for it in items:
        assert isinstance(it, (ImageRecord, Rejection)), type(it)
        if isinstance(it, Rejection):
            assert it.reason.strip() and safe_text(it.reason) == it.reason
            continue
        real = (Path(it.source_root) / it.source_path).resolve()
        assert real.is_relative_to(root.resolve()), (it.source_root, it.source_path)
        assert real != (base / "outside.jpg") and Path(it.path).is_file()


def ingest(spec: str, root: Path) -> None:
    try:
        items = iter_sources([spec], CFG, root.parent / "cache")
    except ValueError as exc:  # a clear, call-time error naming the source
        assert str(exc).startswith("source ") and "Traceback" not in str(exc)
        return
    check(list(items), root)


def _write(root: Path, suffix: str, data: bytes) -> Path:
    p = root / f"m{next(_n)}{suffix}"
    p.write_bytes(data)
    return p


@given(
    lines=st.lists(
        records.map(json.dumps)
        | json_values.map(json.dumps)
        | deep_json
        | st.text(max_size=40)
        | st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
        min_size=1,
        max_size=6,
    ),
    crlf=st.booleans(),
)
@example(lines=['{"path": "ok.jpg"}', '{"a":' * 50_000 + "1" + "}" * 50_000], crlf=False)
@example(lines=["path\rx", "ok.jpg"], crlf=False)  # found by `make fuzz`: csv.Error escaped the sniffer
def test_fuzz_jsonl_manifest(tree, lines, crlf):
    sep = "\r\n" if crlf else "\n"
    p = _write(tree, ".jsonl", sep.join(lines).encode("utf-8", "surrogateescape"))
    ingest(str(p), tree)
    ingest(f"{p}::{tree / 'sub'}", tree)


@given(doc=st.lists(records | json_values, max_size=6) | deep_json.map(lambda s: s))
def test_fuzz_json_array_manifest(tree, doc):
    text = doc if isinstance(doc, str) else json.dumps(doc)
    ingest(str(_write(tree, ".json", text.encode())), tree)


@given(
    header=st.lists(
        st.sampled_from(["path", "image", "file_name", "caption", "x", "", '"q"']), min_size=1, max_size=4
    ),
    rows=st.lists(st.lists(paths | st.text(max_size=20), max_size=5), max_size=6),
    delim=st.sampled_from([",", "\t", ";", "|"]),
    quoted=st.booleans(),
)
@example(
    header=["path"], rows=[["x" * 200_000], ["ok.jpg"]], delim=",", quoted=False
)  # over csv's field limit
@example(header=["path", "caption"], rows=[["ok.jpg", '"unclosed']], delim=",", quoted=False)
def test_fuzz_csv_manifest(tree, header, rows, delim, quoted):
    buf = io.StringIO(newline="")
    if quoted:
        csv.writer(buf, delimiter=delim).writerows([header, *rows])
    else:
        buf.write("\n".join(delim.join(r) for r in [header, *rows]))
    data = buf.getvalue().encode("utf-8", "surrogateescape")
    ingest(str(_write(tree, ".csv", data)), tree)


coco_images = st.lists(
    st.fixed_dictionaries(
        {"file_name": paths | json_values},
        optional={
            "id": json_values,
            "license": json_values,
            "flickr_url": json_values,
            "author": json_values,
        },
    )
    | json_values,
    max_size=6,
)
coco_anns = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "image_id": st.integers(0, 5) | json_values,
            "caption": json_values,
            "category_id": json_values,
        },
    )
    | json_values,
    max_size=6,
)


@given(
    images=coco_images,
    anns=coco_anns | json_values,
    cats=st.lists(st.fixed_dictionaries({"id": json_values, "name": json_values}) | json_values, max_size=3)
    | json_values,
    lics=st.lists(st.fixed_dictionaries({"id": json_values, "name": json_values}) | json_values, max_size=3)
    | json_values,
    one_line=st.booleans(),
)
@example(
    images=[{"id": 1, "file_name": "ok.jpg"}, {"id": 2, "file_name": "../outside.jpg"}],
    anns=[{"image_id": 1, "caption": "c"}],
    cats=[],
    lics=[],
    one_line=False,
)
def test_fuzz_coco(tree, images, anns, cats, lics, one_line):
    doc = {"images": images, "annotations": anns, "categories": cats, "licenses": lics}
    text = json.dumps(doc, indent=None if one_line else 1)
    ingest(str(_write(tree, ".json", text.encode())), tree)


image_values = (
    st.sampled_from(["real", "truncated", "outside"]).map(lambda k: k)
    | st.binary(max_size=64)
    | paths
    | json_values
    | st.fixed_dictionaries(
        {}, optional={"bytes": st.binary(max_size=32) | json_values, "path": paths | json_values}
    )
)


@given(value=image_values, extra=st.dictionaries(st.text(max_size=10), json_values, max_size=4))
@example(value={"bytes": [None]}, extra={})  # found by `make fuzz`: bytes([None]) raised TypeError
def test_fuzz_dataset_rows(tree, value, extra):
    """A parquet / save_to_disk / hub row: the image column may hold anything."""
    real = (tree / "ok.jpg").read_bytes()
    value = (
        {"real": real, "truncated": real[:300], "outside": str(tree.parent / "outside.jpg")}.get(value, value)
        if isinstance(value, str)
        else value
    )
    item = row_item({**extra, "image": value}, "image", str(tree), "rows#0", tree, CFG)
    check([_process(item, CFG, tree.parent / "cache", {})], tree)


@given(
    kinds=st.lists(st.sampled_from(["real", "truncated", "random", "none"]), min_size=1, max_size=4),
    captions=st.lists(st.text(max_size=20) | st.none(), min_size=4, max_size=4),
    corrupt=st.sampled_from(["", "tail", "magic"]),
)
def test_fuzz_parquet_file(tree, kinds, captions, corrupt):
    import pyarrow as pa
    import pyarrow.parquet as pq

    real = (tree / "ok.jpg").read_bytes()
    blobs = {"real": real, "truncated": real[:500], "random": os.urandom(64), "none": None}
    table = pa.table({"image": [blobs[k] for k in kinds], "caption": captions[: len(kinds)]})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    data = buf.getvalue()
    if corrupt == "tail":
        data = data[: len(data) // 2] + data[-8:]
    elif corrupt == "magic":
        data = b"PAR1" + os.urandom(40) + b"PAR1"
    ingest(str(_write(tree, ".parquet", data)), tree)
