"""The Ray worker actor: the same streaming Pipeline as the local executor, over the images the
driver ships it, on a private ledger in the worker's own temp dir.

The driver calls `run()` (a streaming generator: batches of finished rows + progress counters every
`flush_s`) and `feed()` (images with their bytes and the rows they already have in the run's
ledger). A worker never opens the run's rms.sqlite, so it needs no filesystem shared with the
driver. If the process dies, Ray restarts the actor (a fresh temp ledger) and the driver re-ships
what it had not committed."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import queue
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from rmskit.config import STAGES, BackendConfig, BuildConfig
from rmskit.executors.scratch import Scratch
from rmskit.executors.state import SharedCoverage, SharedSelectLock, SharedTaxonomy
from rmskit.ledger import Ledger
from rmskit.ledger.sync import Outbox, RowBatch
from rmskit.models import ModelBackend, load_backend
from rmskit.pipeline.caller import Caller
from rmskit.pipeline.progress import Stats
from rmskit.pipeline.runner import Pipeline
from rmskit.records import ImageRecord

_END = None  # end of this worker's input


def split_backend(bcfg: BackendConfig, workers: int) -> BackendConfig:
    """openai: workers share the endpoints, so each takes its part of the concurrency and rate
    limits; an in-process model is one replica per worker and keeps its settings."""
    if bcfg.kind != "openai" or workers == 1:
        return bcfg
    update: dict[str, Any] = {"concurrency": max(1, -(-bcfg.concurrency // workers))}
    for limit in ("requests_per_minute", "tokens_per_minute"):
        if getattr(bcfg, limit) is not None:
            update[limit] = getattr(bcfg, limit) / workers
    return bcfg.model_copy(update=update)


def stats_dict(stats: Stats) -> dict[str, Any]:
    return dataclasses.asdict(stats)


class ShardWorker:
    """Actor body (wrapped with ray.remote by the driver)."""

    def __init__(self, cfg_json: str, worker: str, workers: int, state: Any, flush_s: float) -> None:
        cfg = BuildConfig.model_validate_json(cfg_json)
        # A killed worker's dir (and its restarts', after a kill) is swept by the next one on the node.
        self.scratch = Scratch(f"rmskit-{worker}-")
        self.dir = self.scratch.path
        self.images = self.dir / "images"
        self.images.mkdir()
        # The global --limit is the driver's (it ships only that many images).
        self.cfg = cfg.model_copy(
            update={
                "out": self.dir / "ledger",
                "limit_images": None,
                "model": split_backend(cfg.model, workers),
                "stage_models": {k: split_backend(v, workers) for k, v in cfg.stage_models.items()},
            }
        )
        self.worker = worker
        self.flush_s = flush_s
        self.state = state
        self.ledger = Ledger(self.dir / "ledger")
        self.outbox = Outbox(self.ledger)
        self.stats = Stats()
        self.backends: list[ModelBackend] = []
        callers: dict[str, Caller] = {}
        by_cfg: dict[str, Caller] = {}
        for stage in STAGES:
            bcfg = self.cfg.backend_for(stage)
            ident = bcfg.model_dump_json()
            if ident not in by_cfg:
                backend = load_backend(bcfg)
                self.backends.append(backend)
                by_cfg[ident] = Caller(backend, self.ledger, self.stats, bcfg.params)
            callers[stage] = by_cfg[ident]
        self.taxonomy = SharedTaxonomy(state)
        self.coverage = SharedCoverage(state, worker, cfg.per_category_target)
        self.pipeline = Pipeline(self.cfg, self.ledger, callers, self.stats, self.taxonomy, self.coverage)  # type: ignore[arg-type]
        # The one hook into Pipeline: its select lock becomes the cluster-wide one.
        self.pipeline._select_lock = SharedSelectLock(state, worker, self.taxonomy, self.coverage)  # type: ignore[assignment]
        window = self.cfg.image_window or max(8, 2 * max(c.concurrency for c in callers_cfgs(self.cfg)))
        self.inbox: queue.Queue[ImageRecord | None] = queue.Queue(maxsize=window)
        self._closed = False

    async def ping(self) -> int:
        return os.getpid()

    async def feed(self, records: list[str], blobs: list[bytes], seed: RowBatch) -> int:
        """Take images (their bytes travel through Ray's object store) and the rows the run's
        ledger already has for them; returns once they fit in the input queue (backpressure)."""
        if self._closed:  # stopped at the target: nothing new starts
            return 0
        self.outbox.seed(seed)
        recs = []
        for raw, blob in zip(records, blobs, strict=True):
            rec = ImageRecord.model_validate_json(raw)
            local = self.images / f"{rec.sha256}{Path(rec.path).suffix}"
            local.write_bytes(blob)
            recs.append(rec.model_copy(update={"path": str(local)}))
        await asyncio.to_thread(self._put_all, recs)
        return len(recs)

    def _put_all(self, recs: list[ImageRecord | None]) -> None:
        for rec in recs:
            while not self.pipeline.stop.is_set():  # a stop drains the queue; never block past it
                with contextlib.suppress(queue.Full):
                    self.inbox.put(rec, timeout=0.2)
                    break

    async def close_input(self) -> None:
        if not self._closed:
            self._closed = True
            await asyncio.to_thread(self._put_all, [_END])

    async def stop(self) -> None:
        """The global target is reached: finish nothing new (as the local executor does)."""
        self.pipeline.stop.set()
        self._closed = True
        while True:  # a feed thread may slip one item in between: drain until the end marker fits
            with contextlib.suppress(queue.Empty):
                while True:
                    self.inbox.get_nowait()
            with contextlib.suppress(queue.Full):
                self.inbox.put_nowait(_END)
                return

    async def run(self) -> AsyncIterator[dict[str, Any]]:
        """Run the pipeline over everything fed until close_input(); stream rows and counters."""
        task = asyncio.create_task(self.pipeline.run(iter(self.inbox.get, _END)))
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=self.flush_s)
                if not self.coverage.in_lock:  # a fresher view for plan/steer between selects
                    snap = await self.state.snapshot.remote()
                    if not self.coverage.in_lock:
                        self.taxonomy.refresh(snap["names"])
                        self.coverage.refresh(snap["loads"])
                yield {"rows": self.outbox.drain(), "stats": stats_dict(self.stats)}
            task.result()
            yield {"rows": self.outbox.drain(), "stats": stats_dict(self.stats), "final": True}
        finally:
            if not task.done():
                task.cancel()
            for backend in self.backends:
                with contextlib.suppress(Exception):
                    await backend.aclose()
            self.backends = []
            if task.done():  # everything went out to the driver: the temp ledger is spent
                with contextlib.suppress(Exception):
                    self.ledger.close()
                self.scratch.close()


def callers_cfgs(cfg: BuildConfig) -> list[BackendConfig]:
    return [cfg.backend_for(s) for s in STAGES]
