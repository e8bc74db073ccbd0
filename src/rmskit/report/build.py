"""`rmskit report`: one self-contained HTML file about a run (plots as embedded PNG, no scripts).

Everything is read from the run's ledger (read-only), the exported dataset's images when present, and
score.json files (from `rmskit score`) when present. Review decisions are honoured: rejected samples
are not counted as kept, edited categories count under their new name."""

from __future__ import annotations

import base64
import datetime as dt
import io
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import jinja2
from PIL import Image

from rmskit.ledger.store import Ledger
from rmskit.pipeline.quality import pass_rates_by_category
from rmskit.pipeline.registry import names_by_role
from rmskit.report import plots
from rmskit.report.plots import DRAW, hbar, short
from rmskit.report.scores import find_scores, load_score, score_entry
from rmskit.stats import fmt_estimate, wilson

HERE = Path(__file__).parent
FUNNEL = ("images", "perceived", "scenarios", "composed", "verified", "responded", "kept")
PLOTS = ("funnel", "checks", "rounds", "taxonomy", "categories", "balance", "tokens")
GALLERY_PER_CATEGORY = 4
THUMB_SIDE = 220


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
    scenarios = sum(len((d or {}).get("scenarios") or []) for d in led.record_data("discover"))
    keyed = led.sample_records("ok")

    def ids(*stages: str) -> set[str]:
        """Sample ids with an ok record of one of `stages` (risky and control samples have their own;
        stage names by model role come from the pipeline's stage registry)."""
        return {_sample_of(k) for st, k in keyed if st in stages}

    return {
        "images": led.image_total(),
        "perceived": led.images_with_record("perceive"),
        "scenarios": scenarios,
        "composed": len(ids(*names_by_role("compose"))),
        "verified": len(led.samples_passed("query")),
        "responded": len(ids(*names_by_role("respond"))),
        "kept": kept,
    }


def _check_rates(led: Ledger) -> list[dict[str, Any]]:
    stats: dict[tuple[str, str], dict[str, int]] = defaultdict(
        lambda: {"n": 0, "pass": 0, "n1": 0, "pass1": 0}
    )
    for r in led.iter_rounds():
        for name, val in ((r["data"] or {}).get("checks") or {}).items():
            ok = bool(val.get("pass"))
            st = stats[(r["phase"], name)]
            st["n"] += 1
            st["pass"] += ok
            if r["round"] == 1:
                st["n1"] += 1
                st["pass1"] += ok
    return [
        {
            "phase": ph,
            "check": name,
            "n": st["n"],
            "rate": st["pass"] / st["n"],
            "rate1": st["pass1"] / st["n1"] if st["n1"] else None,
            "shown": fmt_estimate(wilson(st["pass"], st["n"])),
            "shown1": fmt_estimate(wilson(st["pass1"], st["n1"])) if st["n1"] else "",
        }
        for (ph, name), st in sorted(stats.items())
    ]


def _round_counts(led: Ledger) -> dict[str, Counter]:
    status = led.sample_statuses()
    out: dict[str, Counter] = {"ok": Counter(), "failed": Counter(), "in progress": Counter()}
    for sid, n in led.last_rounds("query").items():
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
    token = DRAW.set(draw)
    try:
        return _collect(Path(run_dir), score)
    finally:
        DRAW.reset(token)


def _collect(run_dir: Path, score: Path | None) -> dict[str, Any]:
    with Ledger(run_dir, readonly=True) as led:
        state = led.review_state()
        kept = _effective(list(led.iter_samples("ok")), state)
        ctx: dict[str, Any] = {"run_name": run_dir.name, "run_dir": str(run_dir)}
        ctx["summary"] = _summary(led, state)
        ctx["prompt_versions"] = led.get_meta("prompt_versions") or {}
        p: dict[str, str | None] = dict.fromkeys(PLOTS)
        ctx["funnel"] = funnel = _funnel(led, len(kept))
        if funnel["images"]:
            values = [float(funnel[k]) for k in FUNNEL]
            p["funnel"] = hbar(
                list(FUNNEL), values, title="stage funnel", xlabel="count (images, then scenarios / samples)"
            )
        ctx["check_rates"] = rates = _check_rates(led)
        p["checks"] = plots.checks_plot(rates) if rates else None
        rc = _round_counts(led)
        ctx["round_counts"] = {k: dict(sorted(v.items())) for k, v in rc.items() if v}
        p["rounds"] = plots.rounds_plot(rc) if any(rc.values()) else None
        per_cat = Counter(s.get("category") or "?" for s in kept if s.get("kind") == "risky")
        ctx["taxonomy"], p["taxonomy"] = _taxonomy(led, per_cat)
        if per_cat:
            cats = sorted(per_cat, key=lambda c: (-per_cat[c], c))
            p["categories"] = hbar(
                cats, [per_cat[c] for c in cats], title="risky samples per category", xlabel="kept samples"
            )
        ctx["categories"] = dict(sorted(per_cat.items(), key=lambda kv: -kv[1]))
        lk = Counter((s.get("label") or "?", s.get("kind") or "?") for s in kept)
        ctx["label_kind"] = {f"{lbl} / {k}": n for (lbl, k), n in sorted(lk.items())}
        p["balance"] = plots.balance_plot(lk) if lk else None
        ctx["usage"] = usage = led.usage_by_stage()
        p["tokens"] = plots.tokens_plot(usage) if usage else None
        score_files = [(path, load_score(path)) for path in find_scores(run_dir, score)]
        ctx["scores"] = [score_entry(path, sc) for path, sc in score_files if sc is not None]
        ctx["probes"] = _probes(led, run_dir, [sc for _, sc in score_files if sc is not None])
        ctx["pass_rates"] = [
            {"category": r.category, "kept": r.kept, "n": r.n, "shown": fmt_estimate(r.rate)}
            for r in pass_rates_by_category(led)
        ]
        ctx["agreement"] = _agreement(led.get_meta("agreement"))
        ctx["gallery"] = _gallery(run_dir, led, kept)
        fails = Counter((f["stage"], f["kind"]) for f in led.failures())
        ctx["failures"] = [{"stage": st, "kind": k, "n": n} for (st, k), n in fails.most_common(20)]
        ctx["plots"] = p
        ctx["generated"] = dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    return ctx


def _agreement(meta: Any) -> dict[str, Any] | None:
    """Verifier agreement from the ledger meta, each check's kappa and raw agreement formatted."""
    if not isinstance(meta, dict) or not meta.get("checks"):
        return None
    rows = [
        {"check": name, "kappa": fmt_estimate(c.get("kappa")), "agreement": fmt_estimate(c.get("agreement"))}
        for name, c in sorted(meta["checks"].items())
    ]
    return {"n": meta.get("n_rounds"), "second": meta.get("second_verifier"), "rows": rows}


def _summary(led: Ledger, state: dict[str, dict[str, Any]]) -> list[tuple[str, Any]]:
    started, finished = led.get_meta("started_at"), led.get_meta("finished_at")
    config = led.get_meta("config") or {}
    counts = led.sample_counts()
    decisions = Counter(s["decision"] for s in state.values())
    return [
        ("rmskit version", led.get_meta("rmskit_version") or "?"),
        ("started", _when(started)),
        ("finished", _when(finished) if finished else "not finished"),
        ("duration", _duration(float(finished) - float(started)) if started and finished else ""),
        ("model", ((config.get("model") or {}).get("spec")) if isinstance(config, dict) else ""),
        ("samples ok / failed", f"{counts.get('ok', 0)} / {counts.get('failed', 0)}"),
        (
            "reviewed",
            f"{decisions['accept']} accepted, {decisions['reject']} rejected, "
            f"{sum(1 for s in state.values() if s['edits'])} edited",
        ),
        ("ingest refusals", str(len(led.rejections()))),
    ]


def _taxonomy(led: Ledger, per_cat: Counter) -> tuple[list[dict[str, Any]], str | None]:
    """Taxonomy rows (with kept samples per category and when it appeared) and its growth plot."""
    tax = led.taxonomy()
    if not tax:
        return [], None
    started, finished = led.get_meta("started_at"), led.get_meta("finished_at")
    t0 = float(started) if started else min((t["created"] or 0) for t in tax)

    def minute(t: dict[str, Any]) -> float:
        return ((t["created"] or t0) - t0) / 60

    rows = [
        {
            "name": t["name"],
            "aliases": t["aliases"],
            "samples": per_cat.get(t["name"], 0),
            "minute": minute(t),
        }
        for t in tax
    ]
    end = (float(finished) - t0) / 60 if finished and started else None
    return rows, plots.taxonomy_plot(sorted(minute(t) for t in tax), end)


def _probes(led: Ledger, run_dir: Path, scores: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    """Probe values: the ledger's (written by the build), else the dataset card's, else a score.json's."""
    probes = led.get_meta("probes")
    if isinstance(probes, dict) and probes:
        return _flatten(probes)
    card = _card_probes(run_dir / "dataset" / "README.md")
    if card:
        return card
    found = next((s["probes"] for s in scores if isinstance(s.get("probes"), dict)), None)
    return _flatten(found) if found else []


def _gallery(run_dir: Path, led: Ledger, kept: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Up to GALLERY_PER_CATEGORY kept samples per category (controls together), with thumbnails."""
    by_cat: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in kept:
        cat = "control (benign)" if s.get("kind") == "control" else s.get("category") or "?"
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
                    "query": short(s.get("query") or "", 300),
                    "response": short(s.get("response") or "", 360),
                    "label": s.get("label"),
                    "kind": s.get("kind"),
                }
            )
        gallery.append({"category": cat, "samples": items})
    return gallery


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
