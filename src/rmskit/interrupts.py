"""Ctrl-C for long commands (build, export).

First SIGINT: stop taking work and cancel what is in flight (the coroutine is cancelled, or a
KeyboardInterrupt is raised in synchronous code), let `finally` blocks close the ledger, then print
MESSAGE and exit 130. A watchdog makes that happen within GRACE_S even when cleanup is stuck in a
thread (a model forward, a dataset write). Second SIGINT: exit 130 at once. Exiting with os._exit
is safe: every finished item is already committed to the ledger (WAL), exactly as after kill -9,
and it is the only way not to wait for worker threads nobody can cancel."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, NoReturn, TypeVar

from rmskit.console import quiet_third_party, setup_console_logging, silence_console_logging

MESSAGE = "interrupted; re-run the same command to resume"
EXIT_INTERRUPTED = 130
GRACE_S = 1.5  # cleanup budget after the first Ctrl-C (the promise to users is 2 s)

T = TypeVar("T")
_exit_lock = threading.Lock()


def exit_interrupted() -> NoReturn:
    """Print MESSAGE once and leave now, without running atexit hooks or joining threads."""
    if _exit_lock.acquire(blocking=False):
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        with contextlib.suppress(Exception):
            sys.stderr.write(f"{MESSAGE}\n")
            sys.stderr.flush()
    os._exit(EXIT_INTERRUPTED)


@contextlib.contextmanager
def command_scope(*, quiet: bool) -> Iterator[None]:
    """Around a long command (build, export): log lines on stderr, escaped (rmskit.console); with
    `quiet`, no third-party progress bars or warnings; Ctrl-C exits 130 at once outside the
    interruptible parts (there is nothing to close yet). Logging, warning filters and the SIGINT
    handler are restored on the way out, so the command can also run in-process (tests)."""
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, lambda s, f: exit_interrupted()) if on_main else None
    handler = setup_console_logging(quiet=quiet)
    raise_exceptions = logging.raiseExceptions
    # A full disk also fails the run's log file: its handler must not print tracebacks about that.
    logging.raiseExceptions = False
    try:
        with warnings.catch_warnings():
            if quiet:
                quiet_third_party()
            yield
    finally:
        logging.getLogger("rmskit").removeHandler(handler)
        logging.raiseExceptions = raise_exceptions
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


class _Guard:
    def __init__(self, cancel: Callable[[], object] | None) -> None:
        self.cancel = cancel
        self.interrupted = False
        self._previous: Any = None

    def _first(self, signum: int, frame: object) -> None:
        self.interrupted = True
        signal.signal(signal.SIGINT, self._second)
        silence_console_logging()
        watchdog = threading.Timer(GRACE_S, exit_interrupted)
        watchdog.daemon = True
        watchdog.start()
        if self.cancel is None:
            raise KeyboardInterrupt
        self.cancel()

    def _second(self, signum: int, frame: object) -> None:
        exit_interrupted()


@contextlib.contextmanager
def interruptible(cancel: Callable[[], object] | None = None) -> Iterator[_Guard]:
    """Run the block under the Ctrl-C policy above. `cancel` stops the work (default: raise
    KeyboardInterrupt where the main thread is). When the block ends after an interrupt, however it
    ends, the process exits 130 with MESSAGE."""
    guard = _Guard(cancel)
    if threading.current_thread() is not threading.main_thread():
        yield guard  # signal handlers can only be set from the main thread
        return
    guard._previous = signal.signal(signal.SIGINT, guard._first)
    try:
        yield guard
    except BaseException:
        if guard.interrupted:
            exit_interrupted()
        raise
    if guard.interrupted:
        exit_interrupted()
    signal.signal(signal.SIGINT, guard._previous)


def run_interruptible(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run(main) under the Ctrl-C policy: the first SIGINT cancels `main`, so its `finally`
    blocks run on the loop (cancel in-flight requests, close backends and the ledger)."""
    loop = asyncio.new_event_loop()
    task = loop.create_task(main)
    try:
        with interruptible(cancel=lambda: loop.call_soon_threadsafe(task.cancel)):
            return loop.run_until_complete(task)
    finally:
        _close_loop(loop)


def _close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """What asyncio.run does on the way out: cancel leftovers, finalise async generators, join the
    default executor, close."""
    try:
        leftovers = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for t in leftovers:
            t.cancel()
        if leftovers:
            loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
    finally:
        loop.close()
