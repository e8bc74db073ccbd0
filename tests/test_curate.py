"""curate: review state, near-duplicate images (pHash) and queries (MinHash), balance, split by image."""

from __future__ import annotations

import copy
import hashlib
import io
import itertools
import random
import types

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
from rmskit.curate.minhash import sketch
from rmskit.curate.split import unit_hash
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


def test_curate_owned_records_give_the_same_result_without_copies(photos: dict[str, ImageRecord]) -> None:
    """`owned=True` (the export's light records) reuses each unedited kept dict instead of copying it;
    the result is the same, edited samples are still copies, and without it the inputs stay as given."""
    samples, images = _corpus(photos)
    review = {samples[0]["id"]: {"decision": "accept", "edits": {"query": "An edited query?"}}}
    kwargs = dict(seed=1, test_fraction=0.3, phash_distance=4, query_dup_threshold=0.8, review=review)
    light = [
        {k: v for k, v in s.items() if k in ("id", "image_sha256", "kind", "category", "query", "label")}
        for s in samples
    ]
    copied = curate(copy.deepcopy(light), images, **kwargs)
    given, handed = copy.deepcopy(light), dict(images)
    owned = curate(given, handed, owned=True, **kwargs)
    assert owned.model_dump() == copied.model_dump()
    assert handed == {}  # the images are handed over too: let go once the image pass has read them
    by_id = {id(s) for s in given}
    unedited = [s for s in owned.kept if "edited" not in s]
    assert unedited and all(id(s) in by_id for s in unedited)
    edited = [s for s in owned.kept if "edited" in s]
    assert edited and all(id(s) not in by_id for s in edited)
    untouched = copy.deepcopy(light)
    curate(untouched, images, **kwargs)
    assert untouched == light
    # a read-only mapping of images (no `clear`) is read, not emptied; a record with every Sample field
    # but `image` (e.g. an earlier curation's kept dict, with its split) is still used as it is
    fields = set(Sample.model_fields) - {"image"}
    full = [{f: s.get(f) for f in fields} for s in samples]
    kept = curate(full, types.MappingProxyType(dict(images)), owned=True, **kwargs).kept
    assert [s["id"] for s in kept] == [s["id"] for s in owned.kept]
    ids = {id(f) for f in full}
    unedited = [s for s in kept if not s.get("edited")]
    assert unedited and all(id(s) in ids for s in unedited)


def test_curate_is_deterministic_and_the_order_given_is_the_priority(photos: dict[str, ImageRecord]) -> None:
    """The same samples in the same order give the same result; the order is the priority (a build's
    stored order): of two near-duplicates the earlier is kept, and an image ranks by its first sample,
    whatever order `images` lists them in."""
    samples, images = _corpus(photos)
    kwargs = dict(seed=1, test_fraction=0.3, phash_distance=4, query_dup_threshold=0.8)
    first = curate(samples, images, **kwargs)
    assert first.model_dump() == curate(list(samples), images, **kwargs).model_dump()
    assert [s["id"] for s in first.kept] == [
        s["id"] for s in samples if s["id"] in {k["id"] for k in first.kept}
    ]
    assert {"c1", "c2"} <= {s["id"] for s in first.kept}
    assert not {"d1", "d2"} & {s["id"] for s in first.kept}
    flipped = dict(reversed(list(images.items())))
    assert curate(samples, flipped, **kwargs).model_dump() == first.model_dump()
    # the copy's samples stored first: the copy is kept, the original's samples go
    copy_first = [s for s in samples if s["id"] in ("d1", "d2")] + [
        s for s in samples if s["id"] not in ("d1", "d2")
    ]
    third = curate(copy_first, images, **kwargs)
    assert {"d1", "d2"} <= {s["id"] for s in third.kept}
    assert not {"c1", "c2"} & {s["id"] for s in third.kept}
    # k1 (a near-duplicate query of c1) stored before c1: k1 is kept and c1 goes as its duplicate
    k1_first = [s for s in samples if s["id"] == "k1"] + [s for s in samples if s["id"] != "k1"]
    fourth = curate(k1_first, images, **kwargs)
    assert "k1" in {s["id"] for s in fourth.kept}
    assert [d.reason for d in fourth.dropped if d.id == "c1"] == [
        next(d.reason for d in first.dropped if d.id == "k1").replace("of c1", "of k1")
    ]


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
    assert {d.reason for d in res.dropped} == {"category cap 2 reached for 'fall from height' (balance)"}
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


# -- boundaries and defaults (found by `make mutate`: each test kills mutants that survived the above) ------
@pytest.mark.parametrize(
    ("bits", "distance"), [(8, 0), (8, 1), (8, 3), (8, 8), (8, 9), (12, 11), (16, 2), (16, 5), (64, 2)]
)
def test_phash_index_finds_every_difference_pattern(bits: int, distance: int) -> None:
    """Exhaustive over which bits differ: the band split must be exact whatever the hash length, also
    when bands are uneven (64 bits in 3 bands) or there are more allowed bits than bits (8 bits, d=9)."""
    base = random.Random(bits * 100 + distance).getrandbits(bits)
    idx = PhashIndex(distance)
    idx.add(f"{base:0{bits // 4}x}", "base")
    for flips in range(0, min(distance + 2, bits + 1)):
        for positions in itertools.combinations(range(bits), flips):
            value = base
            for p in positions:
                value ^= 1 << p
            got = idx.nearest(f"{value:0{bits // 4}x}")
            assert got == (("base", flips) if flips <= distance else None), positions


@pytest.mark.parametrize(("bits", "distance"), [(64, 0), (64, 3), (64, 4), (64, 8), (16, 5), (8, 7)])
def test_phash_bands_partition_the_bits(bits: int, distance: int) -> None:
    """distance + 1 bands, disjoint, covering every bit, widths within one bit: the fewest bucket-mates
    for which the pigeonhole argument still holds."""
    idx = PhashIndex(distance)
    idx.add("0" * (bits // 4), "k")
    masks = [mask << shift for shift, mask in idx._bands]
    assert len(masks) == distance + 1
    union = 0
    for m in masks:
        assert m and not union & m
        union |= m
    assert union == (1 << bits) - 1
    widths = [m.bit_count() for m in masks]
    assert max(widths) - min(widths) <= 1
    # distance >= bits: everything is in range, so there is one bucket holding every item
    wide = PhashIndex(bits)
    wide.add("0" * (bits // 4), "k")
    assert wide._bands == [(0, 0)]


@pytest.mark.parametrize("distance", [1, 2, 3])
def test_phash_nearest_in_crowded_buckets_matches_brute_force(distance: int) -> None:
    """12-bit hashes: buckets hold many items, so an item seen in an earlier band must not end the scan
    of a later band's bucket, and ties go to the earliest inserted item."""
    rng = random.Random(distance)
    stored = [rng.getrandbits(12) for _ in range(300)]
    idx = PhashIndex(distance)
    for i, v in enumerate(stored):
        idx.add(f"{v:03x}", f"k{i}")
    for _ in range(300):
        q = rng.getrandbits(12)
        hits = [((q ^ v).bit_count(), i) for i, v in enumerate(stored) if (q ^ v).bit_count() <= distance]
        want = None if not hits else (f"k{min(hits)[1]}", min(hits)[0])
        assert idx.nearest(f"{q:03x}") == want


def test_phash_parse_and_length_errors() -> None:
    assert PhashIndex.parse(" FF00 ") == (0xFF00, 16)
    with pytest.raises(ValueError, match=r"^max_distance must be >= 0$"):
        PhashIndex(-1)
    idx = PhashIndex(1)
    assert idx.nearest("ffff") is None  # empty index
    idx.add("ffff", "a")
    with pytest.raises(ValueError, match=r"different lengths \(8 vs 16 bits\)"):
        idx.add("ff", "b")
    with pytest.raises(ValueError, match=r"different lengths \(32 vs 16 bits\)"):
        idx.nearest("ffffffff")


def test_near_duplicate_images_compare_hashes_only_with_hashes_of_their_own_length() -> None:
    """A ledger merged from differently configured hashers: one index per length, each exact (a 16-bit
    and a 32-bit hash are never near each other; within each length the earlier image survives)."""
    ordered = [("a", "ffff"), ("b", "ffffffff"), ("c", "fffe"), ("d", "fffffffe"), ("e", " FFFF ")]
    assert near_duplicate_images(ordered, 1) == {"c": ("a", 1), "d": ("b", 1), "e": ("a", 0)}
    assert near_duplicate_images(ordered, 0) == {"e": ("a", 0)}


def test_shingles_boundaries_and_jaccard_of_empty_sets() -> None:
    assert shingles("hello World") == {"hello world"}  # exactly `size` words: one shingle
    assert shingles("a b c d") == {"a b", "b c", "c d"}
    assert shingles("a b c d", size=3) == {"a b c", "b c d"}
    assert shingles("?!") == set()
    # the exact check near_duplicate_queries runs on its LSH candidates
    sk = sketch([set(), set(), {"a"}, {"a", "b"}, {"b", "c"}], bands=2, rows=2)
    assert sk.jaccard(0, [1]).tolist() == [1.0]  # two empty queries are the same query
    assert sk.jaccard(2, [0]).tolist() == [0.0] and sk.jaccard(0, [2]).tolist() == [0.0]
    assert sk.jaccard(3, [4]).tolist() == pytest.approx([1 / 3])


_W = [f"w{i}" for i in range(40)]


def _words(i: int, j: int) -> str:
    return " ".join(_W[i:j])


def test_query_dup_threshold_is_inclusive_and_exact() -> None:
    # 8 of 10 shingles shared: Jaccard exactly 0.8 is a duplicate at threshold 0.8
    got = near_duplicate_queries([("a", _words(0, 9)), ("b", _words(0, 11))], 0.8)
    assert got.keys() == {"b"} and got["b"].of == "a" and got["b"].similarity == 0.8
    # an LSH candidate whose exact Jaccard (19/22) is below the threshold is not a duplicate
    assert near_duplicate_queries([("a", _words(0, 20)), ("b", _words(0, 23))], 0.9) == {}


def test_query_dup_names_the_most_similar_then_earliest_kept() -> None:
    # a and b are kept (Jaccard 0.58 < 0.6); c matches both and is closer to b
    got = near_duplicate_queries([("a", _words(0, 20)), ("b", _words(5, 25)), ("c", _words(3, 23))], 0.6)
    assert got.keys() == {"c"} and got["c"].of == "b" and got["c"].similarity == pytest.approx(17 / 21)
    # equally similar to two kept queries: the earlier kept one, not the alphabetically first
    got = near_duplicate_queries([("z", _words(0, 20)), ("a", _words(6, 26)), ("c", _words(3, 23))], 0.6)
    assert got.keys() == {"c"} and got["c"].of == "z"
    with pytest.raises(ValueError, match="duplicate key 'a'"):
        near_duplicate_queries([("a", "one two three"), ("a", "something else entirely here")], 0.8)


def test_query_dup_names_the_most_similar_of_well_separated_candidates() -> None:
    # At threshold 0.3 both kept queries are certain LSH candidates of c (Jaccard 0.6 and 0.48; a and b
    # share 0.23, so both are kept): c is reported against the more similar one. The LSH returns its
    # candidates as a set (order depends on the string hash seed), so 12 trios under different keys make
    # "whichever candidate came first" fail here with certainty but for a chance of 2^-12.
    a, b, c = _words(0, 20), _words(12, 32), _words(4, 26)
    for n in range(12):
        items = [(f"a{n}", a), (f"b{n}", b)]
        items = items[::-1] if n % 2 else items
        got = near_duplicate_queries([*items, (f"c{n}", c)], 0.3)
        assert got.keys() == {f"c{n}"} and got[f"c{n}"].of == f"a{n}"
        assert got[f"c{n}"].similarity == pytest.approx(0.6)


def test_split_boundary_and_error() -> None:
    sha = hashlib.sha256(b"x").hexdigest()
    u = unit_hash(0, sha)
    assert split_of(sha, seed=0, test_fraction=u) == "train"  # [0, test_fraction) is test
    assert split_of(sha, seed=0, test_fraction=min(1 - 1e-12, u + 1e-12)) == "test"
    with pytest.raises(ValueError, match=r"^test_fraction must be in \[0, 1\)$"):
        split_of(sha, seed=0, test_fraction=-0.1)


def _fake_image(i: int, phash: int) -> ImageRecord:
    return ImageRecord(
        sha256=hashlib.sha256(f"img{i}".encode()).hexdigest(),
        phash=f"{phash:016x}",
        source_root="/photos",
        source_path=f"p{i}.jpg",
        path=f"/nowhere/p{i}.jpg",
        width=8,
        height=8,
    )


def _flip(value: int, n: int, rng: random.Random) -> int:
    for bit in rng.sample(range(64), n):
        value ^= 1 << bit
    return value


def test_curate_defaults(photos: dict[str, ImageRecord]) -> None:
    """curate(samples, images) uses the documented defaults: seed 0, test_fraction 0.1, pHash distance 4
    (inclusive), query Jaccard 0.8 (inclusive)."""
    rng = random.Random(0)
    recs = [_fake_image(i, rng.getrandbits(64)) for i in range(60)]
    near4 = _fake_image(100, _flip(int(recs[0].phash, 16), 4, rng))
    near5 = _fake_image(101, _flip(int(recs[1].phash, 16), 5, rng))
    images = {r.sha256: r for r in [*recs, near4, near5]}
    samples = [_sample(f"s{i:02d}", r, f"question {i} about thing{i}") for i, r in enumerate(recs)]
    samples[2]["query"], samples[3]["query"] = _words(0, 9), _words(0, 11)  # Jaccard exactly 0.8
    samples += [_sample("x4", near4, "a fresh question on x4"), _sample("x5", near5, "another one on x5")]
    res = curate(samples, images)
    dropped = {d.id: d for d in res.dropped}
    assert dropped.keys() == {"x4", "s03"}
    assert dropped["x4"].reason == f"near-duplicate image of {recs[0].sha256}/p0.jpg (distance 4)"
    assert dropped["s03"].reason == "near-duplicate query of s02"
    splits = {s["id"]: s["split"] for s in res.kept}
    assert "x5" in splits
    want = {s["id"]: split_of(s["image_sha256"], seed=0, test_fraction=0.1) for s in res.kept}
    assert splits == want
    # the check has power: another seed or fraction would assign some image differently
    assert "test" in want.values()
    assert any(split_of(s["image_sha256"], seed=1, test_fraction=0.1) != want[s["id"]] for s in res.kept)


def test_curate_rejects_duplicate_sample_ids(photos: dict[str, ImageRecord]) -> None:
    samples, images = _corpus(photos)
    samples.append(dict(samples[4]))
    with pytest.raises(ValueError, match="duplicate sample id 'c2'"):
        curate(samples, images)


def test_curate_reasons_counts_and_review_details(photos: dict[str, ImageRecord]) -> None:
    samples, images = _corpus(photos)
    samples[3]["image"] = "stale/path.jpg"  # never copied: export sets the dataset path
    review = {
        "c1": {"decision": "accept", "edits": {"query": samples[3]["query"]}},  # same text: no edit
        "c2": {"decision": "accept", "edits": {"query": "What is on the saucer?"}, "edited_at": 5.0},
    }
    res = curate(samples, images, review=review, seed=3, test_fraction=0.5)
    kept = {s["id"]: s for s in res.kept}
    dropped = {d.id: d for d in res.dropped}
    m1_sha = photos["camera"].sha256
    assert (
        dropped["m1"].reason
        == f"image {m1_sha} unavailable (not in the ledger, its record unreadable, or its file missing)"
    )
    assert "image" not in kept["c1"] and "edited" not in kept["c1"]
    assert kept["c2"]["edited"]["fields"] == ["query"]
    # nested counts per split, computed by hand from the kept samples and their images' splits
    split = {sid: split_of(s["image_sha256"], seed=3, test_fraction=0.5) for sid, s in kept.items()}
    assert set(split.values()) == {"train", "test"}, "the corpus must populate both splits"
    want_kind: dict[str, dict[str, int]] = {}
    want_label: dict[str, dict[str, int]] = {}
    want_cat: dict[str, dict[str, int]] = {}
    for sid, s in kept.items():
        for want, field in ((want_kind, "kind"), (want_label, "label"), (want_cat, "category")):
            row = want.setdefault(split[sid], {})
            row[s[field]] = row.get(s[field], 0) + 1
    st = res.stats
    assert st.by_kind == want_kind and st.by_label == want_label and st.by_category == want_cat
    assert sum(st.by_kind[sp][k] for sp in st.by_kind for k in st.by_kind[sp]) == len(kept)
    assert st.by_category["train"] != st.by_category["test"]


def test_query_dedup_within_a_single_kind(photos: dict[str, ImageRecord]) -> None:
    p = photos
    samples = [
        _sample("q1", p["astronaut"], "Can I lean over the railing to get a better look?"),
        _sample("q2", p["rocket"], "can I lean over the railing to get a better look"),
    ]
    images = {p[n].sha256: p[n] for n in ("astronaut", "rocket")}
    res = curate(samples, images)
    assert [s["id"] for s in res.kept] == ["q1"]
    assert [(d.id, d.reason) for d in res.dropped] == [("q2", "near-duplicate query of q1")]


def test_balance_of_one_is_seeded_and_zero_is_refused(photos: dict[str, ImageRecord]) -> None:
    rec = photos["astronaut"]
    samples = [_sample(f"s{i}", rec, f"distinct question number {i} here", category="cat") for i in range(8)]
    chosen = {
        seed: [s["id"] for s in curate(samples, {rec.sha256: rec}, seed=seed, balance=1).kept]
        for seed in range(6)
    }
    assert all(len(v) == 1 for v in chosen.values())
    assert len({v[0] for v in chosen.values()}) > 1  # the seed picks which sample stays
    # pinned: the same seed keeps the same sample across releases (reproducible datasets)
    want = min(samples, key=lambda s: (unit_hash(0, "balance|" + s["id"]), s["id"]))["id"]
    assert chosen[0] == [want]
    with pytest.raises(ValueError, match=r"^balance must be >= 1$"):
        curate(samples, {rec.sha256: rec}, balance=0)


def test_lsh_params_are_datasketchs_own_choice(monkeypatch) -> None:
    """The (bands, rows) an index is built with are exactly what datasketch's MinHashLSH chooses for
    that threshold (its scipy quad integration), with misses weighted as in minhash.WEIGHTS; computed
    once per (threshold, num_perm) in a process."""
    from datasketch import MinHashLSH

    from rmskit.curate import minhash
    from rmskit.curate.dedup import lsh_params
    from rmskit.curate.minhash import WEIGHTS

    assert lsh_params(0.8, 128) == (16, 8)
    grid = [(t / 100, n) for t in range(5, 100, 5) for n in (16, 32, 64, 128)]
    for t, n in [*grid, (0.83, 128), (0.9, 256), (0.75, 100)]:
        fresh = MinHashLSH(threshold=t, num_perm=n, weights=WEIGHTS)
        assert lsh_params(t, n) == (fresh.b, fresh.r), (t, n)
    calls: list[int] = []
    real = minhash.np.polynomial.legendre.leggauss
    monkeypatch.setattr(minhash.np.polynomial.legendre, "leggauss", lambda k: calls.append(k) or real(k))
    lsh_params.cache_clear()
    assert lsh_params(0.7, 128) == lsh_params(0.7, 128) and calls == [65]


def test_dropped_records_are_small_and_still_validate_as_part_of_the_result() -> None:
    """A drop costs its reason string and ~60 bytes, not a pydantic model's ~500 (65k drops at a 100k
    build's finish), and `CurateResult` still validates and dumps them."""
    import tracemalloc

    from rmskit.curate import CurateResult, Dropped
    from rmskit.curate.core import RULE_NEAR_DUP_QUERY, RULE_REJECTED

    ids = [f"s-{i:012x}" for i in range(10_000)]
    tracemalloc.start()
    try:
        drops = [Dropped(id=i, rule=RULE_NEAR_DUP_QUERY, reason=f"near-duplicate query of {i}") for i in ids]
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held < 10_000 * 200  # measured: ~150 bytes each, the reason string included; ~620 as a model
    res = CurateResult.model_validate(
        {"kept": [], "dropped": [{"id": "a", "reason": "why", "rule": RULE_REJECTED}, drops[0]], "stats": {}}
    )
    assert res.dropped == [Dropped("a", "why", RULE_REJECTED), drops[0]] and res.dropped[1] is drops[0]
    assert res.model_dump()["dropped"][0] == {"id": "a", "reason": "why", "rule": RULE_REJECTED}
