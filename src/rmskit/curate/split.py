"""Train/test split by image: a seeded hash of the image sha picks the bucket, so the split of an image
never depends on which other images are in the run (adding photos does not reshuffle existing ones)."""

from __future__ import annotations

import hashlib
from typing import Literal

Split = Literal["train", "test"]


def unit_hash(seed: int, key: str) -> float:
    """A stable number in [0, 1) for (seed, key)."""
    digest = hashlib.sha256(f"rmskit-split|{seed}|{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(image_sha: str, *, seed: int, test_fraction: float) -> Split:
    if not 0 <= test_fraction < 1:
        raise ValueError("test_fraction must be in [0, 1)")
    return "test" if unit_hash(seed, image_sha) < test_fraction else "train"
