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
