"""Private temp dirs of the Ray actors, and the sweep of the ones their owners left behind.

A worker or the shared-state actor keeps a temp ledger (and a worker the images shipped to it) in the
node's temp dir and removes it when the run ends. A process killed on the way (SIGKILL, the OOM killer,
a driver killed mid-run, which takes its actors with it) cannot, so each dir holds an exclusive
`flock` on itself for its owner's life: the kernel drops it when the owner dies, however it dies.
Each new scratch dir first sweeps its prefix's dirs whose lock is free. A dir is locked before it gets
its final name (made under a hidden name, then renamed), so a sweep never sees a live one unlocked.
Dirs without the lock (made by older versions) are left alone."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; dirs of killed actors stay, as before
    fcntl = None  # type: ignore[assignment]

_INIT = ".rmskit-init-"
_MARK = ".rmskit-scratch"  # inside each dir Scratch made


class Scratch:
    """A temp dir owned by this process: `close()` removes it; a kill leaves it to the next sweep."""

    def __init__(self, prefix: str) -> None:
        sweep(prefix)
        tmp = Path(tempfile.mkdtemp(prefix=_INIT))
        self._fd: int | None = None
        if fcntl is not None:
            self._fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        (tmp / _MARK).touch()
        while True:
            final = tmp.parent / f"{prefix}{os.urandom(6).hex()}"
            try:
                # os.rename would replace an empty dir of that name; mkdir claims the name first
                final.mkdir()
                os.rename(tmp, final)
                break
            except FileExistsError:
                continue
        self.path = final

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


def sweep(prefix: str) -> list[Path]:
    """Remove the `prefix*` dirs under the temp dir whose owner is gone; returns them."""
    if fcntl is None:
        return []
    removed = []
    for d in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        try:
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:  # not a dir, or gone
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its owner is alive
            os.close(fd)
            continue
        try:
            if _made_here(d):
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
        finally:
            os.close(fd)
    return removed


def _made_here(d: Path) -> bool:
    """Made by Scratch (so it was locked before it had this name), not by an older version: those
    carry no lock and must not be taken for an orphan while their owner runs."""
    return (d / _MARK).exists()
