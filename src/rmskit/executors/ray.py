"""`--executor ray`: the driver. Ingest runs here; images are routed by sha256 shard to worker actors
that each run the ordinary streaming Pipeline; the driver is the only writer of `<out>/rms.sqlite`.

Per worker, a supervisor ships images (bytes + the rows the run already has for them), commits the
batches of finished rows the worker streams back (one transaction each), and, when the worker's
process dies, waits for Ray to restart it and re-ships the images it had not committed: committed
work is seeded into the new worker and never asked again; only in-flight work is redone."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rmskit.config import STAGES, BuildConfig
from rmskit.executors import ExecutorConfig, shard_of
from rmskit.executors.progress import ClusterStats
from rmskit.ledger import Ledger
from rmskit.ledger.sync import RowBatch, apply_rows, seed_rows
from rmskit.pipeline.feed import admitted
from rmskit.pipeline.finish import Finish
from rmskit.pipeline.progress import ProgressView
from rmskit.pipeline.runner import (
    BuildSummary,
    _setup_logging,
    _store_run_meta,
)
from rmskit.records import ImageRecord, Rejection

log = logging.getLogger("rmskit.pipeline.ray")

_IN_PROCESS = ("hf", "vllm", "embedded")


def _ray():
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ValueError('--executor ray needs Ray: pip install "rmskit[ray]"') from exc
    return ray


def _actor_errors() -> tuple[type[BaseException], ...]:
    from ray import exceptions as rex

    return tuple(
        getattr(rex, n)
        for n in ("RayActorError", "ActorDiedError", "ActorUnavailableError")
        if hasattr(rex, n)
    )


def _init_ray(ex: ExecutorConfig) -> None:
    ray = _ray()
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
    if ex.ray_address is None:
        kwargs.update(include_dashboard=False, num_cpus=ex.num_cpus)
    ray.init(address=ex.ray_address, **kwargs)


def _gpus_per_worker(cfg: BuildConfig, ex: ExecutorConfig) -> float:
    if ex.num_gpus is not None:
        return ex.num_gpus
    in_process = any(cfg.backend_for(s).kind in _IN_PROCESS for s in STAGES)
    return 1.0 if in_process and _ray().cluster_resources().get("GPU", 0) > 0 else 0.0


class RayDriver:
    def __init__(self, cfg: BuildConfig, ex: ExecutorConfig, ledger: Ledger, stats: ClusterStats) -> None:
        self.cfg, self.ex, self.ledger, self.stats = cfg, ex, ledger, stats
        self.names = [f"w{i}" for i in range(ex.workers)]
        self.inputs: dict[str, asyncio.Queue[ImageRecord | None]] = {
            w: asyncio.Queue(maxsize=4 * ex.chunk) for w in self.names
        }
        self.sent: dict[str, dict[str, ImageRecord]] = {w: {} for w in self.names}  # shipped, not final
        self.closed: dict[str, bool] = dict.fromkeys(self.names, False)
        self.kept = ledger.sample_counts().get("ok", 0)
        self.stop = asyncio.Event()
        self.shipped = 0  # images shipped, re-shipments included (the kill test bounds these)
        self.restarts: dict[str, int] = dict.fromkeys(self.names, 0)
        self.finish: Finish | None = None  # told each kept sample, as the local pipeline tells it

    def _worker_of(self, sha: str) -> str:
        return self.names[shard_of(sha, self.ex.shards) % len(self.names)]

    def _target_reached(self) -> bool:
        return self.cfg.target is not None and self.kept >= self.cfg.target

    async def run(self, items: Iterable[ImageRecord | Rejection]) -> None:
        ray = _ray()
        ex = self.ex
        self.state: Any = (
            ray.remote(_state_cls())
            .options(num_cpus=0, max_restarts=0)
            .remote(
                self.ledger.taxonomy(),
                self.ledger.category_counts(),
                self.cfg.taxonomy_merge_threshold,
                self.cfg.embedder,
                self.cfg.per_category_target,
            )
        )
        gpus = _gpus_per_worker(self.cfg, ex)
        worker_cls = ray.remote(_worker_cls())
        opts = {
            "num_cpus": ex.cpus_per_worker,
            "num_gpus": gpus,
            "max_restarts": ex.max_restarts,
            "max_task_retries": 0,
        }
        cfg_json = self.cfg.model_dump_json()
        # Named, so operators (and the kill test) can find a worker: ray.util.list_named_actors().
        token = uuid.uuid4().hex[:8]
        self.handles: dict[str, Any] = {
            w: worker_cls.options(name=f"rmskit-{token}-{w}", **opts).remote(
                cfg_json, w, ex.workers, self.state, ex.flush_s
            )
            for w in self.names
        }
        if self._target_reached():
            self.stop.set()
        sync = asyncio.create_task(self._sync_taxonomy_forever())
        try:
            await asyncio.gather(self._ingest(items), *(self._supervise(w) for w in self.names))
        finally:
            sync.cancel()
            await self._sync_taxonomy()
            for h in self.handles.values():
                with contextlib.suppress(Exception):
                    ray.kill(h)
            with contextlib.suppress(Exception):  # a dead actor's folder stays: nothing can reach it
                await asyncio.wait_for(self.state.close.remote(), timeout=30)
            with contextlib.suppress(Exception):
                ray.kill(self.state)

    # -- ingest and routing ---------------------------------------------------------------------
    async def _ingest(self, items: Iterable[ImageRecord | Rejection]) -> None:
        try:
            feed = admitted(items, self.ledger, self.stats, self.cfg, self.stop, maxsize=4 * self.ex.chunk)
            async for item in feed:
                await self.inputs[self._worker_of(item.sha256)].put(item)
        finally:
            self.stats.ingest_finished = True
            for q in self.inputs.values():
                await q.put(None)

    def _payload(self, w: str, recs: list[ImageRecord]) -> tuple[list[str], list[bytes], RowBatch]:
        ok, blobs = [], []
        for r in recs:
            try:
                blobs.append(Path(r.path).read_bytes())
                ok.append(r)
            except OSError as exc:  # the decoded copy vanished: this image fails, the run goes on
                self.ledger.set_image_status(r.sha256, "failed", f"cannot read {r.path}: {exc}")
                self.sent[w].pop(r.sha256, None)
        return [r.model_dump_json() for r in ok], blobs, seed_rows(self.ledger, [r.sha256 for r in ok])

    async def _feed(self, w: str, resend: list[ImageRecord]) -> None:
        try:
            await self._feed_all(w, resend)
        except _actor_errors():
            raise  # the supervisor sees the death on the stream too
        except Exception:  # a driver-side bug must not hang the worker: end its input
            log.exception("feeding worker %s failed; its unsent images stay pending", w)
            self.closed[w] = True
            await self.handles[w].close_input.remote()

    async def _feed_all(self, w: str, resend: list[ImageRecord]) -> None:
        handle = self.handles[w]
        for i in range(0, len(resend), self.ex.chunk):
            chunk = resend[i : i + self.ex.chunk]
            self.shipped += len(chunk)
            await handle.feed.remote(*self._payload(w, chunk))
        while not self.closed[w]:
            chunk: list[ImageRecord] = []
            item = await self.inputs[w].get()
            while item is not None:
                chunk.append(item)
                if len(chunk) >= self.ex.chunk or self.inputs[w].empty():
                    break
                item = self.inputs[w].get_nowait()
            if item is None:
                self.closed[w] = True
            if chunk:
                for rec in chunk:
                    self.sent[w][rec.sha256] = rec
                self.shipped += len(chunk)
                await handle.feed.remote(*self._payload(w, chunk))
        await handle.close_input.remote()

    # -- one worker: ship, commit, recover ------------------------------------------------------
    async def _supervise(self, w: str) -> None:
        handle = self.handles[w]
        errors = _actor_errors()
        restarts = 0
        while True:
            feeder = asyncio.create_task(self._feed(w, list(self.sent[w].values())))
            try:
                async for ref in handle.run.remote():
                    self._commit(w, await ref)
                log.debug(
                    "worker %s: stream ended (%d shipped, %d uncommitted)", w, self.shipped, len(self.sent[w])
                )
                await feeder
                return
            except errors as exc:
                feeder.cancel()
                with contextlib.suppress(BaseException):
                    await feeder
                restarts += 1
                self.restarts[w] = restarts
                self.stats.retire(w)
                await self.state.forget_worker.remote(w)
                if restarts > self.ex.max_restarts:
                    log.error("worker %s died %d times; its images stay pending for a re-run", w, restarts)
                    await self._discard_inputs(w)
                    return
                log.warning(
                    "worker %s died (%s); redoing its %d uncommitted image(s)", w, exc, len(self.sent[w])
                )
                await self._wait_alive(handle)

    async def _wait_alive(self, handle: Any, timeout: float = 120.0) -> None:
        errors = _actor_errors()
        deadline = time.monotonic() + timeout
        while True:
            try:
                await handle.ping.remote()
                return
            except errors:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)

    async def _discard_inputs(self, w: str) -> None:
        """A worker that is gone for good: keep ingest flowing, its images stay pending."""
        while not self.closed[w]:
            if await self.inputs[w].get() is None:
                self.closed[w] = True

    def _commit(self, w: str, out: dict[str, Any]) -> None:
        batch: RowBatch = out["rows"]
        log.debug("worker %s: batch of %d rows, %d image outcome(s)", w, len(batch), len(batch.images))
        if len(batch):
            apply_rows(self.ledger, batch)
        for sha, _status, _error in batch.images:
            self.sent[w].pop(sha, None)
        kept = [s for s in batch.dicts("samples") if s["status"] == "ok"]
        if self.finish is not None:
            for s in kept:  # its query embedded in the background, not after the last response
                self.finish.kept(json.loads(s["data"]))
        cats = [s["category"] for s in kept if s["kind"] == "risky"]
        if cats:
            self.state.commit.remote(w, cats)
        self.kept += len(kept)
        self.stats.absorb(w, out["stats"])
        if self._target_reached() and not self.stop.is_set():
            self.stop.set()
            for h in self.handles.values():
                h.stop.remote()

    async def _sync_taxonomy_forever(self, every_s: float = 5.0) -> None:
        while True:
            await asyncio.sleep(every_s)
            await self._sync_taxonomy()

    async def _sync_taxonomy(self) -> None:
        """Copy the shared taxonomy into the run's ledger (the actor's own copy is private)."""
        with contextlib.suppress(*_actor_errors()):
            rows = await self.state.taxonomy_rows.remote()
            for row in rows:
                self.ledger.add_category(row["name"], row["description"], row["embedding"])
                for alias in row["aliases"]:
                    self.ledger.add_alias(row["name"], alias)


def _state_cls() -> type:
    from rmskit.executors.state import SharedState

    return SharedState


def _worker_cls() -> type:
    from rmskit.executors.worker import ShardWorker

    return ShardWorker


async def run_build_ray(
    cfg: BuildConfig,
    ex: ExecutorConfig,
    *,
    quiet: bool = False,
    items: Iterable[ImageRecord | Rejection] | None = None,
    export: bool = True,
) -> BuildSummary:
    """Run (or resume) a build on Ray; same run directory, summary and dataset as the local executor."""
    t0 = time.monotonic()
    run_dir = Path(cfg.out)
    ledger = Ledger(run_dir, lock=True)  # one writer per run directory
    handler = _setup_logging(run_dir)
    stats = ClusterStats()
    try:
        _store_run_meta(ledger, cfg)
        _init_ray(ex)
        driver = RayDriver(cfg, ex, ledger, stats)
        if items is None:
            from rmskit.ingest.sources import iter_sources

            items = iter_sources(cfg.sources, cfg.ingest, run_dir / "images")
        log.info(
            "build started on Ray (%d workers): %d source(s) -> %s", ex.workers, len(cfg.sources), run_dir
        )
        # The local executor's finish: its worker (a thread of the driver by default) follows the ledger
        # the driver writes and exports at the end, while the kept queries are embedded here as they come.
        finish = driver.finish = Finish() if export else None
        if finish is not None:
            await finish.start(run_dir)
        try:
            with ProgressView(stats, quiet=quiet):
                await driver.run(items)
        except BaseException:
            if finish is not None:
                await finish.cancel()
            raise
        # the run's end, before the export: its card shows it (as the local executor does)
        ledger.set_meta("finished_at", time.time())
        summary_export = await finish.finish(run_dir, ledger) if finish is not None else {}
        usage = ledger.usage_by_stage()
        counts = ledger.image_counts()
        samples = ledger.sample_counts()
        values: dict[str, Any] = {
            "run_dir": str(run_dir),
            "images_accepted": sum(counts.values()),
            "images_rejected": len(ledger.rejections()),
            "images_done": counts.get("done", 0),
            "images_failed": counts.get("failed", 0),
            "images_pending": counts.get("pending", 0),
            "samples_ok": samples.get("ok", 0),
            "samples_failed": samples.get("failed", 0),
            "requests": sum(u["requests"] for u in usage.values()),
            "tokens": sum(u["prompt_tokens"] + u["completion_tokens"] for u in usage.values()),
            "elapsed_s": round(time.monotonic() - t0, 3),
            "stopped_at_target": driver.stop.is_set(),
            **summary_export,
        }
        summary = BuildSummary(**{k: v for k, v in values.items() if k in BuildSummary.model_fields})
        ledger.set_meta(
            "last_executor",
            {**ex.model_dump(mode="json"), "shipped": driver.shipped, "restarts": driver.restarts},
        )
        log.info("build finished: %s", summary.model_dump_json())
        return summary
    finally:
        logging.getLogger("rmskit").removeHandler(handler)
        handler.close()
        ledger.close()
