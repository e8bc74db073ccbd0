"""Ctrl-C: the first SIGINT stops the run cleanly (exit 130, a resume hint, no traceback) and a
re-run resumes without re-asking finished work; a second SIGINT exits at once. Same for export."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from test_build_e2e import _build, _finish

from rmskit.interrupts import MESSAGE
from rmskit.testing.openai_server import OpenAITestServer
from rmskit.testing.rms_script import responder


def _interrupt(proc: subprocess.Popen, srv: OpenAITestServer, *, after: int, times: int) -> tuple[int, str]:
    deadline = time.monotonic() + 120
    while proc.poll() is None and srv.stats().delivered < after and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the build ended before it could be interrupted"
    for _ in range(times):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
    rc, _, stderr = _finish(proc, timeout=60)
    return rc, stderr


def test_first_sigint_exits_130_and_rerun_resumes(tmp_path: Path, photo_dir: Path) -> None:
    out = tmp_path / "run"
    with OpenAITestServer(responder=responder, latency=0.3) as srv:
        proc = _build(photo_dir, out, srv.base_url, "--embedder", "hashing")
        # past the start-up capability probe (a handful of tiny requests, cached once finished;
        # an interrupted probe is simply probed again), into the stage requests
        rc, stderr = _interrupt(proc, srv, after=12, times=1)
        assert rc == 130, stderr
        assert MESSAGE in stderr
        assert "Traceback" not in stderr and "Error" not in stderr
        srv.latency = 0.01
        rc, _, stderr = _finish(_build(photo_dir, out, srv.base_url, "--embedder", "hashing"))
        assert rc == 0, stderr
        records = srv.chat_records()
    # Only requests in flight at the interrupt (at most --concurrency 4) may be asked again.
    delivered = Counter(r.messages_hash for r in records if r.delivered)
    assert sum(n - 1 for n in delivered.values() if n > 1) <= 4


def test_second_sigint_exits_at_once_without_traceback(tmp_path: Path, photo_dir: Path) -> None:
    with OpenAITestServer(responder=responder, latency=0.3) as srv:
        proc = _build(photo_dir, tmp_path / "run", srv.base_url, "--embedder", "hashing")
        rc, stderr = _interrupt(proc, srv, after=2, times=2)
    assert rc == 130, stderr
    assert "Traceback" not in stderr


def _wait_past_interpreter_startup(proc: subprocess.Popen) -> None:
    """Until the child has loaded sqlite3, which rmskit.cli imports after installing its Ctrl-C
    handler (a SIGINT inside Python's own start-up, before any rmskit code, is out of reach)."""
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if "_sqlite3" in maps.read_text():
                return
        except OSError:
            pass
        time.sleep(0.01)


def _staging(out: Path) -> list[Path]:
    exports = out / "exports"
    return [p for p in exports.iterdir() if p.name.startswith(".")] if exports.exists() else []


def _export(out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "rmskit.cli", "export", str(out), "--format", "llava"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _interrupt_stopped(proc: subprocess.Popen) -> tuple[int, str, str]:
    """SIGINT a child held by SIGSTOP, then let it go: the signal is handled at the point where it
    was stopped, whatever the speed of the machine (fixed delays raced a 0.3 s export on CI)."""
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    return _finish(proc, timeout=60)


@pytest.mark.slow
def test_sigint_during_export(tmp_path: Path, photo_dir: Path) -> None:
    out = tmp_path / "run"
    with OpenAITestServer(responder=responder, latency=0.01) as srv:
        rc, _, stderr = _finish(_build(photo_dir, out, srv.base_url, "--embedder", "hashing", "--limit", "3"))
    assert rc == 0, stderr

    # During start-up and curation: the child is stopped once its Ctrl-C handler is in place.
    proc = _export(out)
    _wait_past_interpreter_startup(proc)
    proc.send_signal(signal.SIGSTOP)
    assert proc.poll() is None and not _staging(out)
    rc, _, stderr = _interrupt_stopped(proc)
    assert rc == 130, stderr
    assert MESSAGE in stderr and "Traceback" not in stderr

    # While the export's folder is being written: stopped with its temp folder present (a few
    # tries, as the folder lives ~0.1 s and the stop may land just after the final rename).
    for _ in range(20):
        proc = _export(out)
        while proc.poll() is None and not _staging(out):
            time.sleep(0.001)
        proc.send_signal(signal.SIGSTOP)
        if proc.poll() is None and _staging(out):
            break
        proc.send_signal(signal.SIGCONT)
        assert _finish(proc, timeout=60)[0] == 0
    else:
        pytest.fail("never caught the export while it wrote its folder")
    rc, _, stderr = _interrupt_stopped(proc)
    assert rc == 130, stderr
    assert MESSAGE in stderr and "Traceback" not in stderr and "ProgrammingError" not in stderr

    # At any other moment: either interrupted cleanly or finished first.
    for delay in (0.05, 0.2, 0.6):
        proc = _export(out)
        _wait_past_interpreter_startup(proc)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        rc, stdout, stderr = _finish(proc, timeout=60)
        assert "Traceback" not in stderr and "ProgrammingError" not in stderr
        if rc == 130:
            assert MESSAGE in stderr
        else:  # finished first; a SIGINT during interpreter shutdown (handlers reset) gives -2
            assert rc in (0, -signal.SIGINT) and stdout.startswith("wrote "), stderr

    # nothing half-written is left where the export goes, and the next export works
    r = subprocess.run(
        [sys.executable, "-m", "rmskit.cli", "export", str(out), "--format", "llava"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert not _staging(out)
