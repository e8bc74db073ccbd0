"""A build with `--agreement 20` against the HTTP test server: verifier agreement (Cohen's kappa per
check) and pass rates per category reach `rmskit status`, the dataset card and the HTML report,
each figure with its interval and n."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from test_build_e2e import _build, _finish

from rmskit.testing.openai_server import OpenAITestServer
from rmskit.testing.rms_script import responder


def _cli(*args: str) -> str:
    return subprocess.check_output([sys.executable, "-m", "rmskit.cli", *args], text=True)


def test_agreement_and_pass_rates_reach_status_card_and_report(tmp_path: Path, photo_dir: Path) -> None:
    out = tmp_path / "run"
    with OpenAITestServer(responder=responder, latency=0.01) as srv:
        rc, _, stderr = _finish(
            _build(photo_dir, out, srv.base_url, "--agreement", "20", "--embedder", "hashing")
        )
        assert rc == 0, stderr
        regress = ["prompts", "regress", "--model", "openai:test-model", "--base-url", srv.base_url]
        _cli(*regress, "--run", str(out))
    _cli("export", str(out))  # the card picks up the stored regression result
    st = json.loads(_cli("status", str(out), "--json"))
    agreement = st["agreement"]
    assert agreement["n_rounds"] == 20 and agreement["checks"]
    for c in agreement["checks"].values():
        assert c["agreement"]["n"] == c["n"] and c["kappa"]["n"] == c["n"]
        assert c["kappa"]["value"] is not None or c["kappa"]["insufficient"]
    assert st["pass_rates"] and all(r["rate"]["n"] == r["n"] for r in st["pass_rates"])
    text = _cli("status", str(out))
    assert "verifier agreement" in text and "kappa" in text and "pass rate" in text and "n=" in text
    card = (out / "dataset" / "README.md").read_text(encoding="utf-8")
    assert "## Verifier agreement" in card and "## Pass rates per category" in card
    check = sorted(agreement["checks"])[0]
    row = next(line for line in card.splitlines() if line.startswith(f"| {check} |"))
    assert "n=" in row
    assert "### Verify-prompt regression" in card and "balanced accuracy (chance-corrected)" in card
    _cli("report", str(out))
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "Verifier agreement" in html and "Pass rate per category" in html and "kappa" in html
