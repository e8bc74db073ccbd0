"""The front of a run, shared by the local and Ray executors: ingest (a blocking iterator that
decodes and hashes images) read in a thread with backpressure, refusals recorded, and only the images
that still have work admitted."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncIterator, Iterable
from typing import Any

from rmskit.config import BuildConfig
from rmskit.ledger import Ledger
from rmskit.pipeline.progress import Stats
from rmskit.records import ImageRecord, Rejection


async def admitted(
    items: Iterable[ImageRecord | Rejection],
    ledger: Ledger,
    stats: Stats,
    cfg: BuildConfig,
    stop: asyncio.Event,
    *,
    maxsize: int,
) -> AsyncIterator[ImageRecord]:
    """Images to work on, in ingest order: refusals go to the ledger, `--limit` is honoured, and
    images whose status is final (done or failed) are skipped; 'pending' ones are retried."""
    async for item in _aiter_threaded(items, maxsize=maxsize):
        if stop.is_set():
            return
        if isinstance(item, Rejection):
            ledger.add_rejection(item)
            stats.rejected += 1
            continue
        if cfg.limit_images and stats.images_total >= cfg.limit_images:
            return
        ledger.add_image(item)
        stats.images_total += 1
        if ledger.image_status(item.sha256) in ("done", "failed"):
            stats.images_skipped += 1
            continue
        yield item


async def _aiter_threaded(items: Iterable[Any], maxsize: int):
    """Iterate a blocking iterator (ingest decodes and hashes images) in a thread with backpressure."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue(maxsize=maxsize)
    done = object()
    cancelled = threading.Event()

    def put(x: Any) -> bool:
        """Hand `x` to the loop; False once the consumer is gone (it stopped early, e.g. at --target: the
        loop's shutdown cancels a pending put, then the loop closes). The thread then ends quietly."""
        if cancelled.is_set():
            return False
        coro = queue.put(x)
        try:
            asyncio.run_coroutine_threadsafe(coro, loop).result()
        except RuntimeError:  # the loop is closed
            coro.close()  # never scheduled: no "never awaited" warning
            cancelled.set()
            return False
        except concurrent.futures.CancelledError:  # the loop's shutdown cancelled the pending put
            cancelled.set()
            return False
        return True

    def pump() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as exc:  # surface source errors on the loop side
            put(exc)
            return
        put(done)

    thread = threading.Thread(target=pump, name="rmskit-ingest", daemon=True)
    thread.start()
    try:
        while True:
            item = await queue.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        cancelled.set()
        while not queue.empty():  # unblock the pump if it waits on a full queue
            queue.get_nowait()
