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

from rmskit.curate.minhash import Buckets, lsh_params, sketch

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
    Each image is compared with the images kept so far, so the earlier one of a pair survives."""
    index = PhashIndex(max_distance)
    dropped: dict[str, tuple[str, int]] = {}
    for key, phash in ordered:
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


@dataclass(frozen=True)
class QueryDup:
    of: str
    similarity: float


def near_duplicate_queries(items: Iterable[tuple[str, str]], threshold: float) -> dict[str, QueryDup]:
    """`items` = [(key, text)] in priority order; returns {dropped key: QueryDup(kept key, jaccard)}.
    A later text whose shingle set has Jaccard >= threshold with an earlier kept one is dropped."""
    items = list(items)
    seen: set[str] = set()
    for key, _ in items:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen.add(key)
    bands, rows = lsh_params(threshold, NUM_PERM)
    sk = sketch((shingles(t) for _, t in items), bands, rows, seed=1)
    buckets = Buckets(sk.keys)
    kept_in: dict[int, list[int]] = {}  # bucket -> its kept texts so far, in order
    dropped: dict[str, QueryDup] = {}
    for i in buckets.shared():  # a text alone in every band is kept: nothing earlier can match it
        groups = buckets.buckets_of(i)
        near = sorted({j for g in groups for j in kept_in.get(g, ())})
        if near:
            sim = sk.jaccard(i, near)
            best = int(np.argmax(sim))  # the most similar; of equals, the earliest (near is in order)
            if sim[best] >= threshold:
                dropped[items[i][0]] = QueryDup(of=items[near[best]][0], similarity=float(sim[best]))
                continue
        for g in groups:
            kept_in.setdefault(g, []).append(i)
    return dropped
