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

from rmskit.curate.minhash import Buckets, KeptTexts, lsh_params, sketch

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


@dataclass(frozen=True, slots=True)
class QueryDup:
    of: str
    similarity: float


def near_duplicate_queries(items: Iterable[tuple[str, str]], threshold: float) -> dict[str, QueryDup]:
    """`items` = [(key, text)] in priority order; returns {dropped key: QueryDup(kept key, jaccard)}.
    A later text whose shingle set has Jaccard >= threshold with an earlier kept one is dropped.

    A copy of an earlier text gets that text's verdict without its own Jaccard pass when the verdict
    cannot have changed: a kept text's copies are its duplicates (Jaccard 1, and no earlier kept text
    matched it), and a dropped text's copy has the same candidates unless a later text was kept in one
    of its buckets since (a build's templated queries repeat: 96k queries, 41k distinct, in the bench)."""
    items = list(items)
    seen: set[str] = set()
    for key, _ in items:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen.add(key)
    bands, rows = lsh_params(threshold, NUM_PERM)
    sk = sketch((shingles(t) for _, t in items), bands, rows, seed=1)
    buckets = Buckets(sk.keys)
    sk = sk._replace(keys=sk.keys[:0].copy())  # in `buckets` now; the pass need not hold them (12 MB at 96k)
    kept = KeptTexts(buckets)
    decided: dict[str, tuple[int, QueryDup | None]] = {}  # text -> (the copy decided, its verdict)
    dropped: dict[str, QueryDup] = {}
    for i in buckets.shared():  # a text alone in every band is kept: nothing earlier can match it
        key, text = items[i]
        groups = buckets.text_buckets(i)
        if (prev := decided.get(text)) is not None and threshold <= 1.0:
            at, verdict = prev
            if verdict is None:
                dropped[key] = QueryDup(of=items[at][0], similarity=1.0)
                continue
            if not kept.kept_after(groups, at):
                dropped[key] = verdict
                continue
        verdict = None
        near = kept.near(groups)
        if len(near):
            sim = sk.jaccard(i, near)
            best = int(np.argmax(sim))  # the most similar; of equals, the earliest (near is in order)
            if sim[best] >= threshold:
                verdict = QueryDup(of=items[int(near[best])][0], similarity=float(sim[best]))
        decided[text] = (i, verdict)
        if verdict is None:
            kept.add(i, groups)
        else:
            dropped[key] = verdict
    return dropped
