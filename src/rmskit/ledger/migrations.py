"""Ordered schema migrations of the run ledger, in the manner of simonw/llm's `migrations.py`.

Each `@migration` function runs once per ledger, in the order defined here, inside one transaction,
and is recorded by name in `_migrations`. A ledger from an older rmskit is brought up to date when it
is opened; one that records a migration this rmskit does not know was written by a newer rmskit and is
refused. Never edit or reorder a released migration: add a new one."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from rmskit.ledger.errors import LedgerError

Migration = Callable[[sqlite3.Connection], None]
MIGRATIONS: list[tuple[str, Migration]] = []


def migration(fn: Migration) -> Migration:
    MIGRATIONS.append((fn.__name__, fn))
    return fn


def _run(con: sqlite3.Connection, script: str) -> None:
    # statement by statement: executescript() would commit the migration's transaction half-way
    for stmt in script.split(";"):
        if stmt.strip():
            con.execute(stmt)


@migration
def m001_initial(con: sqlite3.Connection) -> None:
    """The schema of rmskit before migrations existed (IF NOT EXISTS: such ledgers keep their data)."""
    _run(
        con,
        """
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
CREATE INDEX IF NOT EXISTS decisions_sample ON decisions(sample_id)
""",
    )


@migration
def m002_read_indexes(con: sqlite3.Connection) -> None:
    """Indexes for the report / status reads (per-stage record counts, images by status)."""
    _run(
        con,
        """
CREATE INDEX IF NOT EXISTS records_stage_status ON records(stage, status);
CREATE INDEX IF NOT EXISTS images_status ON images(status, seq);
CREATE INDEX IF NOT EXISTS samples_status ON samples(status, kind)
""",
    )


SCHEMA_VERSION = len(MIGRATIONS)
_KNOWN = [name for name, _ in MIGRATIONS]


def _applied(con: sqlite3.Connection) -> list[str]:
    has = con.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='_migrations'").fetchone()
    if not has:
        return []
    return [n for (n,) in con.execute("SELECT name FROM _migrations ORDER BY applied_at, name")]


def _refuse_newer(con: sqlite3.Connection, path: Path, applied: list[str]) -> None:
    unknown = [n for n in applied if n not in _KNOWN]
    has_meta = con.execute("SELECT 1 FROM sqlite_master WHERE name='meta'").fetchone()
    row = con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() if has_meta else None
    stored = str(row[0]) if row else ""
    newer = unknown or (stored.isdigit() and int(stored) > SCHEMA_VERSION)
    if newer:
        what = f"schema migrations {', '.join(unknown)}" if unknown else f"schema version {stored}"
        raise LedgerError(
            path,
            f"written by a newer rmskit ({what}; this rmskit knows schema version {SCHEMA_VERSION})",
            "upgrade rmskit (pip install -U rmskit) to open this run",
        )


def pending(con: sqlite3.Connection, path: Path) -> list[str]:
    """Names of the migrations this ledger still needs; LedgerError when it is newer than this rmskit."""
    applied = _applied(con)
    _refuse_newer(con, path, applied)
    return [n for n in _KNOWN if n not in applied]


def migrate(con: sqlite3.Connection, path: Path) -> list[str]:
    """Apply the pending migrations, each in its own transaction; returns the names applied."""
    con.execute("CREATE TABLE IF NOT EXISTS _migrations(name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
    todo = pending(con, path)
    for name, fn in MIGRATIONS:
        if name not in todo:
            continue
        con.execute("BEGIN IMMEDIATE")
        try:
            fn(con)
            con.execute("INSERT INTO _migrations(name, applied_at) VALUES(?, ?)", (name, time.time()))
            con.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES('schema_version', ?)",
                (str(_KNOWN.index(name) + 1),),
            )
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")
    return todo
