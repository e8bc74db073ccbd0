"""The CLI and the run's ledger: one writer per run directory (build, export and review refuse a
held run and name the holder), a damaged ledger is one line and exit 2 (never a silent restart),
and a sample lands together with the round that decided it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rmskit.ledger import Ledger, RunLock


def _rmskit(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OPENAI_API_KEY": "sk-test-not-secret", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "rmskit.cli", *args], capture_output=True, text=True, env=env, timeout=240
    )


def _build_args(src: Path, out: Path) -> list[str]:
    # Port 9 (discard) on loopback: the build must be refused before any request is attempted.
    return [
        "build",
        str(src),
        "--out",
        str(out),
        "--model",
        "openai:m",
        "--base-url",
        "http://127.0.0.1:9/v1",
    ]


def test_build_and_export_refuse_a_run_held_by_another_writer(run, photo_dir) -> None:
    with RunLock(run.run_dir):
        for args in (_build_args(photo_dir, run.run_dir), ["export", str(run.run_dir)]):
            res = _rmskit(*args, "--quiet") if args[0] == "build" else _rmskit(*args)
            assert res.returncode == 2, (args[0], res.stderr)
            assert f"pid {os.getpid()}" in res.stderr and "Traceback" not in res.stderr
    assert _rmskit("export", str(run.run_dir)).returncode == 0  # released: export works again


@pytest.mark.parametrize("content", [b"", b"garbage, not a database" * 100])
def test_a_damaged_ledger_is_one_line_and_exit_2_never_a_fresh_start(tmp_path, photo_dir, content) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "rms.sqlite").write_bytes(content)
    for args in (["status", str(out)], [*_build_args(photo_dir, out), "--quiet"]):
        res = _rmskit(*args)
        assert res.returncode == 2, (args[0], res.stdout, res.stderr)
        assert "rms.sqlite" in res.stderr and "Traceback" not in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
    assert (out / "rms.sqlite").read_bytes() == content  # not recreated, not overwritten


def test_a_sample_and_its_deciding_round_land_together(tmp_path, monkeypatch) -> None:
    """A failure while storing a sample (a kill, a full disk) must not leave its deciding round
    behind: both are written in one transaction, or neither."""
    from test_build_pipeline import ScriptedBackend, _cfg, _images, _run

    def broken(self, *args, **kwargs):
        raise OSError("simulated failure while writing the sample")

    monkeypatch.setattr(Ledger, "put_sample", broken)
    _run(_cfg(tmp_path, perceive="model", controls=False), ScriptedBackend(), _images(1))
    monkeypatch.undo()
    with Ledger(tmp_path / "run", readonly=True) as led:
        assert list(led.iter_samples(None)) == []
        ids = [c["sample_id"] for c in led.get_record(_images(1)[0].sha256, "select")["data"]["chosen"]]
        assert ids
        for sid in ids:  # query rounds that passed stay; the response round that decided is absent
            assert led.rounds(sid, "response") == [], sid


def test_required_checks_flag_gates_and_is_validated(tmp_path, photo_dir) -> None:
    out = tmp_path / "run"
    bad = _rmskit(*_build_args(photo_dir, out), "--required-checks", "lexical,bogus", "--quiet")
    assert bad.returncode == 2 and "bogus" in bad.stderr and "Traceback" not in bad.stderr
    from rmskit.pipeline.cli import resolve_config

    cfg = resolve_config([str(photo_dir)], None, {"required_checks": ["lexical", "text_only"]}, {}, [])
    assert cfg.required_checks == ["lexical", "text_only"]
