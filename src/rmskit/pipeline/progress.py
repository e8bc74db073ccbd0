"""Live build progress: per-stage done / failed / in flight / cached / tokens, with rich."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from rich.console import Console
from rich.live import Live
from rich.table import Table

from rmskit.pipeline.registry import STAGES

ORDER = tuple(STAGES)  # pipeline order, from the stage registry


@dataclass
class StageStats:
    done: int = 0
    failed: int = 0
    inflight: int = 0
    cached: int = 0
    tokens: int = 0


@dataclass
class Stats:
    """Counters updated on the event loop (no locks needed: single thread)."""

    stages: dict[str, StageStats] = field(default_factory=dict)
    images_total: int = 0
    images_done: int = 0
    images_failed: int = 0
    images_pending: int = 0
    images_skipped: int = 0
    rejected: int = 0
    samples_ok: int = 0
    samples_failed: int = 0
    started: float = field(default_factory=time.monotonic)
    ingest_finished: bool = False

    def _s(self, stage: str) -> StageStats:
        st = self.stages.get(stage)
        if st is None:
            st = self.stages[stage] = StageStats()
        return st

    def start(self, stage: str) -> None:
        self._s(stage).inflight += 1

    def finish(self, stage: str, *, ok: bool, tokens: int = 0) -> None:
        st = self._s(stage)
        st.inflight -= 1
        st.tokens += tokens
        if ok:
            st.done += 1
        else:
            st.failed += 1

    def cached(self, stage: str) -> None:
        self._s(stage).cached += 1

    def eta_s(self) -> float | None:
        finished = self.images_done + self.images_failed + self.images_pending
        if not self.ingest_finished or finished == 0:
            return None
        rate = finished / max(time.monotonic() - self.started, 1e-6)
        return max(self.images_total - self.images_skipped - finished, 0) / rate

    def table(self) -> Table:
        elapsed = time.monotonic() - self.started
        eta = self.eta_s()
        title = (
            f"images {self.images_done + self.images_failed + self.images_pending}/{self.images_total}"
            f"{'' if self.ingest_finished else '+'} (failed {self.images_failed}, "
            f"left for a re-run {self.images_pending}, refused {self.rejected})"
            f"  samples kept {self.samples_ok}, failed {self.samples_failed}"
            f"  elapsed {elapsed:,.0f}s" + (f"  ETA {eta:,.0f}s" if eta is not None else "")
        )
        table = Table(title=title, expand=False)
        for col in ("stage", "done", "failed", "in flight", "cached", "tokens"):
            table.add_column(col, justify="right" if col != "stage" else "left")
        names = [s for s in ORDER if s in self.stages] + sorted(set(self.stages) - set(ORDER))
        for name in names:
            st = self.stages[name]
            table.add_row(
                name, str(st.done), str(st.failed), str(st.inflight), str(st.cached), f"{st.tokens:,}"
            )
        return table


class ProgressView:
    """Context manager showing Stats live on stderr (no-op when quiet)."""

    def __init__(self, stats: Stats, *, quiet: bool) -> None:
        self.stats = stats
        self.quiet = quiet
        self._live: Live | None = None

    def __enter__(self) -> ProgressView:
        if not self.quiet:
            self._live = Live(
                get_renderable=self.stats.table,
                console=Console(stderr=True),
                refresh_per_second=4,
                transient=False,
            )
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)
