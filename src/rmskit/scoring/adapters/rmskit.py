"""rmskit's own dataset: the `dataset/` folder of a build (or the run folder that contains it).

`samples.jsonl` lines follow `rmskit.records.Sample`: `image` is relative to the dataset folder,
`label` is `unsafe`/`safe`, `kind` is `risky`/`control`, `split` is `train`/`test`.

Label semantics: as written — risky pairs (image safe, text safe, pair risky) are **unsafe**;
benign controls for the same images are **safe**. `split` selects train/test rows (all rows when
the dataset has no split)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rmskit.records import Sample
from rmskit.scoring.adapters.base import AdapterError, BaseAdapter, read_jsonl, resolve_image
from rmskit.scoring.sample import BenchSample


def dataset_dir(root: Path) -> Path:
    for d in (root, root / "dataset"):
        if (d / "samples.jsonl").is_file():
            return d
    if root.is_file() and root.name == "samples.jsonl":
        return root.parent
    raise AdapterError(f"rmskit: no samples.jsonl in {root} or {root}/dataset")


class RmskitDataset(BaseAdapter):
    name = "rmskit"
    title = "rmskit dataset (dataset/samples.jsonl; run dir or dataset dir)"
    hf_id = None
    markers = ("samples.jsonl",)

    def detect(self, root: Path) -> bool:
        try:
            dataset_dir(root)
        except AdapterError:
            return False
        return True

    def read_local(self, root: Path, split: str | None, options: Mapping[str, Any]) -> list[BenchSample]:
        d = dataset_dir(root)
        rows = [Sample.model_validate(r) for r in read_jsonl(d / "samples.jsonl")]
        if split in ("train", "test") and any(r.split for r in rows):
            rows = [r for r in rows if r.split == split]
        return [
            BenchSample(
                id=r.id,
                images=[resolve_image(r.image, d)],
                query=r.query,
                response=r.response or None,
                label=r.label,
                category=r.category,
                source=self.name,
                kind=r.kind,
                split=r.split,
            )
            for r in rows
        ]
