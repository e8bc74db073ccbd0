"""`rmskit report`: one self-contained HTML file about a run (plots as embedded PNG, no scripts).

Everything is read from the run's ledger (read-only), the exported dataset's images when present, and
score.json files (from `rmskit score`) when present. Review decisions are honoured: rejected samples
are not counted as kept, edited categories count under their new name."""

from __future__ import annotations

import base64
import contextvars
import datetime as dt
import io
import json
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import jinja2
from matplotlib.figure import Figure
from PIL import Image

from rmskit.ledger.store import Ledger
from rmskit.pipeline.registry import STAGES, names_by_role

HERE = Path(__file__).parent
FUNNEL = ("images", "perceived", "scenarios", "composed", "verified", "responded", "kept")
METRIC_ORDER = ("accuracy", "macro_f1", "unsafe_recall", "false_refusal_rate", "auroc")
PLOTS = ("funnel", "checks", "rounds", "taxonomy", "categories", "balance", "tokens")
LOWER_IS_BETTER = frozenset({"false_refusal_rate"})
GALLERY_PER_CATEGORY = 4
THUMB_SIDE = 220

_DRAW: contextvars.ContextVar[bool] = contextvars.ContextVar("rmskit_report_draw", default=True)
_OK, _BAD, _ACCENT, _MUTED = "#1f7a3e", "#b42318", "#2858c7", "#8a97a6"


# -- plotting helpers ----------------------------------------------------------------------------------
def _png(fig: Figure) -> str:
    if not _DRAW.get():
        return ""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)  # constrained layout: one draw (bbox_inches="tight" draws twice)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _fig(w: float, h: float) -> tuple[Figure, Any]:
    fig = Figure(figsize=(w, h), layout="constrained")
    ax = fig.add_subplot()
    ax.spines[["top", "right"]].set_visible(False)
    return fig, ax


def _short(text: str, n: int = 38) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _hbar(
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
    ax.set_yticks(y, [_short(lbl) for lbl in labels])
    ax.set_title(title, loc="left", fontsize=11)
    ax.set_xlabel(xlabel)
    if xlim:
        ax.set_xlim(*xlim)
    ax.bar_label(bars, labels=[fmt.format(v) for v in values], padding=3, fontsize=9)
    ax.margins(x=0.12)
    return _png(fig)


# -- data ---------------------------------------------------------------------------------------------
def _sample_of(key: str) -> str:
    """Record key '<sample_id>/r<n>' -> sample id."""
    return key.rsplit("/", 1)[0] if "/" in key else key


def _effective(samples: list[dict[str, Any]], state: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Kept samples as the export sees them: rejected ones out, review edits applied."""
    out = []
    for s in samples:
        st = state.get(s["id"]) or {}
        if st.get("decision") == "reject":
            continue
        out.append(
            {
                **s,
                **{
                    k: v for k, v in (st.get("edits") or {}).items() if k in ("query", "response", "category")
                },
            }
        )
    return out


def _funnel(led: Ledger, kept: int) -> dict[str, int]:
    images = led.query("SELECT COUNT(*) FROM images")[0][0]
    perceived = led.query(
        "SELECT COUNT(DISTINCT image_sha) FROM records WHERE stage='perceive' AND status='ok'"
    )[0][0]
    scenarios = 0
    for (data,) in led.query("SELECT data FROM records WHERE stage='discover' AND status='ok'"):
        try:
            scenarios += len((json.loads(data) or {}).get("scenarios") or [])
        except (json.JSONDecodeError, AttributeError):
            continue

    def ids(*prefixes: str) -> set[str]:
        """Sample ids with an ok record of a stage named like one of `prefixes` (the runner splits stages:
        compose / control, respond / respond_control, verify / check_*)."""
        rows = led.query("SELECT stage, key FROM records WHERE status='ok' AND key != ''")
        return {_sample_of(k) for st, k in rows if st.startswith(prefixes) and st not in response_checks}

    # Stage names by model role come from the pipeline's stage registry.
    response_checks = {s.name for s in STAGES.values() if s.role == "verify" and s.unit == "response"}
    verified = {
        s for (s,) in led.query("SELECT DISTINCT sample_id FROM rounds WHERE phase='query' AND passed=1")
    }
    if not verified:  # runs without round rows: any sample with a verify / check record
        verified = ids("verify", *names_by_role("verify"))
    return {
        "images": images,
        "perceived": perceived,
        "scenarios": scenarios,
        "composed": len(ids(*names_by_role("compose"))),
        "verified": len(verified),
        "responded": len(ids(*names_by_role("respond"))),
        "kept": kept,
    }


def _check_rates(led: Ledger) -> list[dict[str, Any]]:
    stats: dict[tuple[str, str], dict[str, int]] = defaultdict(
        lambda: {"n": 0, "pass": 0, "n1": 0, "pass1": 0}
    )
    for phase, rnd, data in led.query("SELECT phase, round, data FROM rounds ORDER BY phase, round"):
        checks = (json.loads(data) or {}).get("checks") or {}
        for name, val in checks.items():
            ok = bool(val.get("pass")) if isinstance(val, dict) else bool(val)
            st = stats[(phase, name)]
            st["n"] += 1
            st["pass"] += ok
            if rnd == 1:
                st["n1"] += 1
                st["pass1"] += ok
    return [
        {
            "phase": ph,
            "check": name,
            "n": st["n"],
            "rate": st["pass"] / st["n"],
            "rate1": st["pass1"] / st["n1"] if st["n1"] else None,
        }
        for (ph, name), st in sorted(stats.items())
    ]


def _round_counts(led: Ledger) -> dict[str, Counter]:
    status = dict(led.query("SELECT id, status FROM samples"))
    rounds = dict(
        led.query("SELECT sample_id, MAX(round) FROM rounds WHERE phase='query' GROUP BY sample_id")
    )
    if not rounds:
        for sid, data in led.query("SELECT id, data FROM samples"):
            rounds[sid] = int((json.loads(data) or {}).get("rounds") or 1)
    out: dict[str, Counter] = {"ok": Counter(), "failed": Counter(), "in progress": Counter()}
    for sid, n in rounds.items():
        st = status.get(sid)
        out[st if st in ("ok", "failed") else "in progress"][n] += 1
    return out


def _flatten(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(obj, dict):
        rows: list[tuple[str, Any]] = []
        for k, v in obj.items():
            rows.extend(_flatten(v, f"{prefix}{k}." if not isinstance(v, dict) or v else f"{prefix}{k}"))
        return rows
    key = prefix[:-1] if prefix.endswith(".") else prefix
    if isinstance(obj, float):
        return [(key, f"{obj:.4g}")]
    if isinstance(obj, list):
        return [(key, ", ".join(str(x) for x in obj))]
    return [(key, obj)]


def _card_probes(readme: Path) -> list[tuple[str, Any]]:
    """(probe, value) rows of the dataset card's "## Probes" table, for runs whose ledger has none."""
    try:
        text = readme.read_text(encoding="utf-8")
    except OSError:
        return []
    rows: list[tuple[str, Any]] = []
    in_section = False
    for line in text.splitlines():
        if line.startswith("## "):
            in_section = line.strip().lower() == "## probes"
            continue
        if in_section and line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) == 2 and cells != ["probe", "value"]:
                rows.append((cells[0], cells[1]))
    return rows


def _find_scores(run_dir: Path, score: Path | None) -> list[Path]:
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


def _load_score(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), dict):
        return None
    return data


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else None


def _metric_names(*dicts: Any) -> list[str]:
    """Metric keys of Metrics dicts (counts n / n_safe / n_unsafe and the `undefined` notes left out)."""
    names: list[str] = []
    for d in dicts:
        for k, v in (d or {}).items() if isinstance(d, dict) else ():
            if k != "n" and not k.startswith("n_") and (v is None or _num(v) is not None) and k not in names:
                names.append(k)
    return sorted(names, key=lambda m: (METRIC_ORDER.index(m) if m in METRIC_ORDER else 99, m))


def _label(v: Any, *keys: str) -> str:
    if isinstance(v, dict):
        return next((str(v[k]) for k in keys if v.get(k)), json.dumps(v)[:80])
    if isinstance(v, list):
        return ", ".join(_label(x, *keys) for x in v)
    return "" if v is None else str(v)


def _heatmap(rows: list[str], cols: list[str], grid: Any, notes: list[list[str]], title: str) -> str:
    fig = Figure(figsize=(1.5 * len(cols) + 3.5, 0.75 * len(rows) + 1.4), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(cols)), [_short(c, 18) for c in cols], rotation=20, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for i in range(len(rows)):
        for j in range(len(cols)):
            if notes[i][j]:
                color = "white" if grid[i, j] < 0.6 else "black"
                ax.text(j, i, notes[i][j], ha="center", va="center", fontsize=8, color=color)
    ax.set_title(title, loc="left", fontsize=11)
    fig.colorbar(im, ax=ax, fraction=0.04)
    return _png(fig)


def _score_entry(path: Path, sc: dict[str, Any]) -> dict[str, Any]:
    """One score.json (`rmskit score`) as table rows + a heatmap. Two shapes: one training set
    (benchmarks.NAME.tuned = Metrics) or a matrix (benchmarks.NAME.tuned = {train: Metrics})."""
    import numpy as np

    benches = {b: v for b, v in sc["benchmarks"].items() if isinstance(v, dict)}
    matrix = any(
        isinstance(v.get("tuned"), dict)
        and v["tuned"]
        and all(isinstance(x, dict) for x in v["tuned"].values())
        for v in benches.values()
    )
    rows: list[dict[str, Any]] = []
    plot: str | None = None
    if matrix:
        trains = sorted({t for v in benches.values() for t in (v.get("tuned") or {})})
        for b, v in benches.items():
            zero = v.get("zero_shot") or {}
            for name, met in [
                ("zero-shot", zero),
                *((t, (v.get("tuned") or {}).get(t) or {}) for t in trains),
            ]:
                for m in _metric_names(met):
                    val = _num(met.get(m))
                    rows.append(
                        {
                            "bench": b,
                            "n": v.get("n"),
                            "train": name,
                            "metric": m,
                            "value": f"{val:.3f}" if val is not None else "n/a",
                        }
                    )

        # the dataset score is the headline metric (macro-F1, else unsafe recall) of each tuned judge
        def headline(met: dict[str, Any]) -> float | None:
            return (
                _num(met.get("macro_f1"))
                if _num(met.get("macro_f1")) is not None
                else _num(met.get("unsafe_recall"))
            )

        row_names = ["zero-shot", *trains]
        grid = np.full((len(row_names), len(benches)), np.nan)
        notes = [["" for _ in benches] for _ in row_names]
        for j, v in enumerate(benches.values()):
            for i, name in enumerate(row_names):
                met = v.get("zero_shot") if name == "zero-shot" else (v.get("tuned") or {}).get(name)
                val = headline(met or {})
                if val is not None:
                    grid[i, j], notes[i][j] = val, f"{val:.2f}"
        if benches and trains:
            plot = _heatmap(
                row_names, list(benches), grid, notes, "headline metric (macro-F1): train × benchmark"
            )
    else:
        metrics = _metric_names(*[v.get(p) for v in benches.values() for p in ("tuned", "zero_shot")])
        for b, v in benches.items():
            zero, tuned = v.get("zero_shot") or {}, v.get("tuned") or {}
            for m in _metric_names(zero, tuned):
                zs, tu = _num(zero.get(m)), _num(tuned.get(m))
                rows.append(
                    {
                        "bench": b,
                        "n": v.get("n"),
                        "metric": m,
                        "zero_shot": f"{zs:.3f}" if zs is not None else "n/a",
                        "tuned": f"{tu:.3f}" if tu is not None else "n/a",
                    }
                )
        grid = np.full((len(metrics), len(benches)), np.nan)
        notes = [["" for _ in benches] for _ in metrics]
        for j, v in enumerate(benches.values()):
            zero, tuned = v.get("zero_shot") or {}, v.get("tuned") or {}
            for i, m in enumerate(metrics):
                val, z = _num(tuned.get(m)), _num(zero.get(m))
                if val is None:
                    val, z = z, None
                if val is not None:
                    grid[i, j] = val
                    notes[i][j] = f"{val:.2f}" + (f"\n({val - z:+.2f})" if z is not None else "")
        if benches and metrics:
            # the colour scale reads "higher is better"; say so where it is the other way round
            labels = [f"{m} (lower is better)" if m in LOWER_IS_BETTER else m for m in metrics]
            plot = _heatmap(labels, list(benches), grid, notes, "tuned judge per benchmark (Δ vs zero-shot)")
    score = sc.get("score")
    if isinstance(score, dict):
        score_text = ", ".join(
            f"{k}: {_num(v):.3f}" if _num(v) is not None else f"{k}: n/a" for k, v in score.items()
        )
    else:
        score_text = f"{_num(score):.3f}" if _num(score) is not None else "n/a"
    return {
        "path": str(path),
        "matrix": matrix,
        "train": _label(sc.get("train"), "name", "path"),
        "judge": _label(sc.get("judge"), "model", "spec", "name"),
        "score": score_text,
        "rows": rows,
        "plot": plot,
    }


def _thumb(path: Path) -> str | None:
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((THUMB_SIDE, THUMB_SIDE))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=80)
    except (OSError, ValueError):
        return None
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _image_file(run_dir: Path, led: Ledger, sha: str) -> Path | None:
    for p in (run_dir / "dataset" / "images" / f"{sha}.jpg", run_dir / "images" / f"{sha}.jpg"):
        if p.is_file():
            return p
    rec = led.get_image(sha)
    if rec and Path(rec.path).is_file():
        return Path(rec.path)
    return None


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _when(ts: Any) -> str:
    try:
        return dt.datetime.fromtimestamp(float(ts)).strftime("%Y-%m-%d %H:%M:%S")
    except (TypeError, ValueError, OverflowError, OSError):
        return str(ts or "")


# -- the report ---------------------------------------------------------------------------------------
def collect(run_dir: Path, score: Path | None = None, *, draw: bool = True) -> dict[str, Any]:
    """Everything the report shows, with plots as base64 PNG strings (None when there is no data; empty
    when `draw` is False, for callers that want the numbers only)."""
    token = _DRAW.set(draw)
    try:
        return _collect(Path(run_dir), score)
    finally:
        _DRAW.reset(token)


def _collect(run_dir: Path, score: Path | None) -> dict[str, Any]:
    with Ledger(run_dir, readonly=True) as led:
        samples_ok = list(led.iter_samples("ok"))
        state = led.review_state()
        kept = _effective(samples_ok, state)
        counts = led.sample_counts()
        plots: dict[str, str | None] = dict.fromkeys(PLOTS)
        ctx: dict[str, Any] = {"run_name": run_dir.name, "run_dir": str(run_dir)}

        started, finished = led.get_meta("started_at"), led.get_meta("finished_at")
        config = led.get_meta("config") or {}
        ctx["summary"] = [
            ("rmskit version", led.get_meta("rmskit_version") or "?"),
            ("started", _when(started)),
            ("finished", _when(finished) if finished else "not finished"),
            (
                "duration",
                _duration(float(finished) - float(started)) if started and finished else "",
            ),
            ("model", ((config.get("model") or {}).get("spec")) if isinstance(config, dict) else ""),
            ("samples ok / failed", f"{counts.get('ok', 0)} / {counts.get('failed', 0)}"),
            (
                "reviewed",
                f"{sum(1 for s in state.values() if s['decision'] == 'accept')} accepted, "
                f"{sum(1 for s in state.values() if s['decision'] == 'reject')} rejected, "
                f"{sum(1 for s in state.values() if s['edits'])} edited",
            ),
            ("ingest refusals", str(len(led.rejections()))),
        ]
        ctx["prompt_versions"] = led.get_meta("prompt_versions") or {}

        funnel = _funnel(led, len(kept))
        ctx["funnel"] = funnel
        if funnel["images"]:
            plots["funnel"] = _hbar(
                list(FUNNEL),
                [funnel[k] for k in FUNNEL],
                title="stage funnel",
                xlabel="count (images, then scenarios / samples)",
            )

        rates = _check_rates(led)
        ctx["check_rates"] = rates
        if rates:
            labels = [f"{r['phase']}: {r['check']}" for r in rates]
            fig, ax = _fig(7.5, 0.5 * len(labels) + 1.3)
            y = list(range(len(labels)))[::-1]
            import numpy as np

            yy = np.array(y, dtype=float)
            b1 = ax.barh(yy + 0.2, [r["rate"] for r in rates], height=0.4, color=_ACCENT, label="all rounds")
            ax.barh(yy - 0.2, [r["rate1"] or 0 for r in rates], height=0.4, color=_MUTED, label="first round")
            ax.bar_label(b1, labels=[f"{r['rate']:.0%}" for r in rates], padding=3, fontsize=8)
            ax.set_yticks(y, labels)
            ax.set_xlim(0, 1.12)
            ax.set_xlabel("pass rate")
            ax.set_title("pass rate per check", loc="left", fontsize=11)
            ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
            plots["checks"] = _png(fig)

        rc = _round_counts(led)
        ctx["round_counts"] = {k: dict(sorted(v.items())) for k, v in rc.items() if v}
        if any(rc.values()):
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
            plots["rounds"] = _png(fig)

        tax = led.taxonomy()
        per_cat = Counter(s.get("category") or "?" for s in kept if s.get("kind") == "risky")
        t0 = float(started) if started else (min((t["created"] or 0) for t in tax) if tax else 0.0)
        ctx["taxonomy"] = [
            {
                "name": t["name"],
                "aliases": t["aliases"],
                "samples": per_cat.get(t["name"], 0),
                "minute": ((t["created"] or t0) - t0) / 60,
            }
            for t in tax
        ]
        if tax:
            mins = sorted(((t["created"] or t0) - t0) / 60 for t in tax)
            fig, ax = _fig(6.5, 3.2)
            ax.step([0.0, *mins], list(range(0, len(mins) + 1)), where="post", color=_ACCENT, linewidth=2)
            ax.plot(mins, range(1, len(mins) + 1), "o", color=_ACCENT, markersize=4)
            if finished and started:
                end = (float(finished) - t0) / 60
                if end > mins[-1]:
                    ax.hlines(len(mins), mins[-1], end, color=_ACCENT, linewidth=2)
            ax.set_xlabel("minutes since the run started")
            ax.set_ylabel("categories")
            ax.set_title("taxonomy growth", loc="left", fontsize=11)
            plots["taxonomy"] = _png(fig)

        if per_cat:
            cats = sorted(per_cat, key=lambda c: (-per_cat[c], c))
            plots["categories"] = _hbar(
                cats, [per_cat[c] for c in cats], title="risky samples per category", xlabel="kept samples"
            )
        ctx["categories"] = dict(sorted(per_cat.items(), key=lambda kv: -kv[1]))

        lk = Counter((s.get("label") or "?", s.get("kind") or "?") for s in kept)
        ctx["label_kind"] = {f"{lbl} / {k}": n for (lbl, k), n in sorted(lk.items())}
        if lk:
            labels = sorted({lbl for lbl, _ in lk})
            kinds = sorted({k for _, k in lk})
            fig, ax = _fig(5.5, 3.0)
            width = 0.8 / len(kinds)
            for i, k in enumerate(kinds):
                xs2 = [j + (i - (len(kinds) - 1) / 2) * width for j in range(len(labels))]
                bars = ax.bar(
                    xs2,
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
            plots["balance"] = _png(fig)

        usage = led.usage_by_stage()
        ctx["usage"] = usage
        if usage:
            stages = sorted(usage, key=lambda s: -(usage[s]["prompt_tokens"] + usage[s]["completion_tokens"]))
            fig, ax = _fig(7.0, 0.45 * len(stages) + 1.3)
            y = list(range(len(stages)))[::-1]
            pt = [usage[s]["prompt_tokens"] for s in stages]
            ct = [usage[s]["completion_tokens"] for s in stages]
            ax.barh(y, pt, color=_ACCENT, label="prompt")
            bars = ax.barh(y, ct, left=pt, color="#e0a526", label="completion")
            ax.bar_label(
                bars, labels=[f"{a + b:,}" for a, b in zip(pt, ct, strict=True)], padding=3, fontsize=8
            )
            ax.set_yticks(y, stages)
            ax.set_xlabel("tokens")
            ax.set_title("tokens per stage", loc="left", fontsize=11)
            ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
            ax.margins(x=0.15)
            plots["tokens"] = _png(fig)

        scores = []
        for path in _find_scores(run_dir, score):
            sc = _load_score(path)
            if sc is not None:
                scores.append(_score_entry(path, sc))
        ctx["scores"] = scores

        probes = led.get_meta("probes")
        card_probes = _card_probes(run_dir / "dataset" / "README.md") if not probes else []
        if not probes and not card_probes:
            probes = next(
                (
                    s["probes"]
                    for s in map(_load_score, _find_scores(run_dir, score))
                    if s and isinstance(s.get("probes"), dict)
                ),
                None,
            )
        ctx["probes"] = _flatten(probes) if isinstance(probes, dict) else card_probes

        by_cat: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for s in kept:
            cat = s.get("category") or "?"
            if s.get("kind") == "control":
                cat = "control (benign)"
            if len(by_cat[cat]) < GALLERY_PER_CATEGORY:
                by_cat[cat].append(s)
        thumbs: dict[str, str | None] = {}
        gallery = []
        for cat in sorted(by_cat, key=lambda c: (c == "control (benign)", c)):
            items = []
            for s in by_cat[cat]:
                sha = str(s.get("image_sha256") or "")
                if sha not in thumbs:
                    path = _image_file(run_dir, led, sha)
                    thumbs[sha] = _thumb(path) if path else None
                items.append(
                    {
                        "id": s["id"],
                        "thumb": thumbs[sha],
                        "query": _short(s.get("query") or "", 300),
                        "response": _short(s.get("response") or "", 360),
                        "label": s.get("label"),
                        "kind": s.get("kind"),
                    }
                )
            gallery.append({"category": cat, "samples": items})
        ctx["gallery"] = gallery

        fails = Counter((f["stage"], f["kind"]) for f in led.failures())
        ctx["failures"] = [{"stage": st, "kind": k, "n": n} for (st, k), n in fails.most_common(20)]
        ctx["plots"] = plots
        ctx["generated"] = dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    return ctx


def render(ctx: dict[str, Any]) -> str:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True, undefined=jinja2.StrictUndefined
    )
    return env.get_template("report.html").render(**ctx)


def write_report(
    run_dir: Path | str, out: Path | str | None = None, *, score: Path | str | None = None
) -> Path:
    """Write the run's HTML report (default `<run_dir>/report.html`) and return its path."""
    run_dir = Path(run_dir)
    out_path = Path(out) if out is not None else run_dir / "report.html"
    html = render(collect(run_dir, Path(score) if score is not None else None))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(out_path)
    return out_path
