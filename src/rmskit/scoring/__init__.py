"""Score a safety dataset by the judge it trains (DESIGN.md §7), plus CPU probes.

Python API (the CLI is a thin layer over it):
- `score(ScoreConfig(...))` -> ScoreReport (one training set) or MatrixReport (several)
- `probe(path, fmt=None)` / `run_probes(samples)` -> ProbeReport
- `load_benchmark(fmt, path)` -> LoadedBenchmark of unified `BenchSample`s
Heavy imports (torch, transformers, sentence-transformers) happen inside the functions."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rmskit.scoring.adapters import ADAPTERS, AdapterError, MissingImagesError, load_benchmark
    from rmskit.scoring.api import DatasetSpec, MatrixReport, ScoreConfig, ScoreReport, score
    from rmskit.scoring.metrics import Metrics, compute_metrics
    from rmskit.scoring.probes import ProbeReport, probe, run_probes
    from rmskit.scoring.sample import BenchSample, Inspection, LoadedBenchmark

# Imported on first use (PEP 562): a build needs only the probes and the judge's prompts, and the
# benchmark adapters, the scoring API and its models held ~3.5 MB in each of the build's two processes.
_WHERE = {
    "ADAPTERS": "adapters",
    "AdapterError": "adapters",
    "MissingImagesError": "adapters",
    "load_benchmark": "adapters",
    "DatasetSpec": "api",
    "MatrixReport": "api",
    "ScoreConfig": "api",
    "ScoreReport": "api",
    "score": "api",
    "Metrics": "metrics",
    "compute_metrics": "metrics",
    "ProbeReport": "probes",
    "probe": "probes",
    "run_probes": "probes",
    "BenchSample": "sample",
    "Inspection": "sample",
    "LoadedBenchmark": "sample",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ADAPTERS",
    "AdapterError",
    "BenchSample",
    "DatasetSpec",
    "Inspection",
    "LoadedBenchmark",
    "MatrixReport",
    "Metrics",
    "MissingImagesError",
    "ProbeReport",
    "ScoreConfig",
    "ScoreReport",
    "compute_metrics",
    "load_benchmark",
    "probe",
    "run_probes",
    "score",
]
