"""Generic JSONL / JSON / CSV / TSV / parquet with a column map.

Option `columns` maps fields to column names: `id`, `image` (several columns joined by commas for
multi-image rows), `query`, `response`, `label`, `safe`, `category`; unnamed fields are guessed
from common names (see `base.COLUMN_GUESSES`). Option `image_root` is the folder relative image
paths start from (default: the file's folder).

Label semantics: `label` values unsafe/harmful/risky/1/true/yes mean **unsafe** and
safe/benign/harmless/control/0/false/no mean **safe**; a `safe` column is read inverted. Option
`label_default` (safe/unsafe) labels files without a label column (e.g. an all-unsafe set)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rmskit.scoring.adapters.base import AdapterError, BaseAdapter, read_table, rows_to_samples
from rmskit.scoring.adapters.rms2 import table_files
from rmskit.scoring.sample import BenchSample


class Generic(BaseAdapter):
    name = "generic"
    title = "generic JSONL/JSON/CSV/TSV/parquet with a column map"
    hf_id = None

    def detect(self, root: Path) -> bool:
        return root.is_file() and root.suffix.lower() in (".jsonl", ".json", ".csv", ".tsv", ".parquet")

    def read_local(self, root: Path, split: str | None, options: Mapping[str, Any]) -> list[BenchSample]:
        files = table_files(root)
        if not files:
            raise AdapterError(f"generic: no table file at {root}")
        default = options.get("label_default")
        if default not in (None, "safe", "unsafe"):
            raise AdapterError("generic: label_default must be safe or unsafe")
        out: list[BenchSample] = []
        for f in files:
            base = Path(options["image_root"]) if options.get("image_root") else f.parent
            out.extend(
                rows_to_samples(
                    read_table(f),
                    source=self.name,
                    base=base,
                    columns=options.get("columns"),
                    label_default=default,
                    embedded_key=f"generic:{f.resolve()}",
                )
            )
        if split in ("train", "test") and any(s.split for s in out):
            out = [s for s in out if s.split == split]
        return out
