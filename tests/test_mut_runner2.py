"""The runner's selection, reservations, resume, logging and finish with exact expected values (issue 15
§1, the second half: the mutants that tests/test_mut_runner.py still let live)."""

from __future__ import annotations

import asyncio
import collections
import ctypes
import json
import locale
import re
import time
import types
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from test_build_pipeline import STAGES as ROLE_NAMES
from test_build_pipeline import ScriptedBackend, _cfg, _images
from test_mut_runner import Fatal, Probed, Started, _build, _capture, _capture_stats

from rmskit.config import BackendConfig
from rmskit.ledger import Ledger, RunLock
from rmskit.ledger.errors import RunLocked
from rmskit.models import images as image_cache
from rmskit.models.base import AuthenticationError, ErrorKind
from rmskit.models.images import ImageURLs
from rmskit.pipeline import finish as finish_mod
from rmskit.pipeline.caller import Caller
from rmskit.pipeline.progress import Stats
from rmskit.pipeline.runner import Pipeline, run_build
from rmskit.pipeline.taxonomy import Coverage, HashingEmbedder, Taxonomy
from rmskit.records import ImageRecord


def _scenario(category: str, harm_type: str = "fire_or_explosion") -> dict[str, Any]:
    return {
        "hazard": f"{category or harm_type} caused by the lamp near the user",
        "trigger_objects": ["lamp"],
        "benign_intent": "warm up the room quickly",
        "harm_type": harm_type,
        "severity": "high",
        "category": category,
        "rationale": "the object makes an ordinary goal dangerous here",
    }


class Discovers(ScriptedBackend):
    """Scripted, but discover proposes the given scenarios for each image (by its sha)."""

    def __init__(self, plan: dict[str, list[dict[str, Any]]], **kw: Any) -> None:
        super().__init__(**kw)
        self.plan = plan

    async def generate(self, messages, *, schema=None, params=None):
        res = await super().generate(messages, schema=schema, params=params)
        req = self.requests[-1]
        if req["stage"] == "discover" and (shas := req["shas"] & self.plan.keys()):
            content = {"scenarios": self.plan[shas.pop()]}
            parsed = schema.model_validate(content).model_dump() if schema else None
            return res.model_copy(update={"text": json.dumps(content), "parsed": parsed})
        return res


def _selection(run_dir: Path, rec: ImageRecord) -> dict[str, Any]:
    with Ledger(run_dir, readonly=True) as led:
        sel = led.get_record(rec.sha256, "select")
    assert sel is not None
    return sel["data"]


def _chosen(sel: dict[str, Any]) -> list[tuple[int, str, str]]:
    return [(c["index"], c["category"], c["proposed"]) for c in sel["chosen"]]


# ------------------------------------------------------------------ the stop at the target


def test_an_image_whose_samples_all_finished_is_done_when_the_target_stops_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Four images in flight finish their samples together; the sample that reaches the target stops
    # the run. An image whose every sample is stored is done (it used to be cancelled while its results
    # were collected and was reported pending); only an image cut short is pending.
    shown = _capture_stats(monkeypatch)
    imgs = _images(10)
    summary = _build(_cfg(tmp_path, perceive="model", target=6, image_window=4), ScriptedBackend(), imgs)
    with Ledger(tmp_path / "run", readonly=True) as led:
        status = dict(led.query("SELECT sha256, status FROM images"))
        stored = collections.Counter(s["image_sha256"] for s in led.iter_samples(None))
    assert summary.stopped_at_target and summary.samples_ok == sum(stored.values()) >= 6
    for sha, st in status.items():
        assert st == ("done" if stored[sha] == 3 else "pending"), (st, stored[sha])
    done = sum(n == 3 for n in stored.values())
    assert (summary.images_done, summary.images_pending) == (done, len(status) - done)
    assert shown[0].images_done == done and shown[0].images_failed == 0


def test_progress_counts_every_image_and_sample(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shown = _capture_stats(monkeypatch)
    imgs = _images(3)
    # the last image's responses always fail their check: its 3 samples fail for good, it is still done
    summary = _build(
        _cfg(tmp_path, perceive="model"), ScriptedBackend(reject=("check_response", imgs[2].sha256)), imgs
    )
    assert (summary.images_done, summary.samples_ok, summary.samples_failed) == (3, 6, 3)
    s = shown[0]
    assert (s.images_total, s.images_done, s.images_failed, s.images_pending) == (3, 3, 0, 0)
    assert (s.samples_ok, s.samples_failed) == (6, 3)


# ------------------------------------------------------------------ selection and coverage


def test_selection_ranks_by_resolved_category_and_falls_back_to_the_harm_type(tmp_path: Path) -> None:
    (img,) = _images(1)
    plan = {img.sha256: [_scenario("Gas"), _scenario("gas"), _scenario("", "poisoning_or_health")]}
    _build(_cfg(tmp_path, perceive="model", controls=False), Discovers(plan), [img])
    sel = _selection(tmp_path / "run", img)
    # "Gas" and "gas" are one category: the second waits behind the other category, whose scenario
    # proposed none and is named by its harm type
    assert _chosen(sel) == [(0, "gas", "Gas"), (2, "poisoning or health", "")]
    assert sel["dropped"] == [{"index": 1, "reason": "enough scenarios for this image"}]
    with Ledger(tmp_path / "run", readonly=True) as led:
        cats = sorted(s["category"] for s in led.iter_samples(None))
    assert cats == ["gas", "poisoning or health"]


def test_full_categories_are_dropped_with_their_reason_and_reservations_are_released(
    tmp_path: Path,
) -> None:
    a, b, c = _images(3)
    plan = {
        a.sha256: [_scenario("fire")],  # its response always fails: nothing kept, fire stays open
        b.sha256: [_scenario("fire"), _scenario("water")],
        c.sha256: [_scenario("fire"), _scenario("gas"), _scenario("water")],
    }
    cfg = _cfg(tmp_path, perceive="model", controls=False, image_window=1, per_category_target=1)
    summary = _build(cfg, Discovers(plan, reject=("check_response", a.sha256)), [a, b, c])
    assert (summary.samples_ok, summary.samples_failed) == (3, 1)
    run = tmp_path / "run"
    assert _chosen(_selection(run, a)) == [(0, "fire", "fire")]
    assert _chosen(_selection(run, b)) == [(0, "fire", "fire"), (1, "water", "water")]
    assert _selection(run, b)["dropped"] == []
    sel = _selection(run, c)
    assert _chosen(sel) == [(1, "gas", "gas")]
    assert sel["dropped"] == [
        {"index": 0, "reason": "category 'fire' is full"},
        {"index": 2, "reason": "category 'water' is full"},
    ]


def test_a_resumed_selection_reserves_its_categories_once(tmp_path: Path) -> None:
    a, b = _images(2)
    plan = {a.sha256: [_scenario("fire")], b.sha256: [_scenario("fire")]}
    cfg = _cfg(tmp_path, perceive="model", controls=False, image_window=1, per_category_target=2)
    # first run: a's response fails (server down) after its selection is stored: a is pending
    first = _build(cfg, Discovers(plan, fail_stage="respond", fail_kind=ErrorKind.server), [a])
    assert first.images_pending == 1
    summary = _build(cfg, Discovers(plan), [a, b])  # a resumes its stored selection, then b selects
    assert (summary.images_done, summary.samples_ok) == (2, 2)
    assert _chosen(_selection(tmp_path / "run", b)) == [(0, "fire", "fire")]  # 1 kept + 0 reserved < 2


def test_spare_scenarios_of_a_stored_discovery_are_each_recorded_as_dropped(tmp_path: Path) -> None:
    # a discovery stored by an earlier run that asked for 3 scenarios per image (and stopped before
    # selecting); this run asks for 1: the three spares are each dropped with the reason
    (img,) = _images(1)
    run = tmp_path / "run"
    cats = ("fire", "water", "gas", "smoke")
    with Ledger(run) as led:
        led.add_image(img)
        led.put_record(img.sha256, "discover", "", {"scenarios": [_scenario(c) for c in cats]})
    cfg = _cfg(tmp_path, perceive="model", controls=False, scenarios_per_image=1)
    _build(cfg, ScriptedBackend(), [img])
    sel = _selection(run, img)
    assert _chosen(sel) == [(0, "fire", "fire")]
    assert sel["dropped"] == [{"index": i, "reason": "enough scenarios for this image"} for i in (1, 2, 3)]


def test_the_plan_shows_the_first_40_categories(tmp_path: Path) -> None:
    (img,) = _images(1)
    names = [f"category {i:02d}" for i in range(45)]
    with Ledger(tmp_path / "run") as led:
        for n in names:
            led.add_category(n, None, None)
    _build(_cfg(tmp_path, perceive="model"), ScriptedBackend(), [img])
    with Ledger(tmp_path / "run", readonly=True) as led:
        plan = led.get_record(img.sha256, "plan")
    assert plan is not None and plan["data"] == {"taxonomy": names[:40], "underfilled": [], "full": []}


# ------------------------------------------------------------------ resume


def test_a_resumed_image_runs_only_its_unfinished_samples(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shown = _capture_stats(monkeypatch)
    imgs = _images(2)
    cfg = _cfg(tmp_path, perceive="model")
    # the risky responses fail (server down): the controls are kept, the images pending
    _build(cfg, ScriptedBackend(fail_stage="respond", fail_kind=ErrorKind.server), imgs)
    summary = _build(cfg, ScriptedBackend(), imgs)
    assert (summary.images_done, summary.samples_ok) == (2, 6)
    assert (shown[1].samples_ok, shown[1].samples_failed, shown[1].images_done) == (4, 0, 2)


# ------------------------------------------------------------------ the build log and run metadata


_STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"


def test_the_build_log_lines_are_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ticks = iter([100.0, 101.23456])  # the run's start and end on the monotonic clock
    fake_time = types.SimpleNamespace(monotonic=lambda: next(ticks), time=time.time)
    monkeypatch.setattr("rmskit.pipeline.runner.time", fake_time)
    run = tmp_path / "rün"  # a run directory that is not ASCII, logged under a C locale
    cfg = _cfg(tmp_path, perceive="model").model_copy(update={"out": run})
    previous = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")
    try:
        summary = _build(cfg, ScriptedBackend(), _images(1))
    finally:
        locale.setlocale(locale.LC_CTYPE, previous)
    assert summary.elapsed_s == 1.235
    lines = (run / "build.log").read_bytes().decode("utf-8").splitlines()
    assert re.fullmatch(f"{_STAMP} INFO rmskit.pipeline: build started: 1 source\\(s\\) -> {run}", lines[0])
    assert re.fullmatch(
        f"{_STAMP} INFO rmskit.pipeline: build finished: {re.escape(summary.model_dump_json())}", lines[-1]
    )


def test_each_config_change_is_logged_and_kept_in_the_history(tmp_path: Path) -> None:
    cfgs = [_cfg(tmp_path, perceive="model", scenarios_per_image=n) for n in (2, 1, 3)]
    for cfg in cfgs:
        _build(cfg, ScriptedBackend(), _images(1))
    with Ledger(tmp_path / "run", readonly=True) as led:
        assert led.get_meta("config") == cfgs[2].public_dump()
        assert led.get_meta("config_history") == [cfgs[0].public_dump(), cfgs[1].public_dump()]
    msg = (
        "INFO rmskit.pipeline: config changed since the last run of this directory; finished work is "
        "reused where the requests are identical (cache), new settings apply to the rest\n"
    )
    assert (tmp_path / "run" / "build.log").read_text(encoding="utf-8").count(msg) == 2


# ------------------------------------------------------------------ run_build's defaults and backends


def _fast_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    def probes(samples: list[dict[str, Any]], **kw: Any) -> Probed:  # the real probes embed: slow
        return Probed(n=len(samples), kinds=sorted({s["kind"] for s in samples}), when=datetime(2026, 1, 2))

    monkeypatch.setattr("rmskit.scoring.probes.run_probes", probes)


def test_run_build_shows_progress_and_exports_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    Started.made = []
    monkeypatch.setattr("rmskit.pipeline.runner.load_backend", lambda c: Started(c))
    _fast_probes(monkeypatch)
    summary = asyncio.run(run_build(_cfg(tmp_path, perceive="model"), items=_images(1)))
    assert "probed openai:scripted" in capsys.readouterr().err
    assert summary.dataset_dir == str(tmp_path / "run" / "dataset") and summary.export_error is None


def test_a_backend_without_a_probe_and_one_that_fails_to_close_do_not_stop_the_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed: list[str] = []

    class NoProbe(ScriptedBackend):  # no `start` (nothing to probe); closing it fails
        async def aclose(self) -> None:
            closed.append("scripted")
            raise RuntimeError("connection already gone")

    monkeypatch.setattr("rmskit.pipeline.runner.load_backend", lambda c: NoProbe())
    cfg = _cfg(tmp_path, perceive="model")
    summary = asyncio.run(run_build(cfg, quiet=True, items=_images(1), export=False))
    assert summary.images_done == 1 and closed == ["scripted"]


def test_one_writer_per_run_directory(tmp_path: Path) -> None:
    with RunLock(tmp_path / "run"), pytest.raises(RunLocked):
        _build(_cfg(tmp_path, perceive="model"), ScriptedBackend(), _images(1))
    assert not (tmp_path / "run" / "rms.sqlite").exists()  # refused before anything was written


class Locked(ScriptedBackend):
    """Tries to take the run directory's lock while the build runs."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__()
        self.run_dir, self.refused = run_dir, 0

    async def generate(self, messages, *, schema=None, params=None):
        try:
            RunLock(self.run_dir).acquire().release()
        except RunLocked:
            self.refused += 1
        return await super().generate(messages, schema=schema, params=params)


def test_the_build_holds_the_run_lock_while_it_runs(tmp_path: Path) -> None:
    backend = Locked(tmp_path / "run")
    _build(_cfg(tmp_path, perceive="model"), backend, _images(1))
    assert backend.refused == len(backend.requests) > 0


# ------------------------------------------------------------------ verifier agreement


def test_agreement_uses_the_given_second_verifier(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, perceive="model", verify_agreement=3)
    first, second = ScriptedBackend(), ScriptedBackend()
    backends: dict[str, Any] = dict.fromkeys(ROLE_NAMES, first) | {"verify2": second}
    summary = asyncio.run(run_build(cfg, quiet=True, items=_images(1), backends=backends, export=False))
    with Ledger(tmp_path / "run", readonly=True) as led:
        agreement = led.get_meta("agreement")
    assert agreement["n_rounds"] == 3 and agreement["second_verifier"] == "scripted"
    assert second.requests and {r["stage"] for r in second.requests} <= {
        "check_text_only",
        "check_combined",
        "check_leakage",
        "check_response",
    }
    assert summary.requests == len(first.requests) + len(second.requests)


def test_agreement_without_a_second_verifier_reasks_the_first(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, perceive="model", verify_agreement=2)
    backend = ScriptedBackend()
    summary = _build(cfg, backend, _images(1))
    with Ledger(tmp_path / "run", readonly=True) as led:
        agreement = led.get_meta("agreement")
    assert agreement["n_rounds"] == 2
    assert agreement["second_verifier"] == "scripted (shuffled instructions, another temperature)"
    assert summary.requests == len(backend.requests)


def test_a_configured_second_verifier_is_loaded_and_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Started.made = []
    monkeypatch.setattr("rmskit.pipeline.runner.load_backend", lambda c: Started(c))
    monkeypatch.setattr("rmskit.pipeline.quality.load_backend", lambda c: Started(c))
    cfg = _cfg(tmp_path, perceive="model", verify_agreement=2).model_copy(
        update={"stage_models": {"verify2": BackendConfig(spec="openai:second")}}
    )
    asyncio.run(run_build(cfg, quiet=True, items=_images(1), export=False))
    assert [(b.cfg.spec, b.closed) for b in Started.made] == [("openai:scripted", 1), ("openai:second", 1)]
    assert Started.made[1].requests


# ------------------------------------------------------------------ the pipeline itself


def test_the_pipeline_runs_without_a_finish_as_the_ray_worker_uses_it(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, perceive="model")
    backend, stats = ScriptedBackend(), Stats()

    async def main() -> None:
        with Ledger(tmp_path / "run") as led:
            callers = {r: Caller(backend, led, stats, cfg.backend_for(r).params) for r in ROLE_NAMES}
            tax = Taxonomy(led, HashingEmbedder(), cfg.taxonomy_merge_threshold)
            pipeline = Pipeline(cfg, led, callers, stats, tax, Coverage(led, None))  # type: ignore[arg-type]
            await pipeline.run(_images(2))

    asyncio.run(main())
    assert (stats.images_done, stats.samples_ok, stats.ingest_finished) == (2, 6, True)


def test_a_run_ended_by_refused_credentials_leaves_no_image_task_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = _capture(monkeypatch, "Pipeline", Pipeline)
    cfg = _cfg(tmp_path, perceive="model", image_window=4)
    backends: dict[str, Any] = dict.fromkeys(ROLE_NAMES, Fatal())

    async def main() -> None:
        with pytest.raises(AuthenticationError):
            await run_build(cfg, quiet=True, items=_images(8), backends=backends, export=False)
        assert made[0]._tasks == set()  # every image in flight ended before the ledger closed

    asyncio.run(main())


class Encodes(ScriptedBackend):
    """Encodes each image it is sent, as a remote backend does (the shared data-URL cache)."""

    def __init__(self) -> None:
        super().__init__()
        self.urls = ImageURLs()
        self.cached: set[str] = set()

    async def generate(self, messages, *, schema=None, params=None):
        for m in messages:
            for img in m.images:
                await self.urls.url(img, 64)
                self.cached |= {k[0] for k in image_cache._IMAGE_CACHE}
        return await super().generate(messages, schema=schema, params=params)


def test_an_image_leaves_the_encoding_cache_when_its_stages_end(tmp_path: Path) -> None:
    imgs = []
    for i, rec in enumerate(_images(2)):
        path = tmp_path / f"p{i}.jpg"
        Image.new("RGB", (32, 24), (40 * i, 90, 160)).save(path)
        imgs.append(rec.model_copy(update={"path": str(path)}))
    backend = Encodes()
    summary = _build(_cfg(tmp_path, perceive="model"), backend, imgs)
    shas = {r.sha256 for r in imgs}
    assert summary.images_done == 2 and backend.cached >= shas  # encoded once, reused while in flight
    assert {k[0] for k in image_cache._IMAGE_CACHE} & shas == set()


# ------------------------------------------------------------------ the finish (finish.py)


def test_a_failed_background_embedding_does_not_lose_the_export(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(self: Any) -> None:
        raise RuntimeError("embedder gone")

    monkeypatch.setattr("rmskit.scoring.probes.QueryEmbeddings.run", broken)
    _fast_probes(monkeypatch)
    cfg = _cfg(tmp_path, perceive="model")
    backends: dict[str, Any] = dict.fromkeys(ROLE_NAMES, ScriptedBackend())
    summary = asyncio.run(run_build(cfg, quiet=True, items=_images(1), backends=backends))
    assert summary.dataset_dir == str(tmp_path / "run" / "dataset") and summary.samples_ok == 3


def _load_openmp() -> None:
    """An OpenMP runtime in the process, as torch brings one (the system's is quick to load)."""
    try:
        ctypes.CDLL("libgomp.so.1")
    except OSError:
        import sklearn.utils._openmp_helpers  # noqa: F401  (ships its own libgomp)


def test_the_finish_probes_with_one_blas_thread_and_lets_the_embedder_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from threadpoolctl import threadpool_info, threadpool_limits

    _load_openmp()

    seen: list[dict[str, list[int]]] = []

    def embed(texts: list[str]) -> np.ndarray:  # the real MiniLM takes seconds to load
        rng = np.random.default_rng(len(texts))
        x = rng.normal(size=(len(texts), 8)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def release() -> None:  # called inside the probes: records the thread limits in force
        info = collections.defaultdict(list)
        for lib in threadpool_info():
            info[lib["user_api"]].append(lib["num_threads"])
        seen.append(dict(info))

    monkeypatch.setattr("rmskit.scoring.probes.embed", embed)
    monkeypatch.setattr("rmskit.scoring.probes.release_embedder", release)
    _build(_cfg(tmp_path, perceive="model"), ScriptedBackend(), _images(2))
    with (
        threadpool_limits(limits=3, user_api="blas"),
        threadpool_limits(limits=3, user_api="openmp"),
        Ledger(tmp_path / "run") as led,
    ):
        out = finish_mod.finish_dataset(tmp_path / "run", led)
        outside = {lib["user_api"] for lib in threadpool_info()}
    assert out == {"dataset_dir": str(tmp_path / "run" / "dataset")}
    assert len(seen) == 1  # the build's finish lets the embedding model go once the texts are embedded
    assert set(seen[0]["blas"]) == {1}
    assert "openmp" in outside and set(seen[0]["openmp"]) == {3}  # other runtimes keep their threads
    with Ledger(tmp_path / "run", readonly=True) as led:
        probes = led.get_meta("probes")
    assert probes["n"] == 6
    card = (tmp_path / "run" / "dataset" / "README.md").read_text(encoding="utf-8")
    assert "CPU probes measured" in card
