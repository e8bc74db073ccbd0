"""Near-duplicate detection for curate: perceptual image hashes and query text.

Images: hex pHashes compared by Hamming distance through a multi-index (pigeonhole) table — split the
hash into `distance + 1` bands; two hashes within `distance` bits agree exactly on at least one band,
so only bucket-mates are compared. Exact, and far from O(n^2) for the small distances used (≤ 8 of 64).

Queries: MinHash LSH over word 2-shingles (curate/minhash.py, numpy) finds candidates; the exact Jaccard
of the shingle sets confirms them, so the verdict does not depend on the LSH's estimate."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from rmskit.curate.minhash import Buckets, KeptTexts, lsh_params, sketch_texts

_WORD = re.compile(r"\w+", re.UNICODE)
NUM_PERM = 128


class PhashIndex:
    """Insert-and-query index of perceptual hashes (hex strings of equal bit length)."""

    def __init__(self, max_distance: int) -> None:
        if max_distance < 0:
            raise ValueError("max_distance must be >= 0")
        self.max_distance = max_distance
        self._bits: int | None = None
        self._bands: list[tuple[int, int]] = []  # (shift, mask) per band
        self._tables: list[dict[int, list[int]]] = []
        self._items: list[tuple[int, str]] = []  # (hash value, key)

    def _setup(self, bits: int) -> None:
        self._bits = bits
        if self.max_distance >= bits:
            # every hash is within range (even one differing in all bits, which no band would find):
            # one band of zero bits puts all items in one bucket, so all are compared
            self._bands = [(0, 0)]
            self._tables = [{}]
            return
        n = self.max_distance + 1
        width, extra = divmod(bits, n)
        shift = 0
        for i in range(n):
            w = width + (1 if i < extra else 0)
            self._bands.append((shift, (1 << w) - 1))
            shift += w
        self._tables = [{} for _ in self._bands]

    @staticmethod
    def parse(hex_hash: str) -> tuple[int, int]:
        h = hex_hash.strip().lower()
        return int(h, 16), len(h) * 4

    def nearest(self, hex_hash: str) -> tuple[str, int] | None:
        """The closest inserted key within max_distance as (key, distance), earliest inserted on ties."""
        value, bits = self.parse(hex_hash)
        if self._bits is None:
            return None
        if bits != self._bits:
            raise ValueError(f"perceptual hashes of different lengths ({bits} vs {self._bits} bits)")
        seen: set[int] = set()
        best: tuple[int, int] | None = None  # (distance, item index)
        for (shift, mask), table in zip(self._bands, self._tables, strict=True):
            for idx in table.get((value >> shift) & mask, ()):
                if idx in seen:
                    continue
                seen.add(idx)
                d = (value ^ self._items[idx][0]).bit_count()
                if d <= self.max_distance and (best is None or (d, idx) < best):
                    best = (d, idx)
        return None if best is None else (self._items[best[1]][1], best[0])

    def add(self, hex_hash: str, key: str) -> None:
        value, bits = self.parse(hex_hash)
        if self._bits is None:
            self._setup(bits)
        elif bits != self._bits:
            raise ValueError(f"perceptual hashes of different lengths ({bits} vs {self._bits} bits)")
        idx = len(self._items)
        self._items.append((value, key))
        for (shift, mask), table in zip(self._bands, self._tables, strict=True):
            table.setdefault((value >> shift) & mask, []).append(idx)


def near_duplicate_images(
    ordered: Sequence[tuple[str, str]], max_distance: int
) -> dict[str, tuple[str, int]]:
    """`ordered` = [(key, hex phash)] in priority order; returns {dropped key: (kept key, distance)}.
    Each image is compared with the images kept so far, so the earlier one of a pair survives. Hashes
    of different lengths (a ledger merged from differently configured hashers) are never near each
    other: each length has an index of its own."""
    indexes: dict[int, PhashIndex] = {}
    dropped: dict[str, tuple[str, int]] = {}
    for key, phash in ordered:
        if (index := indexes.get(bits := len(phash.strip()))) is None:
            index = indexes[bits] = PhashIndex(max_distance)
        hit = index.nearest(phash)
        if hit is not None:
            dropped[key] = hit
        else:
            index.add(phash, key)
    return dropped


def shingles(text: str, size: int = 2) -> set[str]:
    """Lower-cased word n-grams; texts shorter than `size` words fall back to their words."""
    words = _WORD.findall(text.lower())
    if len(words) < size:
        return set(words)
    return {" ".join(words[i : i + size]) for i in range(len(words) - size + 1)}


@dataclass(frozen=True, slots=True)
class QueryDup:
    of: str
    similarity: float


def near_duplicate_queries(items: Iterable[tuple[str, str]], threshold: float) -> dict[str, QueryDup]:
    """`items` = [(key, text)] in priority order; returns {dropped key: QueryDup(kept key, jaccard)}.
    A later text whose shingle set has Jaccard >= threshold with an earlier kept one is dropped; of the
    kept texts it matches, the most similar is named, the earliest of equals.

    Each distinct text is sketched and decided once, at its first item (a build's templated queries
    repeat: 96k queries, 41k distinct, in the bench), since a later copy is never kept: a kept text's
    copies are its duplicates (Jaccard 1), and a dropped text's copy still matches the kept text that
    dropped it. So the kept texts are decided by the first items alone, and each copy of a dropped text
    is named after the best of the kept texts in its buckets that came before it."""
    items = list(items)
    seen: set[str] = set()
    for key, _ in items:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen.add(key)
    del seen
    bands, rows = lsh_params(threshold, NUM_PERM)
    index: dict[str, int] = {}  # distinct text -> its number, in the order of its first item
    of_item = np.fromiter(
        (index.setdefault(t, len(index)) for _, t in items), dtype=np.int64, count=len(items)
    )
    head = np.empty(len(index), dtype=np.int64)  # each distinct text's first item
    head[of_item[::-1]] = np.arange(len(items) - 1, -1, -1)
    sk = sketch_texts(list(index), shingles, bands, rows, seed=1)
    del index
    buckets = Buckets(sk.keys)
    sk = sk._replace(keys=sk.keys[:0].copy())  # in `buckets` now; the pass need not hold them
    kept = KeptTexts(buckets)
    verdict: dict[int, tuple[int, float]] = {}  # dropped distinct text -> (kept distinct text, jaccard)
    for d in buckets.shared():  # a text alone in every band is kept: nothing earlier can match it
        groups = buckets.text_buckets(d)
        near = kept.near(groups)
        if len(near):
            sim = sk.jaccard(d, near)
            best = int(np.argmax(sim))  # the most similar; of equals, the earliest (near is in order)
            if sim[best] >= threshold:
                verdict[d] = (int(near[best]), float(sim[best]))
                continue
        kept.add(d, groups)
    dropped: dict[str, QueryDup] = {}
    later: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # a dropped text's kept candidates: heads, jaccards
    for n, d in enumerate(of_item.tolist()):
        key = items[n][0]
        if n == head[d]:
            if d in verdict:
                of, sim = verdict[d]
                dropped[key] = QueryDup(of=items[head[of]][0], similarity=sim)
        elif d not in verdict:
            dropped[key] = QueryDup(of=items[head[d]][0], similarity=1.0)
        else:
            if d not in later:
                near = kept.near(buckets.text_buckets(d))  # every kept text in its buckets, in order
                later[d] = (head[near], sk.jaccard(d, near))
            heads, sims = later[d]
            # the ones kept before this copy (its first item's match among them)
            k = int(np.searchsorted(heads, n))
            best = int(np.argmax(sims[:k]))
            dropped[key] = QueryDup(of=items[heads[best]][0], similarity=float(sims[best]))
    return dropped
