"""`rmskit build` end to end over real HTTP: contract, faults, secrets, crash/resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from rmskit.records import CONTRACT_FIELDS, Sample
from rmskit.testing.openai_server import OpenAITestServer
from rmskit.testing.rms_script import responder

SECRET = "sk-test-" + "S3cr3tValue0123456789abcdef"  # must never land in a run directory
CONTRACT = set(CONTRACT_FIELDS)


def _build_args(src: Path | str, out: Path, url: str, *extra: str) -> list[str]:
    """The arguments after `rmskit` of a quiet build against the test server at `url`."""
    return [
        "build",
        str(src),
        "--out",
        str(out),
        "--model",
        "openai:test-model",
        "--base-url",
        url,
        "--concurrency",
        "4",
        "--quiet",
        *extra,
    ]


def _env(extra: dict | None = None) -> dict[str, str]:
    return {**os.environ, "OPENAI_API_KEY": SECRET, **(extra or {})}


def _build(
    src: Path | str, out: Path, url: str, *extra: str, env: dict | None = None, **popen
) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "rmskit.cli", *_build_args(src, out, url, *extra)]
    return subprocess.Popen(
        cmd, env=_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen
    )


def _finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _samples(run: Path) -> list[dict]:
    lines = (run / "dataset" / "samples.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if x.strip()]


def _status(run: Path) -> dict:
    out = subprocess.check_output(
        [sys.executable, "-m", "rmskit.cli", "status", str(run), "--json"], text=True
    )
    return json.loads(out)


@pytest.fixture
def server():
    with OpenAITestServer(responder=responder, latency=0.01) as srv:
        yield srv


def test_build_contract_bad_inputs_and_no_secret(tmp_path: Path, photo_dir: Path, server) -> None:
    (photo_dir / "notes.txt").write_text("not an image")
    (photo_dir / "fake.jpg").write_text("<html>nope</html>")
    (photo_dir / "copy of coffee.JPG").write_bytes((photo_dir / "coffee.jpg").read_bytes())
    out = tmp_path / "run"
    rc, stdout, stderr = _finish(_build(photo_dir, out, server.base_url))
    assert rc == 0, stderr
    # --quiet: the summary line only (no progress bars from the MiniLM load, no log lines)
    assert stderr == "", stderr
    assert len(stdout.splitlines()) == 1 and stdout.startswith("done: "), stdout
    # the key reached the server...
    assert any(r.authorization and SECRET in r.authorization for r in server.chat_records())
    # ...and no file of the run directory
    for f in out.rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f"API key leaked into {f}"
    st = _status(out)
    assert set(st) >= {"images", "rejected", "stages", "samples"}
    assert (
        st["images"]["accepted"] == 6
        and st["images"]["total"] == st["images"]["accepted"] + st["images"]["rejected"]
    )
    reasons = {r["path"]: r["reason"] for r in st["rejected"]}
    assert {"notes.txt", "fake.jpg", "copy of coffee.JPG"} <= set(reasons)
    assert all(r for r in reasons.values())
    samples = _samples(out)
    assert 0 < len(samples) == st["dataset"]["samples"] <= st["samples"]
    for s in samples:
        assert CONTRACT <= set(s)
        Sample.model_validate(s)
        assert (out / "dataset" / s["image"]).is_file()
        assert s["label"] == ("unsafe" if s["kind"] == "risky" else "safe")
    kinds = Counter(s["kind"] for s in samples)
    assert kinds["risky"] > 0 and kinds["control"] > 0
    # a rerun of the same command resumes and asks nothing new
    before = server.stats().requests
    rc, _, stderr = _finish(_build(photo_dir, out, server.base_url))
    assert rc == 0, stderr
    assert server.stats().requests == before
    assert {s["id"] for s in _samples(out)} == {s["id"] for s in samples}


def test_unusable_arguments_exit_nonzero(tmp_path: Path) -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "rmskit.cli",
            "build",
            str(tmp_path / "missing"),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "does not exist" in r.stderr
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("max_rounds: 0\n")
    r = subprocess.run(
        [sys.executable, "-m", "rmskit.cli", "build", str(tmp_path), "--config", str(cfg)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "max_rounds" in r.stderr


def test_ten_percent_faults_complete(tmp_path: Path, photo_dir: Path) -> None:
    with OpenAITestServer(
        responder=responder, latency=0.01, fault_rate=0.1, retry_after=0.05, stall_s=3, seed=7
    ) as srv:
        out = tmp_path / "run"
        rc, _, stderr = _finish(
            _build(photo_dir, out, srv.base_url, "--timeout", "1", "--embedder", "hashing")
        )
        assert rc == 0, stderr
        st = srv.stats()
        assert sum(st.faults.values()) > 0
    status = _status(out)
    assert status["images"]["done"] == 6 and status["images"]["failed"] == 0
    assert status["dataset"]["samples"] == len(_samples(out)) > 0
    assert status["samples"] >= status["dataset"]["samples"]  # curation may drop near-duplicates


@pytest.mark.slow
def test_sigkill_at_several_points_then_resume_matches_uninterrupted(tmp_path: Path, photo_dir: Path) -> None:
    with OpenAITestServer(responder=responder, latency=0.03) as srv:
        ref = tmp_path / "ref"
        rc, _, err = _finish(
            _build(photo_dir, ref, srv.base_url, "--embedder", "hashing", "--scenarios", "3")
        )
        assert rc == 0, err
        srv.reset()
        run = tmp_path / "crash"
        kills = 0
        for kill_after in (3, 15, 40, 70):
            start = srv.stats().delivered
            proc = _build(photo_dir, run, srv.base_url, "--embedder", "hashing", "--scenarios", "3")
            deadline = time.monotonic() + 120
            while (
                proc.poll() is None
                and srv.stats().delivered - start < kill_after
                and time.monotonic() < deadline
            ):
                time.sleep(0.01)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
        rc, _, err = _finish(
            _build(photo_dir, run, srv.base_url, "--embedder", "hashing", "--scenarios", "3")
        )
        assert rc == 0, err
        records = srv.chat_records()
    assert kills >= 2
    a, b = _samples(ref), _samples(run)
    ids_b = [s["id"] for s in b]
    assert len(ids_b) == len(set(ids_b)), "duplicate sample ids after resume"
    assert {s["id"] for s in a} == set(ids_b), "samples lost or invented by crash/resume"
    by_id = {s["id"]: s for s in a}
    for s in b:
        assert (s["query"], s["response"], s["label"]) == (
            by_id[s["id"]]["query"],
            by_id[s["id"]]["response"],
            by_id[s["id"]]["label"],
        )
    # Only requests in flight at a kill may be sent again: at most concurrency (4) per kill.
    delivered = Counter(r.messages_hash for r in records if r.delivered)
    resent = sum(n - 1 for n in delivered.values() if n > 1)
    assert resent <= 4 * kills, f"{resent} finished requests re-sent after {kills} kills"
