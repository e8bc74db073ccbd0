"""`count_candidates` (the dry-run counter) on every source kind, checked against what the build
actually ingests from the same source (issue 15 §2: a counter returning 0 for manifests passed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from skimage import data as skdata

from rmskit.config import IngestConfig
from rmskit.ingest.sources import iter_sources
from rmskit.pipeline.estimate import count_candidates


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("count") / "imgs"
    d.mkdir()
    for name in ("chelsea", "coffee", "astronaut"):
        Image.fromarray(getattr(skdata, name)()).save(d / f"{name}.jpg", quality=85)
    return d


def ingested(spec: str, tmp_path: Path) -> int:
    return sum(1 for _ in iter_sources([spec], IngestConfig(), tmp_path / "cache"))


def test_jsonl_manifest_counts_its_records(images, tmp_path):
    m = images.parent / "m.jsonl"
    lines = [
        json.dumps({"path": f"imgs/{n}.jpg", "caption": "a\nb"}) for n in ("chelsea", "coffee", "astronaut")
    ]
    m.write_text("\n".join(lines) + "\n\n")  # a trailing blank line is not a record
    assert count_candidates(str(m)) == 3 == ingested(str(m), tmp_path)


def test_csv_manifest_counts_rows_not_lines(images, tmp_path):
    m = images.parent / "m.csv"
    # a quoted caption spanning two lines is one row; the header is not a row
    m.write_text(
        'path,caption\nimgs/chelsea.jpg,"a cat\non a blanket"\nimgs/coffee.jpg,coffee\nimgs/astronaut.jpg,x\n'
    )
    assert count_candidates(str(m)) == 3 == ingested(str(m), tmp_path)


def test_tsv_manifest_with_image_dir(images, tmp_path):
    m = tmp_path / "m.tsv"
    m.write_text("file_name\tcaption\nchelsea.jpg\tcat\ncoffee.jpg\tcup\n")
    spec = f"{m}::{images}"
    assert count_candidates(spec) == 2 == ingested(spec, tmp_path)


def test_coco_counts_listed_images_once(images, tmp_path):
    doc = {
        "images": [{"id": 1, "file_name": "chelsea.jpg"}, {"id": 2, "file_name": "coffee.jpg"}],
        "annotations": [
            {"image_id": 1, "caption": "a cat"},
            {"image_id": 1, "caption": "a tabby cat"},
            {"image_id": 2, "caption": "a cup"},
        ],
    }
    ann = images.parent / "captions_val.json"
    ann.write_text(json.dumps(doc))
    assert count_candidates(str(ann)) == 2 == ingested(str(ann), tmp_path)
    one_line = tmp_path / "ann.json"  # COCO on one line, sniffed from its first line
    one_line.write_text(json.dumps(doc))
    assert count_candidates(f"{one_line}::{images}") == 2


def test_json_array_folder_and_single_image(images, tmp_path):
    arr = images.parent / "list.json"
    arr.write_text(json.dumps([{"path": "imgs/chelsea.jpg"}, {"path": "imgs/coffee.jpg"}, "not an object"]))
    assert count_candidates(str(arr)) == 3 == ingested(str(arr), tmp_path)
    assert count_candidates(str(images)) == 3
    assert count_candidates(str(images / "coffee.jpg")) == 1


def test_parquet_counts_rows(images, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    shards = tmp_path / "shards"
    shards.mkdir()
    files = sorted(images.glob("*.jpg"))
    pq.write_table(pa.table({"image": [f.read_bytes() for f in files[:2]]}), shards / "a.parquet")
    pq.write_table(pa.table({"image": [files[2].read_bytes()]}), shards / "b.parquet")
    assert count_candidates(str(shards)) == 3 == ingested(str(shards), tmp_path)


def test_unusable_sources_count_zero(tmp_path):
    assert count_candidates(str(tmp_path / "missing")) == 0
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)  # refused as a whole when ingested
    assert count_candidates(str(deep)) == 0


def test_deep_jsonl_line_counts_as_one_candidate(tmp_path):
    deep = tmp_path / "deep.jsonl"  # used to raise RecursionError in the dry run
    deep.write_text('{"a":' * 50_000 + "1" + "}" * 50_000 + "\n")
    assert count_candidates(str(deep)) == 1 == ingested(str(deep), tmp_path)
