"""`rmskit report`: one self-contained HTML file with plots, from the session's scripted build (rundir_fixture)."""

from __future__ import annotations

import base64
import io
import json
import shutil
from collections import Counter
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from rundir_fixture import (
    CHROMIUM,
    CHROMIUM_ARGS,
    HOSTILE_CATEGORY,
    HOSTILE_QUERY,
    HOSTILE_RESPONSE,
    RunInfo,
    chromium_skip_reason,
)
from typer.testing import CliRunner

from rmskit.ledger.store import Ledger
from rmskit.report import write_report
from rmskit.report.build import collect

SECTIONS = {
    "summary",
    "funnel",
    "checks",
    "rounds",
    "taxonomy",
    "categories",
    "balance",
    "tokens",
    "probes",
    "gallery",
}
RUN_PLOTS = {
    "plot-funnel",
    "plot-checks",
    "plot-rounds",
    "plot-taxonomy",
    "plot-categories",
    "plot-balance",
    "plot-tokens",
}


class Page(HTMLParser):
    def __init__(self, html: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))

    def ids(self, tag: str) -> set[str]:
        return {a["id"] for t, a in self.tags if t == tag and "id" in a}

    def imgs(self) -> list[dict[str, str]]:
        return [a for t, a in self.tags if t == "img"]


def decode_png(src: str) -> Image.Image:
    head, _, data = src.partition(",")
    assert head == "data:image/png;base64"
    im = Image.open(io.BytesIO(base64.b64decode(data)))
    im.load()
    return im


def kept_samples(run_dir: Path) -> list[dict]:
    with Ledger(run_dir) as led:
        state = led.review_state()
        out = []
        for s in led.iter_samples("ok"):
            st = state.get(s["id"], {})
            if st.get("decision") != "reject":
                out.append({**s, **st.get("edits", {})})
        return out


def check_self_contained(html: str) -> Page:
    page = Page(html)
    assert "<script" not in html.lower()
    for tag, attrs in page.tags:
        for key in ("src", "href"):
            if key in attrs:
                assert attrs[key].startswith(("data:", "#")), (tag, attrs[key][:60])
        assert not any(k.startswith("on") for k in attrs), (tag, attrs)
    assert "Content-Security-Policy" in html and "default-src 'none'" in html
    return page


@pytest.fixture(scope="module")
def fixture_report(run_template: RunInfo, tmp_path_factory: pytest.TempPathFactory) -> tuple[RunInfo, Path]:
    """The report of a private copy of the fixture run, written once for this module."""
    dst = tmp_path_factory.mktemp("report") / "run"
    shutil.copytree(run_template.run_dir, dst)
    info = replace(run_template, run_dir=dst)
    return info, write_report(dst)


def test_report_from_fixture_run(fixture_report: tuple[RunInfo, Path]) -> None:
    run, out = fixture_report
    assert out == run.run_dir / "report.html"
    html = out.read_text(encoding="utf-8")
    page = check_self_contained(html)
    assert SECTIONS | {"score"} <= page.ids("section")
    plots = {a["id"]: a for a in page.imgs() if "id" in a}
    assert RUN_PLOTS | {"plot-score-1"} == set(plots)
    for pid, attrs in plots.items():
        im = decode_png(attrs["src"])
        assert im.width > 300 and im.height > 150, pid
        arr = np.asarray(im.convert("L"))
        assert arr.std() > 5, f"{pid} looks blank"
    # gallery: up to 4 kept samples per category (controls grouped), each with an embedded thumbnail
    kept = kept_samples(run.run_dir)
    per_cat = Counter("control" if s["kind"] == "control" else s["category"] for s in kept)
    thumbs = [a for a in page.imgs() if a["src"].startswith("data:image/jpeg;base64,")]
    assert len(thumbs) == sum(min(4, n) for n in per_cat.values())
    for a in thumbs:
        with Image.open(io.BytesIO(base64.b64decode(a["src"].split(",", 1)[1]))) as im:
            assert max(im.size) <= 220
    # model output is escaped, never markup
    for raw in (HOSTILE_QUERY, HOSTILE_RESPONSE, HOSTILE_CATEGORY):
        assert raw not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert run.rejected_id not in html  # rejected samples are not shown in the gallery
    assert "leakage.accuracy" in html and "vendi_score" in html  # probes the build stored in the ledger
    assert "hf:tiny-random-qwen2-vl" in html  # score.json found under <run>/score/


def test_fixture_is_what_the_runner_writes(run_template: RunInfo) -> None:
    """The shared fixture is a real build: the runner's check names, record stages, ids and controls,
    with the steered cases present (so the tests below exercise what they claim)."""
    with Ledger(run_template.run_dir, readonly=True) as led:
        stages = set(led.stage_counts())
        samples = {s["id"]: s for s in led.iter_samples(None)}
        raw = json.dumps([led.get_record(sha, "discover") for sha in run_template.shas.values()])
    assert stages == {
        "plan", "perceive", "discover", "select", "compose", "control", "check_text_only",
        "check_combined", "check_leakage", "respond", "respond_control", "check_response",
    }  # fmt: skip
    assert {name for s in samples.values() if s["kind"] == "risky" for name in s["checks"]} == {
        "text_only",
        "combined",
        "leakage",
        "lexical",
        "response",
    }
    assert all(len(sid) == 20 for sid in samples) and len(run_template.control_ids) == 4
    hostile = samples[run_template.hostile_id]
    assert hostile["query"] == HOSTILE_QUERY and hostile["response"] == HOSTILE_RESPONSE
    assert HOSTILE_CATEGORY in hostile["scenario"]["category"] and json.dumps(HOSTILE_CATEGORY)[1:-1] in raw
    assert samples[run_template.never_passes_id]["status"] == "failed"


def test_report_numbers_follow_ledger_and_review(run: RunInfo) -> None:
    ctx = collect(run.run_dir, draw=False)
    # by construction of the fixture's script: 5 images (camera fails at perceive), 3 scenarios per
    # perceived image, 2 risky + 1 control sample each (12), one risky sample never passes its checks
    assert len(run.ok_ids) == 11 and len(run.failed_ids) == 1
    assert ctx["funnel"] == {
        "images": 5,
        "perceived": 4,
        "scenarios": 12,
        "composed": 12,
        "verified": 11,
        "responded": 11,
        "kept": 10,  # one rejected in review
    }
    rates = {(r["phase"], r["check"]): r for r in ctx["check_rates"]}
    # query rounds: 10 one-round samples, the refined one (2 rounds), the never-passing one (3 rounds);
    # leakage runs on the 8 risky samples' 11 rounds: fails on round 1 of the refined one and all 3
    # of the never-passing one
    assert rates[("query", "text_only")]["n"] == 15 and rates[("query", "text_only")]["rate"] == 1.0
    assert rates[("query", "leakage")]["n"] == 11
    assert rates[("query", "leakage")]["rate"] == pytest.approx(7 / 11)
    assert rates[("query", "leakage")]["rate1"] == pytest.approx(6 / 8)
    assert rates[("query", "lexical")]["rate"] == pytest.approx(6 / 11)  # + the advisory failure
    assert rates[("response", "response")] == {
        "phase": "response",
        "check": "response",
        "n": 11,
        "rate": 1.0,
        "rate1": 1.0,
        "shown": "1.00 [0.74, 1.00], n=11",  # Wilson interval of 11/11
        "shown1": "1.00 [0.74, 1.00], n=11",
    }
    assert ctx["round_counts"] == {"ok": {1: 10, 2: 1}, "failed": {3: 1}}
    names = [t["name"] for t in ctx["taxonomy"]]
    assert {"animal safety", "launch hazards", "fall from height"} <= set(names)
    minutes = [t["minute"] for t in ctx["taxonomy"]]
    assert minutes == sorted(minutes) and 0 <= minutes[0] and minutes[-1] < 5  # appeared during the run
    with Ledger(run.run_dir) as led:
        assert ctx["usage"] == led.usage_by_stage()
        assert set(ctx["usage"]) >= {"perceive", "discover", "compose", "check_leakage", "respond"}
    sc = json.loads((run.run_dir / "score" / "score.json").read_text())
    entry = ctx["scores"][0]
    est = sc["score_estimate"]  # the score with its interval and n, as `rmskit score` reports it
    assert entry["score"] == f"{est['value']:.3f} [{est['low']:.3f}, {est['high']:.3f}], n={est['n']}"
    assert not entry["matrix"] and entry["judge"] == "hf:tiny-random-qwen2-vl" and entry["train"] == "fixture"
    metrics = {k for k, v in sc["benchmarks"]["vlguard"]["tuned"].items() if isinstance(v, dict)}
    assert len(metrics) == 7 and len(entry["rows"]) == 3 * len(metrics)  # counts are not metrics
    auroc = next(r for r in entry["rows"] if r["bench"] == "siuo" and r["metric"] == "auroc")
    assert auroc["tuned"].startswith(("undefined", "insufficient"))  # one class only: not 0, not hidden
    ba = sc["benchmarks"]["vlguard"]["tuned"]["balanced_accuracy"]
    row = next(r for r in entry["rows"] if r["bench"] == "vlguard" and r["metric"] == "balanced_accuracy")
    assert row["tuned"] == f"{ba['value']:.3f} [{ba['low']:.3f}, {ba['high']:.3f}], n={ba['n']}"

    # review decisions change what counts as kept, and edited categories count under their new name
    target = next(
        s for s in run.ok_ids if s not in (run.soft_fail_id, run.refined_id, *run.control_ids, run.hostile_id)
    )
    with Ledger(run.run_dir) as led:
        old_cat = led.get_sample(target)["category"]
        led.add_decision(run.refined_id, "reject", {})
        led.add_decision(target, "edit", {"fields": {"category": "kitchen burns"}})
    ctx2 = collect(run.run_dir, draw=False)
    assert ctx2["funnel"]["kept"] == 11 - 2
    assert ctx2["categories"]["kitchen burns"] == 1
    assert ctx2["categories"].get(old_cat, 0) == ctx["categories"][old_cat] - 1
    assert ctx["categories"]["animal safety"] == 1 and "animal safety" not in ctx2["categories"]


def test_report_cli_out_and_score_option(run: RunInfo, tmp_path: Path) -> None:
    from rmskit.report import cli as report_cli

    app = typer.Typer()
    report_cli.register(app)
    app.command("noop")(lambda: None)  # two commands keep typer in multi-command mode
    other = tmp_path / "elsewhere" / "score.json"
    other.parent.mkdir()
    # the matrix shape `rmskit score` writes for several training sets
    met = {
        "n": 10,
        "n_unsafe": 5,
        "n_safe": 5,
        "accuracy": 0.4,
        "macro_f1": 0.35,
        "unsafe_recall": None,
        "false_refusal_rate": 0.2,
        "auroc": None,
        "undefined": {"auroc": "one class only"},
    }
    tuned = {"ours": {**met, "macro_f1": 0.7}, "vlguard-train": {**met, "macro_f1": 0.6}}
    other.write_text(
        json.dumps(
            {
                "train": [{"name": "ours"}, {"name": "vlguard-train"}],
                "judge": {"model": "hf:other-judge", "adapter": None},
                "benchmarks": {b: {"n": 10, "zero_shot": met, "tuned": tuned} for b in ("mssbench", "siuo")},
                "score": {"ours": 0.7, "vlguard-train": 0.6},
            }
        )
    )
    out = tmp_path / "r" / "out.html"
    r = CliRunner().invoke(app, ["report", str(run.run_dir), "--out", str(out), "--score", str(other)])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == str(out)
    html = out.read_text()
    assert "hf:other-judge" in html and "hf:tiny-random-qwen2-vl" not in html and 'id="plot-score-1"' in html
    assert "ours: 0.700, vlguard-train: 0.600" in html and "<td>vlguard-train</td>" in html
    assert not (run.run_dir / "report.html").exists()
    r = CliRunner().invoke(app, ["report", str(run.run_dir), "--score", str(tmp_path / "missing.json")])
    assert r.exit_code == 2 and "no score file" in r.output
    r = CliRunner().invoke(app, ["report", str(tmp_path / "not-a-run")])
    assert r.exit_code == 2 and "no ledger" in r.output


def test_probes_fall_back_to_the_dataset_card(run: RunInfo) -> None:
    with Ledger(run.run_dir) as led:
        led.execute("DELETE FROM meta WHERE key='probes'")
    card = run.run_dir / "dataset" / "README.md"
    card.write_text(
        "# card\n\n## Probes\n\n| probe | value |\n|---|---|\n| text_only.accuracy | 0.61 |\n"
        "\n## Fields\n\n| field | meaning |\n|---|---|\n| id | sample id |\n"
    )
    assert collect(run.run_dir, draw=False)["probes"] == [("text_only.accuracy", "0.61")]
    card.unlink()
    assert collect(run.run_dir, draw=False)["probes"] == []


def test_report_on_empty_run(tmp_path: Path) -> None:
    Ledger(tmp_path / "empty").close()
    html = write_report(tmp_path / "empty").read_text()
    page = check_self_contained(html)
    assert SECTIONS <= page.ids("section") and "score" not in page.ids("section")
    assert page.imgs() == [] and "no images in this run yet" in html


def test_report_funnel_agrees_with_the_ledger(fixture_report: tuple[RunInfo, Path]) -> None:
    real_run, real_report = fixture_report[0].run_dir, fixture_report[1]
    html = real_report.read_text()
    page = check_self_contained(html)
    assert SECTIONS <= page.ids("section")
    assert RUN_PLOTS <= {a["id"] for a in page.imgs() if "id" in a}
    ctx = collect(real_run, draw=False)
    with Ledger(real_run) as led:
        images = led.image_counts()
        n_ok = led.sample_counts().get("ok", 0)
        rejected = sum(1 for st in led.review_state().values() if st["decision"] == "reject")
    f = ctx["funnel"]
    assert f["images"] == sum(images.values()) and f["perceived"] == images["done"]  # failed at perceive
    assert f["kept"] == n_ok - rejected > 0 and f["composed"] >= f["verified"] >= f["kept"]
    assert f["responded"] == n_ok
    exported = (real_run / "dataset" / "samples.jsonl").read_text().splitlines()
    assert len([x for x in exported if x.strip()]) == f["kept"]  # the export honours the same review log


@pytest.mark.skipif(chromium_skip_reason() is not None, reason=chromium_skip_reason() or "")
def test_reports_open_in_browser_without_errors(fixture_report: tuple[RunInfo, Path], tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    reports = [fixture_report[1]]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            for path in reports:
                pg = browser.new_page(viewport={"width": 1300, "height": 900})
                problems: list[str] = []
                pg.on(
                    "console",
                    lambda m, pr=problems: pr.append(m.text) if m.type in ("error", "warning") else None,
                )
                pg.on("pageerror", lambda e, pr=problems: pr.append(str(e)))
                pg.on("dialog", lambda d, pr=problems: (pr.append(d.message), d.dismiss()))
                pg.on(
                    "request",
                    lambda r, pr=problems: (
                        None if r.url.startswith(("file:", "data:")) else pr.append(f"request {r.url}")
                    ),
                )
                pg.goto(path.as_uri())
                pg.wait_for_load_state("load")
                n = pg.evaluate("document.images.length")
                broken = pg.evaluate(
                    "Array.from(document.images).filter(i => !i.complete || !i.naturalWidth).length"
                )
                assert n >= len(RUN_PLOTS) and broken == 0, path
                assert pg.locator("#funnel img.plot").is_visible()
                pg.screenshot(
                    path=str(tmp_path / f"{path.parent.parent.name}-{path.stem}.png"), full_page=False
                )
                assert problems == [], (path, problems)
                pg.close()
        finally:
            browser.close()
