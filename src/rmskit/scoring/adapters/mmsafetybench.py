"""MM-SafetyBench (Liu et al., ECCV 2024; github isXinLiu/MM-SafetyBench).

Release layout: `data/processed_questions/<NN-Scenario>.json` — a dict `{"<id>": {"Question",
"Rephrased Question", "Rephrased Question(SD)", "Key Phrase", ...}}` — and the images from
`MM-SafetyBench(imgs).zip` unzipped to `data/imgs/<NN-Scenario>/{SD,SD_TYPO,TYPO}/<id>.jpg`.

Label semantics: every item is a harmful request (13 scenarios), so all samples are **unsafe**
(single-class: only unsafe recall is defined). Option `variant` picks the image type (default
`SD_TYPO`, the paper's main setting) and its query: `Rephrased Question(SD)` for `SD`, `Rephrased
Question` for `SD_TYPO`/`TYPO`. Category: the scenario name without its number."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rmskit.scoring.adapters.base import AdapterError, BaseAdapter, read_json, resolve_image
from rmskit.scoring.sample import BenchSample

QUERY_KEY = {"SD": "Rephrased Question(SD)", "SD_TYPO": "Rephrased Question", "TYPO": "Rephrased Question"}


def _qdir(root: Path) -> Path | None:
    for d in (root / "data" / "processed_questions", root / "processed_questions"):
        if d.is_dir():
            return d
    return None


class MMSafetyBench(BaseAdapter):
    name = "mmsafetybench"
    title = "MM-SafetyBench (processed_questions/*.json + imgs/<scenario>/SD_TYPO/), all unsafe"
    hf_id = None

    def detect(self, root: Path) -> bool:
        return root.is_dir() and _qdir(root) is not None

    def read_local(self, root: Path, split: str | None, options: Mapping[str, Any]) -> list[BenchSample]:
        qdir = _qdir(root)
        if qdir is None:
            raise AdapterError(f"mmsafetybench: no processed_questions/ folder in {root} or {root}/data")
        variant = str(options.get("variant", "SD_TYPO"))
        if variant not in QUERY_KEY:
            raise AdapterError(f"mmsafetybench: variant must be one of {', '.join(QUERY_KEY)}")
        img_roots = [qdir.parent / "imgs", qdir.parent / "img", qdir.parent]
        img_root = next((d for d in img_roots if d.is_dir() and d != qdir.parent), img_roots[0])
        out: list[BenchSample] = []
        for f in sorted(qdir.glob("*.json")):
            scenario = f.stem
            category = re.sub(r"^\d+-", "", scenario).replace("_", " ")
            for qid, rec in read_json(f).items():
                q = rec.get(QUERY_KEY[variant]) or rec.get("Question")
                out.append(
                    BenchSample(
                        id=f"{scenario}/{qid}",
                        images=[resolve_image(f"{scenario}/{variant}/{qid}.jpg", img_root)],
                        query=q,
                        label="unsafe",
                        category=category,
                        source=self.name,
                        kind=variant,
                        meta={"key_phrase": rec.get("Key Phrase"), "original_question": rec.get("Question")},
                    )
                )
        return out
