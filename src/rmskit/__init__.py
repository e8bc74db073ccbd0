"""rmskit: build real-world multimodal safety datasets image-first, and score safety datasets.

The public API is these plain functions; the CLI is a thin layer over them and takes the same
pydantic configs. Heavy imports (torch, transformers, matplotlib) happen inside the calls, so
importing rmskit stays cheap."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rmskit.config import BuildConfig
    from rmskit.pipeline.runner import BuildSummary
    from rmskit.scoring.api import MatrixReport, ScoreConfig, ScoreReport
    from rmskit.scoring.probes import ProbeReport

__version__ = "0.1.0"

__all__ = ["__version__", "build", "export", "probe", "report", "score", "status"]


def build(config: BuildConfig, *, quiet: bool = False) -> BuildSummary:
    """Run or resume the build that `config` describes (re-running the same config resumes)."""
    from rmskit.pipeline.runner import build as _build

    return _build(config, quiet=quiet)


def score(config: ScoreConfig) -> ScoreReport | MatrixReport:
    """Fine-tune a judge on each training set and evaluate it on the benchmarks."""
    from rmskit.scoring.api import score as _score

    return _score(config)


def export(run: str | Path, fmt: str = "hf", out: str | Path | None = None) -> Path:
    """Write a run's curated dataset in `fmt` (jsonl, hf, llava, sharegpt, judge); returns the folder."""
    from rmskit.export import export as _export

    return _export(Path(run), fmt, Path(out) if out is not None else None)  # type: ignore[arg-type]


def status(run: str | Path) -> dict[str, Any]:
    """The run's counts per image state, stage and sample, as `rmskit status --json` prints them."""
    from rmskit.pipeline.status import run_status

    return run_status(Path(run))


def report(run: str | Path, out: str | Path | None = None) -> Path:
    """Write the run's self-contained HTML report; returns its path."""
    from rmskit.report.build import write_report

    return write_report(run, out)


def probe(run: str | Path, fmt: str | None = None) -> ProbeReport:
    """CPU probes of a dataset (a run directory or any benchmark): leakage, diversity, near-dups."""
    from rmskit.scoring.probes import probe as _probe

    return _probe(run, fmt)
