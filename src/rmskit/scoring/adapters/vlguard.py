"""VLGuard (Zong et al., ICML 2024; HF `ys-zong/VLGuard`).

Release layout: `train.json` / `test.json` beside the unzipped `train/` / `test/` image folders.
Each record: `{"id", "image": "<subdir>/<file>", "safe": bool, "harmful_category"?,
"harmful_subcategory"?, "instr-resp": [...]}`.

Label semantics (the paper's three subsets):
- safe image + its `safe_instruction`   -> **safe**   (kind `safe_safes`)
- safe image + its `unsafe_instruction` -> **unsafe** (kind `safe_unsafes`)
- unsafe image + its `instruction`      -> **unsafe** (kind `unsafes`)
Category: `harmful_category` of unsafe images; `benign` for safe-safes; `unsafe_instruction` for
safe-unsafes (VLGuard gives those no category)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rmskit.scoring.adapters.base import (
    AdapterError,
    BaseAdapter,
    find_file,
    read_json,
    resolve_image,
    snapshot,
)
from rmskit.scoring.sample import BenchSample


class VLGuard(BaseAdapter):
    name = "vlguard"
    title = "VLGuard (train.json/test.json + train/ test/ images)"
    hf_id = "ys-zong/VLGuard"
    markers = ("test.json", "train.json")

    def read_local(self, root: Path, split: str | None, options: Mapping[str, Any]) -> list[BenchSample]:
        if root.is_file():
            meta = root
        else:
            order = [f"{split}.json"] if split in ("train", "test") else ["test.json", "train.json"]
            found = [p for p in (find_file(root, n) for n in order) if p is not None]
            if not found:
                raise AdapterError(f"vlguard: {' or '.join(order)} not found in {root}")
            meta = found[0]
        img_dir = meta.parent / meta.stem
        rows = read_json(meta)
        out: list[BenchSample] = []
        for rec in rows:
            image = resolve_image(rec["image"], img_dir, meta.parent)
            safe_image = bool(rec.get("safe"))
            for j, ir in enumerate(rec.get("instr-resp", [])):
                if "safe_instruction" in ir:
                    q, label, kind, cat = ir["safe_instruction"], "safe", "safe_safes", "benign"
                elif "unsafe_instruction" in ir:
                    q, label, kind, cat = (
                        ir["unsafe_instruction"],
                        "unsafe",
                        "safe_unsafes",
                        "unsafe_instruction",
                    )
                elif "instruction" in ir:
                    q, label = ir["instruction"], "unsafe" if not safe_image else "safe"
                    kind = "unsafes" if not safe_image else "safe_safes"
                    cat = rec.get("harmful_category") or ("benign" if safe_image else "uncategorized")
                else:
                    raise AdapterError(f"vlguard: {rec.get('id')}: instr-resp entry without an instruction")
                out.append(
                    BenchSample(
                        id=f"{rec.get('id')}#{j}",
                        images=[image],
                        query=q,
                        response=ir.get("response"),
                        label=label,
                        category=cat,
                        source=self.name,
                        kind=kind,
                        split=meta.stem,
                        meta={"harmful_subcategory": rec.get("harmful_subcategory")},
                    )
                )
        return out

    def read_hf(self, dataset_id: str, split: str | None, options: Mapping[str, Any]) -> list[BenchSample]:
        # The HF repo is the release itself (JSON + zipped image folders), not a parquet dataset.
        return self.read_local(snapshot(dataset_id), split, options)
