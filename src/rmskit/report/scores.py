"""score.json files (from `rmskit score`) as report table rows and heatmaps."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rmskit.report.plots import heatmap
from rmskit.stats import fmt_estimate

METRIC_ORDER = (
    "balanced_accuracy",
    "macro_f1",
    "unsafe_recall",
    "false_refusal_rate",
    "auroc",
    "accuracy",
    "majority_baseline",
)
LOWER_IS_BETTER = frozenset({"false_refusal_rate"})


def find_scores(run_dir: Path, score: Path | None) -> list[Path]:
    if score is not None:
        score = Path(score)
        if score.is_dir():
            return sorted(score.rglob("score.json"))
        if not score.is_file():
            raise FileNotFoundError(f"no score file at {score}")
        return [score]
    found: list[Path] = []
    for d in sorted(run_dir.glob("score*")):
        if d.is_dir():
            found += sorted(p for p in d.rglob("score.json") if len(p.relative_to(d).parts) <= 3)
    return found


def load_score(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), dict):
        return None
    return data


def _is_estimate(v: Any) -> bool:
    """An `rmskit.stats.Estimate` as score.json stores it: value with interval, n and per-class counts."""
    return isinstance(v, dict) and "value" in v and "n" in v


def _num(v: Any) -> float | None:
    if _is_estimate(v):
        v = v["value"]
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else None


def _metric_names(*dicts: Any) -> list[str]:
    """Metric keys of Metrics dicts: Estimates (current score.json) or plain numbers (older files);
    counts n / n_safe / n_unsafe and notes are not metrics."""
    names: list[str] = []
    for d in dicts:
        for k, v in (d or {}).items() if isinstance(d, dict) else ():
            metric = v is None or _num(v) is not None or _is_estimate(v)
            if k != "n" and not k.startswith("n_") and metric and k not in names:
                names.append(k)
    return sorted(names, key=lambda m: (METRIC_ORDER.index(m) if m in METRIC_ORDER else 99, m))


def _label(v: Any, *keys: str) -> str:
    if isinstance(v, dict):
        return next((str(v[k]) for k in keys if v.get(k)), json.dumps(v)[:80])
    if isinstance(v, list):
        return ", ".join(_label(x, *keys) for x in v)
    return "" if v is None else str(v)


def _fmt(v: Any) -> str:
    """An Estimate with its interval and n (`0.71 [0.64, 0.78], n=412`); a bare number as it is."""
    if _is_estimate(v):
        try:
            return fmt_estimate(v, digits=3)
        except ValueError:  # pydantic: a malformed estimate in a hand-edited file
            pass
    x = _num(v)
    return f"{x:.3f}" if x is not None else "n/a"


def _headline(met: dict[str, Any]) -> float | None:
    """The dataset score of a tuned judge: balanced accuracy (macro-F1 or unsafe recall in older files)."""
    for m in ("balanced_accuracy", "macro_f1", "unsafe_recall"):
        if _num(met.get(m)) is not None:
            return _num(met.get(m))
    return None


def _matrix(benches: dict[str, dict[str, Any]]) -> tuple[list[dict[str, Any]], str | None]:
    """Rows and heatmap of the matrix shape: benchmarks.NAME.tuned = {train: Metrics}."""
    import numpy as np

    trains = sorted({t for v in benches.values() for t in (v.get("tuned") or {})})
    row_names = ["zero-shot", *trains]
    rows: list[dict[str, Any]] = []
    grid = np.full((len(row_names), len(benches)), np.nan)
    notes = [["" for _ in benches] for _ in row_names]
    for j, (b, v) in enumerate(benches.items()):
        for i, name in enumerate(row_names):
            met = (v.get("zero_shot") if name == "zero-shot" else (v.get("tuned") or {}).get(name)) or {}
            for m in _metric_names(met):
                rows.append(
                    {"bench": b, "n": v.get("n"), "train": name, "metric": m, "value": _fmt(met.get(m))}
                )
            val = _headline(met)
            if val is not None:
                grid[i, j], notes[i][j] = val, f"{val:.2f}"
    if not (benches and trains):
        return rows, None
    return rows, heatmap(
        row_names, list(benches), grid, notes, "headline metric (balanced accuracy): train × benchmark"
    )


def _single(benches: dict[str, dict[str, Any]]) -> tuple[list[dict[str, Any]], str | None]:
    """Rows and heatmap of one training set: benchmarks.NAME.{zero_shot, tuned} = Metrics."""
    import numpy as np

    metrics = _metric_names(*[v.get(p) for v in benches.values() for p in ("tuned", "zero_shot")])
    rows: list[dict[str, Any]] = []
    grid = np.full((len(metrics), len(benches)), np.nan)
    notes = [["" for _ in benches] for _ in metrics]
    for j, (b, v) in enumerate(benches.items()):
        zero, tuned = v.get("zero_shot") or {}, v.get("tuned") or {}
        for m in _metric_names(zero, tuned):
            rows.append(
                {
                    "bench": b,
                    "n": v.get("n"),
                    "metric": m,
                    "zero_shot": _fmt(zero.get(m)),
                    "tuned": _fmt(tuned.get(m)),
                }
            )
        for i, m in enumerate(metrics):
            val, z = _num(tuned.get(m)), _num(zero.get(m))
            if val is None:
                val, z = z, None
            if val is not None:
                grid[i, j] = val
                notes[i][j] = f"{val:.2f}" + (f"\n({val - z:+.2f})" if z is not None else "")
    if not (benches and metrics):
        return rows, None
    # the colour scale reads "higher is better"; say so where it is the other way round
    labels = [f"{m} (lower is better)" if m in LOWER_IS_BETTER else m for m in metrics]
    return rows, heatmap(labels, list(benches), grid, notes, "tuned judge per benchmark (Δ vs zero-shot)")


def score_entry(path: Path, sc: dict[str, Any]) -> dict[str, Any]:
    """One score.json as table rows + a heatmap. Two shapes: one training set
    (benchmarks.NAME.tuned = Metrics) or a matrix (benchmarks.NAME.tuned = {train: Metrics})."""
    benches = {b: v for b, v in sc["benchmarks"].items() if isinstance(v, dict)}
    matrix = any(
        isinstance(v.get("tuned"), dict)
        and v["tuned"]
        and all(isinstance(x, dict) for x in v["tuned"].values())
        for v in benches.values()
    )
    rows, plot = _matrix(benches) if matrix else _single(benches)
    score = sc.get("score_estimate") if _is_estimate(sc.get("score_estimate")) else sc.get("score")
    if isinstance(score, dict) and not _is_estimate(score):
        score_text = ", ".join(f"{k}: {_fmt(v)}" for k, v in score.items())
    else:
        score_text = _fmt(score)
    return {
        "path": str(path),
        "matrix": matrix,
        "train": _label(sc.get("train"), "name", "path"),
        "judge": _label(sc.get("judge"), "model", "spec", "name"),
        "score": score_text,
        "rows": rows,
        "plot": plot,
    }
