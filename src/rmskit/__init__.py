"""rmskit: build real-world multimodal safety datasets image-first, and score safety datasets.

The Python API mirrors the CLI and takes the same pydantic configs:
`rmskit.build(BuildConfig(...))`, `rmskit.score(ScoreConfig(...))`, `rmskit.probe(path)`,
`rmskit.export(run_dir, fmt)`, `rmskit.write_report(run_dir)`. Names resolve lazily so importing
rmskit stays cheap."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "build": ("rmskit.build", None),  # a callable package: rmskit.build(cfg)
    "BuildConfig": ("rmskit.config", "BuildConfig"),
    "BackendConfig": ("rmskit.config", "BackendConfig"),
    "score": ("rmskit.score", None),  # a callable package: rmskit.score(cfg)
    "ScoreConfig": ("rmskit.score", "ScoreConfig"),
    "probe": ("rmskit.score", "probe"),
    "run_probes": ("rmskit.score", "run_probes"),
    "export": ("rmskit.export", "export"),
    "write_dataset": ("rmskit.export", "write_dataset"),
    "write_report": ("rmskit.report", "write_report"),
    "status": ("rmskit.build.status", "run_status"),
}

__all__ = ["__version__", *sorted(_API)]


def __getattr__(name: str) -> Any:
    if name in _API:
        module, attr = _API[name]
        mod = importlib.import_module(module)
        return mod if attr is None else getattr(mod, attr)
    raise AttributeError(f"module 'rmskit' has no attribute {name!r}")
