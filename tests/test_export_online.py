"""The dataset written as samples are stored (export/online.py): what it finishes is exactly what
`write_dataset` writes from the same ledger, near-duplicates and unavailable images included, and
whatever it cannot vouch for leaves the finish to write the dataset from the ledger."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from test_export_memo import _dataset

from rmskit.export.online import COLUMNS, Online
from rmskit.export.writer import write_dataset
from rmskit.ledger import Ledger


def _rows(led: Ledger, after: int = 0) -> list[tuple[Any, ...]]:
    return led.query(
        f"SELECT {COLUMNS} FROM samples WHERE status = 'ok' AND rowid > ? ORDER BY rowid", (after,)
    )


def _unreviewed(run_dir: Path) -> None:
    with Ledger(run_dir) as led:
        led.execute("DELETE FROM decisions")


def _with_duplicates(run_dir: Path) -> dict[str, str]:
    """Samples appended to the run as a build would store them: a near-duplicate query of a kept one (on
    another image), a copy of that dropped text, the same text as a control (compared with controls
    only), a sample of a recompressed-copy image (same pHash), and one whose image is gone."""
    with Ledger(run_dir) as led:
        rows = led.query(
            "SELECT id, image_sha, kind, category, data FROM samples WHERE status='ok' AND kind='risky'"
            " ORDER BY rowid"
        )
        (first_id, _, _, cat, data), other = rows[0], next(r for r in rows[1:] if r[1] != rows[0][1])
        base = json.loads(data)
        img_sha, img_raw = led.query("SELECT sha256, data FROM images WHERE sha256=?", (other[1],))[0]
        copy_sha = "c" * 64
        copy = {**json.loads(img_raw), "sha256": copy_sha}
        led.execute(
            "INSERT INTO images(sha256, seq, data, status, updated)"
            " SELECT ?, (SELECT MAX(seq) + 1 FROM images), ?, status, updated FROM images WHERE sha256=?",
            (copy_sha, json.dumps(copy), img_sha),
        )
        near = base["query"].rstrip("?.!") + " please"
        made = {
            "near": ("n" * 20, other[1], "risky", near),
            "repeat": ("r" * 20, other[1], "risky", near),
            "control": ("t" * 20, other[1], "control", near),
            "copy_image": ("p" * 20, copy_sha, "risky", "A question nobody else asks about this copy?"),
            "gone": ("g" * 20, "d" * 64, "risky", "Where does this one go?"),
        }
        for sid, image, k, query in made.values():
            led.put_sample(
                sid,
                image,
                k,
                cat,
                "ok",
                {**base, "id": sid, "image_sha256": image, "kind": k, "query": query},
            )
    return {name: v[0] for name, v in made.items()} | {"first": first_id}


def _online(run_dir: Path, chunk: int = 3) -> Online:
    """An `Online` fed the run's kept samples a few at a time, as the follower feeds it."""
    on = Online(run_dir)
    with Ledger(run_dir, readonly=True) as led:
        rows = _rows(led)
        for i in range(0, len(rows), chunk):
            on.take(led, rows[i : i + chunk])
    assert on.usable, on.broken
    return on


def test_the_online_dataset_is_the_one_written_from_the_ledger(run: Any) -> None:
    _unreviewed(run.run_dir)
    made = _with_duplicates(run.run_dir)
    on = _online(run.run_dir)
    assert on.finish({"n": 1, "seconds": 0.0}) == {"dataset_dir": str(run.run_dir / "dataset")}
    assert not list(run.run_dir.glob(".dataset.*"))  # the staging swapped in, nothing left beside it
    online = _dataset(run.run_dir)
    with Ledger(run.run_dir) as led:
        led.set_meta("probes", {"n": 1, "seconds": 0.0})  # as the build stores them
    write_dataset(run.run_dir)
    assert _dataset(run.run_dir) == online
    rules = {d.id: d.rule for d in on.dropped}
    assert rules[made["near"]] == rules[made["repeat"]] == "near-duplicate query"
    assert rules[made["copy_image"]] == "near-duplicate image" and rules[made["gone"]] == "image unavailable"
    ids = [json.loads(line)["id"] for line in online["jsonl"].splitlines()]
    assert made["control"] in ids and len(ids) >= 6
    with Ledger(run.run_dir, readonly=True) as led:
        stored = [sid for (sid,) in led.query("SELECT id FROM samples WHERE status='ok' ORDER BY rowid")]
    assert ids == [sid for sid in stored if sid in ids]  # in the order the build stored them


def test_online_written_in_one_go_or_sample_by_sample_is_the_same(run: Any, tmp_path: Path) -> None:
    _unreviewed(run.run_dir)
    _with_duplicates(run.run_dir)
    other = tmp_path / "other"
    shutil.copytree(run.run_dir, other)
    assert _online(run.run_dir, chunk=1).finish(None) is not None
    on = Online(other)
    assert on.finish(None) is not None  # nothing taken during the run: all of it at the finish
    assert _dataset(run.run_dir)["jsonl"] == _dataset(other)["jsonl"]
    assert _dataset(run.run_dir)["tables"] == _dataset(other)["tables"]


def test_a_sample_stored_again_after_it_was_written_ends_the_online_dataset(run: Any) -> None:
    _unreviewed(run.run_dir)
    on = _online(run.run_dir)
    staged = list(run.run_dir.glob(".dataset.tmp-*"))
    assert len(staged) == 1
    with Ledger(run.run_dir) as led:
        sid, sha, kind, cat, data = led.query(
            "SELECT id, image_sha, kind, category, data FROM samples WHERE status='ok' ORDER BY rowid LIMIT 1"
        )[0]
        led.put_sample(sid, sha, kind, cat, "ok", {**json.loads(data), "response": "Changed."})
    assert on.finish(None) is None and on.broken and "stored again" in on.broken
    assert not staged[0].exists()  # its staging removed; the finish writes from the ledger


@pytest.mark.parametrize("change", ["gone", "reviewed", "settings"])
def test_what_the_ledger_no_longer_matches_is_not_finished_online(run: Any, change: str) -> None:
    _unreviewed(run.run_dir)
    on = _online(run.run_dir)
    with Ledger(run.run_dir) as led:
        sid = led.query("SELECT id FROM samples WHERE status='ok' ORDER BY rowid LIMIT 1")[0][0]
        if change == "gone":
            led.execute("UPDATE samples SET status='failed' WHERE id=?", (sid,))
        elif change == "reviewed":
            led.add_decision(sid, "reject", {})
        else:
            led.set_meta("config", {**(led.get_meta("config") or {}), "test_fraction": 0.5})
    before = (run.run_dir / "dataset" / "samples.jsonl").read_text()
    assert on.finish(None) is None and on.broken
    assert (run.run_dir / "dataset" / "samples.jsonl").read_text() == before  # the old dataset stays
    assert not list(run.run_dir.glob(".dataset.tmp-*"))


def test_past_its_limit_it_stops(run: Any) -> None:
    _unreviewed(run.run_dir)
    on = Online(run.run_dir, limit=2)
    with Ledger(run.run_dir, readonly=True) as led:
        on.take(led, _rows(led))
    assert not on.usable and "more than 2 samples" in str(on.broken)
    assert on.finish(None) is None and not list(run.run_dir.glob(".dataset.tmp-*"))


def test_a_folder_rmskit_did_not_write_is_not_replaced(run: Any) -> None:
    _unreviewed(run.run_dir)
    shutil.rmtree(run.run_dir / "dataset")
    (run.run_dir / "dataset").mkdir()
    (run.run_dir / "dataset" / "mine.txt").write_text("keep me")
    on = Online(run.run_dir)
    with Ledger(run.run_dir, readonly=True) as led:
        on.take(led, _rows(led))
    assert not on.usable and "refusing to replace" in str(on.broken)
    assert (run.run_dir / "dataset" / "mine.txt").read_text() == "keep me"


def test_the_follower_fills_the_memos_once_the_online_dataset_stops(run: Any) -> None:
    """Past the online writer's limit the follower goes on as before: the samples from there on are made
    ahead in the memos (export/memo.py), and the online staging is gone."""
    from rmskit.export import memo

    _unreviewed(run.run_dir)
    with Ledger(run.run_dir, readonly=True) as led:
        ok = led.sample_counts()["ok"]
    m = memo.ExportMemo()
    on = Online(run.run_dir, limit=3)
    f = memo.Follower(run.run_dir, m, poll_s=0.01, online=on)
    f.start()
    deadline = time.monotonic() + 60
    while f.seen < ok and f.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    f.stop.set()
    f.join()
    assert f.error is None and not on.usable and "more than 3 samples" in str(on.broken)
    assert len(m.samples) == ok  # from the batch it stopped in (all of this small run) on
    assert not list(run.run_dir.glob(".dataset.tmp-*"))
