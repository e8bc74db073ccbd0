"""The export's per-sample work done ahead (export/memo.py): the finish worker's follower fills memos from
the ledger during the run; a finish that reads them writes exactly the dataset a finish without them
writes, and an entry that no longer matches the ledger is never used."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from rmskit.curate import minhash
from rmskit.curate.dedup import NUM_PERM, near_duplicate_queries, shingles
from rmskit.export import memo
from rmskit.export.prepare import HeldSample, KeptSamples
from rmskit.export.writer import write_dataset
from rmskit.ledger import Ledger
from rmskit.scoring.probes import PROBE_DUP_THRESHOLD, PROBE_NUM_PERM, near_duplicate_rate, probe_shingles


@pytest.fixture
def no_memo(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever a test enables is this test's alone."""
    monkeypatch.setattr(memo, "MEMO", None)
    monkeypatch.setattr(minhash, "MEMO", None)


def _dataset(run_dir: Path) -> dict[str, Any]:
    """What an export wrote, but the card's export time."""
    root = run_dir / "dataset"
    tables = {p.name: pq.read_table(p).to_pylist() for p in sorted((root / "data").glob("*.parquet"))}
    card = (root / "README.md").read_text(encoding="utf-8")
    return {
        "jsonl": (root / "samples.jsonl").read_text(encoding="utf-8"),
        "tables": tables,
        "images": sorted(p.name for p in (root / "images").iterdir()),
        "files": sorted(str(p.relative_to(root)) for p in root.rglob("*") if "images" not in p.parts),
        "card": [line for line in card.splitlines() if "exported" not in line.lower()],
    }


def _spy_pass(mp: pytest.MonkeyPatch) -> list[type]:
    """The types of what the dataset pass yields (a `HeldSample`: made during the run)."""
    yielded: list[type] = []
    real = KeptSamples.digesting

    def spy(self: KeptSamples) -> Any:
        for s in real(self):
            yielded.append(type(s))
            yield s

    mp.setattr(KeptSamples, "digesting", spy)
    return yielded


def _follow(run_dir: Path, m: memo.ExportMemo) -> memo.Follower:
    with Ledger(run_dir, readonly=True) as led:
        ok = led.sample_counts()["ok"]
    f = memo.Follower(run_dir, m, poll_s=0.01)
    f.start()
    deadline = time.monotonic() + 60
    while f.seen < ok and f.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    f.stop.set()
    f.join()
    assert f.error is None and (f.seen == ok or m.full())
    return f


def test_a_finish_from_the_memos_writes_the_same_dataset(run: Any, no_memo: None) -> None:
    write_dataset(run.run_dir)
    plain = _dataset(run.run_dir)
    m = memo.enable()
    _follow(run.run_dir, m)
    with Ledger(run.run_dir, readonly=True) as led:
        ok = led.sample_counts()["ok"]
    assert len(m.samples) == ok and minhash.MEMO is not None and minhash.MEMO.size > 0
    hits: list[str] = []
    real = memo.ExportMemo.take

    def spy(self: memo.ExportMemo, sid: str, raw: str) -> Any:
        e = real(self, sid, raw)
        if e is not None:
            hits.append(sid)
        return e

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(memo.ExportMemo, "take", spy)
        yielded = _spy_pass(mp)
        write_dataset(run.run_dir)
    assert _dataset(run.run_dir) == plain
    kept = len(plain["jsonl"].splitlines())
    assert kept >= 6 and len(hits) == kept  # every kept sample came from the memo
    assert yielded == [HeldSample] * kept  # as made during the run: not parsed or validated again
    assert len(m.samples) == ok - kept  # and left it (the curated-out ones stay)


def test_a_sample_made_with_another_image_name_or_split_is_made_again(run: Any, no_memo: None) -> None:
    """The follower names each image from its record and splits it with the run's settings; a finish
    that finds them otherwise (the file now a .png, the run's test fraction changed) does not use the
    line made ahead, and writes what a finish without memos writes."""
    m = memo.enable()
    _follow(run.run_dir, m)
    with Ledger(run.run_dir) as led:
        sha, raw = led.query("SELECT sha256, data FROM images ORDER BY seq LIMIT 1")[0]
        rec = json.loads(raw)
        # a copy in this run (the record may point into the fixture's template, shared by other tests)
        moved = run.run_dir / "images" / f"{sha}.png"
        moved.parent.mkdir(exist_ok=True)
        moved.write_bytes(Path(rec["path"]).read_bytes())
        led.execute("UPDATE images SET data=? WHERE sha256=?", (json.dumps({**rec, "path": str(moved)}), sha))
        config = led.get_meta("config") or {}
        led.set_meta("config", {**config, "test_fraction": 0.5})
    with pytest.MonkeyPatch.context() as mp:
        yielded = _spy_pass(mp)
        write_dataset(run.run_dir)
    with_memo = _dataset(run.run_dir)
    assert 0 < yielded.count(HeldSample) < len(yielded)  # the ones still named and split alike, only
    memo.MEMO = None
    minhash.MEMO = None
    write_dataset(run.run_dir)
    assert _dataset(run.run_dir) == with_memo
    lines = [json.loads(x) for x in with_memo["jsonl"].splitlines()]
    assert any(r["image"] == f"images/{sha}.png" for r in lines)
    assert {r["split"] for r in lines} == {"train", "test"}


def test_a_changed_sample_is_read_again(run: Any, no_memo: None) -> None:
    m = memo.enable()
    _follow(run.run_dir, m)
    with Ledger(run.run_dir) as led:
        sid, raw = led.query("SELECT id, data FROM samples WHERE status='ok' ORDER BY id LIMIT 1")[0]
        data = json.loads(raw)
        data["response"] = "A changed response, stored after the memo read the sample."
        led.execute("UPDATE samples SET data=? WHERE id=?", (json.dumps(data), sid))
    write_dataset(run.run_dir)
    rows = [json.loads(x) for x in (run.run_dir / "dataset" / "samples.jsonl").read_text().splitlines()]
    assert next(r for r in rows if r["id"] == sid)["response"] == data["response"]
    table = pq.read_table(run.run_dir / "dataset" / "data").to_pylist()
    assert next(r for r in table if r["id"] == sid)["response"] == data["response"]


def test_memo_sketches_are_the_sketches(no_memo: None) -> None:
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(40)]
    texts = [" ".join(rng.choice(words, size=int(rng.integers(0, 12)))) for _ in range(300)]
    texts += texts[:20]  # repeats
    bands, rows = minhash.lsh_params(0.8, NUM_PERM)
    plain = minhash.sketch((shingles(t) for t in dict.fromkeys(texts)), bands, rows, seed=1)
    dups = near_duplicate_queries([(str(i), t) for i, t in enumerate(texts)], 0.8)
    rate = near_duplicate_rate(texts)
    minhash.MEMO = minhash.SketchMemo(limit=150)  # room for half: the rest is sketched at the end
    minhash.MEMO.fill(texts[:200], shingles, bands, rows, 1)
    minhash.MEMO.fill(texts[::2], probe_shingles, *minhash.lsh_params(PROBE_DUP_THRESHOLD, PROBE_NUM_PERM), 1)
    assert minhash.MEMO.size == 150
    held = minhash.sketch_texts(list(dict.fromkeys(texts)), shingles, bands, rows, seed=1)
    for a, b in zip(plain, held, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert near_duplicate_queries([(str(i), t) for i, t in enumerate(texts)], 0.8) == dups
    assert near_duplicate_rate(texts) == rate
    empty = minhash.sketch_texts([], shingles, bands, rows)
    assert empty.keys.shape == (0, bands) and list(empty.ends) == [0]


def test_the_memos_stay_within_their_bounds(run: Any, no_memo: None) -> None:
    m = memo.ExportMemo(samples=3)
    minhash.MEMO = minhash.SketchMemo(limit=2)
    f = memo.Follower(run.run_dir, m, poll_s=0.01)
    f.start()
    f.join(timeout=60)  # never told to stop: a full memo ends the following (nothing more is kept)
    assert not f.is_alive() and f.error is None
    assert len(m.samples) == 3 and minhash.MEMO.size == 2


def test_a_follower_that_fails_only_stops_following(tmp_path: Path, no_memo: None) -> None:
    f = memo.Follower(tmp_path / "not-a-run", memo.ExportMemo(), poll_s=0.01)
    f.start()
    f.join(timeout=30)
    assert not f.is_alive() and f.error is not None


def test_the_follower_keeps_up_with_a_ledger_being_written(run: Any, no_memo: None) -> None:
    """As in a build: samples stored while the follower reads, one of them stored again (INSERT OR
    REPLACE: a new rowid). The memo ends with every sample, each entry made from its latest JSON."""
    with Ledger(run.run_dir) as led:
        rows = led.query(
            "SELECT id, image_sha, kind, category, data FROM samples WHERE status='ok' ORDER BY id"
        )
        led.execute("UPDATE samples SET status='pending'")  # as at a run's start: nothing kept yet
    m = memo.enable()
    f = memo.Follower(run.run_dir, m, poll_s=0.01)
    f.start()

    def wait_for(n: int) -> None:
        deadline = time.monotonic() + 60
        while f.seen < n and time.monotonic() < deadline:
            time.sleep(0.01)
        assert f.seen >= n, (f.seen, n, f.error)

    try:
        with Ledger(run.run_dir) as led:
            half = len(rows) // 2
            for sid, sha, kind, cat, data in rows[:half]:
                led.put_sample(sid, sha, kind, cat, "ok", json.loads(data))
            wait_for(half)
            first = rows[0]
            changed = {**json.loads(first[4]), "response": "Stored again with a new response."}
            led.put_sample(*first[:4], "ok", changed)
            for sid, sha, kind, cat, data in rows[half:]:
                led.put_sample(sid, sha, kind, cat, "ok", json.loads(data))
            wait_for(len(rows) + 1)
    finally:
        f.stop.set()
        f.join()
    assert f.error is None and set(m.samples) == {r[0] for r in rows}
    with Ledger(run.run_dir, readonly=True) as led:
        stored = dict(led.query("SELECT id, data FROM samples"))
    assert all(m.samples[sid].digest == memo.digest(stored[sid]) for sid in m.samples)
    assert m.samples[rows[0][0]].row["response"] == "Stored again with a new response."
