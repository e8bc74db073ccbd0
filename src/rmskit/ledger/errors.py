"""Errors a run's ledger raises: one clear line (path, what is wrong, what to do), never a traceback."""

from __future__ import annotations

import sqlite3
from pathlib import Path

_HEADER = b"SQLite format 3\x00"
# SQLite primary result codes meaning "this file is not a usable database" (extended codes share the
# low byte, e.g. SQLITE_CORRUPT_INDEX).
_CORRUPT_CODES = frozenset({11, 26})  # SQLITE_CORRUPT, SQLITE_NOTADB


class LedgerError(Exception):
    """A run ledger that cannot be used as it is: corrupt, from a newer rmskit, or locked by another
    process. CLIs print `str(err)` and exit 2."""

    def __init__(self, path: Path | str, problem: str, hint: str) -> None:
        self.path, self.problem, self.hint = Path(path), problem, hint
        super().__init__(f"{self.path}: {problem}; {hint}")


class RunLocked(LedgerError):
    """Another live process holds the run directory's lock."""

    def __init__(self, path: Path | str, holder: dict[str, object]) -> None:
        self.holder = holder
        who = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
        cmd = f" ({holder['command']})" if holder.get("command") else ""
        super().__init__(
            path,
            f"the run is in use by {who}{cmd}",
            "wait for it to finish or stop that process, then re-run",
        )


def is_corruption(exc: BaseException) -> bool:
    """Whether an sqlite error means the file itself is damaged (not a locked or misused database)."""
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return (code & 0xFF) in _CORRUPT_CODES
    msg = str(exc).lower()
    return "malformed" in msg or "not a database" in msg


def corrupt(path: Path | str, detail: str) -> LedgerError:
    return LedgerError(
        path,
        f"the ledger is damaged ({detail})",
        "restore it from a backup, or move it away and start a new run in an empty directory "
        "(rmskit never starts over on a damaged ledger by itself)",
    )


def check_file(path: Path) -> None:
    """Refuse, before sqlite sees it, a ledger file that is empty, not sqlite, or cut short: sqlite
    would treat an empty file as a new database (a silent start-over) and fail later on the others."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    if size == 0:
        raise corrupt(path, "the file is empty (0 bytes)")
    with path.open("rb") as fh:
        head = fh.read(100)
    if len(head) < 100 or not head.startswith(_HEADER):
        raise corrupt(path, "not an SQLite database")
    page = int.from_bytes(head[16:18], "big")
    page = 65536 if page == 1 else page
    pages = int.from_bytes(head[28:32], "big")
    # The in-header page count is trustworthy when the change counter matches version-valid-for, and
    # only while no write-ahead log is pending (a checkpoint in progress may write the header first).
    wal = path.with_name(path.name + "-wal")
    quiet = not wal.exists() or wal.stat().st_size == 0
    if quiet and head[24:28] == head[92:96] and pages and size < pages * page:
        raise corrupt(path, f"truncated: {size:,} of {pages * page:,} bytes")
