"""MinHash LSH over many texts at once, in numpy: the candidate pairs of both near-duplicate passes of a
build's finish (curation's query filter, the probes' near-duplicate rate).

Why not datasketch's `MinHash` + `MinHashLSH` objects: they hold one object per text (its hash values)
and, per band, a dict of bytes keys to sets of keys, and curation held every text's shingle set for the
exact check; `MinHash.bulk` costs ~75 µs per text. On the bench's 20k-query ledger curation's query pass
peaked at +110 MB with them, +36 MB here. Here the signatures of a chunk of texts are one array
operation, only the band keys (8 bytes per band and text) and 8-byte token fingerprints are kept, and
the buckets are found by sorting the keys. Candidates are confirmed by the Jaccard of the token sets
(`Sketch.jaccard`: exact up to a 64-bit fingerprint collision), so the verdict never rests on an
estimate. The (bands, rows) split is datasketch's choice, computed here (`lsh_params`).

The hash family: each token is hashed once (CRC-32, then murmur3's finaliser to spread its bits), and
permutation i maps a token hash x to ((a_i * x + b_i) mod 2^64) >> 32 with random 64-bit a_i (odd),
b_i: Dietzfelbinger's multiply-add-shift, universal for 32-bit keys. The minimum over a text's tokens is
its signature entry, as in datasketch."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Collection, Iterable, Iterator
from functools import lru_cache
from itertools import islice
from typing import NamedTuple

import numpy as np

CHUNK = 256  # texts per signature batch: ~4.6k tokens x 128 permutations x 8 bytes, ~5 MB (1024: 2x slower)
EMPTY = np.uint32(0xFFFFFFFF)  # every entry of an empty set's signature: empty sets match each other
_M1, _M2 = np.uint32(0x85EBCA6B), np.uint32(0xC2B2AE35)
_BAND_MULT = np.uint64(0x9E3779B97F4A7C15)


# datasketch's default weighs a missed near-duplicate and a needless candidate alike: at 128 permutations
# its (9, 13) split finds a pair at Jaccard 0.8 with probability 0.40 (0.58 at 0.83). Here a candidate
# costs one exact Jaccard, a miss leaves a near-duplicate in the dataset, so misses weigh 19 times more:
# (16, 8) finds it with 0.95 (0.985 at 0.83) and a pair at 0.3 still only with 0.001.
WEIGHTS = (0.05, 0.95)  # (false positive, false negative)


@lru_cache(maxsize=16)
def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """datasketch's `MinHashLSH` (bands, rows) for `threshold`: of every split with bands x rows <=
    num_perm, the first (bands, then rows, ascending) minimising the WEIGHTS-weighted false positive
    probability integrated over [0, threshold] and false negative over [threshold, 1]. datasketch
    integrates with scipy's quad; here Gauss-Legendre with num_perm // 2 + 1 nodes, exact for these
    polynomials of degree bands x rows (tested against datasketch). Importing datasketch (and through
    it scipy.integrate) cost the finish worker ~6 MB for this one choice."""
    nodes, weights = np.polynomial.legendre.leggauss(num_perm // 2 + 1)

    def on(lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
        return (hi - lo) / 2 * nodes + (hi + lo) / 2, (hi - lo) / 2 * weights

    s_fp, w_fp = on(0.0, threshold)
    s_fn, w_fn = on(threshold, 1.0)
    best, opt = float("inf"), (0, 0)
    for b in range(1, num_perm + 1):
        r = np.arange(1, num_perm // b + 1, dtype=np.float64)[:, None]
        fp = (1 - (1 - s_fp**r) ** b) @ w_fp
        fn = ((1 - s_fn**r) ** b) @ w_fn
        err = fp * WEIGHTS[0] + fn * WEIGHTS[1]
        i = int(np.argmin(err))  # the first minimum, as datasketch's strict `<` keeps
        if err[i] < best:
            best, opt = float(err[i]), (b, i + 1)
    return opt


def _mix(h: np.ndarray) -> np.ndarray:
    """murmur3's 32-bit finaliser, element-wise (uint32 arithmetic wraps)."""
    h ^= h >> np.uint32(16)
    h *= _M1
    h ^= h >> np.uint32(13)
    h *= _M2
    h ^= h >> np.uint32(16)
    return h


@lru_cache(maxsize=8)
def _permutations(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) of `n` permutations; cached (never written to): a sketch of a few texts at a time (the
    finish worker's, as samples come) spent most of its time making them."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**64, size=n, dtype=np.uint64, endpoint=False) | np.uint64(1)
    b = rng.integers(0, 2**64, size=n, dtype=np.uint64, endpoint=False)
    return a, b


class _Chunk(NamedTuple):
    sizes: np.ndarray  # tokens per text
    # uint32 CRC-32 of each token, text after text: the MinHash input, the same in every process
    crc: np.ndarray
    fingerprints: np.ndarray  # int64 `hash()` of each token: set equality within this process only


def _chunks(sets: Iterable[Collection[str]]) -> Iterator[_Chunk]:
    it = iter(sets)
    while chunk := list(islice(it, CHUNK)):
        sizes = np.fromiter((len(s) for s in chunk), dtype=np.int64, count=len(chunk))
        m = int(sizes.sum())
        crc = np.fromiter((zlib.crc32(t.encode("utf-8")) for s in chunk for t in s), dtype=np.uint32, count=m)
        fingerprints = np.fromiter((hash(t) for s in chunk for t in s), dtype=np.int64, count=m)
        yield _Chunk(sizes, crc, fingerprints)


def _signature(chunk: _Chunk, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.full((len(chunk.sizes), len(a)), EMPTY, dtype=np.uint32)
    full = chunk.sizes > 0
    if full.any():
        perm = np.multiply.outer(_mix(chunk.crc.copy()).astype(np.uint64), a)  # in place from here on
        perm += b
        perm >>= np.uint64(32)
        starts = np.concatenate(([0], np.cumsum(chunk.sizes)[:-1]))[full]
        out[full] = np.minimum.reduceat(perm, starts, axis=0)
    return out


def signatures(sets: Iterable[Collection[str]], num_perm: int, seed: int = 1) -> Iterator[np.ndarray]:
    """(chunk, num_perm) uint32 MinHash signatures of the token sets, CHUNK texts at a time."""
    a, b = _permutations(num_perm, seed)
    for chunk in _chunks(sets):
        yield _signature(chunk, a, b)


class Sketch(NamedTuple):
    keys: np.ndarray  # (n, bands) uint64: a text's bucket in each band
    tokens: np.ndarray  # int64 token fingerprints, text after text (for `jaccard`)
    ends: np.ndarray  # (n + 1,) int64: text i's tokens are tokens[ends[i]:ends[i + 1]]

    def jaccard(self, i: int, others: list[int] | np.ndarray) -> np.ndarray:
        """Jaccard of text i's token set with each of `others`' (two empty sets: 1.0), in one pass over
        their tokens: 8 bytes per token held instead of Python sets (~2 KB per query)."""
        js = np.asarray(others, dtype=np.int64)
        starts, sizes = self.ends[js], self.ends[js + 1] - self.ends[js]
        # the candidates' tokens, range after range, without a Python loop
        positions = np.repeat(starts - (np.cumsum(sizes) - sizes), sizes) + np.arange(int(sizes.sum()))
        theirs = self.tokens[positions]
        mine = np.sort(self.tokens[self.ends[i] : self.ends[i + 1]])
        if len(mine):
            at = np.searchsorted(mine, theirs)
            at[at == len(mine)] = 0
            hits = mine[at] == theirs
        else:
            hits = np.zeros(len(theirs), dtype=bool)
        inter = np.bincount(np.repeat(np.arange(len(js)), sizes), weights=hits, minlength=len(js))
        union = len(mine) + sizes - inter
        return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def jaccard(mine: np.ndarray, theirs: np.ndarray) -> float:
    """`Sketch.jaccard` of two texts' token fingerprints (sets): the float64 ratio of the counts, two
    empty sets 1.0; for the passes that compare one pair at a time (export/online.py, the probes'
    `NearPairs`)."""
    inter = int(np.isin(theirs, mine, assume_unique=True).sum()) if len(mine) and len(theirs) else 0
    union = len(mine) + len(theirs) - inter
    return float(np.float64(inter) / np.float64(union)) if union > 0 else 1.0


def sketch(sets: Iterable[Collection[str]], bands: int, rows: int, seed: int = 1) -> Sketch:
    """One key per band of `rows` signature entries (two texts share a band's bucket when their keys
    are equal; a 64-bit key collision only adds a candidate), and the token fingerprints. The token
    sets must be sets: no token twice in one text."""
    a, b = _permutations(bands * rows, seed)
    keys, tokens, sizes = [], [], []
    for chunk in _chunks(sets):
        sig = _signature(chunk, a, b)
        k = np.empty((len(sig), bands), dtype=np.uint64)
        for j in range(bands):
            h = np.full(len(sig), np.uint64(j + 1), dtype=np.uint64)
            for col in sig[:, j * rows : (j + 1) * rows].T:
                h ^= col.astype(np.uint64)
                h *= _BAND_MULT
                h ^= h >> np.uint64(29)
            k[:, j] = h
        keys.append(k)
        tokens.append(chunk.fingerprints)
        sizes.append(chunk.sizes)
    if not keys:
        return Sketch(
            np.empty((0, bands), dtype=np.uint64), np.empty(0, dtype=np.int64), np.zeros(1, dtype=np.int64)
        )
    ends = np.concatenate(([0], np.cumsum(np.concatenate(sizes))))
    # each list let go once joined, not the chunks of both held beside both joined arrays (the sketch's
    # traced peak at 96k queries: 52 -> 40 MB)
    all_keys = np.concatenate(keys)
    keys.clear()
    all_tokens = np.concatenate(tokens)
    tokens.clear()
    return Sketch(all_keys, all_tokens, ends)


class SketchMemo:
    """Each text's sketch row (band keys, token fingerprints) computed ahead: the finish worker fills it
    from the ledger while the run goes on (export/memo.py), so curation's near-duplicate pass only
    sketches the texts kept in the run's last moments (issue 13 §6). One table per (shingler, bands,
    rows, seed); at most `limit` texts in all (~0.6 KB each): past it the finish sketches the rest
    itself. The token fingerprints are `hash()`es: a memo is only ever read in the process that filled it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self._tables: dict[tuple[str, int, int, int], dict[str, tuple[np.ndarray, np.ndarray]]] = {}

    def table(
        self, shingle: Callable[[str], Collection[str]], bands: int, rows: int, seed: int
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return self._tables.setdefault((shingle.__qualname__, bands, rows, seed), {})

    def fill(
        self,
        texts: Iterable[str],
        shingle: Callable[[str], Collection[str]],
        bands: int,
        rows: int,
        seed: int,
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Sketch the texts not yet held, keep them while there is room; returns them all (new ones too)."""
        table = self.table(shingle, bands, rows, seed)
        todo = [t for t in dict.fromkeys(texts) if t not in table]
        fresh = _rows(sketch((shingle(t) for t in todo), bands, rows, seed), todo)
        room = max(0, self.limit - self.size)
        for t in todo[:room]:
            table[t] = fresh[t]
        self.size += min(room, len(todo))
        return fresh


def _rows(sk: Sketch, texts: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {
        t: (sk.keys[i].copy(), sk.tokens[sk.ends[i] : sk.ends[i + 1]].copy()) for i, t in enumerate(texts)
    }


# Set in the finish worker (`SketchMemo`); None elsewhere. A build's own probe sketches are held by its
# `QueryEmbeddings` and passed in (`sketch_texts(memo=)`), not set here.
MEMO: SketchMemo | None = None


def sketch_texts(
    texts: list[str],
    shingle: Callable[[str], Collection[str]],
    bands: int,
    rows: int,
    seed: int = 1,
    memo: SketchMemo | None = None,
) -> Sketch:
    """`sketch` of `shingle(t)` for each text, from `memo` (default: this process's `MEMO`) where it
    holds them (the same arrays: the signature of a text does not depend on the others sketched with
    it). The rest are sketched here and not kept: the finish reads each text once."""
    memo = memo if memo is not None else MEMO
    if memo is None:
        return sketch((shingle(t) for t in texts), bands, rows, seed)
    table = memo.table(shingle, bands, rows, seed)
    todo = [t for t in dict.fromkeys(texts) if t not in table]
    fresh = _rows(sketch((shingle(t) for t in todo), bands, rows, seed), todo)
    parts = [table.get(t) or fresh[t] for t in texts]
    if not parts:
        return sketch((), bands, rows, seed)
    sizes = np.fromiter((len(tok) for _, tok in parts), dtype=np.int64, count=len(parts))
    return Sketch(
        np.stack([k for k, _ in parts]),
        np.concatenate([tok for _, tok in parts]),
        np.concatenate(([0], np.cumsum(sizes))),
    )


def index_dtype(n: int, bands: int) -> type[np.signedinteger]:
    """int32 for the buckets' indices (half of numpy's int64: templated queries put most texts in shared
    buckets, ~16 pairs per text) while every raw bucket number, below n x bands, fits; else int64."""
    return np.int32 if n * bands < 2**31 else np.int64


class Buckets:
    """The LSH buckets holding two or more texts, numbered 0..B-1, with each text's buckets and each
    bucket's texts as CSR arrays (O(1) lookups); a text alone in each of its bands is in none."""

    def __init__(self, keys: np.ndarray) -> None:
        n, bands = keys.shape
        if bands < 1:
            raise ValueError("LSH keys need at least one band")
        idx = index_dtype(n, bands)
        texts: list[np.ndarray] = []
        sizes: list[np.ndarray] = []
        # each text's bucket in each band (-1: alone in it). Read row by row it lists a text's buckets
        # ascending, since bucket numbers ascend with the band: no argsort of all (bucket, text) pairs,
        # an int64 index per pair (with the pointers' cumsum in place, the traced peak at 96k templated
        # queries: 27 -> 22.5 MB for the 12.8 MB kept)
        dense = np.full((n, bands), -1, dtype=idx)
        offset = 0
        for j in range(bands):
            order = np.argsort(keys[:, j], kind="stable")  # equal keys stay in text order
            k = keys[order, j]
            same = k[1:] == k[:-1]
            shared = np.zeros(len(k), dtype=bool)
            shared[1:] |= same
            shared[:-1] |= same
            # the shared runs of equal keys, numbered on from the previous band's: bucket numbers come
            # out contiguous and ascending with (band, key), and each bucket's texts in text order
            first = np.concatenate(([True], ~same))[shared]
            local = np.cumsum(first, dtype=np.int64) - 1
            members = order[shared]
            texts.append(members.astype(idx))
            sizes.append(np.bincount(local, minlength=int(first.sum())))
            dense[members, j] = local + offset
            offset += int(first.sum())
        # (bucket, text) pairs come out sorted by bucket, then text
        self._bucket_text = np.concatenate(texts)
        del texts
        counts = np.concatenate(sizes)
        del sizes
        self._bucket_ptr = np.zeros(len(counts) + 1, dtype=idx)
        np.cumsum(counts, out=self._bucket_ptr[1:])
        del counts
        member = dense >= 0
        self._text_bucket = dense[member]
        del dense
        self._text_ptr = np.concatenate(([0], np.cumsum(member.sum(axis=1))))

    def shared(self) -> list[int]:
        """The texts in at least one shared bucket, in text order."""
        return np.flatnonzero(np.diff(self._text_ptr)).tolist()

    def buckets_of(self, i: int) -> list[int]:
        return self.text_buckets(i).tolist()

    def text_buckets(self, i: int) -> np.ndarray:
        """Text i's buckets, ascending (a view)."""
        return self._text_bucket[self._text_ptr[i] : self._text_ptr[i + 1]]

    def members(self, bucket: int) -> list[int]:
        """The bucket's texts, in text order."""
        return self._bucket_text[self._bucket_ptr[bucket] : self._bucket_ptr[bucket + 1]].tolist()


class KeptTexts:
    """The texts kept so far in each bucket, for a pass that visits texts in order (curation's query
    filter). One array laid out as the buckets' own CSR: a bucket's kept texts fill the front of its
    slots, in text order. 4 bytes per (bucket, text) slot, where a dict of Python lists per bucket held
    ~1.5M list entries, int keys and hash slots at 96k templated queries."""

    def __init__(self, buckets: Buckets) -> None:
        self._start = buckets._bucket_ptr[:-1]
        self._fill = np.zeros(len(self._start), dtype=self._start.dtype)
        self._text = np.empty(len(buckets._bucket_text), dtype=buckets._bucket_text.dtype)

    def near(self, groups: np.ndarray) -> np.ndarray:
        """The kept texts in any of `groups`, ascending and distinct."""
        n = self._fill[groups]
        total = int(n.sum())
        if not total:
            return np.empty(0, dtype=np.int64)
        # each group's filled slots, range after range, without a Python loop
        pos = np.repeat(self._start[groups] - (np.cumsum(n) - n), n) + np.arange(total)
        return np.unique(self._text[pos])

    def add(self, i: int, groups: np.ndarray) -> None:
        """Keep text i in `groups` (its buckets: distinct, and i after every text kept so far)."""
        self._text[self._start[groups] + self._fill[groups]] = i
        self._fill[groups] += 1
