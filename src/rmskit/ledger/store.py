"""The run ledger: `<out>/rms.sqlite` (WAL) is the single source of truth of a run.

Every write is its own committed transaction (autocommit + WAL, synchronous=NORMAL), so a SIGKILL
loses at most the request that was in flight, never finished work. JSON columns keep the schema
stable while stage outputs evolve; prompt versions are stored beside each record."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rmskit.records import ImageRecord, Rejection

LEDGER_NAME = "rms.sqlite"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images(
  sha256 TEXT PRIMARY KEY, seq INTEGER NOT NULL, data TEXT NOT NULL,
  status TEXT NOT NULL DEFAULT 'pending', error TEXT, updated REAL);
CREATE TABLE IF NOT EXISTS rejections(
  source_root TEXT NOT NULL, path TEXT NOT NULL, reason TEXT NOT NULL, created REAL,
  PRIMARY KEY(source_root, path));
CREATE TABLE IF NOT EXISTS records(
  image_sha TEXT NOT NULL, stage TEXT NOT NULL, key TEXT NOT NULL, status TEXT NOT NULL,
  data TEXT, error TEXT, prompt_version TEXT, model TEXT, created REAL,
  PRIMARY KEY(image_sha, stage, key));
CREATE TABLE IF NOT EXISTS rounds(
  sample_id TEXT NOT NULL, phase TEXT NOT NULL, round INTEGER NOT NULL, passed INTEGER NOT NULL,
  data TEXT NOT NULL, created REAL, PRIMARY KEY(sample_id, phase, round));
CREATE TABLE IF NOT EXISTS samples(
  id TEXT PRIMARY KEY, image_sha TEXT NOT NULL, kind TEXT NOT NULL, category TEXT,
  status TEXT NOT NULL, data TEXT NOT NULL, created REAL);
CREATE TABLE IF NOT EXISTS cache(
  key TEXT PRIMARY KEY, model TEXT NOT NULL, stage TEXT, text TEXT NOT NULL, finish_reason TEXT,
  prompt_tokens INTEGER NOT NULL DEFAULT 0, completion_tokens INTEGER NOT NULL DEFAULT 0, created REAL);
CREATE TABLE IF NOT EXISTS failures(
  id INTEGER PRIMARY KEY AUTOINCREMENT, image_sha TEXT, stage TEXT, key TEXT, kind TEXT,
  message TEXT, created REAL);
CREATE TABLE IF NOT EXISTS decisions(
  id INTEGER PRIMARY KEY AUTOINCREMENT, sample_id TEXT NOT NULL, action TEXT NOT NULL,
  payload TEXT, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS taxonomy(
  name TEXT PRIMARY KEY, seq INTEGER NOT NULL, description TEXT, embedding BLOB,
  aliases TEXT NOT NULL DEFAULT '[]', created REAL);
CREATE INDEX IF NOT EXISTS samples_image ON samples(image_sha);
CREATE INDEX IF NOT EXISTS decisions_sample ON decisions(sample_id);
"""


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), default=str)


class Ledger:
    """Thin, synchronous access to the run database. One instance per process; safe to share
    between the event loop and worker threads (a lock serialises access to the connection)."""

    def __init__(self, run_dir: Path, *, readonly: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LEDGER_NAME
        self._lock = threading.RLock()
        if readonly:
            if not self.path.exists():
                raise FileNotFoundError(f"no ledger at {self.path}: is {self.run_dir} a run directory?")
            uri = f"file:{self.path}?mode=ro"
            self._con = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
        else:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._con = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._con.execute("PRAGMA journal_mode=WAL")
            self._con.execute("PRAGMA synchronous=NORMAL")
            self._con.execute("PRAGMA busy_timeout=10000")
            self._con.executescript(_SCHEMA)
            if self.get_meta("schema_version") is None:
                self.set_meta("schema_version", SCHEMA_VERSION)
        self._con.execute("PRAGMA busy_timeout=10000")

    # -- plumbing -------------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            self._con.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def execute(self, sql: str, params: tuple | dict = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._con.execute(sql, params)

    def query(self, sql: str, params: tuple | dict = ()) -> list[tuple]:
        with self._lock:
            return self._con.execute(sql, params).fetchall()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Group writes that must land together (e.g. a sample and its final round)."""
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

    def image_counts(self) -> dict[str, int]:
        return dict(self.query("SELECT status, COUNT(*) FROM images GROUP BY status"))

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

    def stage_counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for stage, status, n in self.query(
            "SELECT stage, status, COUNT(*) FROM records GROUP BY stage, status"
        ):
            out.setdefault(stage, {})[status] = n
        return out

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

    def get_sample(self, sample_id: str) -> dict[str, Any] | None:
        rows = self.query("SELECT status, data FROM samples WHERE id=?", (sample_id,))
        if not rows:
            return None
        return {"status": rows[0][0], **json.loads(rows[0][1])}

    def iter_samples(self, status: str | None = "ok") -> Iterator[dict[str, Any]]:
        sql = (
            "SELECT status, data FROM samples"
            + (" WHERE status=?" if status else "")
            + " ORDER BY created, id"
        )
        for st, data in self.query(sql, (status,) if status else ()):
            yield {"status": st, **json.loads(data)}

    def sample_counts(self) -> dict[str, int]:
        return dict(self.query("SELECT status, COUNT(*) FROM samples GROUP BY status"))

    def category_counts(self, status: str = "ok") -> dict[str, int]:
        return dict(
            self.query(
                "SELECT category, COUNT(*) FROM samples WHERE status=? AND kind='risky' GROUP BY category",
                (status,),
            )
        )

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

    def usage_by_stage(self) -> dict[str, dict[str, int]]:
        rows = self.query(
            "SELECT COALESCE(stage, '?'), COUNT(*), SUM(prompt_tokens), SUM(completion_tokens) FROM cache GROUP BY stage"
        )
        return {
            s: {"requests": n, "prompt_tokens": pt or 0, "completion_tokens": ct or 0}
            for s, n, pt, ct in rows
        }

    # -- failures (per-item error log, kept even when a retry later succeeds) ------------------
    def add_failure(self, image_sha: str | None, stage: str, key: str, kind: str, message: str) -> None:
        self.execute(
            "INSERT INTO failures(image_sha, stage, key, kind, message, created) VALUES(?,?,?,?,?,?)",
            (image_sha, stage, key, kind, message[:2000], time.time()),
        )

    def failures(self, limit: int | None = None) -> list[dict[str, Any]]:
        sql = "SELECT image_sha, stage, key, kind, message, created FROM failures ORDER BY id"
        rows = self.query(sql + (f" LIMIT {int(limit)}" if limit else ""))
        return [
            dict(zip(("image_sha", "stage", "key", "kind", "message", "created"), r, strict=True))
            for r in rows
        ]

    # -- review decisions (append-only) ---------------------------------------------------------
    def add_decision(self, sample_id: str, action: str, payload: dict[str, Any] | None = None) -> int:
        cur = self.execute(
            "INSERT INTO decisions(sample_id, action, payload, created) VALUES(?,?,?,?)",
            (sample_id, action, _dumps(payload or {}), time.time()),
        )
        return int(cur.lastrowid or 0)

    def decisions(self, sample_id: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT id, sample_id, action, payload, created FROM decisions"
        params: tuple = ()
        if sample_id:
            sql += " WHERE sample_id=?"
            params = (sample_id,)
        rows = self.query(sql + " ORDER BY id", params)
        return [
            {"id": i, "sample_id": s, "action": a, "payload": json.loads(p or "{}"), "created": c}
            for i, s, a, p, c in rows
        ]

    def review_state(self) -> dict[str, dict[str, Any]]:
        """Fold the append-only decision log into the current state per sample:
        {"decision": "accept"|"reject"|None, "edits": {field: value}, "edited_at": ts, "history": [...]}."""
        state: dict[str, dict[str, Any]] = {}
        for d in self.decisions():
            st = state.setdefault(
                d["sample_id"], {"decision": None, "edits": {}, "edited_at": None, "history": []}
            )
            st["history"].append(d)
            if d["action"] in ("accept", "reject"):
                st["decision"] = d["action"]
            elif d["action"] == "edit":
                st["edits"].update(d["payload"].get("fields", {}))
                st["edited_at"] = d["created"]
        return state

    # -- taxonomy ---------------------------------------------------------------------------------
    def taxonomy(self) -> list[dict[str, Any]]:
        rows = self.query(
            "SELECT name, seq, description, embedding, aliases, created FROM taxonomy ORDER BY seq"
        )
        return [
            {"name": n, "seq": s, "description": d, "embedding": e, "aliases": json.loads(a), "created": c}
            for n, s, d, e, a, c in rows
        ]

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
