"""rmskit/heap.py: glibc's mmap threshold fixed, so large freed blocks go back to the system (a build's
and its finish worker's RSS), measured in fresh processes on this machine's own glibc."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from rmskit import heap
from rmskit.pipeline import finish_worker

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")

# One large block freed (glibc then raises its threshold to that size), then 64 MiB in 1 MiB blocks of
# which only the last stays: what the process still holds of them, in MiB.
PROBE = """
import numpy as np
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
big = np.ones(8 << 20, np.uint8)
del big
before = anon()
blocks = [np.ones(1 << 20, np.uint8) for _ in range(64)]
last = blocks[-1]
del blocks
print(anon() - before)
"""


def _held_mib(setup: str) -> float:
    """The probe after `setup`, in the worker's environment less any threshold of the caller's own."""
    env = {k: v for k, v in finish_worker.environment().items() if k != "MALLOC_MMAP_THRESHOLD_"}
    out = subprocess.check_output([sys.executable, "-c", setup + PROBE], env=env, text=True)
    return float(out.strip().splitlines()[-1])


def test_a_fixed_threshold_gives_freed_large_blocks_back() -> None:
    assert _held_mib("") > 32  # glibc's own behaviour: the freed blocks stay in the heap
    fixed = "from rmskit import heap\nassert heap.fix_mmap_threshold()\n"
    assert _held_mib(fixed) < 8


def test_the_warm_finish_worker_gives_them_back() -> None:
    assert _held_mib("from rmskit.pipeline import finish_worker\nfinish_worker._warm()\n") < 8


def test_a_users_own_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")
    assert heap.fix_mmap_threshold() is False
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536")
    assert heap.fix_mmap_threshold() is False


def test_a_build_fixes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, photo_dir: Path) -> None:
    """run_build fixes the threshold in its own process (a spy: the setting itself is measured above)."""
    from test_finish_worker import _build

    calls: list[int] = []
    monkeypatch.setattr(heap, "fix_mmap_threshold", lambda: bool(calls.append(1)) or True)
    _build(tmp_path, "inline", monkeypatch, photo_dir)
    assert calls == [1]
