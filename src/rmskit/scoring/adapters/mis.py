"""MIS — Multi-Image Safety (Ding et al., 2025; HF `Tuwhy/MIS_Test`, `Tuwhy/MIS_Train`).

Release layout (test): `mis_easy.json`, `mis_hard.json`, `mis_real.json` beside `easy_image/`,
`hard_image/`, `real_image/`; records `{"image_path1", "image_path2", "question", "category",
"sub_category", ...}` with image paths relative to the release root. Training release: `mis_train.json`
(records with an `image`/`images` list or `image_path1/2`, and `question` or LLaVA-style
`conversations`).

Label semantics: MIS pairs two individually harmless images with a question whose harm only emerges
from reasoning across them: every sample is **unsafe** (single-class), unless a record carries an
explicit `label`/`safe` field. Samples have **two images**; the judge sees both. Option `subsets`
(default all of easy,hard,real) selects test files. Category: `category`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rmskit.scoring.adapters.base import (
    AdapterError,
    BaseAdapter,
    parse_label,
    read_json,
    resolve_image,
    snapshot,
)
from rmskit.scoring.sample import BenchSample

TEST_FILES = {"easy": "mis_easy.json", "hard": "mis_hard.json", "real": "mis_real.json"}


def _question(rec: Mapping[str, Any]) -> str:
    if rec.get("question"):
        return str(rec["question"])
    for turn in rec.get("conversations", []):
        if turn.get("from") in ("human", "user"):
            return str(turn.get("value", "")).replace("<image>", "").strip()
    raise AdapterError(f"mis: record {rec.get('id')} has no question")


def _images(rec: Mapping[str, Any]) -> list[str]:
    paths = [rec[k] for k in ("image_path1", "image_path2", "image_path3") if rec.get(k)]
    if not paths:
        v = rec.get("images", rec.get("image"))
        paths = v if isinstance(v, list) else [v] if v else []
    return [str(p) for p in paths]


class MIS(BaseAdapter):
    name = "mis"
    title = "MIS (mis_easy/hard/real.json + *_image/; two images per sample), all unsafe"
    hf_id = "Tuwhy/MIS_Test"
    markers = ("mis_easy.json", "mis_hard.json", "mis_real.json", "mis_train.json")

    def read_local(self, root: Path, split: str | None, options: Mapping[str, Any]) -> list[BenchSample]:
        base = root.parent if root.is_file() else root
        if root.is_file():
            files = {root.stem: root}
        elif split == "train" and (root / "mis_train.json").is_file():
            files = {"train": root / "mis_train.json"}
        else:
            subsets = str(options.get("subsets", "easy,hard,real")).split(",")
            files = {
                s: root / TEST_FILES[s]
                for s in subsets
                if s in TEST_FILES and (root / TEST_FILES[s]).is_file()
            }
            if not files and (root / "mis_train.json").is_file():
                files = {"train": root / "mis_train.json"}
        if not files:
            raise AdapterError(f"mis: no mis_easy/mis_hard/mis_real/mis_train.json in {root}")
        out: list[BenchSample] = []
        for subset, f in files.items():
            for i, rec in enumerate(read_json(f)):
                if rec.get("label") not in (None, ""):
                    label = parse_label(rec["label"])
                elif rec.get("safe") not in (None, ""):
                    label = parse_label(rec["safe"], invert=True)
                else:
                    label = "unsafe"
                out.append(
                    BenchSample(
                        id=f"{subset}/{rec.get('id', i)}",
                        images=[resolve_image(p, base) for p in _images(rec)],
                        query=_question(rec),
                        label=label,
                        category=rec.get("category") or "uncategorized",
                        source=self.name,
                        kind=subset,
                        meta={"sub_category": rec.get("sub_category")},
                    )
                )
        return out

    def read_hf(self, dataset_id: str, split: str | None, options: Mapping[str, Any]) -> list[BenchSample]:
        return self.read_local(snapshot(dataset_id), split, options)
