"""The run ledger (sqlite, WAL): images, stage records, rounds, samples, cache, decisions, taxonomy."""

from rmskit.ledger.store import LEDGER_NAME, Ledger

__all__ = ["LEDGER_NAME", "Ledger"]
