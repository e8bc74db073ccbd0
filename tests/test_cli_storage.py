"""A full disk mid-build: one clear line and a non-zero exit (no traceback storm), and a re-run
after space is freed resumes without re-asking finished work."""

from __future__ import annotations

import errno
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from test_build_e2e import _build, _build_args, _env, _finish

from rmskit.console import storage_failure
from rmskit.testing.openai_server import OpenAITestServer
from rmskit.testing.rms_script import responder

# Runs the real CLI with the ledger capped by sqlite's max_page_count: writes past it fail with
# SQLITE_FULL, the very error sqlite raises when the disk is full.
DRIVER = """
import sys
import rmskit.ledger.store as store
_init = store.Ledger.__init__
def _capped(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if not kwargs.get("readonly"):
        pages = self.query("PRAGMA page_count")[0][0]
        self.execute(f"PRAGMA max_page_count={pages + 20}")
store.Ledger.__init__ = _capped
from rmskit.cli import app
app(prog_name="rmskit")
"""


@pytest.mark.slow
def test_disk_full_one_line_then_resume(tmp_path: Path, photo_dir: Path) -> None:
    driver = tmp_path / "full_disk.py"
    driver.write_text(DRIVER)
    out = tmp_path / "run"
    with OpenAITestServer(responder=responder, latency=0.01) as srv:
        args = _build_args(photo_dir, out, srv.base_url, "--embedder", "hashing")
        r = subprocess.run([sys.executable, str(driver), *args], capture_output=True, text=True, env=_env())
        assert r.returncode == 1, r.stderr
        assert r.stderr.splitlines() == [
            f"error: disk full writing {out / 'rms.sqlite'}: free space and re-run the same command to resume"
        ]
        answered = srv.stats().delivered
        con = sqlite3.connect(out / "rms.sqlite")
        stored = con.execute("SELECT COUNT(*) FROM cache").fetchone()[0]
        con.close()
        assert 0 < stored <= answered
        rc, stdout, stderr = _finish(_build(photo_dir, out, srv.base_url, "--embedder", "hashing"))
        assert rc == 0, stderr
        assert "6 image(s) done, 0 failed" in stdout
        records = srv.chat_records()
    # Every answer the first run saved is reused: only answers that arrived while the disk was full
    # (or were in flight) may be asked again.
    delivered = Counter(r.messages_hash for r in records if r.delivered)
    assert sum(n - 1 for n in delivered.values() if n > 1) <= answered - stored


def test_storage_failure_recognises_full_disks_only() -> None:
    ledger = Path("/r/rms.sqlite")
    full = OSError(errno.ENOSPC, "No space left on device", "/r/images/a.jpg")
    assert storage_failure(full, ledger) == (
        "disk full writing /r/images/a.jpg: free space and re-run the same command to resume"
    )
    wrapped = RuntimeError("stage failed")
    wrapped.__cause__ = sqlite3.OperationalError("database or disk is full")
    assert storage_failure(wrapped, ledger).startswith("disk full writing /r/rms.sqlite")  # type: ignore[union-attr]
    assert storage_failure(OSError(errno.ENOENT, "missing", "x"), ledger) is None
    assert storage_failure(sqlite3.OperationalError("no such table: x"), ledger) is None
