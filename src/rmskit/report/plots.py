"""The report's plots: matplotlib figures rendered to base64 PNG (empty strings when drawing is off)."""

from __future__ import annotations

import base64
import contextvars
import io
from collections import Counter
from typing import Any

from matplotlib.figure import Figure

DRAW: contextvars.ContextVar[bool] = contextvars.ContextVar("rmskit_report_draw", default=True)
_OK, _BAD, _ACCENT, _MUTED = "#1f7a3e", "#b42318", "#2858c7", "#8a97a6"


def _png(fig: Figure) -> str:
    if not DRAW.get():
        return ""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)  # constrained layout: one draw (bbox_inches="tight" draws twice)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _fig(w: float, h: float) -> tuple[Figure, Any]:
    fig = Figure(figsize=(w, h), layout="constrained")
    ax = fig.add_subplot()
    ax.spines[["top", "right"]].set_visible(False)
    return fig, ax


def short(text: str, n: int = 38) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def hbar(
    labels: list[str],
    values: list[float],
    *,
    title: str,
    xlabel: str,
    color: str = _ACCENT,
    fmt: str = "{:g}",
    xlim: tuple[float, float] | None = None,
) -> str:
    fig, ax = _fig(7.5, 0.45 * len(labels) + 1.2)
    y = list(range(len(labels)))[::-1]
    bars = ax.barh(y, values, color=color)
    ax.set_yticks(y, [short(lbl) for lbl in labels])
    ax.set_title(title, loc="left", fontsize=11)
    ax.set_xlabel(xlabel)
    if xlim:
        ax.set_xlim(*xlim)
    ax.bar_label(bars, labels=[fmt.format(v) for v in values], padding=3, fontsize=9)
    ax.margins(x=0.12)
    return _png(fig)


def heatmap(rows: list[str], cols: list[str], grid: Any, notes: list[list[str]], title: str) -> str:
    fig = Figure(figsize=(1.5 * len(cols) + 3.5, 0.75 * len(rows) + 1.4), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(cols)), [short(c, 18) for c in cols], rotation=20, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for i in range(len(rows)):
        for j in range(len(cols)):
            if notes[i][j]:
                color = "white" if grid[i, j] < 0.6 else "black"
                ax.text(j, i, notes[i][j], ha="center", va="center", fontsize=8, color=color)
    ax.set_title(title, loc="left", fontsize=11)
    fig.colorbar(im, ax=ax, fraction=0.04)
    return _png(fig)


def checks_plot(rates: list[dict[str, Any]]) -> str:
    import numpy as np

    labels = [f"{r['phase']}: {r['check']}" for r in rates]
    fig, ax = _fig(7.5, 0.5 * len(labels) + 1.3)
    y = list(range(len(labels)))[::-1]
    yy = np.array(y, dtype=float)
    b1 = ax.barh(yy + 0.2, [r["rate"] for r in rates], height=0.4, color=_ACCENT, label="all rounds")
    ax.barh(yy - 0.2, [r["rate1"] or 0 for r in rates], height=0.4, color=_MUTED, label="first round")
    ax.bar_label(b1, labels=[f"{r['rate']:.0%}" for r in rates], padding=3, fontsize=8)
    ax.set_yticks(y, labels)
    ax.set_xlim(0, 1.12)
    ax.set_xlabel("pass rate")
    ax.set_title("pass rate per check", loc="left", fontsize=11)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    return _png(fig)


def rounds_plot(rc: dict[str, Counter]) -> str:
    n_max = max(max(c) for c in rc.values() if c)
    xs = list(range(1, n_max + 1))
    fig, ax = _fig(6.5, 3.2)
    bottom = [0] * len(xs)
    for name, color in (("ok", _OK), ("failed", _BAD), ("in progress", _MUTED)):
        vals = [rc[name].get(x, 0) for x in xs]
        if any(vals):
            ax.bar(xs, vals, bottom=bottom, color=color, label=name)
            bottom = [a + b for a, b in zip(bottom, vals, strict=True)]
    ax.set_xticks(xs)
    ax.set_xlabel("query refine rounds used")
    ax.set_ylabel("samples")
    ax.set_title("refine rounds per sample", loc="left", fontsize=11)
    ax.legend(fontsize=8)
    return _png(fig)


def taxonomy_plot(minutes: list[float], end: float | None) -> str:
    """Categories over time: `minutes` (sorted) since the start at which each appeared."""
    fig, ax = _fig(6.5, 3.2)
    ax.step([0.0, *minutes], list(range(0, len(minutes) + 1)), where="post", color=_ACCENT, linewidth=2)
    ax.plot(minutes, range(1, len(minutes) + 1), "o", color=_ACCENT, markersize=4)
    if end is not None and end > minutes[-1]:
        ax.hlines(len(minutes), minutes[-1], end, color=_ACCENT, linewidth=2)
    ax.set_xlabel("minutes since the run started")
    ax.set_ylabel("categories")
    ax.set_title("taxonomy growth", loc="left", fontsize=11)
    return _png(fig)


def balance_plot(lk: Counter) -> str:
    labels = sorted({lbl for lbl, _ in lk})
    kinds = sorted({k for _, k in lk})
    fig, ax = _fig(5.5, 3.0)
    width = 0.8 / len(kinds)
    for i, k in enumerate(kinds):
        xs = [j + (i - (len(kinds) - 1) / 2) * width for j in range(len(labels))]
        bars = ax.bar(
            xs,
            [lk.get((lbl, k), 0) for lbl in labels],
            width=width,
            label=k,
            color=(_BAD, _OK, _MUTED)[i % 3],
        )
        ax.bar_label(bars, fontsize=8, padding=2)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("kept samples")
    ax.set_title("label / kind balance", loc="left", fontsize=11)
    ax.legend(fontsize=8)
    ax.margins(y=0.15)
    return _png(fig)


def tokens_plot(usage: dict[str, dict[str, int]]) -> str:
    stages = sorted(usage, key=lambda s: -(usage[s]["prompt_tokens"] + usage[s]["completion_tokens"]))
    fig, ax = _fig(7.0, 0.45 * len(stages) + 1.3)
    y = list(range(len(stages)))[::-1]
    pt = [usage[s]["prompt_tokens"] for s in stages]
    ct = [usage[s]["completion_tokens"] for s in stages]
    ax.barh(y, pt, color=_ACCENT, label="prompt")
    bars = ax.barh(y, ct, left=pt, color="#e0a526", label="completion")
    ax.bar_label(bars, labels=[f"{a + b:,}" for a, b in zip(pt, ct, strict=True)], padding=3, fontsize=8)
    ax.set_yticks(y, stages)
    ax.set_xlabel("tokens")
    ax.set_title("tokens per stage", loc="left", fontsize=11)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    ax.margins(x=0.15)
    return _png(fig)
