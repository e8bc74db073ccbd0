"""VLSBench (Hu et al., ACL 2025; HF `Foreshhh/vlsbench`).

Release layout: `data.json` (at the root or in `data/`) beside `imgs/` (from `imgs.tar`). Records:
`{"instruction_id", "instruction", "image_path": "imgs/...", "category", "sub_category", "source",
"image_description"?, "safety_reason"?}`.

Label semantics: every pair is **unsafe** by construction (leak-free: the risk is in the image), so
VLSBench is single-class: only unsafe recall is defined."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rmskit.scoring.adapters.base import BaseAdapter, read_json, require_file, resolve_image, snapshot
from rmskit.scoring.sample import BenchSample


class VLSBench(BaseAdapter):
    name = "vlsbench"
    title = "VLSBench (data.json + imgs/), all unsafe"
    hf_id = "Foreshhh/vlsbench"
    markers = ("data.json",)

    def detect(self, root: Path) -> bool:
        meta = next((p for p in (root / "data.json", root / "data" / "data.json") if p.is_file()), None)
        return meta is not None and ((meta.parent / "imgs").is_dir() or (root / "imgs").is_dir())

    def read_local(self, root: Path, split: str | None, options: Mapping[str, Any]) -> list[BenchSample]:
        meta = require_file(self.name, root, ["data.json"])
        bases = [meta.parent, meta.parent.parent]
        out = []
        for i, rec in enumerate(read_json(meta)):
            out.append(
                BenchSample(
                    id=str(rec.get("instruction_id", i)),
                    images=[resolve_image(rec["image_path"], *bases)],
                    query=rec["instruction"],
                    label="unsafe",
                    category=rec.get("category") or "uncategorized",
                    source=self.name,
                    meta={k: rec.get(k) for k in ("sub_category", "source", "safety_reason") if k in rec},
                )
            )
        return out

    def read_hf(self, dataset_id: str, split: str | None, options: Mapping[str, Any]) -> list[BenchSample]:
        return self.read_local(snapshot(dataset_id), split, options)
