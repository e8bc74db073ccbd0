"""HoliSafe-Bench (ETRI VILab, 2025; HF `etri-vilab/holisafe-bench`).

Release layout: `holisafe_bench.json` beside `images/`. Records: `{"id", "image", "query",
"category", "subcategory", "type", "image_safe"?, "image_safety_label"?}`.

Label semantics: `type` is a three-letter code [image][query][final] over S/U (e.g. `SSU` = safe
image, safe query, unsafe combination); the **last letter** is the label (S -> safe, U -> unsafe).
Category: `category` (subcategory kept in meta). Mixed labels, so every metric is defined."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rmskit.scoring.adapters.base import (
    AdapterError,
    BaseAdapter,
    load_hf,
    materialize_image,
    read_json,
    require_file,
    resolve_image,
)
from rmskit.scoring.sample import BenchSample, Label


def label_from_type(code: Any) -> Label:
    c = str(code).strip().upper()
    if len(c) < 3 or c[-1] not in "SU":
        raise AdapterError(f"holisafe: unreadable type code {code!r} (expected e.g. SSU, USU, SSS)")
    return "safe" if c[-1] == "S" else "unsafe"


class HoliSafe(BaseAdapter):
    name = "holisafe"
    title = "HoliSafe-Bench (holisafe_bench.json + images/), label from type code"
    hf_id = "etri-vilab/holisafe-bench"
    markers = ("holisafe_bench.json",)

    def _sample(self, rec: Mapping[str, Any], i: int, image: str) -> BenchSample:
        return BenchSample(
            id=str(rec.get("id", i)),
            images=[image],
            query=rec["query"],
            label=label_from_type(rec["type"]),
            category=rec.get("category") or "uncategorized",
            source=self.name,
            kind=str(rec["type"]).upper(),
            meta={"subcategory": rec.get("subcategory")},
        )

    def read_local(self, root: Path, split: str | None, options: Mapping[str, Any]) -> list[BenchSample]:
        meta = require_file(self.name, root, ["holisafe_bench.json"])
        bases = [meta.parent / "images", meta.parent]
        return [self._sample(r, i, resolve_image(r["image"], *bases)) for i, r in enumerate(read_json(meta))]

    def read_hf(self, dataset_id: str, split: str | None, options: Mapping[str, Any]) -> list[BenchSample]:
        ds = load_hf(dataset_id, split=split or "test")
        return [
            self._sample(r, i, materialize_image(r["image"], dataset_id, str(r.get("id", i))))
            for i, r in enumerate(ds)
        ]
