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
