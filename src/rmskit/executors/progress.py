"""One progress view over all Ray workers: the local executor's stage table, summed over workers,
plus a per-worker line (images, requests, throughput, restarts)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Any

from rich.console import Group
from rich.table import Table

from rmskit.pipeline.progress import StageStats, Stats

# Counted by the driver (ingest), not by workers.
_DRIVER_FIELDS = {"images_total", "images_skipped", "rejected", "ingest_finished", "started", "stages"}


@dataclass
class ClusterStats(Stats):
    workers: dict[str, dict[str, Any]] = field(default_factory=dict)  # latest snapshot per worker
    retired: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # snapshots of dead ones

    def absorb(self, worker: str, snapshot: dict[str, Any]) -> None:
        self.workers[worker] = snapshot
        self._recompute()

    def retire(self, worker: str) -> None:
        """The worker died: its counts so far stay in the totals; the restarted one starts at 0."""
        snap = self.workers.pop(worker, None)
        if snap is not None:
            self.retired.setdefault(worker, []).append(snap)

    def _all(self) -> list[tuple[str, dict[str, Any]]]:
        out = [(w, s) for w, snaps in self.retired.items() for s in snaps]
        return out + list(self.workers.items())

    def _recompute(self) -> None:
        names = [f.name for f in fields(Stats) if f.name not in _DRIVER_FIELDS]
        for name in names:
            if isinstance(getattr(self, name), int | float) and not isinstance(getattr(self, name), bool):
                setattr(self, name, sum(s.get(name, 0) for _, s in self._all()))
        stages: dict[str, StageStats] = {}
        for _, snap in self._all():
            for stage, st in snap.get("stages", {}).items():
                agg = stages.setdefault(stage, StageStats())
                for k, v in st.items():
                    setattr(agg, k, getattr(agg, k, 0) + v)
        self.stages = stages

    def worker_rows(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        rows = []
        for w in sorted({*self.workers, *self.retired}):
            snaps = [*self.retired.get(w, []), *([self.workers[w]] if w in self.workers else [])]
            images = sum(s.get("images_done", 0) + s.get("images_failed", 0) for s in snaps)
            requests = sum(
                st.get("done", 0) + st.get("failed", 0) for s in snaps for st in s["stages"].values()
            )
            inflight = sum(st.get("inflight", 0) for st in self.workers.get(w, {}).get("stages", {}).values())
            elapsed = max(now - self.started, 1e-6)
            rows.append(
                {
                    "worker": w,
                    "images": images,
                    "requests": requests,
                    "in_flight": inflight,
                    "images_per_s": images / elapsed,
                    "requests_per_s": requests / elapsed,
                    "restarts": len(self.retired.get(w, [])),
                }
            )
        return rows

    def table(self) -> Group:  # type: ignore[override]
        per = Table(title="workers", expand=False)
        for col in ("worker", "images", "img/s", "requests", "req/s", "in flight", "restarts"):
            per.add_column(col, justify="left" if col == "worker" else "right")
        for r in self.worker_rows():
            per.add_row(
                r["worker"],
                str(r["images"]),
                f"{r['images_per_s']:.2f}",
                str(r["requests"]),
                f"{r['requests_per_s']:.1f}",
                str(r["in_flight"]),
                str(r["restarts"]),
            )
        return Group(super().table(), per)
