"""Many endpoints behind one backend (`--base-url` repeated): least-outstanding-requests balancing,
per-endpoint concurrency and rate limits (each endpoint gets the config's own), ejection of an
endpoint that refuses connections or times out repeatedly, readmission after a health check with
backoff, and in-flight work moved to the others. Each endpoint is probed; mixed capabilities are
refused at start.

Members run with no outage window of their own (a refused connection fails over at once); the pool
waits up to the config's outage window only when every endpoint is out.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from pydantic import BaseModel

from rmskit.config import BackendConfig
from rmskit.models.base import BackendError, ErrorKind, GenParams, Message, Result
from rmskit.models.openai_compat import OpenAIBackend

_FAILOVER_KINDS = frozenset({ErrorKind.connection, ErrorKind.timeout})
EJECT_AFTER = 2  # consecutive transport failures before an endpoint is taken out


class EndpointStats(BaseModel):
    url: str
    requests: int = 0  # generate() calls answered by this endpoint
    failures: int = 0  # generate() calls that failed here (moved elsewhere when transient)
    ejections: int = 0
    readmissions: int = 0
    outstanding: int = 0
    admitted: bool = True


class _Member:
    def __init__(self, backend: OpenAIBackend, url: str | None) -> None:
        self.backend = backend
        self.stats = EndpointStats(url=backend.where)
        self.url = url
        self.streak = 0
        self.retry_at = 0.0
        self.backoff = 0.5
        self.checking = False


class EndpointPool:
    """ModelBackend over several OpenAI-compatible endpoints serving the same model."""

    def __init__(self, cfg: BackendConfig) -> None:
        urls = cfg.base_url if isinstance(cfg.base_url, list) else [cfg.base_url or ""]
        self.cfg = cfg
        self.model_id = cfg.spec
        self.members = [
            _Member(OpenAIBackend(cfg.model_copy(update={"base_url": u, "outage_window_s": 0.0})), u)
            for u in urls
        ]
        self.capabilities = self.members[0].backend.capabilities
        self._store: Any = None
        self._changed = asyncio.Event()
        self._checks: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"EndpointPool({self.cfg.spec!r}, {[m.stats.url for m in self.members]})"

    def endpoint_stats(self) -> list[EndpointStats]:
        return [m.stats.model_copy() for m in self.members]

    async def start(self, store: Any = None, *, echo: Any = None) -> list[Any]:
        """Probe every endpoint; refuse a pool whose endpoints differ in vision or structured mode."""
        self._store = store
        results = [await m.backend.start(store, echo=echo) for m in self.members]
        seen = {(r.vision, r.structured_mode) for r in results}
        if len(seen) > 1:
            parts = "; ".join(f"{r.endpoint}: vision {r.vision}, {r.structured_mode}" for r in results)
            raise ValueError(
                f"endpoints differ in capabilities ({parts}); give endpoints serving the same model"
            )
        self.capabilities = self.members[0].backend.capabilities
        return results

    async def aclose(self) -> None:
        for task in list(self._checks):
            task.cancel()
        if self._store is not None:
            self._store.set_meta(
                f"endpoints:{self.cfg.spec}", [s.model_dump() for s in self.endpoint_stats()]
            )
        for m in self.members:
            await m.backend.aclose()

    # ------------------------------------------------------------ membership
    def _eject(self, m: _Member) -> None:
        if m.stats.admitted:
            m.stats.admitted = False
            m.stats.ejections += 1
            m.retry_at = time.monotonic() + m.backoff

    async def _check(self, m: _Member) -> None:
        """Health check of an ejected endpoint (GET /models); readmit or back off further."""
        m.checking = True
        try:
            await asyncio.wait_for(m.backend.list_models(), timeout=min(self.cfg.timeout_s, 10.0))
        except (BackendError, TimeoutError):
            m.backoff = min(m.backoff * 2, 10.0)
            m.retry_at = time.monotonic() + m.backoff
        else:
            m.stats.admitted, m.streak, m.backoff = True, 0, 0.5
            m.stats.readmissions += 1
            self._changed.set()
        finally:
            m.checking = False

    async def _pick(self, avoid: set[int]) -> _Member:
        deadline = time.monotonic() + self.cfg.outage_window_s
        while True:
            now = time.monotonic()
            for m in self.members:
                if not m.stats.admitted and not m.checking and now >= m.retry_at:
                    m.checking = True  # set before the task runs: one health check at a time
                    task = asyncio.ensure_future(self._check(m))
                    self._checks.add(task)
                    task.add_done_callback(self._checks.discard)
            live = [m for i, m in enumerate(self.members) if m.stats.admitted and i not in avoid]
            if not live:
                live = [m for m in self.members if m.stats.admitted]
            if live:
                return min(live, key=lambda m: m.stats.outstanding)
            if now >= deadline:
                raise BackendError(
                    ErrorKind.connection,
                    f"every endpoint is out ({', '.join(m.stats.url for m in self.members)}) "
                    f"for the outage window of {self.cfg.outage_window_s:g}s",
                    retriable=True,
                )
            self._changed.clear()
            nxt = min(m.retry_at for m in self.members)
            with_timeout = max(0.05, min(nxt - now, deadline - now, 1.0))
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancel that arrives
            # with the event already set, and the cancelled request would go out anyway.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(with_timeout):
                    await self._changed.wait()

    # ------------------------------------------------------------ requests
    async def generate(
        self,
        messages: list[Message],
        *,
        schema: type[BaseModel] | None = None,
        params: GenParams | None = None,
    ) -> Result:
        avoid: set[int] = set()
        while True:
            m = await self._pick(avoid)
            idx = self.members.index(m)
            m.stats.outstanding += 1
            try:
                res = await m.backend.generate(messages, schema=schema, params=params)
            except BackendError as e:
                m.stats.failures += 1
                if e.kind not in _FAILOVER_KINDS:
                    raise
                m.streak += 1
                if m.streak >= EJECT_AFTER or "refused" in str(e):
                    self._eject(m)
                avoid.add(idx)  # move this request to another endpoint
                continue
            finally:
                m.stats.outstanding -= 1
            m.streak = 0
            m.stats.requests += 1
            return res


def openai_backend(cfg: BackendConfig) -> Any:
    """The `openai` kind's factory: one endpoint, or a pool when several base URLs are given."""
    if isinstance(cfg.base_url, list) and len(cfg.base_url) > 1:
        return EndpointPool(cfg)
    return OpenAIBackend(cfg)
