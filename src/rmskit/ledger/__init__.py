"""The run ledger (sqlite, WAL): images, stage records, rounds, samples, cache, decisions, taxonomy.

`Ledger(run_dir)` opens (and migrates) it; `Ledger(run_dir, lock=True)` or `RunLock(run_dir)` makes the
caller the run's only writer; every unusable ledger raises `LedgerError` (CLIs: exit 2)."""

from rmskit.ledger.errors import LedgerError, RunLocked
from rmskit.ledger.lock import RunLock, lock_holder
from rmskit.ledger.migrations import SCHEMA_VERSION
from rmskit.ledger.store import LEDGER_NAME, Ledger, Round

__all__ = [
    "LEDGER_NAME",
    "SCHEMA_VERSION",
    "Ledger",
    "LedgerError",
    "Round",
    "RunLock",
    "RunLocked",
    "lock_holder",
]
