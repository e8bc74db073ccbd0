"""RMS2 — the RMS paper's released dataset (HF `NewCityLetter/RMS2`).

Its card documents no schema, so columns are read flexibly: the first table file(s) found
(parquet, JSON, JSONL, CSV) and the usual column names for image (`image`, `image_path`, `img`,
...; embedded image bytes are cached to files), query (`query`, `question`, `instruction`,
`prompt`, ...), label (`label`, `safety_label`, `is_unsafe`, `harmful`, ...; or a `safe` column,
inverted), category (`category`, `harm_category`, `type`, ...) and response. A column map (option
`columns`) overrides any guess.

Label semantics: an explicit label column is used when present. Without one every row is
**unsafe**: RMS samples are risky image-query pairs by construction."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rmskit.scoring.adapters.base import AdapterError, BaseAdapter, load_hf, read_table, rows_to_samples
from rmskit.scoring.sample import BenchSample

TABLE_EXT = (".parquet", ".jsonl", ".json", ".csv", ".tsv")


def table_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    files = [
        p
        for p in sorted(root.rglob("*"))
        if p.suffix.lower() in TABLE_EXT and p.is_file() and not p.name.startswith(".")
    ]
    return [p for p in files if p.name not in ("dataset_info.json", "dataset_infos.json", "config.json")]


class RMS2(BaseAdapter):
    name = "rms2"
    title = "RMS2 (NewCityLetter/RMS2; columns read flexibly)"
    hf_id = "NewCityLetter/RMS2"

    def detect(self, root: Path) -> bool:
        return False  # no fixed markers: name it explicitly

    def read_local(self, root: Path, split: str | None, options: Mapping[str, Any]) -> list[BenchSample]:
        files = table_files(root)
        if not files:
            raise AdapterError(f"rms2: no parquet/json/jsonl/csv file under {root}")
        out: list[BenchSample] = []
        for f in files:
            rows = read_table(f)
            part = rows_to_samples(
                rows,
                source=self.name,
                base=f.parent,
                columns=options.get("columns"),
                label_default="unsafe",
                embedded_key=f"rms2:{f.resolve()}",
            )
            for s in part:
                s.id = f"{f.stem}/{s.id}"
            out.extend(part)
        if split in ("train", "test") and any(s.split for s in out):
            out = [s for s in out if s.split == split]
        return out

    def read_hf(self, dataset_id: str, split: str | None, options: Mapping[str, Any]) -> list[BenchSample]:
        ds = load_hf(dataset_id)
        splits = list(ds.keys())
        chosen = [split] if split in splits else splits
        out: list[BenchSample] = []
        for sp in chosen:
            part = rows_to_samples(
                list(ds[sp]),
                source=self.name,
                base=Path("."),
                columns=options.get("columns"),
                label_default="unsafe",
                embedded_key=f"{dataset_id}:{sp}",
            )
            for s in part:
                s.id, s.split = f"{sp}/{s.id}", sp
            out.extend(part)
        return out
