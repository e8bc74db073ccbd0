"""executors/scratch.py: an actor's temp dir outlives a SIGKILL only until the next one on the node
sweeps it; a live owner's dir, and dirs made without the lock, are never swept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from rmskit.executors.scratch import Scratch, sweep

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="flock")

_OWNER = textwrap.dedent(
    """
    import sys, time, tempfile
    tempfile.tempdir = sys.argv[1]
    from rmskit.executors.scratch import Scratch
    s = Scratch("rmskit-w1-")
    (s.path / "ledger").mkdir()
    print(s.path, flush=True)
    time.sleep(600)
    """
)


def _owner(tmp: Path) -> tuple[subprocess.Popen[str], Path]:
    proc = subprocess.Popen([sys.executable, "-c", _OWNER, str(tmp)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, Path(proc.stdout.readline().strip())


@pytest.fixture
def tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_a_killed_owners_dir_is_swept_and_a_live_ones_is_not(tmp: Path) -> None:
    alive, alive_dir = _owner(tmp)
    dead, dead_dir = _owner(tmp)
    try:
        os.kill(dead.pid, signal.SIGKILL)
        dead.wait()
        assert dead_dir.is_dir() and alive_dir.is_dir()  # the kill left it
        legacy = tmp / "rmskit-w1-legacy"  # made without the lock (an older version, maybe running)
        (legacy / "ledger").mkdir(parents=True)
        other = Scratch("rmskit-w0-")  # another prefix is not this sweep's
        new = Scratch("rmskit-w1-")  # the restarted worker
        assert not dead_dir.exists()
        assert alive_dir.is_dir() and (alive_dir / "ledger").is_dir()
        assert legacy.is_dir() and other.path.is_dir()
        assert new.path.name.startswith("rmskit-w1-") and new.path.parent == tmp
        assert sweep("rmskit-w1-") == []  # everything left has a live owner or no lock
        new.close()
        other.close()
        assert not new.path.exists() and not other.path.exists()
    finally:
        alive.kill()
        alive.wait()
    assert sweep("rmskit-w1-") == [alive_dir]  # its owner is gone now
    assert sorted(p.name for p in tmp.iterdir()) == ["rmskit-w1-legacy"]


def test_an_owner_in_this_process_holds_its_dir(tmp: Path) -> None:
    a = Scratch("rmskit-state-")
    b = Scratch("rmskit-state-")  # flock is per open file: a second owner in one process sweeps nothing
    assert a.path != b.path and a.path.is_dir() and b.path.is_dir()
    assert not list(tmp.glob(".rmskit-init-*"))  # made under a hidden name, then renamed
    a.close()
    b.close()
    assert list(tmp.iterdir()) == []
