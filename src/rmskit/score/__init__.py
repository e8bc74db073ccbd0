"""Score a safety dataset by the judge it trains (DESIGN.md §7), plus CPU probes.

Python API (the CLI is a thin layer over it):
- `score(ScoreConfig(...))` -> ScoreReport (one training set) or MatrixReport (several)
- `probe(path, fmt=None)` / `run_probes(samples)` -> ProbeReport
- `load_benchmark(fmt, path)` -> LoadedBenchmark of unified `BenchSample`s
Heavy imports (torch, transformers, sentence-transformers) happen inside the functions."""

from __future__ import annotations

from rmskit._callable import make_callable
from rmskit.score.adapters import ADAPTERS, AdapterError, MissingImagesError, load_benchmark
from rmskit.score.api import DatasetSpec, MatrixReport, ScoreConfig, ScoreReport, score
from rmskit.score.metrics import Metrics, compute_metrics
from rmskit.score.probes import ProbeReport, probe, run_probes
from rmskit.score.sample import BenchSample, Inspection, LoadedBenchmark

# `rmskit.score(cfg)` calls score(cfg) although rmskit.score is this package.
make_callable(__name__, "rmskit.score.api:score")

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
