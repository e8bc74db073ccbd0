"""Streaming sharded sources (issue 12 §3): WebDataset tar shards of real photos, read lazily from a
brace pattern, and parquet shards from a pattern; hostile shards are refusals."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image
from skimage import data as skdata

from rmskit.config import IngestConfig
from rmskit.ingest.sources import iter_sources, source_exists
from rmskit.records import ImageRecord, Rejection

PHOTOS = ["chelsea", "coffee", "astronaut", "rocket", "camera", "immunohistochemistry"]


def jpeg(name: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(getattr(skdata, name)()).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def write_shard(path: Path, samples: list[dict[str, object]]) -> None:
    import webdataset as wds

    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)


def photo_samples(names: list[str]) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for n in names:
        s: dict[str, object] = {"__key__": f"img_{n}", "jpg": jpeg(n)}
        if n == "coffee":
            s["txt"] = "a red cup of coffee"
        else:
            s["json"] = json.dumps({"caption": f"a photo of {n}", "license": "CC0"}).encode()
        out.append(s)
    return out


def test_webdataset_pattern_is_read_lazily(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "000.tar", photo_samples(PHOTOS[:2]))
    write_shard(shards / "001.tar", photo_samples(PHOTOS[2:4]))
    spec = str(shards / "{000..002}.tar")
    assert source_exists(spec)
    it = iter_sources([spec], IngestConfig(), tmp_path / "cache")
    first = next(it)
    assert isinstance(first, ImageRecord) and first.source_path == "000.tar#img_chelsea"
    # the last shard did not exist when the first image was yielded: it is only opened when reached
    write_shard(shards / "002.tar", photo_samples(PHOTOS[4:]))
    rest = list(it)
    recs = {r.source_path: r for r in [first, *rest] if isinstance(r, ImageRecord)}
    assert not [r for r in rest if isinstance(r, Rejection)]
    assert sorted(recs) == sorted(
        f"{i:03d}.tar#img_{n}" for i, pair in enumerate([PHOTOS[:2], PHOTOS[2:4], PHOTOS[4:]]) for n in pair
    )
    assert recs["000.tar#img_coffee"].annotation.captions == ["a red cup of coffee"]
    assert recs["001.tar#img_rocket"].annotation.captions == ["a photo of rocket"]
    assert recs["001.tar#img_rocket"].annotation.license == "CC0"
    assert recs["002.tar#img_camera"].width == 512


def test_hostile_shards_are_refusals(tmp_path):
    shards = tmp_path / "s"
    shards.mkdir()
    big = {"__key__": "huge", "jpg": b"\xff\xd8" + b"x" * 300_000}
    write_shard(
        shards / "a.tar", [*photo_samples(["chelsea"]), {"__key__": "noimg", "txt": "only text"}, big]
    )
    good = shards / "b.tar"
    write_shard(good, photo_samples(["coffee", "rocket"]))
    (shards / "c.tar").write_bytes(good.read_bytes()[:2000])  # a truncated shard
    spec = str(shards / "{a,b,c,d}.tar")  # d.tar does not exist
    items = list(iter_sources([spec], IngestConfig(max_file_bytes=200_000), tmp_path / "cache"))
    recs = {r.source_path for r in items if isinstance(r, ImageRecord)}
    rejs = {r.path: r.reason for r in items if isinstance(r, Rejection)}
    assert recs == {"a.tar#img_chelsea", "b.tar#img_coffee", "b.tar#img_rocket"}
    assert "no image" in rejs["a.tar#noimg"]
    assert "too large" in rejs["a.tar#huge.jpg"]
    assert any(k.startswith("c.tar") and ("unreadable" in v or "truncated" in v) for k, v in rejs.items())
    assert "cannot open shard" in rejs["d.tar"]


def test_single_tar_sniffed_by_content_and_patterns_refused(tmp_path):
    shard = tmp_path / "photos.dat"  # no .tar extension: sniffed by the ustar magic
    write_shard(shard, photo_samples(["astronaut"]))
    items = list(iter_sources([str(shard)], IngestConfig(), tmp_path / "cache"))
    assert [i.source_path for i in items if isinstance(i, ImageRecord)] == ["photos.dat#img_astronaut"]
    for bad in ("http://host/{000..009}.tar", "pipe:curl x/{0..1}.tar", str(tmp_path / "none{0..3}.tar")):
        with pytest.raises(ValueError):
            iter_sources([bad], IngestConfig(), tmp_path / "cache")
        assert not source_exists(bad) or "://" in bad


def test_parquet_shards_from_a_pattern(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    for i, names in enumerate([PHOTOS[:2], PHOTOS[2:3]]):
        pq.write_table(
            pa.table({"image": [jpeg(n) for n in names], "caption": names}),
            tmp_path / f"train-{i:05d}.parquet",
        )
    spec = str(tmp_path / "train-{00000..00001}.parquet")
    items = list(iter_sources([spec], IngestConfig(), tmp_path / "cache"))
    recs = [i for i in items if isinstance(i, ImageRecord)]
    assert [r.source_path for r in recs] == [
        "train-00000.parquet#0",
        "train-00000.parquet#1",
        "train-00001.parquet#0",
    ]
    assert recs[2].annotation.captions == ["astronaut"]
