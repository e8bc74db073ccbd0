"""Kept / finished risky samples per category, read from the ledger. A module of its own, apart from
pipeline/quality.py: the export (and its finish worker) reads it without importing the stage machinery
(asyncio, rich, jinja2: ~10 MB of the worker's RSS and ~0.14 s of its imports)."""

from __future__ import annotations

from pydantic import BaseModel

from rmskit.ledger import Ledger
from rmskit.stats import Estimate, wilson


class CategoryRate(BaseModel):
    category: str
    n: int  # risky samples finished (kept or failed for good)
    kept: int
    rate: Estimate  # kept / n with a 95% Wilson interval


def pass_rates_by_category(ledger: Ledger) -> list[CategoryRate]:
    """Kept / finished risky samples per category, most-attempted first: which hazards the model
    can encode without leakage, and which it cannot."""
    # counted by SQLite: the finish's read of every sample's JSON for this was its largest transient
    # (~180 MB at 96k samples)
    counts = ledger.query(
        "SELECT COALESCE(NULLIF(json_extract(data, '$.category'), ''), 'unknown') AS cat, COUNT(*),"
        " SUM(status = 'ok') FROM samples WHERE json_extract(data, '$.kind') = 'risky' GROUP BY cat"
    )
    out = [
        CategoryRate(category=cat, n=n, kept=k, rate=wilson(k, n, metric="pass rate")) for cat, n, k in counts
    ]
    return sorted(out, key=lambda r: (-r.n, r.category))
