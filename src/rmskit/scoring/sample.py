"""The unified sample every benchmark adapter produces, and the loaded-benchmark container."""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal

from pydantic import BaseModel, Field

Label = Literal["safe", "unsafe"]


class BenchSample(BaseModel):
    """One (image(s), query) pair with a safety label, whatever benchmark it came from.

    `images` holds absolute local paths (several for multi-image benchmarks such as MIS; empty for a
    text-only row). `response` is optional: the judge classifies the request, not the answer."""

    id: str
    images: list[str] = Field(default_factory=list)
    query: str
    response: str | None = None
    label: Label
    category: str = "uncategorized"
    source: str  # adapter name (e.g. "vlguard")
    kind: str | None = None  # rmskit: "risky" / "control"; others: free-form subset tag
    split: str | None = None
    meta: dict[str, Any] = Field(default_factory=dict)

    @property
    def image(self) -> str | None:
        return self.images[0] if self.images else None


class Inspection(BaseModel):
    """What `rmskit benchmarks inspect --json` prints."""

    n: int
    labels: dict[str, int]
    categories: dict[str, int]
    missing_images: int


class LoadedBenchmark(BaseModel):
    name: str  # adapter name
    path: str  # local path or HF id it came from
    samples: list[BenchSample]
    missing_images: int = 0  # samples dropped (or, for inspect, found) with an image file missing

    def inspection(self) -> Inspection:
        labels = Counter(s.label for s in self.samples)
        cats = Counter(s.category for s in self.samples)
        return Inspection(
            n=len(self.samples),
            labels={"safe": labels.get("safe", 0), "unsafe": labels.get("unsafe", 0)},
            categories=dict(sorted(cats.items(), key=lambda kv: (-kv[1], kv[0]))),
            missing_images=self.missing_images,
        )
