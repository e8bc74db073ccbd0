"""Moving a shard's rows between ledgers (the Ray executor: worker-local ledger <-> the run's ledger).

The driver is the only writer of `<out>/rms.sqlite`. Workers run the ordinary pipeline on a private
temp ledger; `Outbox` streams what they write (stage records, rounds, samples, cache rows,
failures, image outcomes) to the driver in batches, and `seed_rows` ships a shard's finished rows
to a worker when the shard starts, so resume needs no shared filesystem.

Rows are copied generically (column names from the table itself), so the same code serves any
schema version both sides share. New or replaced rows are found by SQLite rowid: every write in the
pipeline is an INSERT (OR REPLACE), which gives the row a fresh rowid. Images are the exception
(status is updated in place), so they are tracked by their `updated` timestamp."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, Field

from rmskit.ledger import Ledger

# Tables a worker writes while running stages, in the order a batch is applied (a sample lands with
# or after its records; image outcomes come last, so 'done' never precedes its samples).
SYNC_TABLES = ("records", "rounds", "samples", "cache", "failures")
_DROP_COLUMNS = {"failures": {"id"}}  # autoincrement ids are local to each ledger


class TableRows(BaseModel):
    columns: list[str]
    rows: list[list[Any]] = Field(default_factory=list)


class RowBatch(BaseModel):
    """Rows of one or more images, as written by a worker (or shipped to it)."""

    tables: dict[str, TableRows] = Field(default_factory=dict)
    images: list[tuple[str, str, str | None]] = Field(default_factory=list)  # (sha, status, error)

    def __len__(self) -> int:
        return sum(len(t.rows) for t in self.tables.values()) + len(self.images)

    def count(self, table: str) -> int:
        t = self.tables.get(table)
        return len(t.rows) if t else 0

    def dicts(self, table: str) -> list[dict[str, Any]]:
        t = self.tables.get(table)
        return [dict(zip(t.columns, r, strict=True)) for r in t.rows] if t else []


def _select(ledger: Ledger, table: str, where: str, params: tuple) -> TableRows:
    with ledger._lock:  # one consistent read of columns + rows
        cur = ledger._con.execute(f"SELECT * FROM {table} WHERE {where}", params)  # noqa: S608
        cols = [d[0] for d in cur.description]
        rows = cur.fetchall()
    keep = [i for i, c in enumerate(cols) if c not in _DROP_COLUMNS.get(table, ())]
    return TableRows(columns=[cols[i] for i in keep], rows=[[r[i] for i in keep] for r in rows])


def _max_rowid(ledger: Ledger, table: str) -> int:
    return int(ledger.query(f"SELECT COALESCE(MAX(rowid), 0) FROM {table}")[0][0])  # noqa: S608


def apply_rows(ledger: Ledger, batch: RowBatch) -> None:
    """Write a batch into `ledger` in one transaction (all of it lands, or none of it)."""
    with ledger.transaction():
        for table in SYNC_TABLES:
            t = batch.tables.get(table)
            if not t or not t.rows:
                continue
            cols = ", ".join(t.columns)
            marks = ", ".join("?" * len(t.columns))
            verb = "INSERT" if table == "failures" else "INSERT OR REPLACE"
            ledger._con.executemany(f"{verb} INTO {table}({cols}) VALUES({marks})", t.rows)  # noqa: S608
        for sha, status, error in batch.images:
            ledger.set_image_status(sha, status, error)


def seed_rows(ledger: Ledger, shas: Iterable[str]) -> RowBatch:
    """What a worker needs to resume these images: their stage records, samples and the samples'
    rounds. (Cache rows are not linked to images in the schema; finished stages are reused from
    their records, so the cache is only a second line of defence and is not shipped.)"""
    shas = list(shas)
    batch = RowBatch()
    if not shas:
        return batch
    marks = ", ".join("?" * len(shas))
    batch.tables["records"] = _select(ledger, "records", f"image_sha IN ({marks})", tuple(shas))
    samples = _select(ledger, "samples", f"image_sha IN ({marks})", tuple(shas))
    batch.tables["samples"] = samples
    ids = [r[samples.columns.index("id")] for r in samples.rows]
    if ids:
        batch.tables["rounds"] = _select(
            ledger, "rounds", f"sample_id IN ({', '.join('?' * len(ids))})", tuple(ids)
        )
    return batch


class Outbox:
    """Everything written to a (worker) ledger since the last `drain`, as one RowBatch."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._marks = {t: _max_rowid(ledger, t) for t in SYNC_TABLES}
        self._image_mark = 0.0
        self._sent_images: dict[str, float] = {}
        self._held = RowBatch()

    def drain(self) -> RowBatch:
        """New rows since the last drain; images only once they reached an outcome (done, failed,
        or left pending with an error for a re-run)."""
        out, self._held = self._held, RowBatch()
        for table in SYNC_TABLES:
            rows = _select(self.ledger, table, "rowid > ?", (self._marks[table],))
            if rows.rows:
                self._marks[table] = _max_rowid(self.ledger, table)
                _extend(out, table, rows)
        for sha, status, error, updated in self.ledger.query(
            "SELECT sha256, status, error, updated FROM images WHERE updated >= ?", (self._image_mark,)
        ):
            self._image_mark = max(self._image_mark, updated or 0.0)
            if (status != "pending" or error) and self._sent_images.get(sha) != updated:
                self._sent_images[sha] = updated
                out.images.append((sha, status, error))
        return out

    def seed(self, batch: RowBatch) -> None:
        """Write shipped rows into the worker ledger without echoing them back to the driver."""
        pending = self.drain()  # keep what the pipeline wrote so far; it goes out with the next drain
        apply_rows(self.ledger, batch)
        self._marks = {t: _max_rowid(self.ledger, t) for t in SYNC_TABLES}
        self._held = pending


def _extend(batch: RowBatch, table: str, rows: TableRows) -> None:
    have = batch.tables.get(table)
    if have is None:
        batch.tables[table] = rows
    else:  # the same table of the same ledger: same columns
        have.rows.extend(rows.rows)
