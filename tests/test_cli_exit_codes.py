"""`rmskit build` exit codes and argument checks: 2 unusable arguments (one line per problem, no
traceback), 3 when no image finished (with the top error kinds), and untrusted names escaped."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from test_build_e2e import _build, _finish

from rmskit.testing.openai_server import OpenAITestServer
from rmskit.testing.rms_script import responder

HOSTILE = ["\x1b]0;PWNED\x07\x1b[31mred.jpg", "x\nINFO rmskit: all good.jpg"]


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-m", "rmskit.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )


def test_no_image_finished_exits_3_with_top_errors_and_escaped_names(tmp_path: Path, photo_dir: Path) -> None:
    for name in HOSTILE:
        (photo_dir / name).write_text("not an image")
    out = tmp_path / "run"
    with OpenAITestServer(responder=responder, fault_rate=1.0, fault_kinds=("bad_request",)) as srv:
        rc, stdout, stderr = _finish(_build(photo_dir, out, srv.base_url, "--embedder", "hashing"))
    assert rc == 3, stderr
    assert "Traceback" not in stderr
    assert "nothing built: no image finished" in stderr
    assert "bad_request x" in stderr  # the error kind, counted
    assert len(stdout.strip().splitlines()) == 1 and "0 image(s) done" in stdout  # --quiet: the summary
    # refused names are shown escaped, never as live terminal controls or forged log lines
    st = _cli("status", str(out))
    assert st.returncode == 0, st.stderr
    for text in (st.stdout, st.stderr, stderr):
        assert "\x1b" not in text and "\x07" not in text
        assert not any(line.startswith("INFO rmskit: all good") for line in text.splitlines())
    assert "\\x1b]0;PWNED" in st.stdout


def test_invalid_settings_exit_2_one_line_each(tmp_path: Path, photo_dir: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("max_rounds: 0\nscenarios_per_image: 99\n")
    r = _cli("build", str(photo_dir), "--config", str(cfg), "--agreement", "-1")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 3, r.stderr
    assert all(line.startswith("error: invalid setting ") for line in lines)
    assert {"max_rounds", "scenarios_per_image", "verify_agreement"} <= {
        line.split()[3].rstrip(":") for line in lines
    }


def test_api_key_env_must_be_a_name_and_is_never_echoed(tmp_path: Path, photo_dir: Path) -> None:
    key = "sk-proj-Zq8vLw3NtYb7Kp2Rx"  # a key pasted where the variable's name belongs
    r = _cli("build", str(photo_dir), "--out", str(tmp_path / "o"), "--api-key-env", key)
    assert r.returncode == 2
    assert key not in r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert "invalid setting model.api_key_env" in r.stderr and "OPENAI_API_KEY" in r.stderr  # the hint
    assert not (tmp_path / "o").exists()  # refused before anything was written
    r = _cli("prompts", "regress", "--api-key-env", key)
    assert r.returncode == 2 and key not in r.stdout + r.stderr


def test_manifest_with_image_dir_source_passes_the_precheck(tmp_path: Path, photo_dir: Path) -> None:
    images = photo_dir
    manifest = tmp_path / "list.jsonl"
    manifest.write_text("".join(json.dumps({"image": p.name}) + "\n" for p in sorted(images.glob("*.jpg"))))
    with OpenAITestServer(responder=responder, latency=0.01) as srv:
        rc, stdout, stderr = _finish(
            _build(
                f"{manifest}::{images}", tmp_path / "o", srv.base_url, "--embedder", "hashing", "--limit", "2"
            )
        )
    assert rc == 0, stderr
    assert "2 image(s) done" in stdout
    missing = _cli("build", f"{manifest}::{tmp_path / 'nope'}", "--dry-run")
    assert missing.returncode == 2 and "is not a directory" in missing.stderr
    missing = _cli("build", f"{tmp_path / 'nope.jsonl'}::{images}", "--dry-run")
    assert missing.returncode == 2 and "nope.jsonl does not exist" in missing.stderr
