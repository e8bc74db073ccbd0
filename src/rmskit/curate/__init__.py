"""Curate: review decisions, near-duplicate removal (images by pHash, queries by MinHash), optional
balance, and a seeded train/test split by image."""

from rmskit.curate.core import CurateResult, CurateStats, Dropped, apply_review, curate
from rmskit.curate.dedup import PhashIndex, near_duplicate_images, near_duplicate_queries, shingles
from rmskit.curate.split import split_of

__all__ = [
    "CurateResult",
    "CurateStats",
    "Dropped",
    "PhashIndex",
    "apply_review",
    "curate",
    "near_duplicate_images",
    "near_duplicate_queries",
    "shingles",
    "split_of",
]
