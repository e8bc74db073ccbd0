"""glibc heap settings and trims for rmskit's long-lived processes (a build and its finish worker).

glibc serves a block of 128 KiB or more from a mapping of its own, returned to the system on free, but
it raises that threshold to the size of each such block freed (up to 32 MiB): after the first freed
image payload or numpy batch, blocks of that size come from the heap, whose free pages only go back
from its top. So a build's process held ~20 MB more in its run (job (b) of bench/peers: 201-218 MB PSS
against 185-187 with the threshold fixed) and the finish worker kept the ~70 MB of curation's query
pass through the Parquet write at 96k samples (369 -> ~300 MB). `fix_mmap_threshold` keeps glibc's
initial 128 KiB for good (a value set by `mallopt` is never raised). `run_build` applies it to the
process it runs in, the worker to its own; a process started with MALLOC_MMAP_THRESHOLD_ (or the glibc
tunable) keeps that instead."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys

MMAP_THRESHOLD = 128 * 1024  # glibc's own initial value
_M_MMAP_THRESHOLD = -3  # <malloc.h>


def _user_set() -> bool:
    """A setting of the user's own (glibc's environment variable or tunable) wins."""
    return "MALLOC_MMAP_THRESHOLD_" in os.environ or "malloc.mmap_threshold" in os.environ.get(
        "GLIBC_TUNABLES", ""
    )


def fix_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at `MMAP_THRESHOLD` for this process; False where not done (not glibc,
    or the user chose their own)."""
    if not sys.platform.startswith("linux") or _user_set():
        return False
    with contextlib.suppress(OSError, AttributeError):
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    return False


def trim() -> None:
    """Return the heap's free pages to the system (glibc `malloc_trim`; a no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
