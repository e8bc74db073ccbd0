"""One writer per run directory: `<run>/.lock`, held with flock(2) for the life of the writer.

The kernel drops an flock when its holder dies, kill -9 included, so a lock file left behind by a
dead process is stale by construction: the next writer takes it over (and logs that it did). The file
holds the holder's pid, host and command so a refused process can say who is in the way."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from rmskit.ledger.errors import RunLocked

LOCK_NAME = ".lock"
log = logging.getLogger(__name__)


class RunLock:
    """Exclusive, non-blocking lock on a run directory. Use as a context manager, or `acquire()` /
    `release()`. Raises `RunLocked` (a LedgerError) at once when a live process holds it."""

    def __init__(self, run_dir: Path | str, *, command: str | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.command = command if command is not None else _command()
        self._fd: int | None = None
        self.took_over: dict[str, Any] | None = None  # the dead holder's record, when one was replaced

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        if self._fd is not None:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise RunLocked(self.run_dir, holder) from None
        except BaseException:
            os.close(fd)
            raise
        previous = _read(fd)
        if previous.get("pid"):  # a record without a live flock: its writer died without cleaning up
            self.took_over = previous
            log.warning(
                "took over a stale lock on %s left by pid %s on %s (that process is gone)",
                self.run_dir,
                previous.get("pid"),
                previous.get("host"),
            )
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command, "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):  # an empty file marks a clean release (not a stale lock)
            os.ftruncate(fd, 0)
        os.close(fd)  # closing drops the flock

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_holder(run_dir: Path | str) -> dict[str, Any] | None:
    """Who holds the run's lock right now (None when nobody does)."""
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _command() -> str:
    # program and subcommand only ("rmskit review"): later arguments may carry URLs with credentials
    prog = Path(sys.argv[0] or "python")
    name = prog.parent.name if prog.name == "__main__.py" else prog.name  # `python -m rmskit` -> rmskit
    return " ".join(a for a in (name, *sys.argv[1:2]) if not a.startswith("-"))[:80]
