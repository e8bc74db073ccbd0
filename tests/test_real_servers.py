"""The OpenAI backend against the test server made to behave like real servers (issue 8): the
capability probe, format refusals by content, connection refused, auth, body cap, lenient caps,
tokens-per-minute over real HTTP, and a real build per server personality."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, Field

from rmskit.config import BackendConfig
from rmskit.models.base import AuthenticationError, BackendError, ErrorKind, GenParams, Message
from rmskit.models.openai_compat import OpenAIBackend
from rmskit.testing.openai_server import OpenAITestServer, make_default_responder
from rmskit.testing.rms_script import responder as scripted

_schema_valid = make_default_responder(0)


def rms_responder(body: dict[str, Any]) -> Any:
    """rmskit's scripted stage answers; other requests (the probe's) get what a grammar-constrained
    model gives: schema-valid JSON for the requested schema."""
    out = scripted(body)
    return _schema_valid(body) if out == "{}" else out


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


class Cat(BaseModel):
    category: str = Field(max_length=12)
    tags: list[str] = Field(max_length=2)


def cfg(url: str, **kw: Any) -> BackendConfig:
    base: dict[str, Any] = {
        "spec": "openai:test-model",
        "base_url": url,
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.05,
        "timeout_s": 5.0,
        "max_retries": 3,
    }
    return BackendConfig(**{**base, **kw})


async def _started(c: BackendConfig, store: Any = None) -> OpenAIBackend:
    b = OpenAIBackend(c)
    try:
        await b.start(store)
    except BaseException:
        await b.aclose()  # as the build does: the probe's requests may have opened connections
        raise
    return b


EXPECTED = {  # personality -> (vision, structured mode, full constraints)
    "llama-cpp-python": (False, "json_object_schema", False),
    "llama-server": (False, "json_schema", True),
    "vllm": (True, "json_schema", True),
    "openai-strict": (True, "json_schema", False),
}


@pytest.mark.parametrize("personality", list(EXPECTED))
def test_probe_finds_what_each_server_really_supports(personality: str) -> None:
    with OpenAITestServer(personality=personality, keep_bodies=True) as srv:

        async def go() -> tuple[Any, Any]:
            b = await _started(cfg(srv.base_url))
            res = await b.generate([Message(role="user", content="x")], schema=Cat)
            await b.aclose()
            return b.probe_result, res

        probe, res = asyncio.run(go())
        assert (probe.vision, probe.structured_mode, probe.full_constraints) == EXPECTED[personality]
        assert probe.models == ["test-model"]
        Cat.model_validate(res.parsed)
        last = srv.chat_records()[-1].body
        assert last is not None
        mode = EXPECTED[personality][1]
        rf = last.get("response_format") or {}
        assert (rf.get("type"), "schema" in rf) == {
            "json_schema": ("json_schema", False),
            "json_object_schema": ("json_object", True),
        }[mode]
        if EXPECTED[personality][2]:  # full constraints reach servers that accept them
            assert rf["json_schema"]["schema"]["properties"]["category"]["maxLength"] == 12
        if personality == "llama-cpp-python":
            assert "silently dropped" in probe.vision_how


def test_the_probe_costs_one_latency_when_the_server_is_up() -> None:
    """The text baseline, the image request and the first structured-output request are in flight
    together (they used to cost two latencies: baseline first): 0.3 s each, the whole probe well
    under two of them, and the answers still tell vision and the best mode apart."""
    with OpenAITestServer(personality="vllm", keep_bodies=True, latency=0.3) as srv:

        async def go() -> Any:
            b = await _started(cfg(srv.base_url))
            await b.aclose()
            return b.probe_result

        probe = asyncio.run(go())
        assert (probe.vision, probe.structured_mode, probe.full_constraints) == (True, "json_schema", True)
        recs = srv.chat_records()
        base = next(r for r in recs if "image_url" not in json.dumps(r.body) and not r.response_format)
        image = next(r for r in recs if "image_url" in json.dumps(r.body))
        structured = next(r for r in recs if r.response_format)
        assert len(recs) == 3
        latest_start = max(base.t_start, image.t_start, structured.t_start)
        assert latest_start < min(base.t_end, image.t_end, structured.t_end)  # all three at once


def test_the_models_list_is_asked_beside_the_probe_requests() -> None:
    """GET /models is a round trip of its own on a remote server: it goes out with the probe's three
    requests, not before them."""
    with OpenAITestServer(personality="vllm", keep_bodies=True, latency=0.3, models_latency=0.3) as srv:

        async def go() -> Any:
            b = await _started(cfg(srv.base_url))
            await b.aclose()
            return b.probe_result

        probe = asyncio.run(go())
        assert probe.models == ["test-model"] and probe.structured_mode == "json_schema"
        (m_start, m_end), recs = srv.models_spans[0], srv.chat_records()
        assert len(srv.models_spans) == 1 and len(recs) == 3
        assert max(r.t_start for r in recs) < m_end and m_start < min(r.t_end for r in recs)


def test_a_server_still_starting_is_waited_for_then_probed_in_full() -> None:
    """The early image and structured requests meet a refused connection; they are redone once the
    baseline (which waits out the outage) got through, so the late server's vision and json_schema
    support are found, not read as "image refused" and "prompt mode"."""
    port = _free_port()
    srv = OpenAITestServer(port=port, personality="vllm", keep_bodies=True)
    timer = threading.Timer(1.0, srv.start)
    timer.start()
    try:
        c = cfg(f"http://127.0.0.1:{port}/v1", outage_window_s=30, max_retries=0)

        async def go() -> Any:
            b = await _started(c)
            await b.aclose()
            return b.probe_result

        probe = asyncio.run(go())
        assert (probe.vision, probe.structured_mode, probe.full_constraints) == (True, "json_schema", True)
        assert "prompt tokens" in probe.vision_how
    finally:
        timer.cancel()
        srv.stop()


def test_forced_overrides_skip_the_probe_steps_and_probe_is_cached_in_the_store() -> None:
    class Store(dict):
        def get_meta(self, k: str, default: Any = None) -> Any:
            return self.get(k, default)

        def set_meta(self, k: str, v: Any) -> None:
            self[k] = v

    store = Store()
    with OpenAITestServer(personality="vllm", keep_bodies=True) as srv:
        c = cfg(srv.base_url, vision=False, structured="prompt")
        probe = asyncio.run(_started(c, store)).probe_result
        assert (probe.vision, probe.vision_how, probe.structured_mode) == (False, "forced", "prompt")
        sent = srv.chat_records()
        assert not any("image_url" in json.dumps(r.body) for r in sent)  # no vision request
        assert not any(r.response_format for r in sent)  # no format requests
        n = len(sent)
        again = asyncio.run(_started(c, store)).probe_result  # a fresh backend, same run
        assert again == probe and len(srv.chat_records()) == n and len(store) == 1


def test_500_format_refusal_steps_down_without_burning_retries() -> None:
    with OpenAITestServer(personality="llama-cpp-python") as srv:
        res, b = asyncio.run(_gen(cfg(srv.base_url), Cat))
        assert [r.status for r in srv.chat_records()] == [500, 200]
        assert b.stats.retries == 0 and b.stats.structured_mode == "json_object_schema"
        Cat.model_validate(res.parsed)


async def _gen(c: BackendConfig, schema: type[BaseModel] | None = None) -> tuple[Any, OpenAIBackend]:
    b = OpenAIBackend(c)
    try:
        return await b.generate([Message(role="user", content="x")], schema=schema), b
    finally:
        await b.aclose()


def test_over_long_answer_under_strict_schema_is_truncated_and_reported() -> None:
    answer = {"category": "c" * 61, "tags": ["a", "b", "c"]}
    with OpenAITestServer(personality="openai-strict", responder=lambda body: answer) as srv:
        res, _ = asyncio.run(_gen(cfg(srv.base_url), Cat))
        assert res.parsed == {"category": "c" * 12, "tags": ["a", "b"]}
        assert res.adjustments == ["category: truncated 61 -> 12 chars", "tags: truncated to 2 items"]
        assert len(srv.chat_records()) == 1  # no re-ask for a cap


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_connection_refused_is_reported_as_such_and_transient() -> None:
    url = f"http://127.0.0.1:{_free_port()}/v1"
    with pytest.raises(BackendError) as ei:
        asyncio.run(_gen(cfg(url, outage_window_s=0.3, max_retries=0)))
    err = ei.value
    assert err.kind == ErrorKind.connection and err.transient
    assert "connection refused by http://127.0.0.1" in str(err) and "timeout" not in str(err)


def test_connection_refused_waits_out_an_outage_beyond_max_retries() -> None:
    port = _free_port()
    srv = OpenAITestServer(port=port)
    timer = threading.Timer(1.0, srv.start)  # the server comes up 1 s after the first attempt
    timer.start()
    try:
        res, b = asyncio.run(_gen(cfg(f"http://127.0.0.1:{port}/v1", outage_window_s=30, max_retries=0)))
        assert res.text and b.stats.refused_connections >= 2 and b.stats.retries == 0
        assert len(srv.chat_records()) == 1
    finally:
        timer.cancel()
        srv.stop()


def test_401_raises_authentication_error_without_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RMSKIT_T_KEY", "sk-wrong-0123456789abcdef")
    with OpenAITestServer(auth_token="right") as srv:
        with pytest.raises(AuthenticationError) as ei:
            asyncio.run(_started(cfg(srv.base_url, api_key_env="RMSKIT_T_KEY")))
        msg = str(ei.value)
        assert msg.startswith("auth: authentication failed at http://127.0.0.1") and "0123456789" not in msg
        # stopped at the probe: /models and its three requests go out together, all refused
        recs = srv.chat_records()
        assert len(recs) <= 3 and all(r.fault == "unauthorized" for r in recs)


def test_oversized_body_is_a_per_request_too_large_error() -> None:
    with OpenAITestServer(max_body_repeat=40) as srv:
        with pytest.raises(BackendError) as ei:
            asyncio.run(_gen(cfg(srv.base_url, max_response_bytes=4096)))
        assert ei.value.kind == ErrorKind.too_large and not ei.value.transient
        assert len(srv.chat_records()) == 1
    with OpenAITestServer(max_body_repeat=2) as srv:  # under the cap: fine
        res, _ = asyncio.run(_gen(cfg(srv.base_url, max_response_bytes=1 << 20)))
        assert res.text


def test_tokens_per_minute_spaces_requests_at_the_server() -> None:
    """8 concurrent requests, tiny token budget: the token bucket (capacity = one second of tokens)
    must hold arrival n-1 back until the tokens of the earlier n-1 requests, minus the bucket's
    capacity, have been refilled. The bound follows from the limit, not from wall-clock luck."""
    rate_per_min = 6000.0  # 100 tokens/s, capacity 100
    with OpenAITestServer(responder=lambda body: "ok") as srv:

        async def go() -> None:
            b = OpenAIBackend(cfg(srv.base_url, concurrency=8, tokens_per_minute=rate_per_min))
            msgs = [Message(role="user", content="y" * 200)]
            await asyncio.gather(*[b.generate(msgs, params=GenParams(max_tokens=60)) for _ in range(8)])
            await b.aclose()

        asyncio.run(go())
        recs = sorted(srv.chat_records(), key=lambda r: r.t_start)
        st = srv.stats()
        per_request = (st.prompt_tokens + st.completion_tokens) / len(recs)  # all requests are equal
        bound = (per_request * (len(recs) - 1) - 100) / (rate_per_min / 60)
        assert bound > 1.0  # the test means something
        assert recs[-1].t_start - recs[0].t_start >= bound - 0.05


# ------------------------------------------------------------------ builds per personality


def _examples(tmp: Path) -> Path:
    from rmskit.ingest.bundled import materialize_real_photos

    ex = tmp / "ex"
    ex.mkdir()
    (ex / "annotations.json").write_bytes((EXAMPLES / "annotations.json").read_bytes())
    materialize_real_photos(ex / "photos")
    return ex / "annotations.json"


def _build(src: Path, out: Path, url: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "rmskit.cli", "build", str(src), "--out", str(out), "--model",
           "openai:test-model", "--base-url", url, "--concurrency", "4", "--limit", "3",
           "--embedder", "hashing", *extra]  # fmt: skip
    env = {**os.environ, "OPENAI_API_KEY": "sk-test-build-key-000000"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.slow
@pytest.mark.parametrize("personality", list(EXPECTED))
def test_build_against_each_real_server_personality_keeps_samples(tmp_path: Path, personality: str) -> None:
    src = _examples(tmp_path)
    with OpenAITestServer(responder=rms_responder, personality=personality, keep_bodies=True) as srv:
        t0 = time.monotonic()
        proc = _build(src, tmp_path / "run", srv.base_url, "--perceive", "annotations")
        assert proc.returncode == 0, proc.stderr[-2000:]
        records = srv.chat_records()
    vision, mode, _ = EXPECTED[personality]
    line = next(x for x in proc.stderr.splitlines() if x.startswith("probe "))
    assert f"structured {mode} " in line and f"vision {'yes' if vision else 'no'} " in line
    samples = (tmp_path / "run" / "dataset" / "samples.jsonl").read_text().splitlines()
    assert samples, f"no samples kept against {personality} ({time.monotonic() - t0:.1f}s)"
    db = sqlite3.connect(tmp_path / "run" / "rms.sqlite")
    (meta,) = [json.loads(v) for k, v in db.execute("SELECT key, value FROM meta") if k.startswith("probe:")]
    assert meta["structured_mode"] == mode and meta["vision"] is vision
    probe_requests = sum(1 for r in records if "main colour" in json.dumps(r.body))
    work = [
        r
        for r in records
        if "main colour" not in json.dumps(r.body) and "ripe tomato" not in json.dumps(r.body)
    ]
    assert probe_requests >= 1 and work and all(r.status == 200 for r in work)
    if not vision:  # text-only end to end: no stage sent image bytes
        assert not any("image_url" in json.dumps(r.body) for r in work)


def test_build_with_every_request_401_stops_at_once(tmp_path: Path) -> None:
    src = _examples(tmp_path)
    with OpenAITestServer(responder=rms_responder, auth_token="the-right-key") as srv:
        proc = _build(src, tmp_path / "run", srv.base_url)
        recs = srv.chat_records()  # only the probe's requests, all refused
        assert len(recs) <= 3 and all(r.fault == "unauthorized" for r in recs)
    assert proc.returncode == 2
    assert "authentication failed at http://127.0.0.1" in proc.stderr and "sk-test-build" not in proc.stderr
    assert "Traceback" not in proc.stderr


def test_dry_run_shows_the_probe_result(tmp_path: Path) -> None:
    src = _examples(tmp_path)
    with OpenAITestServer(responder=rms_responder, personality="llama-cpp-python") as srv:
        proc = _build(src, tmp_path / "run", srv.base_url, "--dry-run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "vision no" in proc.stderr and "structured json_object_schema" in proc.stderr


@pytest.mark.slow
def test_server_killed_mid_build_and_restarted_loses_nothing(tmp_path: Path) -> None:
    """Connection refused is waited out (outage window), so a restart costs no image."""
    src = _examples(tmp_path)
    srv = OpenAITestServer(responder=rms_responder, latency=0.05).start()
    port, holder = srv.port, [srv]

    def kill_and_restart() -> None:
        while len(srv.chat_records()) < 25:
            time.sleep(0.02)
        srv.stop()
        time.sleep(3.0)
        holder.append(OpenAITestServer(responder=rms_responder, latency=0.05, port=port).start())

    t = threading.Thread(target=kill_and_restart)
    t.start()
    try:
        # One retry only: without the outage window a 3 s outage would exhaust it and fail images.
        (tmp_path / "c.yaml").write_text("model:\n  max_retries: 1\n  backoff_max_s: 0.2\n")
        proc = _build(
            src,
            tmp_path / "run",
            srv.base_url,
            "--perceive",
            "annotations",
            "--no-vision",
            "-c",
            str(tmp_path / "c.yaml"),
        )
        t.join(30)
    finally:
        for s in holder:
            s.stop()
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(holder) == 2 and holder[1].stats().delivered > 0  # the outage really happened mid-run
    status = json.loads(
        subprocess.check_output(
            [sys.executable, "-m", "rmskit.cli", "status", str(tmp_path / "run"), "--json"]
        )
    )
    assert status["images"]["failed"] == 0 and status["images"]["done"] == 3
    failures = (
        sqlite3.connect(tmp_path / "run" / "rms.sqlite").execute("SELECT COUNT(*) FROM failures").fetchone()
    )
    assert failures == (0,)
