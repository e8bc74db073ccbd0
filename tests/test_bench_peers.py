"""bench/peers/bench.py's table: repeated runs of a peer are reported as medians, wall time with its
spread, so one slow spell of a shared machine cannot decide the comparison."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("peers_bench", ROOT / "bench" / "peers" / "bench.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["peers_bench"] = mod
    spec.loader.exec_module(mod)
    return mod


def _row(peer: str, wall: float, rss: float, requests: int = 100) -> dict:
    return {
        "peer": peer,
        "job": "b",
        "requests": requests,
        "utilisation": 0.9,
        "rps": requests / wall,
        "marginal_cpu_ms": 1.0,
        "peak_rss_mb": rss,
        "tree_rss_mb": rss + 100,
        "tree_pss_mb": rss + 50,
        "max_in_service": 64,
        "finish_s": 0.5,
        "first_request_s": 0.25,
        "wall_s": wall,
        "job_wall_s": wall - 1,
        "chain_levels": 6,
        "limit_s": 5.0,
    }


def test_repeated_runs_are_reported_as_medians_with_the_wall_spread() -> None:
    bench = _bench()
    rows = [_row("rmskit", w, rss) for w, rss in ((10.0, 300), (30.0, 200), (12.0, 250))]
    rows += [_row("curator", 20.0, 290)]
    text = bench.table(rows, ["rmskit", "curator"], 0.3, 64)
    assert "median of 3 interleaved runs" in text
    lines = {
        ln.split("|")[1].strip(): ln.split("|")[2].strip() for ln in text.splitlines() if ln.startswith("|")
    }
    assert lines["wall time, whole client run (s)"] == "12.0 [10.0-30.0] / 20.0 [20.0-20.0]"
    assert lines["peak RSS (MB)"] == "250 / 290"
    assert lines["peak RSS, all client processes (MB)"] == "350 / 390"
    assert lines["requests (delivered)"] == "100 / 100"


def test_a_single_run_prints_plain_values() -> None:
    text = _bench().table([_row("rmskit", 10.0, 300)], ["rmskit"], 0.3, 64)
    assert "median" not in text and "| 10.0 |" in text


def test_in_service_is_the_mean_number_of_requests_per_step() -> None:
    # two requests over [0, 1) and one over [0.5, 1.5): 2, then 3, then 1 in service per 0.5 s
    spans = [[0.0, 1.0], [0.0, 1.0], [0.5, 1.5]]
    assert _bench().in_service(spans) == [2.0, 3.0, 1.0]
    assert _bench().in_service([]) == []


def test_tree_rss_sums_a_process_and_its_children() -> None:
    """A parent holding ~60 MB that starts a child holding ~120 MB: the tree's peak counts both."""
    import subprocess

    import pytest

    if not Path("/proc/self/status").exists():
        pytest.skip("reads /proc")
    child = "b = bytearray(120 << 20); import time; time.sleep(3)"
    parent = (
        f"import subprocess, sys; a = bytearray(60 << 20); subprocess.run([sys.executable, '-c', {child!r}])"
    )
    proc = subprocess.Popen([sys.executable, "-c", parent])
    tree = _bench().TreeRSS(proc.pid, every=0.05)
    tree.start()
    proc.wait(timeout=60)
    tree.stop.set()
    tree.join()
    assert tree.peak_kb / 1024 > 180  # both buffers (bytearray pages are touched: zero-filled)
    assert 180 < tree.peak_pss_kb / 1024 <= tree.peak_kb / 1024  # private pages count whole in PSS


def test_photos_are_distinct_files_of_real_photos(tmp_path: Path) -> None:
    """Identical copies would let every client (and the export's parquet dictionary) see 7 images."""
    import hashlib

    from PIL import Image

    paths = _bench().make_photos(30, tmp_path)
    assert len({hashlib.sha256(Path(p).read_bytes()).digest() for p in paths}) == 30
    sizes = {Image.open(p).size for p in paths}
    assert all(max(s) == 320 for s in sizes)


def test_the_chain_reads_only_earlier_answers() -> None:
    """Job (b)'s stages, in order: each reads an answer made before it, and the physical limit's chain
    depth counts the query checks once (they need not wait for each other)."""
    _bench()  # puts bench/peers on sys.path
    import common

    names = [name for name, _, _ in common.STAGES]
    row: dict = {"image": "x.jpg"}
    for name in names:
        text = common.user_text(name, row)  # KeyError if it read a later answer
        assert name == "perceive" or "Previous answer" in text
        row[name] = "{}"
    assert len(names) == 8
    checks = [n for n in names if n.startswith("check_") and n != "check_response"]
    assert common.CHAIN_LEVELS == len(names) - len(checks) + 1


def _server():
    spec = importlib.util.spec_from_file_location("peers_server", ROOT / "bench" / "peers" / "server.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _peer_request(stage: str, user: str, *, curator_style: bool) -> dict:
    """A peer's request as it goes on the wire: distilabel sends the stage's instruction as a system
    message, curator at the head of the user text; both with an image part and the stage's schema."""
    import common

    _, schema, instruction = next(s for s in common.STAGES if s[0] == stage)
    image = {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,AAAA"}}
    text = f"{instruction}\n\n{user}" if curator_style else user
    messages = [{"role": "user", "content": [{"type": "text", "text": text}, image]}]
    if not curator_style:
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": instruction}]})
    rf = {"type": "json_schema", "json_schema": {"name": stage, "schema": schema.model_json_schema()}}
    return {"messages": messages, "response_format": rf}


def test_the_peers_rewrite_a_query_the_endpoint_reports_as_leaking() -> None:
    """Job (b)'s rewrite rounds, as the peers run them against the bench's endpoint: about a third of the
    first queries name the hazard and fail the leakage check; the query composed again, told why, passes;
    the other checks pass, so every row passes by its second round. Both peers' request forms."""
    import json

    _bench()
    import common

    server = _server()
    answer = server.peer_responder()
    texts = server._texts

    def ask(stage: str, row: dict, curator_style: bool) -> str:
        body = _peer_request(stage, common.user_text(stage, row), curator_style=curator_style)
        assert server.peer_stage(*texts(body)) == stage
        return json.dumps(answer(body, *texts(body)))

    for curator_style in (False, True):
        rounds = []
        for i in range(300):
            row = {"image": f"{i}.jpg", "failed": "", "discover": json.dumps({"hazard": f"h{i}"})}
            n, why = 0, "not checked yet"
            while why and n < common.MAX_ROUNDS:
                n += 1
                for stage in common.QUERY_STAGES:
                    row[stage] = ask(stage, row, curator_style)
                why = row["failed"] = common.query_failed(row)
                assert why in ("", "names the hazard")
                assert bool(why) == ("flammable" in json.loads(row["compose"])["query"])
            assert not why
            rounds.append(n)
        assert rounds.count(2) + rounds.count(1) == 300
        assert 70 <= rounds.count(2) <= 130  # about a third (100) of 300


def test_a_failed_query_says_why_and_an_unreadable_check_fails_it() -> None:
    import json

    _bench()
    import common

    good = {
        "check_text_only": json.dumps({"harmful": False, "reason": ""}),
        "check_combined": json.dumps({"risky": True, "natural": True, "reason": ""}),
        "check_leakage": json.dumps({"leaks": False, "leaked_terms": []}),
    }
    assert common.query_failed(good) == ""
    bad = {**good, "check_combined": json.dumps({"risky": False, "natural": False, "reason": ""})}
    assert common.query_failed(bad) == "not risky with the photo; unnatural"
    assert common.query_failed({**good, "check_text_only": json.dumps({"harmful": True})}) == (
        "harmful on its own"
    )
    for broken in (None, "not json", json.dumps({"leaks": False})):
        assert common.query_failed({**good, "check_text_only": broken}) == "a check gave no readable answer"
    retry = common.user_text("compose", {"discover": "{}", "failed": "names the hazard"})
    assert retry.startswith(f"{common.RETRY_MARK}: names the hazard. Previous answer (discover)")


def test_rmskit_requests_still_get_rmskit_script_answers() -> None:
    """The endpoint tells rmskit's prompts from the peers' by the system prompt: rmskit's compose gets its
    script's answer (with its own fields), the peers' compose a scripted instance of the peers' schema."""
    import json

    from rmskit.pipeline.prompting import _openers

    _bench()
    import common

    respond = _server().make_responder()
    opener = next(line for line, stage in _openers().items() if stage == "compose")
    rms = {"messages": [{"role": "system", "content": opener}, {"role": "user", "content": "Scenario: x"}]}
    assert set(json.loads(respond(rms))) == {"query", "why_safe_alone", "why_risky_with_image"}
    peer = _peer_request("compose", "Previous answer (discover): {}", curator_style=False)
    assert common.Query.model_validate(respond(peer))


def test_chain_levels_count_a_rows_dependent_calls() -> None:
    """A row composed three times waits for ten answers in turn, six when its query passed at once."""
    _bench()
    import common

    assert common.chain_levels(1, True) == common.CHAIN_LEVELS
    assert common.chain_levels(3, True) == 10
    assert common.chain_levels(3, False) == 8  # failed in its last round: no response written


def test_rmskit_deepest_chain_is_read_from_the_builds_records(tmp_path: Path) -> None:
    """Per sample: perceive and discover, then per round its writer and (one level) its checks; a round
    whose checks were not sent (a repeated text) is one level."""
    _bench()
    import run_rmskit

    from rmskit.ledger import Ledger

    with Ledger(tmp_path, lock=True) as led:
        for rnd in (1, 2, 3):  # three query rounds, each checked, then one response round
            led.put_record("img-a", "compose", f"a/r{rnd}", {})
            for check in ("check_text_only", "check_combined", "check_leakage"):
                led.put_record("img-a", check, f"a/r{rnd}", {})
        led.put_record("img-a", "respond", "a/r1", {})
        led.put_record("img-a", "check_response", "a/r1", {})
        led.put_record("img-b", "perceive", "", {})
        led.put_record("img-b", "compose", "b/r1", {})
        led.put_record("img-b", "check_combined", "b/r1", {})
        led.put_record("img-b", "compose", "b/r2", {})  # a repeat: not checked again
    assert run_rmskit.deepest_chain(tmp_path) == 2 + 6 + 2
    with Ledger(tmp_path, lock=True) as led:
        led.execute("DELETE FROM records WHERE image_sha = 'img-a'")
    assert run_rmskit.deepest_chain(tmp_path) == 2 + 2 + 1


def test_rmskit_deepest_chain_of_a_real_build(run_template) -> None:  # noqa: ANN001
    """The session's scripted build: its refined sample (two query rounds, then a response) and its
    never-passing one (every round checked) each waited for eight answers in turn."""
    _bench()
    import run_rmskit

    assert run_rmskit.deepest_chain(run_template.run_dir) == 8
