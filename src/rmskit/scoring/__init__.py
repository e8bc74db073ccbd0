"""Score a safety dataset by the judge it trains (DESIGN.md §7), plus CPU probes.

Python API (the CLI is a thin layer over it):
- `score(ScoreConfig(...))` -> ScoreReport (one training set) or MatrixReport (several)
- `probe(path, fmt=None)` / `run_probes(samples)` -> ProbeReport
- `load_benchmark(fmt, path)` -> LoadedBenchmark of unified `BenchSample`s
Heavy imports (torch, transformers, sentence-transformers) happen inside the functions."""

from __future__ import annotations

from rmskit.scoring.adapters import ADAPTERS, AdapterError, MissingImagesError, load_benchmark
from rmskit.scoring.api import DatasetSpec, MatrixReport, ScoreConfig, ScoreReport, score
from rmskit.scoring.metrics import Metrics, compute_metrics
from rmskit.scoring.probes import ProbeReport, probe, run_probes
from rmskit.scoring.sample import BenchSample, Inspection, LoadedBenchmark

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
