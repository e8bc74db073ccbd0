"""Exact behaviour of the client-side limits (rmskit.models.limits), pinned where `make mutate` found the
older tests loose: bucket boundaries and wait arithmetic on a fake clock, the limiter's order and
bookkeeping, Retry-After parsing and the backoff formula. Test names match the mutation group's
`-k "bucket or limiter or retry or concurrency"` selection."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from rmskit.models.limits import LimiterStats, RequestLimiter, RetryPolicy, TokenBucket, parse_retry_after


class FakeTime:
    """A clock and an asyncio.sleep that advances it, recording every sleep."""

    def __init__(self) -> None:
        self.t = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.t

    async def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.t += s


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    ft = FakeTime()
    monkeypatch.setattr("rmskit.models.limits.asyncio.sleep", ft.sleep)
    return ft


def test_token_bucket_rate_and_default_capacity() -> None:
    with pytest.raises(ValueError, match=r"^rate_per_minute must be > 0$"):
        TokenBucket(0)
    assert TokenBucket(0.5).rate_per_s == pytest.approx(0.5 / 60)
    assert TokenBucket(30).capacity == 1.0  # at least one unit
    assert TokenBucket(600).capacity == 10.0  # one second's worth
    tb = TokenBucket(600, capacity=3)
    assert tb.capacity == 3.0 and isinstance(tb.capacity, float) and tb.level == 3.0


def test_token_bucket_boundaries_on_a_fake_clock() -> None:
    clk = FakeTime()
    tb = TokenBucket(60, capacity=2, clock=clk)  # 1 token/s
    assert tb.try_acquire(2) and tb.level == 0.0  # exactly the level is enough
    clk.t += 0.5
    assert tb.level == pytest.approx(0.5) and not tb.try_acquire(1)
    clk.t += 0.5
    assert tb.try_acquire(1) and tb.level == pytest.approx(0.0)
    clk.t += 10  # refills stop at capacity
    assert tb.level == 2.0
    clk.t -= 5  # a clock going back never drains the bucket
    assert tb.level == 2.0
    tb.adjust(1.5)  # used more than estimated
    assert tb.level == pytest.approx(0.5)
    tb.adjust(-10)
    assert tb.level == 2.0


def test_token_bucket_acquire_waits_exactly_the_refill_time(fake: FakeTime) -> None:
    async def go() -> list[float]:
        tb = TokenBucket(120, capacity=2, clock=fake)  # 2 tokens/s
        waited = [await tb.acquire(2), await tb.acquire(1), await tb.acquire(5)]
        assert tb.level == pytest.approx(-3)  # a request larger than the bucket is admitted in debt
        waited.append(await tb.acquire(1))  # the debt is paid back first: 4 tokens = 2 s
        assert tb.waited_s == pytest.approx(sum(waited))
        return waited

    assert asyncio.run(go()) == [0.0, pytest.approx(0.5), pytest.approx(1.0), pytest.approx(2.0)]
    assert fake.sleeps == [pytest.approx(0.5), pytest.approx(1.0), pytest.approx(2.0)]

    async def default_amount() -> float:
        tb = TokenBucket(60, capacity=3, clock=fake)
        await tb.acquire()  # one token by default
        return tb.level

    assert asyncio.run(default_amount()) == 2.0


def test_token_bucket_try_acquire_does_not_jump_the_queue() -> None:
    async def go() -> tuple[bool, bool]:
        tb = TokenBucket(60, capacity=1)
        tb._lock = asyncio.Lock()
        await tb._lock.acquire()  # as while a waiter sleeps for its tokens
        jumped = tb.try_acquire(1)  # the bucket is full, but someone is queued
        tb._lock.release()
        return jumped, tb.try_acquire(1)

    assert asyncio.run(go()) == (False, True)


def test_request_limiter_order_and_bookkeeping(fake: FakeTime) -> None:
    with pytest.raises(ValueError, match=r"^concurrency must be >= 1$"):
        RequestLimiter(0)
    assert RequestLimiter(1).rpm is None and RequestLimiter(1).tpm is None

    async def go() -> RequestLimiter:
        lim = RequestLimiter(3, requests_per_minute=120, tokens_per_minute=600, clock=fake)
        assert lim.rpm is not None and lim.tpm is not None
        assert lim.rpm.capacity == 2.0 and lim.tpm.capacity == 10.0
        await lim.acquire(0)  # no estimate: the token bucket is not touched
        assert lim.tpm.level == 10.0 and lim.rpm.level == 1.0
        await lim.acquire(4)
        assert lim.tpm.level == 6.0 and lim.in_flight == 2 and lim.peak_in_flight == 2
        lim.release(4)  # no actual count: the estimate stands
        assert lim.tpm.level == 6.0 and lim.in_flight == 1
        await lim.acquire(4)  # rpm is empty: waits 0.5 s for a request token
        assert fake.sleeps == [pytest.approx(0.5)]
        lim.release(4, actual_tokens=1)
        lim.release(0, actual_tokens=50)  # no estimate was taken, so nothing to correct
        assert lim.in_flight == 0 and lim.peak_in_flight == 2
        return lim

    lim = asyncio.run(go())
    st = lim.stats()
    assert (st.in_flight, st.peak_in_flight, st.tpm_wait_s) == (0, 2, 0.0)
    assert st.rpm_wait_s == pytest.approx(0.5)
    assert RequestLimiter(2).stats() == LimiterStats()


def test_request_limiter_concurrency_slots_are_held_until_release() -> None:
    async def go() -> list[str]:
        lim = RequestLimiter(2)
        events: list[str] = []

        async def one(i: int) -> None:
            await lim.acquire()
            events.append(f"in{i}")
            await asyncio.sleep(0.01)
            events.append(f"out{i}")
            lim.release()

        await asyncio.gather(*(one(i) for i in range(4)))
        assert lim.peak_in_flight == 2
        return events

    events = asyncio.run(go())
    assert events[:2] == ["in0", "in1"] and events.index("in2") > events.index("out0")


def test_retry_after_parsing() -> None:
    assert parse_retry_after(None) is None and parse_retry_after({}) is None
    assert parse_retry_after({"retry-after-ms": "1500"}) == 1.5
    assert parse_retry_after({"Retry-After-Ms": "250", "retry-after": "9"}) == 0.25
    assert parse_retry_after({"retry-after-ms": "soon", "retry-after": "3"}) == 3.0  # bad ms: fall back
    assert parse_retry_after({"retry-after-ms": "-5"}) == 0.0
    assert parse_retry_after({"Retry-After": " 7 "}) == 7.0
    assert parse_retry_after({"retry-after": "-2"}) == 0.0
    assert parse_retry_after({"retry-after": ""}) is None
    assert parse_retry_after({"other": "1"}) is None
    when = datetime(2030, 1, 1, 12, 0, 30, tzinfo=UTC)
    now = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC).timestamp()
    assert parse_retry_after({"retry-after": format_datetime(when, usegmt=True)}, now=now) == 30.0
    assert parse_retry_after({"retry-after": format_datetime(when, usegmt=True)}, now=now + 60) == 0.0
    assert parse_retry_after({"retry-after": "Someday, never"}) is None
    past = parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"})  # real clock
    assert past == 0.0


class _Fixed(random.Random):
    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


def test_retry_policy_defaults_and_exact_delays() -> None:
    pol = RetryPolicy()
    assert (pol.max_retries, pol.base_s, pol.max_s, pol.max_retry_after_s) == (6, 0.5, 60.0, 600.0)
    for field in ("max_retries", "base_s", "max_s", "max_retry_after_s"):
        RetryPolicy(**{field: 0})  # zero is allowed
        with pytest.raises(ValueError):
            RetryPolicy(**{field: -1})
    one = _Fixed(1.0)
    half = _Fixed(0.5)
    assert [pol.delay(a, rng=one) for a in range(9)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    assert pol.delay(3, rng=half) == 2.0
    assert pol.delay(10_000, rng=one) == 60.0  # huge attempt numbers do not overflow
    # Retry-After: at least what the server asked, capped, plus jitter up to min(base, ceiling)
    assert pol.delay(0, retry_after=10.0, rng=one) == 10.5
    assert pol.delay(0, retry_after=10.0, rng=half) == 10.25
    assert pol.delay(4, retry_after=10_000.0, rng=one) == 600.5
    tiny = RetryPolicy(base_s=2.0, max_s=1.0)
    assert tiny.delay(0, retry_after=3.0, rng=one) == 4.0  # jitter bounded by the ceiling (1 s)
    assert tiny.delay(0, rng=one) == 1.0


def test_request_limiter_reports_token_waits(fake: FakeTime) -> None:
    async def go() -> RequestLimiter:
        lim = RequestLimiter(4, tokens_per_minute=600, clock=fake)  # 10 tokens/s, bucket of 10
        await lim.acquire(8)
        await lim.acquire(20)  # needs a full bucket: 8 tokens short = 0.8 s, then 20 taken
        lim.release(8)
        lim.release(20)
        return lim

    st = asyncio.run(go()).stats()
    assert st.tpm_wait_s == pytest.approx(0.8) and st.rpm_wait_s == 0.0 and st.in_flight == 0


def test_request_limiter_charges_only_positive_estimates(fake: FakeTime) -> None:
    async def go() -> tuple[float, float, float, int]:
        lim = RequestLimiter(4, tokens_per_minute=600, clock=fake)
        assert lim.tpm is not None
        await lim.acquire()  # no estimate by default: nothing charged
        full = lim.tpm.level
        await lim.acquire(1)  # one token is charged
        one = lim.tpm.level
        lim.tpm.adjust(20)  # in debt now
        await lim.acquire(0)  # a request with no estimate does not wait for the debt
        return full, one, lim.tpm.level, lim.stats().in_flight

    assert asyncio.run(go()) == (10.0, 9.0, -11.0, 3)
    assert fake.sleeps == []


def test_request_limiter_corrects_only_what_was_charged(fake: FakeTime) -> None:
    async def go() -> list[float]:
        lim = RequestLimiter(4, tokens_per_minute=600, clock=fake)
        assert lim.tpm is not None
        levels = []
        await lim.acquire()
        lim.release(actual_tokens=5)  # nothing was charged (no estimate): nothing to correct
        levels.append(lim.tpm.level)
        await lim.acquire(0)
        lim.release(0, actual_tokens=5)
        levels.append(lim.tpm.level)
        await lim.acquire(1)
        lim.release(1, actual_tokens=5)  # one charged, five used: four more
        levels.append(lim.tpm.level)
        return levels

    assert asyncio.run(go()) == [10.0, 10.0, 5.0]


def test_limiter_priority_slots_serve_the_lowest_priority_first_and_survive_cancellation() -> None:
    """Queued requests get free slots lowest priority value first (FIFO within one value); a waiter
    cancelled in the queue is skipped, and one cancelled right after being handed a slot passes it on."""
    from rmskit.models.limits import PrioritySlots

    async def go() -> list[str]:
        slots = PrioritySlots(1)
        order: list[str] = []
        await slots.acquire()  # the only slot is taken

        async def want(name: str, prio: int) -> None:
            await slots.acquire(prio)
            order.append(name)
            slots.release()

        tasks = [
            asyncio.create_task(want(n, p))
            for n, p in [("late-a", 5), ("early", 0), ("late-b", 5), ("gone", 1)]
        ]
        await asyncio.sleep(0)
        tasks[3].cancel()  # cancelled while queued: skipped
        await asyncio.sleep(0)
        slots.release()
        await asyncio.gather(*tasks, return_exceptions=True)
        # handed a slot and cancelled before it ran: the slot is not lost
        await slots.acquire()
        t = asyncio.create_task(slots.acquire(0))
        await asyncio.sleep(0)
        slots.release()  # hands the slot to t...
        t.cancel()  # ...which is cancelled before it resumes
        await asyncio.gather(t, return_exceptions=True)
        await asyncio.wait_for(slots.acquire(), 1.0)  # still acquirable
        return order

    assert asyncio.run(go()) == ["early", "late-a", "late-b"]


def test_limiter_priority_slots_default_priority_is_zero_fifo() -> None:
    """A default acquire queues at priority 0: FIFO with explicit 0s, ahead of any 1."""
    from rmskit.models.limits import PrioritySlots

    async def go() -> list[str]:
        slots = PrioritySlots(1)
        await slots.acquire()
        order: list[str] = []

        async def want(name: str, prio: int | None) -> None:
            await (slots.acquire() if prio is None else slots.acquire(prio))
            order.append(name)
            slots.release()

        tasks = []
        for name, prio in [("default", None), ("zero", 0), ("one", 1)]:
            tasks.append(asyncio.create_task(want(name, prio)))
            await asyncio.sleep(0)  # queue them in this order
        slots.release()
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(go()) == ["default", "zero", "one"]


def test_limiter_priority_slots_count_exactly_and_a_cancelled_waiter_frees_nothing() -> None:
    """n slots: n acquires pass at once, the next waits; releases give back exactly one slot each; a
    waiter cancelled in the queue gives back nothing (it held no slot)."""
    from rmskit.models.limits import PrioritySlots

    async def passes(slots: PrioritySlots) -> bool:
        try:
            await asyncio.wait_for(slots.acquire(), 0.05)
        except TimeoutError:
            return False
        return True

    async def go() -> list[bool]:
        slots = PrioritySlots(3)
        got = [await passes(slots) for _ in range(4)]  # three pass, the fourth waits
        for _ in range(3):
            slots.release()
        got += [await passes(slots) for _ in range(4)]  # all three came back, no more
        slots.release()
        got.append(await passes(slots))  # one release: one slot
        got.append(await passes(slots))
        queued = asyncio.create_task(slots.acquire())
        await asyncio.sleep(0)
        queued.cancel()  # cancelled while queued: it held no slot, so none is freed
        await asyncio.gather(queued, return_exceptions=True)
        got.append(await passes(slots))
        return got

    assert asyncio.run(go()) == [True, True, True, False, True, True, True, False, True, False, False]


def test_request_limiter_queues_by_the_request_priority_of_the_task() -> None:
    """RequestLimiter hands queued slots by the calling task's `request_priority`, not FIFO."""
    from rmskit.models.limits import request_priority

    async def go() -> list[int]:
        lim = RequestLimiter(1)
        await lim.acquire()
        order: list[int] = []

        async def want(prio: int) -> None:
            request_priority.set(prio)
            await lim.acquire()
            order.append(prio)
            lim.release()

        tasks = []
        for prio in (3, 1, 2, 0):
            tasks.append(asyncio.create_task(want(prio)))
            await asyncio.sleep(0)
        lim.release()
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(go()) == [0, 1, 2, 3]
