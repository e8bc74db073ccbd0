"""A key revoked in the middle of a run (401 on every later request) stops the build at once with
one clear line and exit 2: no image is failed for good, so a re-run with a good key resumes."""

from __future__ import annotations

import json
import time
from pathlib import Path

from test_build_e2e import SECRET, _build, _status

from rmskit.testing.openai_server import OpenAITestServer
from rmskit.testing.rms_script import responder


def test_a_key_revoked_mid_run_stops_the_build_and_fails_nothing(tmp_path: Path, photo_dir: Path) -> None:
    out = tmp_path / "run"
    with OpenAITestServer(responder=responder, latency=0.05, auth_token=SECRET) as srv:
        proc = _build(photo_dir, out, srv.base_url, "--embedder", "hashing")
        deadline = time.monotonic() + 120
        while len(srv.chat_records()) < 6 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        srv.auth_token = "revoked"  # every later request gets 401
        _, err = proc.communicate(timeout=120)
        sent_after = len(srv.chat_records())
    assert proc.returncode == 2, err
    assert "authentication failed" in err and SECRET not in err and "Traceback" not in err
    st = _status(out)
    assert st["images"]["failed"] == 0 and st["images"]["done"] < st["images"]["accepted"]
    assert sent_after < 6 + 4 * 3  # stopped at once: at most the requests in flight were 401'd
    assert json.dumps(st).count(SECRET) == 0


def test_status_reports_per_endpoint_counts_that_add_up(tmp_path: Path, photo_dir: Path) -> None:
    out = tmp_path / "run"
    with (
        OpenAITestServer(responder=responder, latency=0.02) as a,
        OpenAITestServer(responder=responder, latency=0.02) as b,
    ):
        proc = _build(photo_dir, out, a.base_url, "--base-url", b.base_url, "--embedder", "hashing")
        _, err = proc.communicate(timeout=240)
        served = {a.base_url: len(a.chat_records()), b.base_url: len(b.chat_records())}
    assert proc.returncode == 0, err
    st = _status(out)
    (stats,) = st["endpoints"].values()
    assert len(stats) == 2 and all(e["requests"] > 0 for e in stats)  # both endpoints were used
    # every model request of the run was answered by one of them (the servers also saw the
    # start-up capability probes, which are not model requests of a stage)
    assert sum(e["requests"] for e in stats) == sum(s["requests"] for s in st["stages"].values())
    for e in stats:
        assert e["requests"] <= served[next(u for u in served if u.startswith(e["url"].rstrip("/")))]
