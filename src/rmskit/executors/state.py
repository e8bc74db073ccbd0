"""Global taxonomy + coverage for the Ray executor: one actor, and the proxies workers hand to Pipeline.

The pipeline's select step (resolve each proposed category, skip full ones, reserve the chosen)
runs under a lock; here that lock is global (held in the actor), so selections on different
workers never interleave and `--per-category-target` holds across the cluster exactly as in the
local executor. Coverage counts kept samples once the driver has committed them; samples a worker
kept but the driver has not committed yet, and reservations of samples in flight, are held per
worker, so a worker that dies takes its uncommitted counts with it (its images are redone)."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from rmskit.executors.scratch import Scratch
from rmskit.ledger import Ledger
from rmskit.pipeline.taxonomy import Coverage, Taxonomy, make_embedder


class SharedState:
    """The actor body (wrapped with ray.remote by the driver). Async: calls interleave only at
    awaits, so each method is atomic except `acquire` (waits for the lock) and `resolve`."""

    def __init__(
        self,
        taxonomy_rows: list[dict[str, Any]],
        category_counts: dict[str, int],
        threshold: float,
        embedder: str,
        per_category_target: int | None,
    ) -> None:
        # Taxonomy persists through a Ledger; this private one is copied to the run's ledger by the
        # driver (taxonomy_rows), never opened by anyone else.
        self._scratch = Scratch("rmskit-state-")  # a killed run's is swept by the next one
        self._ledger = Ledger(self._scratch.path)
        for row in taxonomy_rows:
            self._ledger.add_category(row["name"], row.get("description"), row.get("embedding"))
            for alias in row.get("aliases", []):
                self._ledger.add_alias(row["name"], alias)
        self.taxonomy = Taxonomy(self._ledger, make_embedder(embedder), threshold)
        self.target = per_category_target
        self.committed: Counter[str] = Counter(category_counts)
        self.reserved: dict[str, Counter[str]] = {}
        self.pending: dict[str, Counter[str]] = {}  # kept by a worker, not yet committed
        self._lock = asyncio.Lock()
        self._holder: str | None = None

    def _loads(self) -> dict[str, int]:
        total = Counter(self.committed)
        for per in (*self.reserved.values(), *self.pending.values()):
            total.update(per)
        return dict(total)

    async def snapshot(self) -> dict[str, Any]:
        return {"names": self.taxonomy.names, "loads": self._loads()}

    async def acquire(self, worker: str) -> dict[str, Any]:
        await self._lock.acquire()
        self._holder = worker
        return await self.snapshot()

    async def release(self, worker: str, reserved: dict[str, int]) -> None:
        self.reserved.setdefault(worker, Counter()).update(reserved)
        if self._holder == worker and self._lock.locked():
            self._holder = None
            self._lock.release()

    async def resolve(self, proposed: str) -> tuple[str, list[str]]:
        canonical = await self.taxonomy.resolve(proposed)
        return canonical, self.taxonomy.names

    async def reserve(self, worker: str, category: str, delta: int) -> None:
        self.reserved.setdefault(worker, Counter())[category] += delta

    async def add(self, worker: str, category: str) -> None:
        self.pending.setdefault(worker, Counter())[category] += 1

    async def commit(self, worker: str, categories: list[str]) -> None:
        """The driver committed these kept risky samples of `worker` to the run's ledger."""
        for cat in categories:
            self.committed[cat] += 1
            self.pending.setdefault(worker, Counter())[cat] -= 1

    async def forget_worker(self, worker: str) -> None:
        """A worker died: drop its reservations and uncommitted counts, free the lock if it held it."""
        self.reserved.pop(worker, None)
        self.pending[worker] = Counter({c: n for c, n in self.pending.get(worker, {}).items() if n < 0})
        if self._holder == worker and self._lock.locked():
            self._holder = None
            self._lock.release()

    async def taxonomy_rows(self) -> list[dict[str, Any]]:
        return self._ledger.taxonomy()

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        """The run is over (the driver has copied the taxonomy): remove the private ledger's folder,
        which would otherwise outlive the actor in the node's temporary directory, one per run."""
        self._ledger.close()
        self._scratch.close()


class SharedTaxonomy:
    """What Pipeline calls on Taxonomy (`names`, `resolve`), answered by the shared actor."""

    def __init__(self, state: Any) -> None:
        self.state = state
        self._names: list[str] = []

    @property
    def names(self) -> list[str]:
        return list(self._names)

    def refresh(self, names: list[str]) -> None:
        self._names = list(names)

    async def resolve(self, proposed: str) -> str:
        canonical, names = await self.state.resolve.remote(proposed)
        self._names = names
        return canonical


class SharedCoverage(Coverage):
    """Coverage over a snapshot of the global loads (`counts`) plus this worker's changes since it
    (`reserved`); `load`, `is_full` and `steer` are inherited unchanged. Changes go to the actor:
    at once, or at the release of the select lock when made under it."""

    def __init__(self, state: Any, worker: str, per_category_target: int | None) -> None:  # noqa: D107
        self.state = state
        self.worker = worker
        self.target = per_category_target
        self.counts: dict[str, int] = {}
        self.reserved: dict[str, int] = {}
        self.in_lock = False
        self._lock_deltas: Counter[str] = Counter()

    def refresh(self, loads: dict[str, int]) -> None:
        self.counts = dict(loads)
        self.reserved = {}

    def take_lock_deltas(self) -> dict[str, int]:
        out, self._lock_deltas = dict(self._lock_deltas), Counter()
        return out

    def add(self, category: str) -> None:
        super().add(category)
        self.state.add.remote(self.worker, category)

    def reserve(self, category: str, delta: int) -> None:
        super().reserve(category, delta)
        if self.in_lock:
            self._lock_deltas[category] += delta
        else:
            self.state.reserve.remote(self.worker, category, delta)


class SharedSelectLock:
    """Replaces Pipeline's local select lock: held cluster-wide in the actor, and refreshes this
    worker's view of the taxonomy and loads when taken."""

    def __init__(self, state: Any, worker: str, taxonomy: SharedTaxonomy, coverage: SharedCoverage) -> None:
        self.state = state
        self.worker = worker
        self.taxonomy = taxonomy
        self.coverage = coverage
        self._local = asyncio.Lock()  # one select at a time inside this worker too

    async def __aenter__(self) -> SharedSelectLock:
        await self._local.acquire()
        try:
            snap = await self.state.acquire.remote(self.worker)
        except BaseException:
            self._local.release()
            raise
        self.taxonomy.refresh(snap["names"])
        self.coverage.refresh(snap["loads"])
        self.coverage.in_lock = True
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.coverage.in_lock = False
        try:
            await self.state.release.remote(self.worker, self.coverage.take_lock_deltas())
        finally:
            self._local.release()
