"""Request batching shared by the in-process backends (transformers, vLLM).

Concurrent `generate` calls become Pending items on a queue; one worker task per event loop drains
it, lets the backend pick a batch, runs the blocking batch function in a thread (so the event loop
stays free) and resolves each caller's future with its own result or error."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from rmskit.models.base import BackendError, ErrorKind, GenParams, Message, Result


@dataclass
class Pending:
    messages: list[Message]
    schema: type[BaseModel] | None
    params: GenParams
    future: asyncio.Future[Result]
    images: list[Any] = field(default_factory=list)  # loaded by the backend while rendering

    @property
    def group(self) -> tuple[Any, ...]:
        # Rows of one generate() call share sampling settings; schemas and budgets may differ per row.
        p = self.params
        return (p.temperature, p.top_p if p.temperature > 0 else None, p.seed)


def as_backend_error(e: BaseException) -> BackendError:
    return e if isinstance(e, BackendError) else BackendError(ErrorKind.other, f"{type(e).__name__}: {e}")


def settle(futures: list[asyncio.Future[Any]], results: list[Any]) -> None:
    """Resolve each caller's future with its result or error (callers that gave up are skipped)."""
    for fut, r in zip(futures, results, strict=True):
        if fut.done():
            continue
        if isinstance(r, BaseException):
            fut.set_exception(r)
        else:
            fut.set_result(r)


def take_all(backlog: list[Pending], max_batch: int) -> list[Pending]:
    return backlog[:max_batch]


def take_same_sampling(backlog: list[Pending], max_batch: int) -> list[Pending]:
    key = backlog[0].group
    return [p for p in backlog if p.group == key][:max_batch]


class Batcher:
    """`await submit(messages, schema, params)` -> Result; `run_batch(list[Pending])` runs in a thread
    and returns one Result or exception per item."""

    def __init__(
        self,
        run_batch: Callable[[list[Pending]], list[Result | BaseException]],
        *,
        max_batch: int,
        select: Callable[[list[Pending], int], list[Pending]] = take_all,
        name: str = "rmskit-batcher",
    ) -> None:
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.select = select
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[Pending] | None = None
        self._worker: asyncio.Task[None] | None = None

    async def submit(
        self, messages: list[Message], schema: type[BaseModel] | None, params: GenParams
    ) -> Result:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._worker is None or self._worker.done():
            # A new event loop (e.g. successive asyncio.run calls) gets its own queue and worker.
            self._loop, self._queue = loop, asyncio.Queue()
            self._worker = loop.create_task(self._work(self._queue), name=self.name)
        assert self._queue is not None
        fut: asyncio.Future[Result] = loop.create_future()
        await self._queue.put(Pending(messages, schema, params, fut))
        return await fut

    async def close(self) -> None:
        """Stop the worker; callers still waiting get a clear error."""
        if self._worker is not None and not self._worker.done():
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._worker
        self._worker = None
        if self._queue is not None:
            while not self._queue.empty():
                p = self._queue.get_nowait()
                if not p.future.done():
                    p.future.set_exception(BackendError(ErrorKind.other, "backend closed"))

    async def _work(self, queue: asyncio.Queue[Pending]) -> None:
        backlog: list[Pending] = []
        while True:
            if not backlog:
                backlog.append(await queue.get())
            await asyncio.sleep(0)  # let callers that were scheduled together enqueue first
            while not queue.empty():
                backlog.append(queue.get_nowait())
            backlog = [p for p in backlog if not p.future.done()]  # drop cancelled callers
            if not backlog:
                continue
            batch = self.select(backlog, self.max_batch)
            taken = {id(p) for p in batch}
            backlog = [p for p in backlog if id(p) not in taken]
            try:
                results = await asyncio.to_thread(self.run_batch, batch)
            except asyncio.CancelledError:
                for p in batch + backlog:
                    if not p.future.done():
                        p.future.set_exception(BackendError(ErrorKind.other, "backend closed"))
                raise
            except BaseException as e:  # noqa: BLE001 - every caller must hear about it
                results = [as_backend_error(e)] * len(batch)
            settle([p.future for p in batch], results)
