"""The train x benchmark matrix of headline metrics, drawn as a heatmap PNG."""

from __future__ import annotations

from pathlib import Path


def write_heatmap(
    rows: list[str],
    cols: list[str],
    values: list[list[float | None]],
    out: Path,
    title: str = "judge: balanced accuracy (single-class benchmarks pooled with benign items)",
) -> Path:
    """`values[i][j]` is row i's number on benchmark j (None = undefined, drawn grey)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    data = np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * max(len(cols), 1), 1.2 + 0.6 * max(len(rows), 1)))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#cccccc")
    im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(cols)), labels=cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), labels=rows)
    for i in range(len(rows)):
        for j in range(len(cols)):
            v = data[i, j]
            ax.text(
                j,
                i,
                "n/a" if np.isnan(v) else f"{v:.2f}",
                ha="center",
                va="center",
                color="black" if np.isnan(v) or v > 0.6 else "white",
                fontsize=9,
            )
    ax.set_xlabel("benchmark")
    ax.set_ylabel("judge trained on")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
