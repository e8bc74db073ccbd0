"""curate/minhash.py: numpy MinHash signatures, LSH band keys and buckets, as both near-duplicate passes
use them (curation's query filter, the probes' near-duplicate rate)."""

from __future__ import annotations

import numpy as np
import pytest

from rmskit.curate.dedup import NUM_PERM, QueryDup, near_duplicate_queries, shingles
from rmskit.curate.minhash import CHUNK, Buckets, KeptTexts, index_dtype, lsh_params, signatures, sketch


def _pair(rng: np.random.Generator, vocab: int, size: int, shared: int) -> tuple[set[str], set[str]]:
    """Two token sets of `size` tokens with `shared` in common: Jaccard shared / (2 size - shared)."""
    tokens = [f"t{v}" for v in rng.choice(vocab, size=2 * size - shared, replace=False)]
    return set(tokens[:size]), set(tokens[size - shared :])


@pytest.mark.parametrize("shared", [10, 24, 36])  # Jaccard 0.11, 0.43, 0.82
def test_signature_agreement_estimates_the_jaccard(shared: int) -> None:
    """The share of equal signature entries is an unbiased estimate of the Jaccard: over 60 pairs of
    128 entries its mean has a standard error of ~0.006, so 0.03 is five of them."""
    rng = np.random.default_rng(shared)
    pairs = [_pair(rng, 10_000, 40, shared) for _ in range(60)]
    sigs = np.concatenate(list(signatures([s for p in pairs for s in p], num_perm=128)))
    agree = (sigs[0::2] == sigs[1::2]).mean()
    assert agree == pytest.approx(shared / (80 - shared), abs=0.03)


def test_signatures_are_seeded_chunked_and_mark_empty_sets() -> None:
    sets = [{f"w{i}", f"w{i + 1}"} for i in range(CHUNK + 5)] + [set()]
    chunks = list(signatures(sets, num_perm=16, seed=3))
    assert [len(c) for c in chunks] == [CHUNK, 6]  # a chunk of signatures is held at a time, not all
    a = np.concatenate(chunks)
    b = np.concatenate(list(signatures(sets, num_perm=16, seed=3)))
    assert a.shape == (CHUNK + 6, 16) and np.array_equal(a, b)  # one array per chunk, same across calls
    assert not np.array_equal(a, np.concatenate(list(signatures(sets, num_perm=16, seed=4))))
    assert (a[-1] == 0xFFFFFFFF).all() and (a[:-1] < 0xFFFFFFFF).any(axis=1).all()
    one = next(signatures([{"kettle"}, {"stove"}], num_perm=16, seed=3))  # one token is not an empty set
    assert (one < 0xFFFFFFFF).any(axis=1).all() and not np.array_equal(one[0], one[1])
    # a text's entries do not depend on its neighbours in the chunk
    assert np.array_equal(next(signatures([sets[7]], num_perm=16, seed=3))[0], a[7])


def test_buckets_hold_only_texts_that_share_a_band() -> None:
    sets = [{"a", "b", "c"}, {"x", "y", "z"}, {"a", "b", "c"}, {"p", "q"}, {"a", "b", "c"}]
    buckets = Buckets(sketch(sets, bands=4, rows=2).keys)
    assert buckets.shared() == [0, 2, 4]  # identical sets share every band; the others none
    assert len(buckets.buckets_of(0)) == 4 and buckets.buckets_of(1) == []
    assert all(buckets.members(g) == [0, 2, 4] for g in buckets.buckets_of(2))
    assert Buckets(sketch([], bands=4, rows=2).keys).shared() == []


def test_recall_at_the_threshold() -> None:
    """300 pairs at Jaccard 0.82 (each pair its own words): the recall-weighted bands find a pair with
    p = 0.97, so ~291 are expected (sd ~3); datasketch's default split, (9, 13), finds one with p = 0.49
    (~147). No unrelated query is dropped."""
    items = []
    for k in range(300):
        words = [f"p{k}w{i}" for i in range(23)]
        # 20 word 2-shingles each, 18 shared: 18 / 22 = 0.82
        items += [(f"a{k}", " ".join(words[:21])), (f"b{k}", " ".join(words[2:]))]
    got = near_duplicate_queries(items, 0.8)
    assert set(got) <= {f"b{k}" for k in range(300)}
    assert all(got[f"b{k}"].of == f"a{k}" for k in range(300) if f"b{k}" in got)
    assert len(got) >= 270
    assert lsh_params(0.8, 128) == (16, 8)


def test_many_copies_of_one_query() -> None:
    items = [(f"{i:05d}", "how do I warm up this room fast") for i in range(3000)]
    items.append(("99999", "an unrelated question about the weather today"))
    got = near_duplicate_queries(items, 0.8)
    assert len(got) == 2999 and {d.of for d in got.values()} == {"00000"}
    assert all(d.similarity == 1.0 for d in got.values())


def test_texts_without_words_are_duplicates_of_each_other_only() -> None:
    got = near_duplicate_queries([("a", "?!"), ("b", "how hot is it"), ("c", "..."), ("d", "")], 0.8)
    assert got.keys() == {"c", "d"} and got["c"].of == "a" and got["d"].of == "a"


def test_sketch_jaccard_is_the_set_jaccard() -> None:
    """Against Python's sets, on random token sets (tokens past every one of text i's, empty sets)."""
    rng = np.random.default_rng(7)
    sets = [
        {f"t{v}" for v in rng.choice(40, size=int(rng.integers(0, 12)), replace=False)} for _ in range(60)
    ]
    sets += [set(), set(), {"t0"}, {"zzz"}]
    sk = sketch(sets, bands=4, rows=2)
    for i, a in enumerate(sets):
        others = [j for j in range(len(sets)) if j != i]
        want = [len(a & sets[j]) / len(a | sets[j]) if a | sets[j] else 1.0 for j in others]
        assert sk.jaccard(i, others).tolist() == pytest.approx(want, abs=1e-12)
    assert sk.jaccard(60, [61]).tolist() == [1.0]  # two empty sets are equal
    assert sk.jaccard(60, [62]).tolist() == [0.0] and sk.jaccard(62, [60]).tolist() == [0.0]


def test_buckets_are_exactly_the_shared_band_keys() -> None:
    """Every pair of texts with an equal key in some band shares a bucket, no other pair does, and a
    bucket never spans two bands (a key equal across bands means nothing)."""
    rng = np.random.default_rng(8)
    keys = rng.integers(0, 6, size=(40, 3)).astype(np.uint64)  # small key space: many shared buckets
    keys[:, 1] += np.uint64(100)
    keys[5] = keys[6] = np.uint64(3)  # texts 5 and 6 equal in every band
    b = Buckets(keys)
    groups = {
        (j, int(k)): [i for i in range(40) if keys[i, j] == k] for j in range(3) for k in set(keys[:, j])
    }
    shared = [g for g in groups.values() if len(g) > 1]
    assert b.shared() == sorted({i for g in shared for i in g})
    for i in range(40):
        mine = b.buckets_of(i)
        assert sorted(tuple(b.members(g)) for g in mine) == sorted(tuple(g) for g in shared if i in g)
        assert len(mine) == len(set(mine))
    assert len({g for i in b.shared() for g in b.buckets_of(i)}) == len(shared)


def _plain_near_duplicate_queries(items: list[tuple[str, str]], threshold: float) -> dict[str, QueryDup]:
    """The pass before `KeptTexts` and the copies' shortcut: a dict of Python lists per bucket, and every
    text its own Jaccard pass over the kept texts in its buckets."""
    bands, rows = lsh_params(threshold, NUM_PERM)
    sk = sketch((shingles(t) for _, t in items), bands, rows, seed=1)
    buckets = Buckets(sk.keys)
    kept_in: dict[int, list[int]] = {}
    dropped: dict[str, QueryDup] = {}
    for i in buckets.shared():
        groups = buckets.buckets_of(i)
        near = sorted({j for g in groups for j in kept_in.get(g, ())})
        if near:
            sim = sk.jaccard(i, near)
            best = int(np.argmax(sim))
            if sim[best] >= threshold:
                dropped[items[i][0]] = QueryDup(of=items[near[best]][0], similarity=float(sim[best]))
                continue
        for g in groups:
            kept_in.setdefault(g, []).append(i)
    return dropped


@pytest.mark.parametrize(("seed", "threshold"), [(s, t) for s in range(4) for t in (0.5, 0.8)])
def test_near_duplicate_queries_equal_the_plain_pass(seed: int, threshold: float) -> None:
    """Templated queries with many exact copies, as a build's are: the same verdicts, matched texts and
    similarities as the plain pass, through every kind of copy (a kept text's; a dropped text's that
    names the same kept text as its first item, and one that names a text kept after that item)."""
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(80)]
    pool = []
    for _ in range(150):  # overlapping windows of a small vocabulary: Jaccards spread over 0..1
        start, size = int(rng.integers(0, 68)), int(rng.integers(6, 13))
        words = vocab[start : start + size]
        if rng.random() < 0.3:
            words = [*words[:-1], str(rng.choice(vocab))]
        pool.append(" ".join(words))
    items = [(f"q{n:04d}", pool[int(rng.integers(0, len(pool)))]) for n in range(600)]
    got = near_duplicate_queries(items, threshold)
    assert got == _plain_near_duplicate_queries(items, threshold)
    assert 50 < len(got) < 600 - 20
    first = {t: k for k, t in reversed(items)}
    assert all(k in got for k, t in items if k != first[t])  # every later copy is dropped
    assert any(d.of == first[items[int(k[1:])][1]] and d.similarity == 1.0 for k, d in got.items())
    renamed = [got[k].of != got[first[t]].of for k, t in items if k != first[t] and first[t] in got]
    assert True in renamed and False in renamed


def test_kept_texts_against_a_dict_of_lists() -> None:
    """`KeptTexts` answers as a dict of lists per bucket does, texts kept in order into random buckets
    (each bucket's kept texts are some of its members, so its slots never overflow)."""
    rng = np.random.default_rng(11)
    keys = rng.integers(0, 5, size=(200, 4)).astype(np.uint64)  # few keys per band: big shared buckets
    buckets = Buckets(keys)
    kept = KeptTexts(buckets)
    model: dict[int, list[int]] = {}
    for i in buckets.shared():
        groups = buckets.text_buckets(i)
        assert kept.near(groups).tolist() == sorted({t for g in groups.tolist() for t in model.get(g, [])})
        if rng.random() < 0.4:
            kept.add(i, groups)
            for g in groups.tolist():
                model.setdefault(g, []).append(i)
    assert sum(map(len, model.values())) > 100
    assert kept.near(np.empty(0, dtype=np.int64)).tolist() == []
    # indices either way: a caller may index with an empty answer as with a full one
    assert kept.near(np.empty(0, dtype=np.int64)).dtype.kind == "i"
    assert kept.near(buckets.text_buckets(buckets.shared()[-1])).dtype.kind == "i"


def test_a_sketch_of_no_texts_has_the_layout_of_one_of_many() -> None:
    """n texts: keys (n, bands) uint64, int64 token fingerprints, n + 1 int64 ends; for n = 0 too."""
    for sets, n in (([], 0), ([{"kettle", "stove"}, {"kettle"}, set()], 3)):
        sk = sketch(sets, bands=4, rows=2)
        assert sk.keys.shape == (n, 4) and sk.keys.dtype == np.uint64
        assert sk.tokens.dtype == np.int64 and len(sk.tokens) == sum(map(len, sets))
        assert sk.ends.dtype == np.int64 and sk.ends.tolist()[:1] == [0] and len(sk.ends) == n + 1
        assert len(Buckets(sk.keys).shared()) <= n
    assert sketch([{"a", "b"}], bands=4, rows=2).jaccard(0, []).shape == (0,)  # against no texts


def test_index_dtype_is_int32_while_every_raw_bucket_number_fits() -> None:
    assert index_dtype(100, 1) is np.int32
    assert index_dtype(2**27 - 1, 16) is np.int32  # n x bands = 2^31 - 16
    assert index_dtype(2**27, 16) is np.int64  # 2^31: past int32
    assert index_dtype(2**31 - 1, 1) is np.int32
    assert index_dtype(2**31, 1) is np.int64
    assert Buckets(sketch([{"a"}, {"a"}], bands=1, rows=2).keys)._bucket_text.dtype == np.int32


def test_buckets_need_a_band() -> None:
    with pytest.raises(ValueError, match=r"^LSH keys need at least one band$"):
        Buckets(np.empty((3, 0), dtype=np.uint64))


def _golden_corpus() -> list[set[str]]:
    """300 token sets (past one CHUNK), templated as a build's queries are, with copies and an empty one;
    pure Python arithmetic, so a numpy upgrade changes the corpus only if it changes the hash family."""
    base = [{f"w{(i * 7 + k * 13) % 60}" for k in range(3 + i % 9)} for i in range(120)]
    out = [base[(j * 37) % 120] | ({f"x{j}"} if j % 3 else set()) for j in range(299)]
    return [*out, set()]


def _digest(*arrays: np.ndarray) -> str:
    import hashlib

    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a, dtype=np.int64 if a.dtype.kind == "i" else a.dtype).tobytes())
    return h.hexdigest()[:16]


def test_the_hash_family_is_pinned_across_versions() -> None:
    """The same ledger curates to the same dataset after an upgrade: LSH finds candidates by chance, so
    another hash family (mixing constants, permutations, band keys) would change which near-duplicates
    are dropped. These digests are of this version's signatures, band keys and buckets (the token
    fingerprints use Python's per-process `hash`, so they are not pinned); change them only together
    with a deliberate change of the family, and say so in the release notes."""
    sets = _golden_corpus()
    sigs = np.concatenate(list(signatures(sets, num_perm=NUM_PERM)))
    assert sigs.dtype == np.uint32 and _digest(sigs) == "32c4a9ec4dbf7439"
    bands, rows = lsh_params(0.8, NUM_PERM)
    sk = sketch(sets, bands, rows)
    assert sk.keys.dtype == np.uint64 and _digest(sk.keys) == "94797e8942ec86e4"
    assert np.array_equal(np.diff(sk.ends), [len(s) for s in sets])
    b = Buckets(sk.keys)
    assert _digest(b._bucket_text, b._bucket_ptr, b._text_bucket, b._text_ptr) == "3e2ec2791c96cf3c"
