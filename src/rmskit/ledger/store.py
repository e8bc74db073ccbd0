"""The run ledger: `<out>/rms.sqlite` (WAL) is the single source of truth of a run.

Every write is its own committed transaction (autocommit + WAL, synchronous=NORMAL), or one group in
`transaction()` (a sample and its final round), so a SIGKILL loses at most the request that was in
flight, never finished work. The schema evolves through `migrations.py`. JSON columns keep the schema
stable while stage outputs evolve; prompt versions are stored beside each record."""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from rmskit.ledger import migrations
from rmskit.ledger.errors import LedgerError, check_file, corrupt, is_corruption
from rmskit.ledger.lock import RunLock
from rmskit.ledger.reads import LedgerReads
from rmskit.records import ImageRecord, Rejection

LEDGER_NAME = "rms.sqlite"
BUSY_TIMEOUT_MS = 10_000  # how long a statement waits for another connection's lock
log = logging.getLogger("rmskit.ledger")


class Round(NamedTuple):
    """One refine round, as `put_sample_with_round` stores it beside its sample."""

    phase: str
    round_no: int
    passed: bool
    data: Any


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), default=str)


class Ledger(LedgerReads):
    """Thin, synchronous access to the run database. One instance per process; safe to share
    between the event loop and worker threads (a lock serialises access to the connection).

    `readonly=True` never writes (apart from migrating a ledger from an older rmskit once);
    `lock=True` also takes the run directory's `RunLock` for as long as the ledger is open, so a
    second writer (build, export, review) refuses at once. Opening a damaged ledger, or one from a
    newer rmskit, raises `LedgerError`; a missing one in read-only mode raises FileNotFoundError."""

    def __init__(self, run_dir: Path, *, readonly: bool = False, lock: bool = False) -> None:
        if readonly and lock:
            raise ValueError("a read-only ledger takes no lock")
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LEDGER_NAME
        self._lock = threading.RLock()
        self._checkpointer: tuple[threading.Event, threading.Thread] | None = None
        if readonly and not self.path.exists():
            raise FileNotFoundError(f"no ledger at {self.path}: is {self.run_dir} a run directory?")
        check_file(self.path)
        self.run_lock = RunLock(self.run_dir).acquire() if lock else None
        try:
            self._con = self._open(readonly)
        except sqlite3.DatabaseError as exc:
            self._release_lock()
            if is_corruption(exc):
                raise corrupt(self.path, str(exc)) from None
            raise
        except BaseException:
            self._release_lock()
            raise

    def _connect(self, readonly: bool) -> sqlite3.Connection:
        if readonly:
            uri = f"file:{self.path}?mode=ro"
            con = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
        else:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            con = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        con.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        return con

    def _open(self, readonly: bool) -> sqlite3.Connection:
        con = self._connect(readonly)
        try:
            if readonly:
                todo = migrations.pending(con, self.path)
            else:
                con.execute("PRAGMA journal_mode=WAL")
                con.execute("PRAGMA synchronous=NORMAL")
                migrations.migrate(con, self.path)
                return con
        except BaseException:
            con.close()
            raise
        if not todo:
            return con
        con.close()  # a ledger from an older rmskit: migrate it once, then read
        try:
            rw = self._connect(False)
            try:
                migrations.migrate(rw, self.path)
            finally:
                rw.close()
        except sqlite3.OperationalError as exc:  # e.g. a read-only file system
            raise LedgerError(
                self.path,
                f"written by an older rmskit; migrating it ({', '.join(todo)}) failed: {exc}",
                "open it once with write access (e.g. `rmskit status` as its owner), then retry",
            ) from None
        return self._connect(True)

    # -- plumbing -------------------------------------------------------------------------------
    def _release_lock(self) -> None:
        if self.run_lock is not None:
            self.run_lock.release()

    def checkpoint_in_background(self, interval_s: float = 1.0, writer_pages: int = 10_000) -> None:
        """Move the WAL's checkpoints off the writing thread: a thread of its own, on a connection of its
        own, checkpoints every `interval_s` (PASSIVE: it never waits for the writer or readers, and the
        writer never waits for it). By default SQLite checkpoints inside the commit that takes the WAL
        past 1,000 pages, with two fdatasyncs: in a build that commit runs on the event loop, ~40 times
        per 400 images, 2-13 ms each and 0.1-0.2 s on a busy disk (strace, 2026-12-03), while every
        request in flight waits. What stays on the writer is one small fdatasync of the WAL's header
        when a write starts it over after a complete checkpoint (SQLite needs it for safety): hence
        checkpoints once a second, not as often as possible. bench/peers job (b), 400 images, under
        strace: the writing thread's fdatasyncs 122 taking 0.52 s (the longest 113 ms) before, 17 taking
        10 ms (the longest 3 ms) after, most of them the ledger's creation.

        A PASSIVE checkpoint beside a writer that never pauses never completes (frames arrive while it
        copies), and only a complete one lets the WAL start over: so the writer still checkpoints, at
        `writer_pages` (40 MB) instead of 1,000, which bounds the WAL; by then the thread has copied
        almost every page. The build calls this; `close` stops the thread first."""
        if self._checkpointer is not None:
            return
        stop = threading.Event()
        con = self._connect(False)

        def run() -> None:
            try:
                while not stop.wait(interval_s):
                    con.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error as exc:  # e.g. a full disk: SQLite checkpoints in the commits again
                log.warning("background WAL checkpoints stopped (%r); commits checkpoint again", exc)
                with self._lock, contextlib.suppress(sqlite3.Error):
                    self._con.execute("PRAGMA wal_autocheckpoint=1000")
            finally:
                con.close()

        with self._sql():
            self._con.execute(f"PRAGMA wal_autocheckpoint={int(writer_pages)}")
        thread = threading.Thread(target=run, name="ledger-checkpoints", daemon=True)
        self._checkpointer = (stop, thread)
        thread.start()

    def checkpoint(self, truncate: bool = False, wait: bool = True) -> bool:
        """One checkpoint on this connection now; True when it copied the whole WAL into the database.
        PASSIVE by default: a reader of an older snapshot holds back the frames written since. With
        `truncate`, it waits for readers (up to the busy timeout) and empties the WAL file: closing
        the last connection deletes the WAL, and deleting a large one took ~16 ms at 40 MB (the
        background checkpoints let it grow to `writer_pages`), which a finish then waited for.
        `wait=False`: no busy wait; False when a reader or writer was in the way (what it could copy,
        it copied). SQLite's own wait sleeps in growing steps (1, 2, 5, 10, 15, 20, 25 ms...): a
        caller that polls finds a reader gone sooner."""
        mode = "TRUNCATE" if truncate else "PASSIVE"
        with self._sql():
            if not wait:
                self._con.execute("PRAGMA busy_timeout=0")
            try:
                busy, frames, copied = self._con.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
            finally:
                if not wait:
                    self._con.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        return not busy and frames == copied

    def _stop_checkpointer(self) -> None:
        if self._checkpointer is not None:
            stop, thread = self._checkpointer
            stop.set()
            thread.join()
            self._checkpointer = None

    def close(self) -> None:
        self._stop_checkpointer()  # its connection closes first: the last one to close checkpoints
        with self._lock:
            self._con.close()
        self._release_lock()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _sql(self) -> Iterator[None]:
        """Hold the connection's lock; a damaged database file raises one clear LedgerError."""
        with self._lock:
            try:
                yield
            except sqlite3.DatabaseError as exc:
                if is_corruption(exc):
                    raise corrupt(self.path, str(exc)) from None
                raise

    def execute(self, sql: str, params: tuple | dict = ()) -> sqlite3.Cursor:
        with self._sql():
            return self._con.execute(sql, params)

    def query(self, sql: str, params: tuple | dict = ()) -> list[tuple]:
        with self._sql():
            return self._con.execute(sql, params).fetchall()

    def stream(self, sql: str, params: tuple | dict = (), chunk: int = 4096) -> Iterator[tuple]:
        """`query`'s rows, `chunk` at a time: a pass over every sample or image holds one chunk of
        rows, not all of them (the export's read of 96k samples: 84 -> 61 MB at its peak). The lock is
        held per chunk, not between them."""
        with self._sql():
            cur = self._con.execute(sql, params)
        try:
            while True:
                with self._sql():
                    rows = cur.fetchmany(chunk)
                if not rows:
                    return
                yield from rows
                del rows  # not two chunks at once while the next is fetched
        finally:
            cur.close()  # a pass left early ends its read now, not when the generator is collected

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Group writes that must land together (e.g. a sample and its final round): all of them are
        committed, or none (an exception or a kill inside the block leaves the ledger as before)."""
        with self._lock:
            self._con.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._con.execute("ROLLBACK")
                raise
            self._con.execute("COMMIT")

    # -- meta -----------------------------------------------------------------------------------
    def set_meta(self, key: str, value: Any) -> None:
        self.execute("INSERT OR REPLACE INTO meta(key, value) VALUES(?, ?)", (key, _dumps(value)))

    def get_meta(self, key: str, default: Any = None) -> Any:
        rows = self.query("SELECT value FROM meta WHERE key=?", (key,))
        return json.loads(rows[0][0]) if rows else default

    # -- images ---------------------------------------------------------------------------------
    def add_image(self, rec: ImageRecord) -> bool:
        """Insert an accepted image; False when the same bytes were already ingested."""
        with self._lock:
            seq = self._con.execute("SELECT COALESCE(MAX(seq), -1) + 1 FROM images").fetchone()[0]
            cur = self._con.execute(
                "INSERT OR IGNORE INTO images(sha256, seq, data, status, updated) VALUES(?,?,?,?,?)",
                (rec.sha256, seq, rec.model_dump_json(), "pending", time.time()),
            )
            if cur.rowcount:  # a previously refused path that is now fine is no longer a refusal
                self._con.execute(
                    "DELETE FROM rejections WHERE source_root=? AND path=?",
                    (rec.source_root, rec.source_path),
                )
            return cur.rowcount == 1

    def get_image(self, sha: str) -> ImageRecord | None:
        rows = self.query("SELECT data FROM images WHERE sha256=?", (sha,))
        return ImageRecord.model_validate_json(rows[0][0]) if rows else None

    def image_status(self, sha: str) -> str | None:
        rows = self.query("SELECT status FROM images WHERE sha256=?", (sha,))
        return rows[0][0] if rows else None

    def set_image_status(self, sha: str, status: str, error: str | None = None) -> None:
        self.execute(
            "UPDATE images SET status=?, error=?, updated=? WHERE sha256=?", (status, error, time.time(), sha)
        )

    def iter_images(self, status: str | None = None) -> Iterator[ImageRecord]:
        sql = "SELECT data FROM images" + (" WHERE status=?" if status else "") + " ORDER BY seq"
        for (data,) in self.query(sql, (status,) if status else ()):
            yield ImageRecord.model_validate_json(data)

    def add_rejection(self, rej: Rejection) -> None:
        self.execute(
            "INSERT OR REPLACE INTO rejections(source_root, path, reason, created) VALUES(?,?,?,?)",
            (rej.source_root, rej.path, rej.reason, time.time()),
        )

    def rejections(self) -> list[Rejection]:
        rows = self.query("SELECT source_root, path, reason FROM rejections ORDER BY created, path")
        return [Rejection(source_root=r, path=p, reason=why) for r, p, why in rows]

    # -- stage records ----------------------------------------------------------------------------
    def put_record(
        self,
        image_sha: str,
        stage: str,
        key: str,
        data: Any,
        *,
        status: str = "ok",
        error: str | None = None,
        prompt_version: str | None = None,
        model: str | None = None,
    ) -> None:
        self.execute(
            "INSERT OR REPLACE INTO records(image_sha, stage, key, status, data, error, prompt_version, model,"
            " created) VALUES(?,?,?,?,?,?,?,?,?)",
            (image_sha, stage, key, status, _dumps(data), error, prompt_version, model, time.time()),
        )

    def get_record(self, image_sha: str, stage: str, key: str = "") -> dict[str, Any] | None:
        """The stored record as {status, data, error, prompt_version, model}, or None."""
        rows = self.query(
            "SELECT status, data, error, prompt_version, model FROM records WHERE image_sha=? AND stage=? AND key=?",
            (image_sha, stage, key),
        )
        if not rows:
            return None
        status, data, error, pv, model = rows[0]
        return {
            "status": status,
            "data": json.loads(data) if data else None,
            "error": error,
            "prompt_version": pv,
            "model": model,
        }

    def records_for(self, image_sha: str) -> list[dict[str, Any]]:
        rows = self.query(
            "SELECT stage, key, status, data, error, prompt_version, model FROM records WHERE image_sha=? "
            "ORDER BY created",
            (image_sha,),
        )
        return [
            {
                "stage": s,
                "key": k,
                "status": st,
                "data": json.loads(d) if d else None,
                "error": e,
                "prompt_version": pv,
                "model": m,
            }
            for s, k, st, d, e, pv, m in rows
        ]

    # -- refine rounds --------------------------------------------------------------------------
    def put_round(self, sample_id: str, phase: str, round_no: int, passed: bool, data: Any) -> None:
        self.execute(
            "INSERT OR REPLACE INTO rounds(sample_id, phase, round, passed, data, created) VALUES(?,?,?,?,?,?)",
            (sample_id, phase, round_no, int(passed), _dumps(data), time.time()),
        )

    def rounds(self, sample_id: str, phase: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT phase, round, passed, data FROM rounds WHERE sample_id=?"
        params: tuple = (sample_id,)
        if phase:
            sql += " AND phase=?"
            params += (phase,)
        rows = self.query(sql + " ORDER BY phase, round", params)
        return [{"phase": p, "round": r, "passed": bool(ok), "data": json.loads(d)} for p, r, ok, d in rows]

    # -- samples --------------------------------------------------------------------------------
    def put_sample(
        self,
        sample_id: str,
        image_sha: str,
        kind: str,
        category: str | None,
        status: str,
        data: dict[str, Any],
    ) -> None:
        self.execute(
            "INSERT OR REPLACE INTO samples(id, image_sha, kind, category, status, data, created)"
            " VALUES(?,?,?,?,?,?,?)",
            (sample_id, image_sha, kind, category, status, _dumps(data), time.time()),
        )

    def put_sample_with_round(
        self,
        sample_id: str,
        image_sha: str,
        kind: str,
        category: str | None,
        status: str,
        data: dict[str, Any],
        final_round: Round | None = None,
    ) -> None:
        """Store a sample and the round that decided it in one transaction, so no reader and no crash
        ever sees a kept sample without its final round (or that round without its sample)."""
        with self.transaction():
            if final_round is not None:
                self.put_round(sample_id, *final_round)
            self.put_sample(sample_id, image_sha, kind, category, status, data)

    def get_sample(self, sample_id: str) -> dict[str, Any] | None:
        rows = self.query("SELECT status, data FROM samples WHERE id=?", (sample_id,))
        if not rows:
            return None
        return {"status": rows[0][0], **json.loads(rows[0][1])}

    def iter_samples(self, status: str | None = "ok") -> Iterator[dict[str, Any]]:
        """Every sample (of `status`) in creation order, read in chunks: a pass holds one chunk of rows, not
        every sample's JSON at once (~180 MB at 96k samples)."""
        sql = (
            "SELECT status, data FROM samples"
            + (" WHERE status=?" if status else "")
            + " ORDER BY created, id"
        )
        for st, data in self.stream(sql, (status,) if status else ()):
            yield {"status": st, **json.loads(data)}

    # -- request cache ----------------------------------------------------------------------------
    def cache_get(self, key: str) -> dict[str, Any] | None:
        rows = self.query(
            "SELECT text, finish_reason, prompt_tokens, completion_tokens, model FROM cache WHERE key=?",
            (key,),
        )
        if not rows:
            return None
        text, finish, pt, ct, model = rows[0]
        return {
            "text": text,
            "finish_reason": finish,
            "prompt_tokens": pt,
            "completion_tokens": ct,
            "model": model,
        }

    def cache_put(
        self,
        key: str,
        *,
        model: str,
        stage: str | None,
        text: str,
        finish_reason: str | None,
        prompt_tokens: int,
        completion_tokens: int,
    ) -> None:
        self.execute(
            "INSERT OR REPLACE INTO cache(key, model, stage, text, finish_reason, prompt_tokens,"
            " completion_tokens, created) VALUES(?,?,?,?,?,?,?,?)",
            (key, model, stage, text, finish_reason, prompt_tokens, completion_tokens, time.time()),
        )

    def cache_delete(self, key: str) -> None:
        self.execute("DELETE FROM cache WHERE key=?", (key,))

    # -- failures (per-item error log, kept even when a retry later succeeds) ------------------
    def add_failure(self, image_sha: str | None, stage: str, key: str, kind: str, message: str) -> None:
        self.execute(
            "INSERT INTO failures(image_sha, stage, key, kind, message, created) VALUES(?,?,?,?,?,?)",
            (image_sha, stage, key, kind, message[:2000], time.time()),
        )

    # -- review decisions (append-only) ---------------------------------------------------------
    def add_decision(self, sample_id: str, action: str, payload: dict[str, Any] | None = None) -> int:
        cur = self.execute(
            "INSERT INTO decisions(sample_id, action, payload, created) VALUES(?,?,?,?)",
            (sample_id, action, _dumps(payload or {}), time.time()),
        )
        return int(cur.lastrowid or 0)

    # -- taxonomy ---------------------------------------------------------------------------------
    def add_category(self, name: str, description: str | None, embedding: bytes | None) -> None:
        with self._lock:
            seq = self._con.execute("SELECT COALESCE(MAX(seq), -1) + 1 FROM taxonomy").fetchone()[0]
            self._con.execute(
                "INSERT OR IGNORE INTO taxonomy(name, seq, description, embedding, aliases, created)"
                " VALUES(?,?,?,?,?,?)",
                (name, seq, description, embedding, "[]", time.time()),
            )

    def add_alias(self, name: str, alias: str) -> None:
        with self._lock:
            rows = self._con.execute("SELECT aliases FROM taxonomy WHERE name=?", (name,)).fetchall()
            if not rows:
                return
            aliases = json.loads(rows[0][0])
            if alias not in aliases and alias != name:
                aliases.append(alias)
                self._con.execute("UPDATE taxonomy SET aliases=? WHERE name=?", (_dumps(aliases), name))
