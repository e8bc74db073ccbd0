"""Streaming build runner: images flow through the stages with no barrier between stages.

Each image is one task (perceive -> discover -> select -> per-scenario SampleLoop, plus a control);
at most `image_window` images are in flight and each backend bounds its own request concurrency.
Everything finished is in the ledger; re-running the same command resumes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

import rmskit
from rmskit import embedding, heap
from rmskit.config import BuildConfig
from rmskit.console import is_storage_failure
from rmskit.executors import ExecutorConfig
from rmskit.ledger import Ledger
from rmskit.models import AuthenticationError, ModelBackend, load_backend
from rmskit.models.images import forget_image
from rmskit.pipeline.caller import Caller, StageFailed
from rmskit.pipeline.feed import admitted
from rmskit.pipeline.finish import Finish
from rmskit.pipeline.progress import ProgressView, Stats
from rmskit.pipeline.prompting import prompts_fingerprint
from rmskit.pipeline.quality import measure_agreement
from rmskit.pipeline.registry import ROLES, STAGES
from rmskit.pipeline.sample import SampleLoop
from rmskit.pipeline.stages import StageContext, sample_id
from rmskit.pipeline.taxonomy import Coverage, Taxonomy, make_embedder
from rmskit.records import ImageRecord, Rejection
from rmskit.textsafe import EscapingFilter

log = logging.getLogger("rmskit.pipeline")


class BuildSummary(BaseModel):
    run_dir: str
    images_accepted: int
    images_rejected: int
    images_done: int
    images_failed: int
    images_pending: int = 0  # left for a re-run after transient failures (server down, timeouts)
    samples_ok: int
    samples_failed: int
    requests: int
    tokens: int
    elapsed_s: float
    stopped_at_target: bool = False
    dataset_dir: str | None = None
    export_error: str | None = None


class Pipeline:
    def __init__(
        self,
        cfg: BuildConfig,
        ledger: Ledger,
        callers: dict[str, Caller],
        stats: Stats,
        taxonomy: Taxonomy,
        coverage: Coverage,
    ) -> None:
        self.cfg = cfg
        self.ledger = ledger
        self.callers = callers
        self.stats = stats
        self.taxonomy = taxonomy
        self.coverage = coverage
        self.kept = ledger.sample_counts().get("ok", 0)
        self.stop = asyncio.Event()
        self._select_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self._main: asyncio.Task | None = None
        self._fatal: BaseException | None = None  # set by _abort
        self.finish: Finish | None = None  # probes/export prepared while the run goes on

    # -- orchestration --------------------------------------------------------------------------
    async def run(self, items: Iterable[ImageRecord | Rejection]) -> None:
        self._main = asyncio.current_task()
        try:
            await self._run(items)
        except asyncio.CancelledError:
            if self._fatal is None:
                raise
            self._main.uncancel()  # type: ignore[union-attr]
            raise self._fatal from None
        finally:
            # Ctrl-C or a full disk: stop the images in flight before the caller closes the ledger.
            for t in self._tasks:
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _settled(self, task: asyncio.Task) -> None:
        exc = None if task.cancelled() else task.exception()  # retrieved: never "never retrieved"
        if exc is not None and _ends_the_run(exc):
            self._abort(exc)
        elif exc is not None:
            log.error("image task ended with %r", exc)

    def _abort(self, exc: BaseException) -> None:
        """Storage ran out or the endpoint refuses our credentials: no later work can succeed, so
        end the run (resumable) rather than fail every image in turn."""
        if self._fatal is None:
            self._fatal = exc
            if self._main is not None:
                self._main.cancel()

    async def _run(self, items: Iterable[ImageRecord | Rejection]) -> None:
        window = self.cfg.image_window or max(8, 2 * max(self.cfg.backend_for(r).concurrency for r in ROLES))
        slots = asyncio.Semaphore(window)
        tasks = self._tasks
        if self._target_reached():
            self.stop.set()
        async for item in admitted(items, self.ledger, self.stats, self.cfg, self.stop, maxsize=window):
            await slots.acquire()
            if self.stop.is_set():
                slots.release()
                break
            task = asyncio.create_task(self._image(item))
            tasks.add(task)
            task.add_done_callback(lambda t: (tasks.discard(t), slots.release(), self._settled(t)))
        self.stats.ingest_finished = True
        if self.finish is not None:
            self.finish.feed_done()
        if self.stop.is_set():
            for t in tasks:
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _target_reached(self) -> bool:
        return self.cfg.target is not None and self.kept >= self.cfg.target

    async def _image(self, rec: ImageRecord) -> None:
        try:
            await self._image_stages(rec)
        finally:
            forget_image(rec.sha256)  # its encoded pixels are not needed again in this run

    async def _image_stages(self, rec: ImageRecord) -> None:
        ctx = StageContext(rec, self.ledger, self.callers, self.cfg.perceive, self.cfg.stage_max_tokens)
        planning = self.finish is not None
        if self.finish is not None:
            self.finish.image_planning(+1)
        try:
            plan = self._plan(rec)
            perception = await ctx.perceive()
            discovery = await ctx.discover(perception, plan, self.cfg.scenarios_per_image)
            chosen = await self._select(rec, discovery)
            jobs = [
                self._risky(
                    ctx, perception, c["sample_id"], discovery["scenarios"][c["index"]], c["category"]
                )
                for c in chosen
            ]
            if self.cfg.controls:
                jobs.append(self._control(ctx, perception))
            if self.finish is not None:
                self.finish.samples_started(len(jobs))  # each one's `_sample` ends it
                planning = False
                self.finish.image_planning(-1)
            results = await _gather_finished(jobs)
            for r in results:  # every sample ran to its end or to a transient failure
                if isinstance(r, BaseException):
                    raise r
            self.ledger.set_image_status(rec.sha256, "done")
            self.stats.images_done += 1
        except StageFailed as exc:
            if exc.transient:  # not the image's fault: leave it (and its unfinished samples) pending
                self.ledger.set_image_status(rec.sha256, "pending", str(exc))
                self.stats.images_pending += 1
                log.warning("image %s (%s) left for a re-run: %s", rec.source_path, rec.sha256[:12], exc)
                return
            self.ledger.set_image_status(rec.sha256, "failed", str(exc))
            self.stats.images_failed += 1
            log.warning("image %s (%s) failed: %s", rec.source_path, rec.sha256[:12], exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug on one image must not end the run
            if _ends_the_run(exc):  # ...but a full disk or a refused key must (see _abort)
                raise
            log.exception("image %s crashed", rec.source_path)
            self.ledger.set_image_status(rec.sha256, "failed", f"internal error: {exc!r}")
            self.stats.images_failed += 1
        finally:
            if planning and self.finish is not None:
                self.finish.image_planning(-1)

    def _adjustments(self, sha: str, sid: str) -> list[str]:
        """Truncations of this sample's answers and of its image's perceive/discover answers."""
        return [
            f"{a['stage']}: {a['message']}"
            for a in self.ledger.failures_of(sha, "adjusted")
            if sid in a["key"] or a["stage"] in ("perceive", "discover")
        ]

    def _plan(self, rec: ImageRecord) -> dict[str, Any]:
        """Snapshot of the taxonomy/coverage steering this image saw; stored so a resumed run
        renders identical prompts (and hits the request cache)."""
        stored = self.ledger.get_record(rec.sha256, "plan")
        if stored and stored["status"] == "ok":
            return stored["data"]
        names = self.taxonomy.names
        under, full = self.coverage.steer(names)
        plan = {"taxonomy": names[:40], "underfilled": under, "full": full}
        self.ledger.put_record(rec.sha256, "plan", "", plan)
        return plan

    async def _select(self, rec: ImageRecord, discovery: dict[str, Any]) -> list[dict[str, Any]]:
        stored = self.ledger.get_record(rec.sha256, "select")
        if stored and stored["status"] == "ok":  # resumed: reserve again (each _risky releases one)
            for c in stored["data"]["chosen"]:
                self.coverage.reserve(c["category"], 1)
            return stored["data"]["chosen"]
        async with self._select_lock:  # category resolution + reservation must not interleave
            candidates, dropped = [], []
            for i, sc in enumerate(discovery["scenarios"]):
                cat = await self.taxonomy.resolve(sc.get("category") or sc.get("harm_type") or "other")
                if self.coverage.is_full(cat):
                    dropped.append({"index": i, "reason": f"category '{cat}' is full"})
                    continue
                candidates.append((i, cat, sc.get("category", "")))
            # Discovery order, one per category first: never load order, so ids are the same per run.
            seen: set[str] = set()
            first, rest = [], []
            for c in candidates:
                (rest if c[1] in seen else first).append(c)
                seen.add(c[1])
            ranked = first + rest
            chosen = []
            for i, cat, proposed in ranked:
                if len(chosen) >= self.cfg.scenarios_per_image:
                    dropped.append({"index": i, "reason": "enough scenarios for this image"})
                    continue
                chosen.append(
                    {
                        "index": i,
                        "sample_id": sample_id(rec.sha256, "risky", i),
                        "category": cat,
                        "proposed": proposed,
                    }
                )
                self.coverage.reserve(cat, 1)
            self.ledger.put_record(rec.sha256, "select", "", {"chosen": chosen, "dropped": dropped})
        return chosen

    # -- one sample: its rounds run in SampleLoop; here it is stored and counted -----------------
    async def _risky(
        self, ctx: StageContext, perception: dict, sid: str, scenario: dict, category: str
    ) -> None:
        try:
            await self._sample(ctx, perception, sid, "risky", category, scenario)
        finally:
            self.coverage.reserve(category, -1)

    async def _control(self, ctx: StageContext, perception: dict) -> None:
        """The benign control: safe alone and with the image; measures over-refusal."""
        sid = sample_id(ctx.rec.sha256, "control", 0)
        await self._sample(ctx, perception, sid, "control", "none", None)

    async def _sample(
        self,
        ctx: StageContext,
        perception: dict,
        sid: str,
        kind: str,
        category: str,
        scenario: dict | None,
    ) -> None:
        finish = self.finish
        readied: list[tuple[str, str, str]] = []  # its query, as the finish saw it

        def ready(query: str) -> None:
            readied.append((query, kind, category))
            if finish is not None:
                finish.query_ready(query, kind, category)

        try:
            if self.ledger.get_sample(sid) is None:  # else finished (kept or failed for good) earlier
                await self._run_sample(ctx, perception, sid, kind, category, scenario, ready)
        finally:
            if finish is not None:
                finish.sample_ended(readied)

    async def _run_sample(
        self,
        ctx: StageContext,
        perception: dict,
        sid: str,
        kind: str,
        category: str,
        scenario: dict | None,
        ready: Callable[[str], None],
    ) -> None:
        loop = SampleLoop(ctx, self.cfg, self.callers, perception, sid, kind, category, scenario, ready)
        status, data = await loop.run()  # a transient failure propagates: nothing is written
        if caps := self._adjustments(ctx.rec.sha256, sid):
            data["checks"]["caps"] = {
                "pass": True,
                "reason": "over-long model output truncated to the schema's caps",
                "adjustments": caps,
            }
        self.ledger.put_sample_with_round(
            sid, ctx.rec.sha256, kind, category, status, data, final_round=loop.final_round
        )
        if status != "ok":
            self.stats.samples_failed += 1
            return
        self.stats.samples_ok += 1
        self.kept += 1
        if self.finish is not None:
            self.finish.kept(data, kind, category)  # before `sample_ended`: its row is in, not in flight
        if kind == "risky":
            self.coverage.add(category)
        if self._target_reached():
            self.stop.set()


async def _gather_finished(jobs: list[Any]) -> list[Any]:
    """gather(return_exceptions=True), but a cancel that arrives once every job has ended (the target,
    reached by this image's last sample, stops the run) does not discard the results: the image is done."""
    gathered = asyncio.gather(*jobs, return_exceptions=True)
    try:
        return await gathered
    except asyncio.CancelledError:
        # The cancel surfaces here only once `gathered` is done: cancelled if a job was still running
        # (cut short: the image stays pending), else with every job's result (the task then ends normally).
        if gathered.cancelled():
            raise
        return gathered.result()


def _ends_the_run(exc: BaseException) -> bool:
    return is_storage_failure(exc) or isinstance(exc, AuthenticationError)


def _setup_logging(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "build.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(EscapingFilter())  # a file name with a newline must not forge a log line
    root = logging.getLogger("rmskit")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return handler


def _store_run_meta(ledger: Ledger, cfg: BuildConfig) -> None:
    previous = ledger.get_meta("config")
    current = cfg.public_dump()
    if previous is not None and previous != current:
        log.info(
            "config changed since the last run of this directory; finished work is reused where the "
            "requests are identical (cache), new settings apply to the rest"
        )
        ledger.set_meta("config_history", [*ledger.get_meta("config_history", []), previous])
    ledger.set_meta("config", current)
    ledger.set_meta("prompt_versions", {name: spec.prompt for name, spec in STAGES.items()})
    ledger.set_meta("prompt_fingerprints", prompts_fingerprint())
    ledger.set_meta("rmskit_version", rmskit.__version__)
    if ledger.get_meta("started_at") is None:
        ledger.set_meta("started_at", time.time())


async def run_build(
    cfg: BuildConfig,
    *,
    quiet: bool = False,
    items: Iterable[ImageRecord | Rejection] | None = None,
    backends: dict[str, ModelBackend] | None = None,
    export: bool = True,
) -> BuildSummary:
    """Run (or resume) a build. `items` replaces ingest (benchmarks, notebooks); `backends` maps
    stage names to ready backends (tests)."""
    t0 = time.monotonic()
    heap.fix_mmap_threshold()  # a long run's freed payloads and batches go back to the system
    run_dir = Path(cfg.out)
    ledger = Ledger(run_dir, lock=True)  # one writer per run directory
    handler = _setup_logging(run_dir)
    stats = Stats()
    created: list[ModelBackend] = []
    threads = embedding.set_shared_threads(1)  # the build's MiniLM embeds in the background
    try:
        ledger.checkpoint_in_background()  # no fdatasync on the event loop (closed in `finally`)
        _store_run_meta(ledger, cfg)
        by_cfg: dict[str, Caller] = {}
        callers: dict[str, Caller] = {}
        for stage in ROLES:
            bcfg = cfg.backend_for(stage)
            ident = bcfg.model_dump_json()
            if backends and stage in backends:
                callers[stage] = Caller(backends[stage], ledger, stats, bcfg.params)
                continue
            if ident not in by_cfg:
                backend = load_backend(bcfg)
                created.append(backend)
                by_cfg[ident] = Caller(backend, ledger, stats, bcfg.params)
            callers[stage] = by_cfg[ident]
        for backend in created:  # capability probe of remote servers (models/probe.py); 401 stops here
            start = getattr(backend, "start", None)
            if start is not None:
                await start(ledger, echo=None if quiet else lambda line: print(line, file=sys.stderr))
        if cfg.perceive == "model" and not callers["perceive"].vision:  # nothing could be perceived
            raise ValueError(
                f"--perceive model, but {callers['perceive'].model_id} has no vision (probed or "
                "--no-vision): give a vision model with --stage-model perceive=SPEC, or derive perception "
                "from captions/instances with --perceive annotations"
            )
        embedder = await asyncio.to_thread(make_embedder, cfg.embedder)
        taxonomy = Taxonomy(ledger, embedder, cfg.taxonomy_merge_threshold)
        coverage = Coverage(ledger, cfg.per_category_target)
        pipeline = Pipeline(cfg, ledger, callers, stats, taxonomy, coverage)
        if items is None:
            from rmskit.ingest.sources import iter_sources

            items = iter_sources(cfg.sources, cfg.ingest, run_dir / "images")
        log.info("build started: %d source(s) -> %s", len(cfg.sources), run_dir)
        finish = Finish() if export else None
        pipeline.finish = finish
        if finish is not None:
            await finish.start(run_dir)
        try:
            with ProgressView(stats, quiet=quiet):
                await pipeline.run(items)
                if cfg.verify_agreement:
                    await measure_agreement(cfg, ledger, callers, stats, backends or {}, created)
        except BaseException:
            if finish is not None:
                await finish.cancel()
            raise
        # the run's end, before the export: its card shows it (set after, a fresh build's card said "unknown")
        ledger.set_meta("finished_at", time.time())
        # The finish sends its worker the request at once; the summary's reads (~5 ms, which the finish
        # does not change) run here while it exports, not after.
        # the model clients' connections closed beside the finish (its probes), not after it
        finishing = asyncio.ensure_future(
            finish.finish(run_dir, ledger, meanwhile=lambda: _close_backends(created))
            if finish is not None
            else _no_export()
        )
        try:
            await asyncio.sleep(0)
            usage = ledger.usage_by_stage()
            counts = ledger.image_counts()
            samples = ledger.sample_counts()
            rejected = len(ledger.rejections())
        except BaseException:
            finishing.cancel()
            await asyncio.gather(finishing, return_exceptions=True)
            if finish is not None:
                await finish.cancel()  # its worker is a process of its own
            raise
        summary_export = await finishing
        summary = BuildSummary(
            run_dir=str(run_dir),
            images_accepted=sum(counts.values()),
            images_rejected=rejected,
            images_done=counts.get("done", 0),
            images_failed=counts.get("failed", 0),
            images_pending=counts.get("pending", 0),
            samples_ok=samples.get("ok", 0),
            samples_failed=samples.get("failed", 0),
            requests=sum(u["requests"] for u in usage.values()),
            tokens=sum(u["prompt_tokens"] + u["completion_tokens"] for u in usage.values()),
            elapsed_s=round(time.monotonic() - t0, 3),
            stopped_at_target=pipeline.stop.is_set(),
            **summary_export,
        )
        log.info("build finished: %s", summary.model_dump_json())
        return summary
    finally:
        embedding.set_shared_threads(threads)
        await _close_backends(created)
        logging.getLogger("rmskit").removeHandler(handler)
        handler.close()
        ledger.close()


async def _close_backends(created: list[Any]) -> None:
    """Close the backends this build made, once (the list is emptied)."""
    while created:
        with contextlib.suppress(Exception):
            await created.pop().aclose()


async def _no_export() -> dict[str, Any]:
    return {}


def build(cfg: BuildConfig, *, quiet: bool = False, executor: ExecutorConfig | None = None) -> BuildSummary:
    """Python API: run or resume a build described by `cfg` (same config the CLI takes)."""
    if executor is not None and executor.kind == "ray":  # same stages, on Ray worker actors
        from rmskit.executors.ray import run_build_ray

        return asyncio.run(run_build_ray(cfg, executor, quiet=quiet))
    return asyncio.run(run_build(cfg, quiet=quiet))
