"""Several endpoints behind one backend (issue 12 §1): balancing, ejection and readmission with
in-flight work moved, per-endpoint counts, mixed capabilities refused."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from rmskit.config import BackendConfig
from rmskit.models import load_backend
from rmskit.models.base import Message
from rmskit.models.pool import EndpointPool
from rmskit.testing.openai_server import OpenAITestServer


def pool_cfg(urls: list[str], **kw: Any) -> BackendConfig:
    base: dict[str, Any] = {
        "spec": "openai:test-model",
        "base_url": urls,
        "concurrency": 2,
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.05,
        "timeout_s": 5.0,
        "max_retries": 2,
        "outage_window_s": 30,
        "vision": False,
        "structured": "prompt",
    }
    return BackendConfig(**{**base, **kw})


def test_one_url_in_a_list_is_one_endpoint_and_several_make_a_pool() -> None:
    assert BackendConfig(spec="openai:m", base_url=["http://a/v1"]).base_url == "http://a/v1"
    pool = load_backend(pool_cfg(["http://127.0.0.1:9/v1", "http://127.0.0.1:10/v1"]))
    assert isinstance(pool, EndpointPool) and len(pool.members) == 2
    asyncio.run(pool.aclose())


def test_killed_endpoint_is_ejected_work_moves_and_it_is_readmitted_after_restart() -> None:
    servers = [OpenAITestServer(latency=0.05, seed=i).start() for i in range(3)]
    port = servers[1].port
    old = servers[1]
    msgs = [Message(role="user", content="hello")]

    class Store(dict):
        def get_meta(self, k: str, d: Any = None) -> Any:
            return self.get(k, d)

        def set_meta(self, k: str, v: Any) -> None:
            self[k] = v

    store = Store()

    async def go() -> tuple[EndpointPool, int]:
        pool = EndpointPool(pool_cfg([s.base_url for s in servers]))
        await pool.start(store)
        done = 0

        async def one() -> None:
            nonlocal done
            assert (await pool.generate(msgs)).text
            done += 1

        first = [asyncio.ensure_future(one()) for _ in range(60)]
        while done < 15:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(old.stop)  # killed mid-run, with requests in flight
        await asyncio.gather(*first)
        servers[1] = OpenAITestServer(port=port, latency=0.05).start()  # restarted on the same port
        extra = 0
        while not pool.members[1].stats.admitted and extra < 400:
            await one()
            extra += 1
        await asyncio.gather(*[one() for _ in range(30)])
        await pool.aclose()
        return pool, 60 + extra + 30

    try:
        pool, total = asyncio.run(go())
    finally:
        for s in servers:
            s.stop()
    st = {s.url: s for s in pool.endpoint_stats()}
    killed = st[pool.members[1].stats.url]
    assert sum(s.requests for s in st.values()) == total  # every call answered exactly once
    assert killed.ejections >= 1 and killed.readmissions >= 1 and killed.admitted
    assert servers[1].stats().delivered > 0  # the restarted endpoint took work again
    for i in (0, 2):  # the healthy endpoints: our counts agree with what each server delivered
        assert st[pool.members[i].stats.url].requests == servers[i].stats().delivered > 0
    assert killed.requests <= old.stats().delivered + servers[1].stats().delivered
    assert [e["requests"] for e in store["endpoints:openai:test-model"]] == [s.requests for s in st.values()]


def test_mixed_capabilities_are_refused_at_start() -> None:
    with OpenAITestServer(personality="vllm") as a, OpenAITestServer(personality="llama-server") as b:

        async def go() -> None:
            pool = EndpointPool(pool_cfg([a.base_url, b.base_url], vision=None, structured="auto"))
            try:
                await pool.start()
            finally:
                await pool.aclose()

        with pytest.raises(ValueError, match="differ in capabilities"):
            asyncio.run(go())


def test_a_request_cancelled_while_it_waits_for_an_endpoint_stays_cancelled() -> None:
    """Every endpoint out; the request waits for one to come back. Its cancel (a Ctrl-C, a stage
    dropped) arriving in the tick an endpoint is readmitted ends it: on Python 3.11 asyncio.wait_for
    swallowed that cancel and the cancelled request went on to the readmitted endpoint."""
    pool = EndpointPool(pool_cfg(["http://127.0.0.1:9/v1", "http://127.0.0.1:10/v1"]))
    for m in pool.members:  # out, and their health checks are already "running"
        m.stats.admitted, m.checking, m.retry_at = False, True, float("inf")

    async def go() -> asyncio.Task[Any]:
        task = asyncio.ensure_future(pool._pick(set()))
        await asyncio.sleep(0)  # now waiting for a change
        pool.members[0].stats.admitted = True
        pool._changed.set()
        task.cancel()  # same tick as the readmission
        await asyncio.wait({task}, timeout=10)
        task.cancel()
        await pool.aclose()
        return task

    task = asyncio.run(go())
    assert task.cancelled()
