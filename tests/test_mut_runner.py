"""The runner and the stage registry with exact expected values (issue 15 §1: the mutants that the
pipeline tests let live): what each check decides and tells the next round, the registry's lookups,
and the runner's resume, target and failure bookkeeping."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import re
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
from pydantic import BaseModel
from test_build_pipeline import ScriptedBackend, _cfg, _images, _run

import rmskit
from rmskit.config import BackendConfig, BuildConfig
from rmskit.executors import ExecutorConfig
from rmskit.ledger import Ledger
from rmskit.models.base import AuthenticationError, ErrorKind
from rmskit.pipeline.progress import Stats
from rmskit.pipeline.prompting import prompts_fingerprint
from rmskit.pipeline.registry import (
    ROLES,
    STAGES,
    check_names,
    checks_for,
    default_max_tokens,
    names_by_role,
    say,
    stage,
    writer_for,
)
from rmskit.pipeline.runner import BuildSummary, Pipeline, build, run_build
from rmskit.pipeline.stages import sample_id
from rmskit.records import Rejection
from rmskit.testing.rms_script import stage_of

T = TypeVar("T")


def _check(name: str):
    spec = STAGES[name].check
    assert spec is not None
    return spec


RESPONSE_OK = {"safe": True, "helpful": True, "bare_refusal": False, "grounded": True, "reason": "fine"}


@pytest.mark.parametrize(
    ("change", "kind", "passes", "problems"),
    [
        ({}, "risky", True, " (fine)"),
        ({"grounded": False}, "risky", False, "not grounded in the photo (fine)"),
        ({"grounded": False}, "control", True, " (fine)"),  # a control need not point at the photo
        ({"safe": False}, "risky", False, "unsafe (fine)"),
        ({"helpful": False}, "control", False, "not helpful (fine)"),
        ({"bare_refusal": True}, "risky", False, "bare refusal (fine)"),
        ({"safe": False, "helpful": False}, "risky", False, "unsafe, not helpful (fine)"),
        (
            {"safe": False, "helpful": False, "bare_refusal": True, "grounded": False},
            "risky",
            False,
            "unsafe, not helpful, bare refusal, not grounded in the photo (fine)",
        ),
    ],
)
def test_the_response_check_decides_and_says_why(
    change: dict[str, Any], kind: str, passes: bool, problems: str
) -> None:
    check = _check("check_response")
    v = RESPONSE_OK | change
    assert check.name == "response"
    assert check.passes(v, kind) is passes
    assert check.feedback(v, kind) == problems


def test_the_query_checks_decide_per_kind() -> None:
    combined = _check("check_combined")
    assert combined.passes({"risky": True, "natural": True}, "risky") is True
    assert combined.passes({"risky": True, "natural": False}, "risky") is False
    assert combined.passes({"risky": False, "natural": True}, "risky") is False
    assert combined.passes({"risky": False, "natural": False}, "control") is True
    assert combined.passes({"risky": True, "natural": True}, "control") is False
    assert _check("check_text_only").passes({"harmful": False}, "risky") is True
    assert _check("check_text_only").passes({"harmful": True}, "control") is False
    assert _check("check_leakage").passes({"leaks": False}, "risky") is True
    assert _check("check_leakage").passes({"leaks": True}, "risky") is False


def test_query_check_feedback_names_the_terms_and_the_reason() -> None:
    leak = _check("check_leakage").feedback
    base = "the query names or hints at the hazard"
    assert leak({"leaks": True, "leaked_terms": ["fire", "gas"], "reason": "says it"}, "risky") == (
        base + " (fire, gas): says it"
    )
    assert leak({"leaks": True, "leaked_terms": [], "reason": ""}, "risky") == base
    assert leak({"leaks": True}, "risky") == base  # no terms, no reason: the message alone
    combined = _check("check_combined").feedback
    assert (
        combined({"risky": True, "reason": "r"}, "control") == "with the photo the query must be harmless: r"
    )
    assert combined({"risky": False, "reason": "r"}, "risky") == (
        "with the photo the query is not risky or not natural; tie the goal to the hazard: r"
    )


def test_say_builds_feedback_per_kind() -> None:
    fb = say({"risky": "too risky", "control": "too tame"})
    assert fb({"leaked_terms": ["a", "b"], "reason": "why"}, "risky") == "too risky (a, b): why"
    assert fb({"leaked_terms": [], "reason": ""}, "control") == "too tame"
    assert fb({}, "control") == "too tame"
    assert fb({"leaked_terms": ["x"]}, "risky") == "too risky (x)"
    assert fb({"reason": "r"}, "risky") == "too risky: r"


def test_registry_lookups() -> None:
    assert names_by_role("verify") == ["check_text_only", "check_combined", "check_leakage", "check_response"]
    assert names_by_role("compose") == ["compose", "control"]
    assert names_by_role("respond") == ["respond", "respond_control"]
    assert [s.name for s in checks_for("query", "risky")] == [
        "check_text_only",
        "check_combined",
        "check_leakage",
    ]
    assert [s.name for s in checks_for("query", "control")] == ["check_text_only", "check_combined"]
    assert [s.name for s in checks_for("response", "control")] == ["check_response"]
    assert writer_for("query", "risky").name == "compose"
    assert writer_for("response", "control").name == "respond_control"
    with pytest.raises(KeyError, match="no stage writes the query of a other sample"):
        writer_for("query", "other")
    assert stage("discover").prompt == "discover.v2"
    with pytest.raises(KeyError) as ei:
        stage("nope")
    assert str(ei.value) == (
        "\"unknown stage 'nope'; stages are perceive, discover, compose, control, check_text_only, "
        'check_combined, check_leakage, respond, respond_control, check_response"'
    )
    assert check_names() == ["text_only", "combined", "leakage", "lexical", "response"]
    assert default_max_tokens() == {
        "perceive": 700,
        "discover": 1200,
        "compose": 300,
        "control": 150,
        "check_text_only": 200,
        "check_combined": 250,
        "check_leakage": 200,
        "respond": 700,
        "respond_control": 600,
        "check_response": 250,
    }
    assert (
        STAGES["discover"]
        .output_schema({"n_scenarios": 3})
        .model_json_schema()["properties"]["scenarios"]["maxItems"]
        == 4
    )
    assert STAGES["compose"].output_schema({}) is STAGES["compose"].schema


# ------------------------------------------------------------------ the runner (runner.py)


def _build(cfg: BuildConfig, backend: Any, images: list[Any]) -> BuildSummary:
    summary = _run(cfg, backend, images)
    assert isinstance(summary, BuildSummary)
    return summary


class Peak(ScriptedBackend):
    """Holds every perceive request a moment and records how many images were in flight at once."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.active = self.peak = 0

    async def generate(self, messages, *, schema=None, params=None):
        if stage_of(messages[0].content) != "perceive":
            return await super().generate(messages, schema=schema, params=params)
        self.active += 1
        self.peak = max(self.peak, self.active)
        await asyncio.sleep(0.15)
        self.active -= 1
        return await super().generate(messages, schema=schema, params=params)


def _bcfg(concurrency: int) -> BackendConfig:
    return BackendConfig(spec="openai:scripted", concurrency=concurrency)


@pytest.mark.parametrize(
    ("model", "respond", "window"),
    [(4, None, 8), (16, None, 32), (4, 10, 20)],  # 2x the largest concurrency of any role, at least 8
)
def test_the_image_window_defaults_to_twice_the_largest_concurrency(
    tmp_path: Path, model: int, respond: int | None, window: int
) -> None:
    stage_models = {"respond": _bcfg(respond)} if respond else {}
    cfg = _cfg(tmp_path, perceive="model", controls=False)
    cfg = cfg.model_copy(update={"model": _bcfg(model), "stage_models": stage_models})
    backend = Peak()
    summary = _build(cfg, backend, _images(window + 3))
    assert summary.images_done == window + 3 and backend.peak == window


def test_the_target_stops_after_the_image_that_reached_it_and_counts_earlier_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shown: list[Stats] = []  # what the progress display is given

    class Shown(Stats):
        def __init__(self, **kw: Any) -> None:
            super().__init__(**kw)
            shown.append(self)

    monkeypatch.setattr("rmskit.pipeline.runner.Stats", Shown)
    # one image at a time, 3 samples each (2 risky + the control), every sample kept
    cfg = _cfg(tmp_path, perceive="model", target=6, image_window=1)
    summary = _build(cfg, ScriptedBackend(), _images(10))
    # images_done is not asserted: the feed may admit (and record as pending) the next image before the
    # stop; test_mut_runner2 checks that an image whose samples all finished is done
    assert summary.stopped_at_target and summary.samples_ok == 6
    assert shown[0].ingest_finished and shown[0].samples_ok == 6
    again = ScriptedBackend()  # target already met: nothing is sent
    summary = _build(cfg, again, _images(10))
    assert summary.stopped_at_target and again.requests == [] and summary.samples_ok == 6
    more = ScriptedBackend()  # a higher target counts what earlier runs kept
    summary = _build(cfg.model_copy(update={"target": 9}), more, _images(10))
    assert summary.samples_ok == 9
    assert {r["shas"].pop() for r in more.requests if r["shas"]} == {_images(3)[2].sha256}
    summary = _build(cfg.model_copy(update={"target": None}), ScriptedBackend(), _images(4))
    assert not summary.stopped_at_target and (summary.images_done, summary.samples_ok) == (4, 12)


def test_the_summary_and_run_metadata_are_exact(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, perceive="model")
    rejected = Rejection(source_root="/src", path="bad.jpg", reason="not an image")
    backend = ScriptedBackend()
    summary = _build(cfg, backend, [*_images(2), rejected])
    assert summary.run_dir == str(tmp_path / "run")
    assert (summary.images_accepted, summary.images_rejected, summary.images_done) == (2, 1, 2)
    assert (summary.images_failed, summary.images_pending) == (0, 0)
    assert (summary.samples_ok, summary.samples_failed) == (6, 0)
    assert summary.requests == len(backend.requests) and summary.tokens == 15 * len(backend.requests)
    assert summary.stopped_at_target is False and summary.dataset_dir is None and summary.export_error is None
    with Ledger(tmp_path / "run", readonly=True) as led:
        assert led.get_meta("config") == cfg.public_dump() and led.get_meta("config_history") is None
        assert led.get_meta("prompt_versions") == {n: s.prompt for n, s in STAGES.items()}
        assert led.get_meta("prompt_fingerprints") == prompts_fingerprint()
        assert led.get_meta("rmskit_version") == rmskit.__version__
        started, finished = led.get_meta("started_at"), led.get_meta("finished_at")
        assert isinstance(started, float) and isinstance(finished, float) and finished >= started
    log = (tmp_path / "run" / "build.log").read_text()
    assert f"INFO rmskit.pipeline: build started: 1 source(s) -> {tmp_path / 'run'}" in log
    assert "build finished: " in log and "image task ended" not in log
    changed = cfg.model_copy(update={"scenarios_per_image": 1})
    _build(changed, ScriptedBackend(), _images(2))
    _build(changed, ScriptedBackend(), _images(2))
    with Ledger(tmp_path / "run", readonly=True) as led:
        assert led.get_meta("config") == changed.public_dump()
        assert led.get_meta("config_history") == [cfg.public_dump()]  # one change, recorded once
        assert led.get_meta("started_at") == started
    assert "config changed since the last run" in (tmp_path / "run" / "build.log").read_text()


def test_the_build_log_handler_is_removed_after_the_run(tmp_path: Path) -> None:
    root = logging.getLogger("rmskit")
    before = list(root.handlers)
    _build(_cfg(tmp_path, perceive="model"), ScriptedBackend(), _images(1))
    assert root.handlers == before and root.level == logging.INFO


class Fatal(ScriptedBackend):
    async def generate(self, messages, *, schema=None, params=None):
        if stage_of(messages[0].content) == "discover" and len(self.requests) > 6:
            raise AuthenticationError("http://x:1", 401)
        return await super().generate(messages, schema=schema, params=params)


def test_rejected_credentials_end_the_run_and_fail_nothing(tmp_path: Path) -> None:
    with pytest.raises(AuthenticationError):
        _build(_cfg(tmp_path, perceive="model", image_window=4), Fatal(), _images(8))
    with Ledger(tmp_path / "run", readonly=True) as led:
        counts = led.image_counts()
        assert "failed" not in counts and counts.get("done", 0) < 8
        assert list(led.iter_samples("failed")) == []
    summary = _build(_cfg(tmp_path, perceive="model", image_window=4), ScriptedBackend(), _images(8))
    assert summary.images_done == 8 and summary.images_failed == 0  # resumable: nothing was lost


def test_a_full_disk_ends_the_run_and_a_bug_fails_only_its_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    imgs = _images(3)
    real_put = Ledger.put_sample_with_round
    real_adj = Pipeline._adjustments

    def full_disk(self, sid, sha, *a, **kw):
        if sha == imgs[1].sha256:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_put(self, sid, sha, *a, **kw)

    monkeypatch.setattr(Ledger, "put_sample_with_round", full_disk)
    with pytest.raises(OSError) as ei:
        _build(_cfg(tmp_path, perceive="model", image_window=1), ScriptedBackend(), imgs)
    assert ei.value.errno == errno.ENOSPC
    with Ledger(tmp_path / "run", readonly=True) as led:
        status = [led.image_status(i.sha256) for i in imgs]
    assert status[:2] == ["done", "pending"] and status[2] in (
        "pending",
        None,
    )  # the 3rd: admitted or not yet
    monkeypatch.setattr(Ledger, "put_sample_with_round", real_put)

    def bug(self, sha, sid):
        if sha == imgs[2].sha256:
            raise ValueError("a bug")
        return real_adj(self, sha, sid)

    monkeypatch.setattr(Pipeline, "_adjustments", bug)
    summary = _build(_cfg(tmp_path, perceive="model", image_window=1), ScriptedBackend(), imgs)
    assert (summary.images_done, summary.images_failed) == (2, 1)
    with Ledger(tmp_path / "run", readonly=True) as led:
        (err,) = led.query("SELECT error FROM images WHERE status = 'failed'")
        assert err[0] == "internal error: ValueError('a bug')"


def test_the_selection_is_recorded_with_its_reasons(tmp_path: Path) -> None:
    img = _images(1)
    _build(_cfg(tmp_path, perceive="model"), ScriptedBackend(), img)
    with Ledger(tmp_path / "run", readonly=True) as led:
        sel, disc, plan = (led.get_record(img[0].sha256, k) for k in ("select", "discover", "plan"))
    assert sel is not None and disc is not None and plan is not None
    sel, disc, plan = sel["data"], disc["data"]["scenarios"], plan["data"]
    assert len(disc) == 3 and len(sel["chosen"]) == 2
    for i, c in enumerate(sel["chosen"]):
        assert c["index"] == i and c["sample_id"] == sample_id(img[0].sha256, "risky", i)
        assert c["proposed"] == disc[i]["category"]
    assert sel["dropped"] == [{"index": 2, "reason": "enough scenarios for this image"}]
    assert plan == {"taxonomy": [], "underfilled": [], "full": []}
    with Ledger(tmp_path / "run", readonly=True) as led:
        controls = [x["id"] for x in led.iter_samples("ok") if x["kind"] == "control"]
    assert controls == [sample_id(img[0].sha256, "control", 0)]


class Probed(BaseModel):
    n: int
    kinds: list[str]
    when: datetime


def test_export_and_probes_run_after_the_build_and_their_failures_are_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _cfg(tmp_path, perceive="model")

    imgs = _images(2)

    def run(export: bool = True):  # the second image's responses all fail their check
        backends: dict[str, Any] = dict.fromkeys(
            ROLES, ScriptedBackend(reject=("check_response", imgs[1].sha256))
        )
        return asyncio.run(run_build(cfg, quiet=True, items=imgs, backends=backends, export=export))

    def probes(samples: list[dict[str, Any]], **kw: Any) -> Probed:  # the real probes embed: slow
        return Probed(n=len(samples), kinds=sorted({s["kind"] for s in samples}), when=datetime(2026, 1, 2))

    monkeypatch.setattr("rmskit.scoring.probes.run_probes", probes)
    summary = run()
    assert summary.dataset_dir == str(tmp_path / "run" / "dataset") and summary.export_error is None
    assert (tmp_path / "run" / "dataset" / "README.md").is_file()
    with Ledger(tmp_path / "run", readonly=True) as led:  # the kept samples only, as JSON
        assert led.get_meta("probes") == {
            "n": 3,
            "kinds": ["control", "risky"],
            "when": "2026-01-02T00:00:00",
        }
    assert summary.samples_failed == 3

    def broken(*a: Any, **kw: Any) -> None:
        raise RuntimeError("disk gone")

    monkeypatch.setattr("rmskit.scoring.probes.run_probes", broken)
    summary = run()
    assert summary.dataset_dir == str(tmp_path / "run" / "dataset")  # probes are optional
    assert "CPU probes measured" in (tmp_path / "run" / "dataset" / "README.md").read_text()  # stored ones
    log = (tmp_path / "run" / "build.log").read_text()
    assert re.search(r"WARNING rmskit\.\w+: probes skipped: 'disk gone'", log)
    # the disk gone both for the dataset written as samples came (export/online.py) and for the write
    # from the ledger that then follows
    monkeypatch.setattr("rmskit.export.online.swap_in", broken)
    monkeypatch.setattr("rmskit.export.write_dataset", broken)
    summary = run()
    assert summary.dataset_dir is None and summary.export_error == "RuntimeError: disk gone"
    assert (
        "the dataset was not written as samples came (RuntimeError: disk gone)"
        in (tmp_path / "run" / "build.log").read_text()
    )
    assert re.search(r"ERROR rmskit\.\w+: export failed", (tmp_path / "run" / "build.log").read_text())


class Started(ScriptedBackend):
    made: list[Started] = []

    def __init__(self, cfg: BackendConfig, vision: bool = True) -> None:
        super().__init__(vision=vision)
        self.cfg = cfg
        self.started: list[tuple[Any, Any]] = []
        self.closed = 0
        Started.made.append(self)

    async def start(self, store: Any = None, *, echo: Any = None) -> None:
        self.started.append((store, echo))
        if echo is not None:
            echo(f"probed {self.cfg.spec}")

    async def aclose(self) -> None:
        self.closed += 1


def test_backends_are_made_once_per_distinct_config_probed_and_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    Started.made = []
    monkeypatch.setattr("rmskit.pipeline.runner.load_backend", lambda c: Started(c))
    cfg = _cfg(tmp_path, perceive="model").model_copy(
        update={"stage_models": {"verify": BackendConfig(spec="openai:judge")}}
    )
    summary = asyncio.run(run_build(cfg, quiet=True, items=_images(1), export=False))
    assert summary.images_done == 1
    assert [b.cfg.spec for b in Started.made] == ["openai:scripted", "openai:judge"]
    stages = [{r["stage"] for r in b.requests} for b in Started.made]
    assert "check_response" in stages[1] and not stages[0] & stages[1]
    for b in Started.made:
        assert b.closed == 1 and len(b.started) == 1 and b.started[0][1] is None
        assert isinstance(b.started[0][0], Ledger)
    Started.made = []
    asyncio.run(run_build(cfg, quiet=False, items=_images(1), export=False))
    assert "probed openai:scripted" in capsys.readouterr().err


def test_perceive_model_without_vision_is_refused_with_the_way_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Started.made = []
    monkeypatch.setattr("rmskit.pipeline.runner.load_backend", lambda c: Started(c, vision=False))
    with pytest.raises(ValueError) as ei:
        asyncio.run(run_build(_cfg(tmp_path, perceive="model"), quiet=True, items=_images(1), export=False))
    assert str(ei.value) == (
        "--perceive model, but scripted has no vision (probed or --no-vision): give a vision model with "
        "--stage-model perceive=SPEC, or derive perception from captions/instances with --perceive annotations"
    )
    assert [b.closed for b in Started.made] == [1]  # closed even so


class Slow(ScriptedBackend):
    """Records each request's output cap; `slow` prompt stages answer only after a pause."""

    def __init__(self, slow: tuple[str, ...] = (), **kw: Any) -> None:
        super().__init__(**kw)
        self.slow = slow
        self.caps: dict[str, set[int]] = {}

    async def generate(self, messages, *, schema=None, params=None):
        stage = stage_of(messages[0].content)
        if params is not None:
            self.caps.setdefault(stage, set()).add(params.max_tokens)
        if stage in self.slow:
            await asyncio.sleep(0.3)
        return await super().generate(messages, schema=schema, params=params)


def _capture(monkeypatch: pytest.MonkeyPatch, name: str, base: type[T]) -> list[T]:
    """Every instance of `base` the runner creates under `rmskit.pipeline.runner.<name>`, to read after
    the build."""
    made: list[T] = []

    class Seen(base):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            made.append(cast(T, self))

    monkeypatch.setattr(f"rmskit.pipeline.runner.{name}", Seen)
    return made


def _capture_stats(monkeypatch: pytest.MonkeyPatch) -> list[Stats]:
    """Every progress Stats the runner creates, to read its counters after the build."""
    return _capture(monkeypatch, "Stats", Stats)


def test_a_transient_failure_leaves_the_image_pending_after_its_other_samples_finish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shown = _capture_stats(monkeypatch)
    imgs = _images(2)
    # the risky responses fail (server down) at once, the controls answer slowly: they are still kept
    backend = Slow(slow=("respond_control",), fail_stage="respond", fail_kind=ErrorKind.server)
    cfg = _cfg(tmp_path, perceive="model", stage_max_tokens={"compose": 99})
    summary = _build(cfg, backend, imgs)
    assert (summary.images_pending, summary.images_done, summary.samples_ok) == (2, 0, 2)
    assert shown[0].images_pending == 2 and shown[0].images_failed == 0
    with Ledger(tmp_path / "run", readonly=True) as led:
        rows = led.query("SELECT status, error FROM images ORDER BY rowid")
        kept = [(s["kind"], s["category"]) for s in led.iter_samples("ok")]
    assert [tuple(r) for r in rows] == [("pending", "respond: server: server after 6 attempts")] * 2
    assert kept == [("control", "none")] * 2
    log = (tmp_path / "run" / "build.log").read_text()
    for i in imgs:
        line = f"image {i.source_path} ({i.sha256[:12]}) left for a re-run: respond: server: server after 6 attempts"
        assert f"WARNING rmskit.pipeline: {line}\n" in log
    assert backend.caps["compose"] == {99} and backend.caps["perceive"] == {700}  # the configured caps


def test_stopping_at_the_target_cancels_the_images_in_flight_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    made = _capture(monkeypatch, "Pipeline", Pipeline)
    cfg = _cfg(tmp_path, perceive="model", target=1, image_window=4)
    with caplog.at_level(logging.ERROR):
        summary = _build(cfg, Slow(slow=("respond",)), _images(8))
    assert summary.stopped_at_target and 1 <= summary.samples_ok <= 1 + 3 * 4
    assert summary.images_done < 8 and summary.images_failed == 0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert made[0]._tasks == set()  # finished image tasks are not kept


def test_build_runs_the_sources_and_the_executor_it_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    Started.made = []
    monkeypatch.setattr("rmskit.pipeline.runner.load_backend", lambda c: Started(c))
    seen: list[Any] = []

    def sources(srcs: list[str], ingest: Any, cache: Path) -> list[Any]:
        seen.append((srcs, ingest, cache))
        return _images(1)

    monkeypatch.setattr("rmskit.ingest.sources.iter_sources", sources)
    cfg = _cfg(tmp_path, perceive="model")
    summary = build(cfg)  # not quiet by default: the probe line is shown
    assert summary.images_done == 1 and seen == [(["/src"], cfg.ingest, tmp_path / "run" / "images")]
    assert "probed openai:scripted" in capsys.readouterr().err
    assert build(cfg, quiet=True, executor=ExecutorConfig(kind="local")).images_done == 1
    assert capsys.readouterr().err == ""

    async def on_ray(c: BuildConfig, ex: ExecutorConfig, *, quiet: bool) -> Any:
        return (c, ex, quiet)

    monkeypatch.setattr("rmskit.executors.ray.run_build_ray", on_ray)
    ray = ExecutorConfig(kind="ray")
    assert build(cfg, quiet=True, executor=ray) == (cfg, ray, True)  # type: ignore[comparison-overlap]


def test_failed_images_are_counted_and_logged_once_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shown = _capture_stats(monkeypatch)
    imgs = _images(4)
    real_adj = Pipeline._adjustments

    def bug(self, sha, sid):
        if sha == imgs[3].sha256:
            raise ValueError("a bug")
        return real_adj(self, sha, sid)

    monkeypatch.setattr(Pipeline, "_adjustments", bug)
    # images 1 and 2: discover refused for good (a bad request); image 3: a bug; image 0: fine

    class Picky(ScriptedBackend):
        async def generate(self, messages, *, schema=None, params=None):
            shas = {i.sha256 for m in messages for i in m.images}
            self.fail_stage = "discover" if shas & {imgs[1].sha256, imgs[2].sha256} else None
            return await super().generate(messages, schema=schema, params=params)

    summary = _build(
        _cfg(tmp_path, perceive="model", image_window=1), Picky(fail_kind=ErrorKind.bad_request), imgs
    )
    assert (summary.images_done, summary.images_failed) == (1, 3)
    assert (shown[0].images_done, shown[0].images_failed, shown[0].images_pending) == (1, 3, 0)
    log = (tmp_path / "run" / "build.log").read_text()
    for i in imgs[1:3]:
        line = f"image {i.source_path} ({i.sha256[:12]}) failed: discover: bad_request: bad_request after 6 attempts"
        assert log.count(f"WARNING rmskit.pipeline: {line}\n") == 1
    assert log.count(f"ERROR rmskit.pipeline: image {imgs[3].source_path} crashed") == 1


class Truncating(ScriptedBackend):
    async def generate(self, messages, *, schema=None, params=None):
        res = await super().generate(messages, schema=schema, params=params)
        stage = self.requests[-1]["stage"]
        if stage in ("perceive", "compose"):
            return res.model_copy(update={"adjustments": [f"{stage} field: cut"]})
        return res


def test_each_sample_records_its_own_truncations_and_its_images(tmp_path: Path) -> None:
    _build(_cfg(tmp_path, perceive="model"), Truncating(), _images(1))
    with Ledger(tmp_path / "run", readonly=True) as led:
        samples = list(led.iter_samples("ok"))
        assert len(samples) == 3
        for s in samples:
            assert s["checks"]["caps"]["pass"] is True
            assert s["checks"]["caps"]["reason"] == "over-long model output truncated to the schema's caps"
            caps = s["checks"]["caps"]["adjustments"]
            perceive = [c for c in caps if c.startswith("perceive:")]
            compose = [c for c in caps if c.startswith("compose:")]
            assert len(perceive) == 1 and "perceive field: cut" in perceive[0]
            assert len(compose) == (s["rounds"] if s["kind"] == "risky" else 0)  # its own rounds only
            assert len(caps) == len(perceive) + len(compose)


def test_a_resumed_image_renders_the_plan_it_first_saw(tmp_path: Path) -> None:
    a, b = _images(2)

    class FailA(ScriptedBackend):
        async def generate(self, messages, *, schema=None, params=None):
            shas = {i.sha256 for m in messages for i in m.images}
            self.fail_stage = "discover" if a.sha256 in shas and self.fail_kind == ErrorKind.server else None
            return await super().generate(messages, schema=schema, params=params)

    cfg = _cfg(tmp_path, perceive="model", image_window=1)
    first = FailA()
    _build(cfg, first, [a, b])  # a: discover fails (server down), b: done, the taxonomy grows
    again = ScriptedBackend()
    summary = _build(cfg, again, [a, b])
    assert summary.images_done == 2

    def discover_of_a(backend: ScriptedBackend) -> list[str]:
        return [
            json.dumps(r["body"])
            for r in backend.requests
            if r["stage"] == "discover" and a.sha256 in r["shas"]
        ]

    assert discover_of_a(again) == discover_of_a(first)[:1]  # the same prompt: the stored plan
