"""Client-side limits shared by remote backends: bounded concurrency, requests- and tokens-per-minute
token buckets, and the retry/backoff policy (full jitter, Retry-After honoured).

Everything here is on the per-request hot path, so it is plain asyncio with no per-call allocation
beyond what a semaphore/lock needs; pydantic appears only in the (rarely built) policy object."""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import itertools
import random
import time
from collections.abc import Callable, Mapping
from email.utils import parsedate_to_datetime

from pydantic import BaseModel, Field

_ROUNDING = 1e-9  # tokens: far below any real amount, far above float error at realistic rates


class TokenBucket:
    """A token bucket refilled at `rate_per_minute`, holding at most `capacity` tokens.

    `acquire(n)` waits until the bucket holds `min(n, capacity)` tokens and then takes `n` (the level
    may go negative: a request larger than the bucket is admitted when the bucket is full and its
    excess is paid back before anyone else proceeds). `adjust(delta)` corrects an estimate after the
    fact (positive: more was used; negative: refund). Waiters are served FIFO: the lock is held while
    sleeping, so one large request cannot be starved by a stream of small ones."""

    __slots__ = ("rate_per_s", "capacity", "_level", "_stamp", "_lock", "_clock", "waited_s")

    def __init__(
        self,
        rate_per_minute: float,
        *,
        capacity: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_per_minute <= 0:
            raise ValueError("rate_per_minute must be > 0")
        self.rate_per_s = rate_per_minute / 60.0
        # Default burst: one second's worth (at least one unit), which spaces requests evenly instead
        # of firing a whole minute's budget at once and meeting a server-side sliding window.
        self.capacity = float(capacity) if capacity is not None else max(1.0, self.rate_per_s)
        self._level = self.capacity
        self._clock = clock
        self._stamp = clock()
        self._lock: asyncio.Lock | None = None
        self.waited_s = 0.0

    @property
    def level(self) -> float:
        self._refill()
        return self._level

    def _refill(self) -> None:
        now = self._clock()
        elapsed = now - self._stamp
        if elapsed > 0:
            self._level = min(self.capacity, self._level + elapsed * self.rate_per_s)
            self._stamp = now

    def try_acquire(self, amount: float = 1.0) -> bool:
        """Take `amount` now if possible (no waiting, no queue jumping)."""
        if self._lock is not None and self._lock.locked():
            return False
        self._refill()
        if self._level >= min(amount, self.capacity):
            self._level -= amount
            return True
        return False

    async def acquire(self, amount: float = 1.0) -> float:
        """Wait for and take `amount` tokens; returns the seconds waited."""
        if self.try_acquire(amount):
            return 0.0
        if self._lock is None:
            self._lock = asyncio.Lock()
        t0 = self._clock()
        async with self._lock:
            need = min(amount, self.capacity)
            while True:
                self._refill()
                # the refill after sleeping the computed time can land a rounding error short of `need`
                # (clock differences are inexact); without the tolerance the loop re-sleeps femtoseconds,
                # spinning until a coarse clock ticks (or forever on a clock that stands still)
                if self._level >= need - _ROUNDING:
                    break
                await asyncio.sleep((need - self._level) / self.rate_per_s)
            self._level -= amount
        waited = self._clock() - t0
        self.waited_s += waited
        return waited

    def adjust(self, delta: float) -> None:
        """Correct a previous estimate: `delta` > 0 takes more, < 0 gives back (capped at capacity)."""
        self._refill()
        self._level = min(self.capacity, self._level - delta)


class LimiterStats(BaseModel):
    in_flight: int = 0
    peak_in_flight: int = 0
    rpm_wait_s: float = 0.0
    tpm_wait_s: float = 0.0


# The priority of the requests the current task sends (lower first). A build sets each stage's rank
# (perceive 0 ... check_response last): when requests queue for slots, the youngest images' early
# stages go first, so the images admitted last do not wait behind everyone's late stages and the run's
# tail (the last chains, with free slots) is as short as one chain.
request_priority: contextvars.ContextVar[int] = contextvars.ContextVar("rmskit_request_priority", default=0)


class PrioritySlots:
    """`n` slots handed out lowest `priority` first, first come first served within one priority."""

    def __init__(self, n: int) -> None:
        self._free = n
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    async def acquire(self, priority: int = 0) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (priority, next(self._seq), fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # handed a slot, then cancelled: pass it on
                self.release()
            else:
                fut.cancel()  # skipped by release()
            raise

    def release(self) -> None:
        while self._waiters:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_result(None)
                return
        self._free += 1


class RequestLimiter:
    """Concurrency slot + rpm + tpm, acquired in that order (a request holding no slot must not drain
    the rate buckets, or requests would burst when slots free up). Use:

        await lim.acquire(estimated_tokens)
        try: ... finally: lim.release(estimated_tokens, actual_tokens)
    """

    __slots__ = ("concurrency", "_sem", "rpm", "tpm", "in_flight", "peak_in_flight")

    def __init__(
        self,
        concurrency: int,
        *,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self.concurrency = concurrency
        self._sem: PrioritySlots | None = None  # created lazily inside the running loop
        self.rpm = TokenBucket(requests_per_minute, clock=clock) if requests_per_minute else None
        self.tpm = TokenBucket(tokens_per_minute, clock=clock) if tokens_per_minute else None
        self.in_flight = 0
        self.peak_in_flight = 0

    async def acquire(self, estimated_tokens: float = 0.0) -> None:
        if self._sem is None:
            self._sem = PrioritySlots(self.concurrency)
        await self._sem.acquire(request_priority.get())
        try:
            if self.rpm is not None:
                await self.rpm.acquire(1.0)
            if self.tpm is not None and estimated_tokens > 0:
                await self.tpm.acquire(estimated_tokens)
        except BaseException:
            self._sem.release()
            raise
        self.in_flight += 1
        if self.in_flight > self.peak_in_flight:
            self.peak_in_flight = self.in_flight

    def release(self, estimated_tokens: float = 0.0, actual_tokens: float | None = None) -> None:
        """Free the slot; when the real token usage is known, correct the tpm estimate with it."""
        self.in_flight -= 1
        assert self._sem is not None
        self._sem.release()
        if self.tpm is not None and actual_tokens is not None and estimated_tokens > 0:
            self.tpm.adjust(actual_tokens - estimated_tokens)

    def stats(self) -> LimiterStats:
        return LimiterStats(
            in_flight=self.in_flight,
            peak_in_flight=self.peak_in_flight,
            rpm_wait_s=self.rpm.waited_s if self.rpm else 0.0,
            tpm_wait_s=self.tpm.waited_s if self.tpm else 0.0,
        )


def parse_retry_after(headers: Mapping[str, str] | None, *, now: float | None = None) -> float | None:
    """Seconds to wait as the server asked: `retry-after-ms`, else `Retry-After` as seconds or an HTTP
    date. None when absent or unparseable; never negative."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms") or headers.get("Retry-After-Ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    ra = headers.get("retry-after") or headers.get("Retry-After")
    if not ra:
        return None
    ra = ra.strip()
    try:
        return max(0.0, float(ra))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(ra)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class RetryPolicy(BaseModel):
    """Exponential backoff with full jitter (delay ~ U(0, min(max_s, base_s * 2**attempt))); when the
    server sent Retry-After, wait at least that long (plus a little jitter so a crowd told the same
    instant does not return at once), capped at `max_retry_after_s`."""

    max_retries: int = Field(default=6, ge=0)
    base_s: float = Field(default=0.5, ge=0)
    max_s: float = Field(default=60.0, ge=0)
    max_retry_after_s: float = Field(default=600.0, ge=0)

    def delay(
        self, attempt: int, retry_after: float | None = None, rng: random.Random | None = None
    ) -> float:
        """Delay before retry number `attempt + 1` (attempt counts from 0)."""
        rnd = (rng or random).random()
        ceiling = min(self.max_s, self.base_s * (2.0 ** min(attempt, 62)))
        if retry_after is not None:
            return min(retry_after, self.max_retry_after_s) + rnd * min(self.base_s, ceiling)
        return rnd * ceiling
