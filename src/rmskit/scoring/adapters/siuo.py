"""SIUO — Safe Inputs but Unsafe Output (Wang et al., 2024; HF `sinwang/SIUO`).

Release layout: `siuo_gen.json` (at the root or in `data/`) beside `images/`. Records:
`{"question_id", "image", "question", "category", "safety_warning", "reference_answer"}`.

Label semantics: every pair is **unsafe** by construction (image safe, text safe, the combination
risky), so SIUO is single-class: only unsafe recall (= accuracy) is defined on it.
`reference_answer` is kept as the response."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rmskit.scoring.adapters.base import BaseAdapter, read_json, require_file, resolve_image, snapshot
from rmskit.scoring.sample import BenchSample


class SIUO(BaseAdapter):
    name = "siuo"
    title = "SIUO (siuo_gen.json + images/), all unsafe"
    hf_id = "sinwang/SIUO"
    markers = ("siuo_gen.json",)

    def read_local(self, root: Path, split: str | None, options: Mapping[str, Any]) -> list[BenchSample]:
        meta = require_file(self.name, root, ["siuo_gen.json"])
        bases = [meta.parent / "images", meta.parent.parent / "images", meta.parent]
        out = []
        for i, rec in enumerate(read_json(meta)):
            out.append(
                BenchSample(
                    id=str(rec.get("question_id", i)),
                    images=[resolve_image(rec["image"], *bases)],
                    query=rec["question"],
                    response=rec.get("reference_answer"),
                    label="unsafe",
                    category=rec.get("category") or "uncategorized",
                    source=self.name,
                    meta={"safety_warning": rec.get("safety_warning")},
                )
            )
        return out

    def read_hf(self, dataset_id: str, split: str | None, options: Mapping[str, Any]) -> list[BenchSample]:
        return self.read_local(snapshot(dataset_id), split, options)
