"""Export: the run's `dataset/` folder (samples.jsonl, images/, HF parquet, dataset card) and the
jsonl / hf / llava / sharegpt formats, all honouring review decisions.

Names resolve lazily so `rmskit --help` does not pay for datasketch/pyarrow imports."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "NotARunError": "prepare",
    "Prepared": "prepare",
    "is_run_dir": "prepare",
    "prepare": "prepare",
    "FORMATS": "writer",
    "DatasetSummary": "writer",
    "ExportError": "writer",
    "Format": "writer",
    "export": "writer",
    "export_summary": "writer",
    "write_dataset": "writer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"rmskit.export.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'rmskit.export' has no attribute {name!r}")
