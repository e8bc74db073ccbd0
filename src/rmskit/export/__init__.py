"""Export: the run's `dataset/` folder (samples.jsonl, images/, HF parquet, dataset card) and the
jsonl / hf / llava / sharegpt / judge formats, all honouring review decisions.

Imported eagerly on purpose: `prepare` is both a submodule and a function here, and only binding the
function after the submodule has loaded keeps `from rmskit.export import prepare` a function."""

from rmskit.export.prepare import NotARunError, Prepared, is_run_dir, prepare
from rmskit.export.writer import (
    FORMATS,
    DatasetSummary,
    ExportError,
    Format,
    export,
    export_summary,
    write_dataset,
)

__all__ = [
    "FORMATS",
    "DatasetSummary",
    "ExportError",
    "Format",
    "NotARunError",
    "Prepared",
    "export",
    "export_summary",
    "is_run_dir",
    "prepare",
    "write_dataset",
]
