"""The ledger itself: schema migrations, corrupt files, the sample+round transaction, the run lock."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from rmskit.ledger import (
    LEDGER_NAME,
    SCHEMA_VERSION,
    Ledger,
    LedgerError,
    Round,
    RunLock,
    RunLocked,
    lock_holder,
)
from rmskit.ledger.migrations import MIGRATIONS

# The schema rmskit 0.1 wrote, before migrations existed (copied, not imported: it must not change).
OLD_SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE images(sha256 TEXT PRIMARY KEY, seq INTEGER NOT NULL, data TEXT NOT NULL,
  status TEXT NOT NULL DEFAULT 'pending', error TEXT, updated REAL);
CREATE TABLE rejections(source_root TEXT NOT NULL, path TEXT NOT NULL, reason TEXT NOT NULL, created REAL,
  PRIMARY KEY(source_root, path));
CREATE TABLE records(image_sha TEXT NOT NULL, stage TEXT NOT NULL, key TEXT NOT NULL, status TEXT NOT NULL,
  data TEXT, error TEXT, prompt_version TEXT, model TEXT, created REAL, PRIMARY KEY(image_sha, stage, key));
CREATE TABLE rounds(sample_id TEXT NOT NULL, phase TEXT NOT NULL, round INTEGER NOT NULL,
  passed INTEGER NOT NULL, data TEXT NOT NULL, created REAL, PRIMARY KEY(sample_id, phase, round));
CREATE TABLE samples(id TEXT PRIMARY KEY, image_sha TEXT NOT NULL, kind TEXT NOT NULL, category TEXT,
  status TEXT NOT NULL, data TEXT NOT NULL, created REAL);
CREATE TABLE cache(key TEXT PRIMARY KEY, model TEXT NOT NULL, stage TEXT, text TEXT NOT NULL,
  finish_reason TEXT, prompt_tokens INTEGER NOT NULL DEFAULT 0, completion_tokens INTEGER NOT NULL DEFAULT 0,
  created REAL);
CREATE TABLE failures(id INTEGER PRIMARY KEY AUTOINCREMENT, image_sha TEXT, stage TEXT, key TEXT, kind TEXT,
  message TEXT, created REAL);
CREATE TABLE decisions(id INTEGER PRIMARY KEY AUTOINCREMENT, sample_id TEXT NOT NULL, action TEXT NOT NULL,
  payload TEXT, created REAL NOT NULL);
CREATE TABLE taxonomy(name TEXT PRIMARY KEY, seq INTEGER NOT NULL, description TEXT, embedding BLOB,
  aliases TEXT NOT NULL DEFAULT '[]', created REAL);
INSERT INTO meta VALUES('schema_version', '1');
INSERT INTO samples VALUES('s1', 'abc', 'risky', 'fire hazard', 'ok', '{"id": "s1", "query": "q"}', 1.0);
INSERT INTO decisions(sample_id, action, payload, created) VALUES('s1', 'accept', '{}', 2.0);
"""


def old_run(tmp_path: Path) -> Path:
    run = tmp_path / "old"
    run.mkdir()
    con = sqlite3.connect(run / LEDGER_NAME)
    con.executescript(OLD_SCHEMA)
    con.close()
    return run


def indexes(run: Path) -> set[str]:
    con = sqlite3.connect(run / LEDGER_NAME)
    try:
        return {n for (n,) in con.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    finally:
        con.close()


@pytest.mark.parametrize("readonly", [False, True])
def test_ledger_from_an_older_rmskit_is_migrated_and_keeps_its_data(tmp_path: Path, readonly: bool) -> None:
    run = old_run(tmp_path)
    assert "records_stage_status" not in indexes(run)
    with Ledger(run, readonly=readonly) as led:
        assert led.get_meta("schema_version") == SCHEMA_VERSION == len(MIGRATIONS)
        assert [n for (n,) in led.query("SELECT name FROM _migrations ORDER BY name")] == [
            n for n, _ in MIGRATIONS
        ]
        assert led.get_sample("s1") == {"status": "ok", "id": "s1", "query": "q"}
        assert led.review_state()["s1"]["decision"] == "accept"
    assert {"records_stage_status", "images_status", "samples_status"} <= indexes(run)
    with Ledger(run) as led:  # migrations run once: reopening applies nothing new
        assert len(led.query("SELECT name FROM _migrations")) == len(MIGRATIONS)


@pytest.mark.parametrize("readonly", [False, True])
def test_ledger_from_a_newer_rmskit_is_refused(tmp_path: Path, readonly: bool) -> None:
    Ledger(tmp_path / "run").close()
    con = sqlite3.connect(tmp_path / "run" / LEDGER_NAME)
    con.execute("INSERT INTO _migrations VALUES('m099_from_the_future', 1e10)")
    con.commit()
    con.close()
    with pytest.raises(LedgerError, match="newer rmskit.*m099_from_the_future.*upgrade rmskit"):
        Ledger(tmp_path / "run", readonly=readonly)


def _filled(run: Path, n: int = 400) -> Path:
    with Ledger(run) as led:
        for i in range(n):
            led.put_sample(f"s{i}", "abc", "risky", "cat", "ok", {"id": f"s{i}", "query": "x" * 300})
    return run / LEDGER_NAME


@pytest.mark.parametrize("damage", ["empty", "garbage", "truncated", "bad_pages"])
def test_a_damaged_ledger_gives_one_clear_error_and_never_starts_over(tmp_path: Path, damage: str) -> None:
    run = tmp_path / "run"
    path = _filled(run)
    data = path.read_bytes()
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "garbage":
        path.write_bytes(os.urandom(8192))
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:  # header intact, every page after the schema overwritten
        path.write_bytes(data[:8192] + b"\xa5" * (len(data) - 8192))
    before = path.read_bytes()

    def read_everything(readonly: bool) -> None:
        with Ledger(run, readonly=readonly) as led:
            list(led.iter_samples())

    for readonly in (False, True):
        with pytest.raises(LedgerError) as err:
            read_everything(readonly)
        msg = str(err.value)
        assert str(path) in msg and "damaged" in msg and "backup" in msg and "\n" not in msg
    assert path.read_bytes() == before  # nothing was written over it: no silent start-over


def test_status_and_report_raise_ledger_error_on_a_damaged_ledger(tmp_path: Path) -> None:
    from rmskit.pipeline.status import run_status
    from rmskit.report.build import collect

    run = tmp_path / "run"
    (run).mkdir()
    (run / LEDGER_NAME).write_bytes(b"")
    with pytest.raises(LedgerError):
        run_status(run)
    with pytest.raises(LedgerError):
        collect(run, draw=False)
    import typer
    from typer.testing import CliRunner

    from rmskit.report import cli as report_cli

    app = typer.Typer()
    report_cli.register(app)
    app.command("noop")(lambda: None)
    r = CliRunner().invoke(app, ["report", str(run)])
    assert r.exit_code == 2 and "empty (0 bytes)" in r.output and len(r.output.strip().splitlines()) == 1


def test_sample_and_final_round_land_together(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Ledger(tmp_path / "run") as led:
        final = Round("response", 2, True, {"response": "r", "checks": {}})
        led.put_sample_with_round("s1", "abc", "risky", "cat", "ok", {"id": "s1"}, final)
        assert led.get_sample("s1") is not None and led.rounds("s1", "response")[0]["round"] == 2

        def boom(*a: object, **k: object) -> None:
            raise OSError("disk full")

        monkeypatch.setattr(led, "put_sample", boom)  # the sample write fails after its round was written
        with pytest.raises(OSError):
            led.put_sample_with_round("s2", "abc", "risky", "cat", "ok", {"id": "s2"}, final)
        assert led.rounds("s2") == []  # rolled back with it
        monkeypatch.undo()
        led.put_sample("s3", "abc", "risky", "cat", "ok", {"id": "s3"})  # the connection is usable again
    with Ledger(tmp_path / "run", readonly=True) as led:
        assert led.rounds("s2") == [] and led.get_sample("s3") is not None


HOLDER = textwrap.dedent(
    """
    import sys, time
    from rmskit.ledger import Ledger
    led = Ledger(sys.argv[1], lock=True)
    print("locked", flush=True)
    time.sleep(60)
    """
)


def test_run_lock_refuses_a_second_writer_and_is_taken_over_after_kill_9(tmp_path: Path) -> None:
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, env=env, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        assert lock_holder(run)["pid"] == proc.pid  # type: ignore[index]
        t0 = time.monotonic()
        with pytest.raises(RunLocked, match=f"pid {proc.pid}") as err:
            Ledger(run, lock=True)
        assert time.monotonic() - t0 < 5  # refused at once, not after a wait
        assert err.value.holder["pid"] == proc.pid
        with Ledger(run, readonly=True) as led:  # readers need no lock
            assert led.get_meta("schema_version") == SCHEMA_VERSION
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert (run / ".lock").read_text()  # the dead holder's record is still there ...
        assert lock_holder(run) is None  # ... but nobody holds the lock
        with RunLock(run) as lock:
            assert lock.took_over is not None and lock.took_over["pid"] == proc.pid
            assert lock_holder(run)["pid"] == os.getpid()  # type: ignore[index]
        assert lock_holder(run) is None and (run / ".lock").read_text() == ""
    finally:
        proc.kill()
        proc.wait(10)


def test_ledger_lock_is_released_on_close(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "run", lock=True)
    with pytest.raises(RunLocked, match=f"pid {os.getpid()}"):
        Ledger(tmp_path / "run", lock=True)
    led.close()
    with Ledger(tmp_path / "run", lock=True) as again:
        assert again.run_lock is not None and again.run_lock.took_over is None  # clean release, not stale
    with pytest.raises(ValueError):
        Ledger(tmp_path / "run", readonly=True, lock=True)


@pytest.mark.parametrize("chunk", [1, 3, 7, 4096])
def test_stream_gives_the_query_rows_chunk_by_chunk(tmp_path: Path, chunk: int) -> None:
    with Ledger(tmp_path / "run") as led:
        for i in range(7):
            led.put_sample(
                f"s{i}", "abc", "risky", "cat", "ok" if i % 3 else "failed", {"id": f"s{i}", "n": i}
            )
        sql = "SELECT id, json_extract(data, '$.n') FROM samples WHERE status=? ORDER BY id"
        assert list(led.stream(sql, ("ok",), chunk=chunk)) == led.query(sql, ("ok",))
        assert list(led.stream(sql, ("nothing",), chunk=chunk)) == []
        # a pass left early, then writes and reads on the same connection
        rows = led.stream("SELECT id FROM samples ORDER BY id", chunk=chunk)
        assert next(rows) == ("s0",)
        rows.close()
        led.put_sample("s9", "abc", "risky", "cat", "ok", {"id": "s9"})
        assert led.get_sample("s9") is not None
    with Ledger(tmp_path / "run", readonly=True) as led:
        assert [r[0] for r in led.stream("SELECT id FROM samples ORDER BY id", chunk=chunk)][-1] == "s9"


def test_probe_rows_read_what_the_probes_need_with_one_str_per_distinct_value(tmp_path: Path) -> None:
    with Ledger(tmp_path / "run") as led:
        for i in range(5):
            data = {"id": f"s{i}", "query": f"q{i}", "label": "unsafe" if i % 2 else "safe"}
            led.put_sample(f"s{i}", "abc", "risky", "fire", "failed" if i == 4 else "ok", data)
        rows = led.probe_rows("ok")
    assert rows == [
        {"query": f"q{i}", "kind": "risky", "label": "unsafe" if i % 2 else "safe", "category": "fire"}
        for i in range(4)
    ]
    # 96k samples name a handful of kinds, labels and categories: one str object each, not one per row
    assert rows[0]["kind"] is rows[3]["kind"] and rows[0]["label"] is rows[2]["label"]
    assert rows[0]["category"] is rows[1]["category"]


def test_iter_samples_holds_a_chunk_of_rows_not_every_sample(tmp_path: Path) -> None:
    import tracemalloc

    with Ledger(tmp_path / "run") as led:
        with led.transaction():
            for i in range(20000):
                status = "ok" if i % 5 else "failed"
                led.put_sample(f"s{i:05d}", "abc", "risky", "c", status, {"r": "x" * 1000})
        assert [s["status"] for s in led.iter_samples("failed")] == ["failed"] * 4000
        tracemalloc.start()
        try:
            n = sum(len(s["r"]) for s in led.iter_samples(None))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert n == 20000 * 1000
    # every row at once is > 20 MB; a chunk of 4096 rows ~4 MB
    assert peak < 8_000_000


def test_background_checkpoints_keep_the_wal_small_and_off_the_writer(tmp_path: Path) -> None:
    """With `checkpoint_in_background` the writing connection checkpoints only at `writer_pages`
    (SQLite's automatic checkpoint at 1,000 pages, two fdatasyncs inside a commit, ran on the build's
    event loop); a thread of its own copies the WAL into the database meanwhile, and the writer's rare
    checkpoint still bounds the WAL under commits that never pause (beside them a PASSIVE checkpoint
    never completes, and the WAL only starts over after a complete one). `close` stops the thread and
    every committed row is there after a reopen."""
    led = Ledger(tmp_path / "run", lock=True)
    led.checkpoint_in_background(interval_s=0.02, writer_pages=600)
    led.checkpoint_in_background(interval_s=0.02)  # once is enough: a second call adds no thread
    assert led.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 600
    threads = [t for t in threading.enumerate() if t.name == "ledger-checkpoints"]
    assert len(threads) == 1
    wal, db = tmp_path / "run" / f"{LEDGER_NAME}-wal", tmp_path / "run" / LEDGER_NAME
    blob = "x" * 3000
    for i in range(1500):  # ~6,000 WAL frames of commits, one transaction each, without a pause
        led.set_meta(f"k{i}", blob)
    # bounded by the writer's checkpoint at 600 frames, not ~6,000 (slack: a commit that finds the
    # thread mid-checkpoint skips its own, the next one tries again)
    assert wal.stat().st_size < 3 * 600 * (4096 + 24)
    time.sleep(0.1)  # a pause: now the thread's checkpoint completes
    db0 = db.stat().st_size
    for i in range(1500, 1550):
        led.set_meta(f"k{i}", blob)
    for _ in range(3000):  # only the thread checkpoints these 50 (the writer's mark is far off)
        if db.stat().st_size > db0:
            break
        time.sleep(0.01)
    assert db.stat().st_size > db0
    led.close()
    assert not threads[0].is_alive()
    with Ledger(tmp_path / "run", readonly=True) as again:
        assert again.get_meta("k1549") == blob and again.get_meta("k0") == blob


def test_a_ledger_without_background_checkpoints_keeps_sqlites_own(tmp_path: Path) -> None:
    with Ledger(tmp_path / "run", lock=True) as led:
        assert led.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000


def test_a_build_checkpoints_its_ledger_in_the_background(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README: the build's ledger checkpoints from a thread of its own while the build runs, and the
    thread is gone once the build has closed its ledger."""
    import asyncio

    from test_build_pipeline import STAGES, ScriptedBackend, _cfg, _images

    from rmskit.pipeline.runner import run_build

    seen: list[bool] = []

    class Watching(ScriptedBackend):
        async def generate(self, *a, **k):  # type: ignore[no-untyped-def]
            seen.append(any(t.name == "ledger-checkpoints" for t in threading.enumerate()))
            return await super().generate(*a, **k)

    monkeypatch.setenv("RMSKIT_FINISH", "inline")
    backend = Watching()
    asyncio.run(
        run_build(
            _cfg(tmp_path, perceive="model"),
            quiet=True,
            items=_images(2),
            backends=dict.fromkeys(STAGES, backend),
        )
    )
    assert seen and all(seen)  # every stage call ran with the thread checkpointing
    assert not any(t.name == "ledger-checkpoints" for t in threading.enumerate())


def test_checkpoint_copies_the_wal_and_truncate_empties_it(tmp_path: Path) -> None:
    """A build's finish checkpoints while its worker exports, so that closing the ledger has nothing left
    to copy or delete; a reader of an older snapshot holds a PASSIVE checkpoint back, not TRUNCATE's
    (which waits for it)."""
    wal = tmp_path / "run" / f"{LEDGER_NAME}-wal"
    with Ledger(tmp_path / "run", lock=True) as led:
        for i in range(200):
            led.set_meta(f"k{i}", "x" * 3000)
        reader = sqlite3.connect(tmp_path / "run" / LEDGER_NAME, check_same_thread=False)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM meta").fetchone()  # a snapshot of the WAL as it is now
        led.set_meta("late", "y" * 3000)
        assert led.checkpoint() is False  # the late frames wait for the reader
        threading.Timer(0.2, reader.rollback).start()  # the reader ends while TRUNCATE waits for it
        assert led.checkpoint(truncate=True) is True
        assert wal.stat().st_size == 0
        reader.close()
    with Ledger(tmp_path / "run", readonly=True) as again:
        assert again.get_meta("late") == "y" * 3000
