"""The ingest thread's hand-off to the event loop (pipeline/feed.py)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import pytest

from rmskit.pipeline.feed import _aiter_threaded


def test_the_ingest_thread_ends_quietly_when_the_run_stops_early(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that stops early (e.g. at --target) leaves the ingest thread blocked on a full queue; the
    loop's shutdown then cancels that put. The thread must end, without an exception and without
    handing anything more to the (closing) loop."""
    errors: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    real = asyncio.run_coroutine_threadsafe
    loops: list[asyncio.AbstractEventLoop] = []

    class LateWaker:
        """The thread learns of the cancelled put only after the loop has closed (a loaded machine)."""

        def __init__(self, fut: concurrent.futures.Future) -> None:
            self.fut = fut

        def result(self):
            try:
                return self.fut.result()
            except concurrent.futures.CancelledError:
                for _ in range(2000):
                    if loops[0].is_closed():
                        break
                    time.sleep(0.005)
                raise

    def late(coro, loop):
        loops.append(loop)
        return LateWaker(real(coro, loop))

    monkeypatch.setattr(asyncio, "run_coroutine_threadsafe", late)
    produced: list[int] = []

    def items():
        for i in range(100):
            produced.append(i)
            yield i

    async def main() -> threading.Thread:
        agen = _aiter_threaded(items(), maxsize=1)
        assert await agen.__anext__() == 0
        # Wait (bounded) until the pump blocks on a put to the full queue, then return without closing
        # the generator: asyncio.run cancels the pending put first, then finalises the generator.
        for _ in range(2000):
            if any("Queue.put" in repr(t.get_coro()) for t in asyncio.all_tasks()) and len(produced) >= 3:
                break
            await asyncio.sleep(0.005)
        else:
            raise AssertionError("the pump never blocked on the full queue")
        return next(t for t in threading.enumerate() if t.name == "rmskit-ingest")

    thread = asyncio.run(main())
    thread.join(timeout=10)
    assert not thread.is_alive(), "the ingest thread hangs after the run stopped"
    assert errors == []
    assert len(produced) == 3  # it stopped at the blocked item; nothing more was decoded
