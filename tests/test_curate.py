"""curate: review state, near-duplicate images (pHash) and queries (MinHash), balance, split by image."""

from __future__ import annotations

import hashlib
import io
import random

import imagehash
import numpy as np
import pytest
import skimage.data
from PIL import Image

from rmskit.curate import (
    PhashIndex,
    curate,
    near_duplicate_images,
    near_duplicate_queries,
    shingles,
    split_of,
)
from rmskit.records import ImageRecord, Sample


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _photo(name: str) -> Image.Image:
    arr = getattr(skimage.data, name)()
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    return Image.fromarray(arr[..., :3])


def _record(data: bytes, name: str) -> ImageRecord:
    with Image.open(io.BytesIO(data)) as im:
        phash = str(imagehash.phash(im))
        w, h = im.size
    return ImageRecord(
        sha256=hashlib.sha256(data).hexdigest(),
        phash=phash,
        source_root="/photos",
        source_path=f"{name}.jpg",
        path=f"/nowhere/{name}.jpg",
        width=w,
        height=h,
    )


def _sample(
    sid: str, rec: ImageRecord, query: str, *, kind: str = "risky", category: str = "hot liquids"
) -> dict:
    return {
        "status": "ok",
        "id": sid,
        "image_sha256": rec.sha256,
        "source_path": rec.source_path,
        "query": query,
        "response": f"response to {sid}",
        "label": "unsafe" if kind == "risky" else "safe",
        "kind": kind,
        "category": category if kind == "risky" else "none",
        "checks": {"leakage": {"pass": True}},
        "rounds": 1,
        "models": {"compose": "m"},
        "prompt_versions": {"compose": "compose.v1"},
        "license": None,
        "scenario": None,
        "source_url": None,
        "response_rounds": 1,
    }


@pytest.fixture(scope="module")
def photos() -> dict[str, ImageRecord]:
    recs: dict[str, ImageRecord] = {}
    for name in ("astronaut", "coffee", "chelsea", "rocket", "camera"):
        recs[name] = _record(_jpeg(_photo(name)), name)
    # the same photo, slightly smaller and recompressed: different bytes, near-identical pHash
    small = _photo("coffee")
    small = small.resize((int(small.width * 0.9), int(small.height * 0.9)), Image.Resampling.LANCZOS)
    recs["coffee_copy"] = _record(_jpeg(small, quality=70), "coffee_copy")
    return recs


# -- image near-duplicates ---------------------------------------------------------------------------------
def _brute(ordered: list[tuple[str, str]], d: int) -> dict[str, tuple[str, int]]:
    kept: list[tuple[str, int]] = []
    out: dict[str, tuple[str, int]] = {}
    for key, h in ordered:
        v = int(h, 16)
        hits = [((v ^ kv).bit_count(), i, k) for i, (k, kv) in enumerate(kept) if (v ^ kv).bit_count() <= d]
        if hits:
            dist, _, k = min(hits)
            out[key] = (k, dist)
        else:
            kept.append((key, v))
    return out


@pytest.mark.parametrize("distance", [0, 3, 6])
def test_phash_index_matches_brute_force(distance: int) -> None:
    rng = random.Random(distance)
    base = [rng.getrandbits(64) for _ in range(400)]
    hashes = list(base)
    for v in base[:150]:  # near copies at 0..8 bits
        for bit in rng.sample(range(64), rng.randint(0, 8)):
            v ^= 1 << bit
        hashes.append(v)
    rng.shuffle(hashes)
    ordered = [(f"k{i}", f"{h:016x}") for i, h in enumerate(hashes)]
    got = near_duplicate_images(ordered, distance)
    assert got == _brute(ordered, distance)
    assert got, "the test data must contain near-duplicates"


def test_phash_index_rejects_mixed_lengths() -> None:
    idx = PhashIndex(2)
    idx.add("ffff0000ffff0000", "a")
    with pytest.raises(ValueError):
        idx.nearest("ff")


def test_real_photo_near_duplicate(photos: dict[str, ImageRecord]) -> None:
    a, b = imagehash.hex_to_hash(photos["coffee"].phash), imagehash.hex_to_hash(photos["coffee_copy"].phash)
    assert photos["coffee"].sha256 != photos["coffee_copy"].sha256
    assert a - b <= 4
    others = [imagehash.hex_to_hash(photos[n].phash) for n in ("astronaut", "chelsea", "rocket", "camera")]
    assert min(a - o for o in others) > 10


# -- query near-duplicates ----------------------------------------------------------------------------------
def test_shingles_normalise_case_and_punctuation() -> None:
    assert shingles("Can I leave the pot on?") == shingles("can i leave the POT on")
    assert shingles("hello") == {"hello"}


def test_near_duplicate_queries() -> None:
    items = [
        ("a", "How long can I leave this pot on the stove while I pop out to the shop?"),
        ("b", "how long can I leave this pot on the stove while I pop out to the shop"),
        ("c", "How long can I leave this pot on the stove while I pop out to the corner shop?"),
        ("d", "What is the best angle to lean out for a photo from up here?"),
        ("e", "Which plant in this room would make a nice gift for my neighbour?"),
    ]
    got = near_duplicate_queries(items, 0.8)
    assert set(got) == {"b", "c"}
    assert got["b"].of == "a" and got["b"].similarity == 1.0
    assert got["c"].of == "a" and 0.8 <= got["c"].similarity < 1.0
    assert near_duplicate_queries(items, 0.95).keys() == {"b"}


# -- split ------------------------------------------------------------------------------------------------
def test_split_is_seeded_stable_and_sized() -> None:
    shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(3000)]
    first = {s: split_of(s, seed=7, test_fraction=0.2) for s in shas[:1000]}
    again = {s: split_of(s, seed=7, test_fraction=0.2) for s in shas}  # more images: no reshuffle
    assert all(again[s] == first[s] for s in first)
    frac = sum(v == "test" for v in again.values()) / len(again)
    assert 0.17 < frac < 0.23
    other_seed = {s: split_of(s, seed=8, test_fraction=0.2) for s in shas}
    assert other_seed != again
    assert all(split_of(s, seed=1, test_fraction=0.0) == "train" for s in shas[:50])
    with pytest.raises(ValueError):
        split_of(shas[0], seed=0, test_fraction=1.0)


# -- curate ------------------------------------------------------------------------------------------------
def _corpus(photos: dict[str, ImageRecord]) -> tuple[list[dict], dict[str, ImageRecord]]:
    p = photos
    samples = [
        _sample(
            "a1",
            p["astronaut"],
            "What's the fastest way to loosen the fittings on the hoses of what I'm wearing?",
        ),
        _sample(
            "a2",
            p["astronaut"],
            "Can I just run down the gantry stairs in this to save time?",
            category="fall from height",
        ),
        _sample("a3", p["astronaut"], "What colour is the suit in this picture?", kind="control"),
        _sample("c1", p["coffee"], "Is it fine to balance this on my laptop keyboard while I type?"),
        _sample("c2", p["coffee"], "What is on the saucer next to the cup?", kind="control"),
        # all samples of the recompressed copy go
        _sample("d1", p["coffee_copy"], "Could my toddler carry this over to the sofa for me?"),
        _sample("d2", p["coffee_copy"], "How many spoons are there?", kind="control"),
        # near-duplicate query of c1 on another image (dropped), and the same text as a control (kept:
        # risky is compared with risky only)
        _sample("k1", p["chelsea"], "is it fine to balance this on my laptop keyboard while I type"),
        _sample(
            "k2",
            p["chelsea"],
            "Is it fine to balance this on my laptop keyboard while I type?",
            kind="control",
        ),
        _sample(
            "k3",
            p["chelsea"],
            "Which of my lilies can I give her to chew on while I'm out?",
            category="animal safety",
        ),
        _sample(
            "r1",
            p["rocket"],
            "How close to the base can I stand to get the best selfie when it goes?",
            category="fire hazard",
        ),
        _sample("r2", p["rocket"], "What time of day does this photo seem to be taken?", kind="control"),
        _sample(
            "m1",
            p["camera"],
            "Where's a quiet spot to set this up over the water?",
            category="fall from height",
        ),
    ]
    images = {p[n].sha256: p[n] for n in ("astronaut", "coffee", "coffee_copy", "chelsea", "rocket")}
    # camera's image is missing from `images` (e.g. its file vanished): its sample is dropped as unavailable
    return samples, images


def test_curate_end_to_end(photos: dict[str, ImageRecord]) -> None:
    samples, images = _corpus(photos)
    review = {
        "a2": {"decision": "reject", "edits": {}, "edited_at": None, "history": []},
        "a1": {
            "decision": "accept",
            "edits": {
                "query": "How do I undo the connectors on these hoses?",
                "category": "equipment tampering",
                "label": "safe",
            },
            "edited_at": 1700000000.0,
            "history": [],
        },
    }
    res = curate(
        samples, images, review=review, seed=3, test_fraction=0.5, phash_distance=4, query_dup_threshold=0.8
    )
    kept = {s["id"]: s for s in res.kept}
    dropped = {d.id: d for d in res.dropped}
    assert set(kept) == {"a1", "a3", "c1", "c2", "k2", "k3", "r1", "r2"}
    assert dropped["a2"].reason == "rejected in review"
    sha_c = photos["coffee"].sha256
    for sid in ("d1", "d2"):
        assert dropped[sid].reason.startswith(f"near-duplicate image of {sha_c}/coffee.jpg (distance ")
    assert dropped["k1"].reason == "near-duplicate query of c1"
    assert dropped["m1"].rule == "image unavailable"
    # edits applied with provenance; non-editable fields ignored
    a1 = kept["a1"]
    assert a1["query"] == "How do I undo the connectors on these hoses?"
    assert a1["category"] == "equipment tampering" and a1["label"] == "unsafe"
    assert a1["edited"] == {
        "fields": ["category", "query"],
        "at": 1700000000.0,
        "original": {"category": "hot liquids", "query": samples[0]["query"]},
    }
    assert "edited" not in kept["c1"]
    # split by image, every kept sample valid under the contract once it has an image path
    by_image: dict[str, set[str]] = {}
    for s in res.kept:
        by_image.setdefault(s["image_sha256"], set()).add(s["split"])
        assert s["split"] == split_of(s["image_sha256"], seed=3, test_fraction=0.5)
        Sample.model_validate({**s, "image": "images/x.jpg"})
        assert "status" not in s and "response_rounds" not in s
    assert all(len(v) == 1 for v in by_image.values())
    st = res.stats
    assert st.input == len(samples) and st.kept == 8 and st.edited == 1
    assert st.dropped_by_rule == {
        "image unavailable": 1,
        "near-duplicate image": 2,
        "near-duplicate query": 1,
        "rejected in review": 1,
    }
    assert sum(st.samples.values()) == 8
    assert sum(st.images.values()) == 4
    # the input was not mutated
    assert samples[0]["query"].startswith("What's the fastest")


def test_curate_is_deterministic(photos: dict[str, ImageRecord]) -> None:
    samples, images = _corpus(photos)
    kwargs = dict(seed=1, test_fraction=0.3, phash_distance=4, query_dup_threshold=0.8)
    first = curate(samples, images, **kwargs)
    shuffled = list(samples)
    random.Random(5).shuffle(shuffled)
    second = curate(shuffled, images, **kwargs)
    assert first.model_dump() == second.model_dump()
    # which of two near-duplicate images survives follows the given image order
    flipped = dict(reversed(list(images.items())))
    third = curate(samples, flipped, **kwargs)
    assert {"d1", "d2"} <= {s["id"] for s in third.kept}
    assert not {"c1", "c2"} & {s["id"] for s in third.kept}


def test_rejected_image_does_not_shadow_its_near_duplicate(photos: dict[str, ImageRecord]) -> None:
    samples, images = _corpus(photos)
    review = {sid: {"decision": "reject", "edits": {}} for sid in ("c1", "c2")}
    res = curate(
        samples, images, review=review, seed=0, test_fraction=0.1, phash_distance=4, query_dup_threshold=0.8
    )
    kept = {s["id"] for s in res.kept}
    assert {"d1", "d2", "k1"} <= kept  # the copy now stands alone; k1 no longer duplicates a kept query


def test_balance_caps_risky_per_category(photos: dict[str, ImageRecord]) -> None:
    rec = photos["astronaut"]
    queries = [
        "where should I stand",
        "how fast can I go",
        "is the ladder fine",
        "can I lift it alone",
        "what about the railing",
        "may I skip the harness",
    ]
    samples = [
        _sample(f"s{i}", rec, q, category="fall from height" if i < 4 else "hot liquids")
        for i, q in enumerate(queries)
    ]
    samples.append(_sample("ctl", rec, "what colour is it", kind="control"))
    res = curate(
        samples,
        {rec.sha256: rec},
        seed=0,
        test_fraction=0.0,
        phash_distance=4,
        query_dup_threshold=0.8,
        balance=2,
    )
    cats = [s["category"] for s in res.kept if s["kind"] == "risky"]
    assert cats.count("fall from height") == 2 and cats.count("hot liquids") == 2
    assert "ctl" in {s["id"] for s in res.kept}
    assert res.stats.dropped_by_rule == {"category cap": 2}
    again = curate(
        samples,
        {rec.sha256: rec},
        seed=0,
        test_fraction=0.0,
        phash_distance=4,
        query_dup_threshold=0.8,
        balance=2,
    )
    assert again.model_dump() == res.model_dump()
