"""SPA-VL — Safety Preference Alignment for VLMs (Zhang et al., 2024; HF `sqrti/SPA-VL`).

Release layout (the HF repo): parquet shards with an embedded `image` column, `question`, `chosen`,
`rejected`, `image_name`, `class1`/`class2`/`class3` (harm domain / category / subcategory):
`data/train-*.parquet` (config `default`), `validation` shards, and the test configs `harm` and
`help` (e.g. `test/harm/*.parquet`, `test/help/*.parquet`).

Label semantics: SPA-VL questions are written from its harm taxonomy to elicit harmful content, so
train/validation rows and the `harm` test set are **unsafe**; the `help` test set (helpfulness
prompts) is **safe**. A `label` column, where present, wins. Category: `class1`. `chosen` is kept
as the response. `split`: "train" reads train/validation shards, "test" the harm/help shards."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rmskit.scoring.adapters.base import AdapterError, BaseAdapter, load_hf, materialize_image, parse_label
from rmskit.scoring.sample import BenchSample


def _shard_split(path: Path) -> str:
    s = path.as_posix().lower()
    if "help" in s:
        return "help"
    if "harm" in s:
        return "harm"
    if "valid" in s:
        return "validation"
    return "train"


class SPAVL(BaseAdapter):
    name = "spavl"
    title = "SPA-VL (parquet shards: train/validation/harm/help)"
    hf_id = "sqrti/SPA-VL"

    def detect(self, root: Path) -> bool:
        if not root.is_dir():
            return False
        shard = next(iter(sorted(root.rglob("*.parquet"))), None)
        if shard is None:
            return False
        import pyarrow.parquet as pq

        names = set(pq.read_schema(shard).names)
        return {"question", "chosen", "rejected"} <= names

    def _rows(self, rows: Any, part: str, key: str) -> list[BenchSample]:
        out = []
        for i, r in enumerate(rows):
            label = (
                parse_label(r["label"])
                if r.get("label") not in (None, "")
                else ("safe" if part == "help" else "unsafe")
            )
            sid = f"{part}-{r.get('image_name') or i}"
            out.append(
                BenchSample(
                    id=f"{part}-{i}",
                    images=[materialize_image(r["image"], key, sid + f"#{i}")],
                    query=r["question"],
                    response=r.get("chosen"),
                    label=label,
                    category=r.get("class1") or "uncategorized",
                    source=self.name,
                    kind=part,
                    split="test" if part in ("harm", "help") else "train",
                    meta={"class2": r.get("class2"), "class3": r.get("class3")},
                )
            )
        return out

    def read_local(self, root: Path, split: str | None, options: Mapping[str, Any]) -> list[BenchSample]:
        import pyarrow.parquet as pq

        shards = [root] if root.is_file() else sorted(root.rglob("*.parquet"))
        if not shards:
            raise AdapterError(f"spavl: no parquet shards under {root}")
        want = {"train": ("train", "validation"), "test": ("harm", "help")}.get(split or "", None)
        out: list[BenchSample] = []
        for shard in shards:
            part = _shard_split(shard.relative_to(root) if root.is_dir() else shard)
            if want is not None and part not in want:
                continue
            out.extend(self._rows(pq.read_table(shard).to_pylist(), part, f"spavl:{shard.resolve()}"))
        return out

    def read_hf(self, dataset_id: str, split: str | None, options: Mapping[str, Any]) -> list[BenchSample]:
        if split == "train":
            return self._rows(load_hf(dataset_id, "default", "train"), "train", dataset_id)
        return [
            s
            for part in ("harm", "help")
            for s in self._rows(load_hf(dataset_id, "test", part), part, dataset_id)
        ]
