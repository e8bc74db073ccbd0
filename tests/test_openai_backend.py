"""The `openai:` backend over real HTTP against rmskit.testing.openai_server, plus the limits and
structured-output helpers it is built from."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import time
from collections.abc import Coroutine
from email.utils import formatdate
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from PIL import Image
from pydantic import BaseModel, Field

from rmskit.config import BackendConfig
from rmskit.models import images, openai_compat
from rmskit.models.base import BackendError, ErrorKind, GenParams, ImageInput, Message
from rmskit.models.limits import RequestLimiter, RetryPolicy, TokenBucket, parse_retry_after, request_priority
from rmskit.models.openai_compat import OpenAIBackend
from rmskit.models.structured import (
    extract_json,
    json_instruction,
    parse_structured,
    response_format_for,
    schema_for,
)
from rmskit.pipeline.registry import STAGES
from rmskit.pipeline.schemas import ComposedQuery, Perception, discovery_schema
from rmskit.testing.openai_server import OpenAITestServer, Reply, instance_from_schema

STAGE_SCHEMAS = {n: s.schema for n, s in STAGES.items()} | {"discover_n": discovery_schema(2)}
T = TypeVar("T")
try:
    import aiohttp  # noqa: F401

    HAVE_AIOHTTP = True
except ImportError:  # the SDK then uses its default httpx transport
    HAVE_AIOHTTP = False
TRANSPORTS = [
    pytest.param("aiohttp", marks=pytest.mark.skipif(not HAVE_AIOHTTP, reason="aiohttp not installed")),
    "httpx",
]


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def cfg(srv: OpenAITestServer, **kw: Any) -> BackendConfig:
    base: dict[str, Any] = {
        "spec": "openai:test-model",
        "base_url": srv.base_url,
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.05,
        "timeout_s": 5.0,
        "max_retries": 4,
    }
    base.update(kw)
    return BackendConfig(**base)


def user(text: str, **kw: Any) -> list[Message]:
    return [
        Message(role="system", content="You are a careful assistant."),
        Message(role="user", content=text, **kw),
    ]


async def gen_once(c: BackendConfig, msgs: list[Message], schema: type[BaseModel] | None = None, **kw: Any):
    b = OpenAIBackend(c, **kw)
    try:
        return await b.generate(msgs, schema=schema), b
    finally:
        await b.aclose()


# ------------------------------------------------------------------ structured output


def test_response_format_structured_output_validates() -> None:
    with OpenAITestServer(keep_bodies=True) as srv:
        res, b = run(gen_once(cfg(srv), user("describe the scene"), Perception))
        assert res.parsed is not None
        Perception.model_validate(res.parsed)
        assert res.finish_reason == "stop" and res.attempts == 1
        assert res.usage.prompt_tokens > 0 and res.usage.completion_tokens > 0
        assert b.stats.structured_mode == "json_schema"
        (rec,) = srv.chat_records()
        rf = rec.body["response_format"]
        assert rf["type"] == "json_schema" and rf["json_schema"]["name"] == "Perception"
        assert rf["json_schema"]["strict"] is True
        sch = rf["json_schema"]["schema"]
        assert sch["additionalProperties"] is False and set(sch["required"]) == set(sch["properties"])
        assert rec.body["model"] == "test-model" and rec.body["max_tokens"] == 1024


def test_fallback_to_json_in_prompt_with_repair() -> None:
    def responder(body: dict[str, Any]) -> str:
        assert "response_format" not in body
        # Prose, a code fence, single quotes and a trailing comma: all repaired on our side.
        return (
            "Sure, here it is:\n```json\n{'query': 'How long can I leave this?', 'why_safe_alone': 'a',\n"
            " 'why_risky_with_image': 'b',}\n```\nHope that helps."
        )

    with OpenAITestServer(responder=responder, refuse_response_format=True) as srv:

        async def go() -> tuple[list[Any], OpenAIBackend]:
            b = OpenAIBackend(cfg(srv))
            out = [await b.generate(user(f"q{i}"), schema=ComposedQuery) for i in range(3)]
            await b.aclose()
            return out, b

        results, b = run(go())
        for r in results:
            assert r.parsed == {
                "query": "How long can I leave this?",
                "why_safe_alone": "a",
                "why_risky_with_image": "b",
            }
        recs = srv.chat_records()
        # One refusal per mode down the ladder (json_schema, json_object+schema, json_object), no
        # retries spent on them; then every request (this and later calls) goes JSON-in-prompt.
        assert [r.status for r in recs] == [400, 400, 400, 200, 200, 200]
        assert [r.response_format for r in recs] == [True, True, True, False, False, False]
        assert b.stats.structured_mode == "prompt" and b.stats.retries == 0
        assert results[0].attempts == 4 and results[1].attempts == 1


def test_fallback_default_responder_reads_schema_from_prompt() -> None:
    with OpenAITestServer(refuse_response_format=True, keep_bodies=True) as srv:
        res, _ = run(gen_once(cfg(srv), user("x"), Perception))
        Perception.model_validate(res.parsed)
        sys_msg = srv.chat_records()[-1].body["messages"][0]
        assert sys_msg["role"] == "system" and json_instruction(Perception) in sys_msg["content"]


def test_reask_quotes_validation_error_and_is_bounded() -> None:
    seen: list[str] = []

    def responder(body: dict[str, Any]) -> str:
        seen.append(body["messages"][-1]["content"])
        if len(seen) == 1:
            return '{"query": "ok"}'  # schema-invalid: two fields missing
        return json.dumps({"query": "ok", "why_safe_alone": "a", "why_risky_with_image": "b"})

    with OpenAITestServer(responder=responder, refuse_response_format=True) as srv:
        res, b = run(gen_once(cfg(srv), user("x"), ComposedQuery))
        assert res.parsed is not None and b.stats.reasks == 1
        assert "why_safe_alone" in seen[1] and "Field required" in seen[1]
        assert res.attempts == 5  # 3 refusals (one per mode), invalid answer, corrected answer
        assert res.usage.completion_tokens > 0

    with OpenAITestServer(responder=lambda body: '{"query": 1}', refuse_response_format=True) as srv:
        with pytest.raises(BackendError) as ei:
            run(gen_once(cfg(srv, max_reasks=2), user("x"), ComposedQuery))
        assert ei.value.kind == ErrorKind.parse and "ComposedQuery" in str(ei.value)
        assert len(srv.chat_records()) == 3 + 3  # 3 refusals + first try + 2 re-asks


def test_reask_also_in_native_mode_after_malformed_content() -> None:
    with OpenAITestServer(script=["malformed"]) as srv:
        res, b = run(gen_once(cfg(srv), user("x"), ComposedQuery))
        ComposedQuery.model_validate(res.parsed)
        assert b.stats.reasks == 1 and b.stats.retries == 0
        assert [r.response_format for r in srv.chat_records()] == [True, True]


def test_length_truncated_json_is_a_parse_error() -> None:
    def responder(body: dict[str, Any]) -> Reply:
        return Reply(content='{"query": "this answer was cut', finish_reason="length")

    with OpenAITestServer(responder=responder) as srv:
        with pytest.raises(BackendError) as ei:
            run(gen_once(cfg(srv, max_reasks=1), user("x"), ComposedQuery))
        assert ei.value.kind == ErrorKind.parse and "length" in str(ei.value)
        assert len(srv.chat_records()) == 2


def test_structured_json_schema_only_mode_does_not_fall_back() -> None:
    with OpenAITestServer(refuse_response_format=True) as srv:
        with pytest.raises(BackendError) as ei:
            run(gen_once(cfg(srv, structured="json_schema"), user("x"), ComposedQuery))
        assert ei.value.kind == ErrorKind.bad_request and "response_format" in str(ei.value)
        assert len(srv.chat_records()) == 1


def test_plain_400_on_first_use_does_not_stick_to_prompt_mode() -> None:
    with OpenAITestServer(script=["bad_request", "bad_request"]) as srv:

        async def go() -> tuple[OpenAIBackend, Any]:
            b = OpenAIBackend(cfg(srv))
            with pytest.raises(BackendError) as ei:
                await b.generate(user("x"), schema=ComposedQuery)
            mode_after_failure = b.stats.structured_mode
            ok = await b.generate(user("y"), schema=ComposedQuery)
            await b.aclose()
            return b, (ei.value, mode_after_failure, ok)

        b, (err, mode, ok) = run(go())
        assert err.kind == ErrorKind.bad_request and mode == "json_schema"
        assert [r.response_format for r in srv.chat_records()] == [True, False, True]
        assert ok.parsed is not None


# ------------------------------------------------------------------ retries and faults


def test_429_retry_after_is_honoured() -> None:
    with OpenAITestServer(script=["rate_limit"], retry_after=0.6) as srv:
        res, b = run(gen_once(cfg(srv), user("x"), ComposedQuery))
        r1, r2 = srv.chat_records()
        assert r1.status == 429 and r2.status == 200
        assert r2.t_start - r1.t_end >= 0.6  # lower bound only: the wait was at least Retry-After
        assert res.attempts == 2 and b.stats.rate_limited == 1 and b.stats.retries == 1


def test_retry_after_ms_is_honoured() -> None:
    with OpenAITestServer(script=["rate_limit"], retry_after=None, retry_after_ms=400) as srv:
        run(gen_once(cfg(srv), user("x")))
        r1, r2 = srv.chat_records()
        assert r2.t_start - r1.t_end >= 0.4


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_5xx_then_success(transport: str) -> None:
    with OpenAITestServer(script=["server_error", "unavailable"]) as srv:
        res, b = run(gen_once(cfg(srv), user("x"), ComposedQuery, transport=transport))
        assert res.parsed is not None and res.attempts == 3
        assert b.stats.errors == {"server": 2} and b.stats.requests == 3


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_stall_times_out_and_is_retried(transport: str) -> None:
    with OpenAITestServer(script=["stall"], stall_s=5.0) as srv:
        res, b = run(gen_once(cfg(srv, timeout_s=0.5), user("x"), ComposedQuery, transport=transport))
        assert res.parsed is not None and res.attempts == 2
        assert b.stats.errors == {"timeout": 1}


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_truncated_body_dropped_connection_and_bad_body_are_retried(transport: str) -> None:
    with OpenAITestServer(script=["truncated", "drop", "bad_body"]) as srv:
        res, b = run(gen_once(cfg(srv), user("x"), ComposedQuery, transport=transport))
        assert res.parsed is not None and res.attempts == 4
        assert b.stats.errors == {"connection": 2, "server": 1}
        recs = srv.chat_records()
        assert [r.delivered for r in recs] == [False, False, False, True]
        assert len({r.messages_hash for r in recs}) == 1  # the same request, re-sent until answered


def test_persistent_failure_raises_clear_backend_error() -> None:
    with OpenAITestServer(fault_rate=1.0, fault_kinds=["server_error"]) as srv:
        with pytest.raises(BackendError) as ei:
            run(gen_once(cfg(srv, max_retries=2), user("x"), ComposedQuery))
        err = ei.value
        assert err.kind == ErrorKind.server and err.retriable
        msg = str(err)
        assert "HTTP 500" in msg and "after 3 attempts" in msg and srv.base_url.rsplit("/", 1)[0] in msg
        assert len(srv.chat_records()) == 3


def test_persistent_drops_give_connection_error() -> None:
    with OpenAITestServer(fault_rate=1.0, fault_kinds=["drop"]) as srv:
        with pytest.raises(BackendError) as ei:
            run(gen_once(cfg(srv, max_retries=1), user("x")))
        assert ei.value.kind == ErrorKind.connection and "after 2 attempts" in str(ei.value)


def test_4xx_is_not_retried() -> None:
    with OpenAITestServer(script=["bad_request"]) as srv:
        with pytest.raises(BackendError) as ei:
            run(gen_once(cfg(srv), user("x")))  # no schema: a plain 400
        assert ei.value.kind == ErrorKind.bad_request and not ei.value.retriable
        assert len(srv.chat_records()) == 1


def test_ten_percent_faults_over_100_requests_all_complete() -> None:
    with OpenAITestServer(fault_rate=0.1, retry_after=0.05, latency=0.005, seed=7) as srv:

        async def go() -> tuple[list[Any], OpenAIBackend]:
            b = OpenAIBackend(cfg(srv, concurrency=8, max_retries=8))
            out = await asyncio.gather(
                *[b.generate(user(f"item {i}"), schema=ComposedQuery) for i in range(100)]
            )
            await b.aclose()
            return out, b

        results, b = run(go())
        assert all(r.parsed is not None for r in results)
        st = srv.stats()
        assert sum(st.faults.values()) >= 3 and b.stats.succeeded == 100 and b.stats.failed == 0
        # No request whose full answer was delivered and used was ever sent again.
        recs = srv.chat_records()
        for i, r in enumerate(recs):
            if r.delivered and r.status == 200 and r.fault != "malformed":
                assert all(later.messages_hash != r.messages_hash for later in recs[i + 1 :])


def test_switches_to_max_completion_tokens_when_told() -> None:
    msg = "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens'."
    with OpenAITestServer(
        fault_fn=lambda body, i: "bad_request" if "max_tokens" in body else None,
        fault_messages={"bad_request": msg},
        keep_bodies=True,
    ) as srv:

        async def go() -> None:
            b = OpenAIBackend(cfg(srv))
            await asyncio.gather(*[b.generate(user(f"{i}"), schema=ComposedQuery) for i in range(3)])
            await b.generate(user("later"), schema=ComposedQuery)
            assert b.stats.structured_mode == "json_schema"  # not mistaken for a response_format refusal
            await b.aclose()

        run(go())
        recs = srv.chat_records()
        assert [r.status for r in recs].count(400) <= 3 and "max_tokens" not in recs[-1].body
        assert recs[-1].body["max_completion_tokens"] == 1024 and recs[-1].response_format


# ------------------------------------------------------------------ keys


SECRET = "sk-test-0123456789abcdefSECRET"


def test_key_reaches_server_but_never_errors_repr_or_stats(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RMSKIT_TEST_KEY", SECRET)
    with OpenAITestServer(script=[None, "unauthorized", "server_error", "server_error"]) as srv:

        async def go() -> tuple[OpenAIBackend, list[BackendError]]:
            b = OpenAIBackend(cfg(srv, api_key_env="RMSKIT_TEST_KEY", max_retries=1))
            await b.generate(user("x"))
            errs = []
            for _ in range(2):
                try:
                    await b.generate(user("y"))
                except BackendError as e:
                    errs.append(e)
            await b.aclose()
            return b, errs

        b, errs = run(go())
        assert srv.chat_records()[0].authorization == f"Bearer {SECRET}"
        assert [e.kind for e in errs] == [ErrorKind.auth, ErrorKind.server]
        # 401 stops with a message naming the endpoint, never the key (the server echoed it).
        assert "authentication failed at http://127.0.0.1" in str(errs[0])
        for text in [
            *(str(e) for e in errs),
            *(repr(e) for e in errs),
            repr(b),
            b.stats.model_dump_json(),
            b.cfg.model_dump_json(),
            str(b.limiter.stats()),
        ]:
            assert SECRET not in text and "0123456789abcdef" not in text


def test_no_key_with_local_base_url_just_works(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with OpenAITestServer() as srv:
        res, b = run(gen_once(cfg(srv), user("x")))
        assert res.text and b.capabilities.local and b.capabilities.vision
        assert srv.chat_records()[0].authorization == "Bearer EMPTY"


def test_no_key_and_no_base_url_fails_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(BackendError) as ei:
        OpenAIBackend(BackendConfig(spec="openai:gpt-4o"))
    assert ei.value.kind == ErrorKind.auth and "OPENAI_API_KEY" in str(ei.value)


# ------------------------------------------------------------------ images


def _decode_data_url(url: str) -> Image.Image:
    head, b64 = url.split(",", 1)
    assert head == "data:image/jpeg;base64"
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_images_sent_as_resized_jpeg_data_urls(
    tmp_path: Path, real_photos: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = {}
    for name in ("astronaut", "china"):  # 512x512 and 427x640 (landscape)
        p = tmp_path / f"{name}.png"
        Image.fromarray(real_photos[name]).save(p)
        paths[name] = p
    images._IMAGE_CACHE.clear()
    calls: list[Path] = []
    real_encode = images.encode_image_data_url

    def counting(path: Path, max_side: int, quality: int = 90, **kw: Any) -> str:
        calls.append(path)
        return real_encode(path, max_side, quality, **kw)

    monkeypatch.setattr(images, "encode_image_data_url", counting)
    imgs = [ImageInput(sha256=f"{n:0<64}"[:64], path=p) for n, p in paths.items()]
    with OpenAITestServer(keep_bodies=True) as srv:

        async def go() -> None:
            b = OpenAIBackend(cfg(srv, image_max_side=128))
            # Several requests for the same images at once: each image is encoded exactly once.
            await asyncio.gather(*[b.generate(user(f"what is here {i}", images=imgs)) for i in range(4)])
            await b.aclose()

        run(go())
        assert sorted(calls) == sorted(paths.values())
        for rec in srv.chat_records():
            parts = rec.body["messages"][1]["content"]
            assert [p["type"] for p in parts] == ["image_url", "image_url", "text"]
            a, c = (_decode_data_url(p["image_url"]["url"]) for p in parts[:2])
            assert a.format == "JPEG" and a.size == (128, 128)
            assert max(c.size) == 128 and c.size[0] > c.size[1]  # aspect kept (640x427 -> 128x85)
            assert abs(c.size[0] / c.size[1] - 640 / 427) < 0.05


def _sent_image_bytes(srv: OpenAITestServer, path: Path, max_side: int) -> bytes:
    """The bytes of the image part one real request carried for the file at `path`."""
    images._IMAGE_CACHE.clear()
    run(
        gen_once(
            cfg(srv, image_max_side=max_side),
            user("x", images=[ImageInput(sha256=path.stem.ljust(64, "0")[:64], path=path)]),
        )
    )
    url = srv.chat_records()[-1].body["messages"][1]["content"][0]["image_url"]["url"]
    head, b64 = url.split(",", 1)
    assert head == "data:image/jpeg;base64"
    return base64.b64decode(b64)


def test_a_clean_small_jpeg_is_sent_as_its_own_bytes_and_others_are_reencoded(
    tmp_path: Path, real_photos: dict[str, np.ndarray]
) -> None:
    """Ingest's normalised copies (RGB JPEG, no EXIF) within image_max_side skip the decode and
    re-encode: the server gets the file byte for byte. EXIF (orientation, GPS), a larger side, a
    non-RGB mode or a bloated file still go through the re-encode, which strips metadata."""
    photo = Image.fromarray(real_photos["astronaut"]).convert("RGB")  # 512 x 512
    clean = tmp_path / "clean.jpg"
    photo.save(clean, quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    exif[0x010F] = "SecretCam"  # any EXIF at all may carry GPS: never sent as is
    wide = photo.resize((512, 256))
    tagged = tmp_path / "tagged.jpg"
    wide.save(tagged, quality=90, exif=exif.tobytes())
    grey = tmp_path / "grey.jpg"
    photo.convert("L").save(grey, quality=90)
    bloated = tmp_path / "bloated.jpg"
    photo.resize((64, 64)).save(bloated, quality=90, comment=b"x" * 60000)
    with OpenAITestServer(keep_bodies=True) as srv:
        assert _sent_image_bytes(srv, clean, 512) == clean.read_bytes()
        smaller = Image.open(io.BytesIO(_sent_image_bytes(srv, clean, 256)))
        assert smaller.size == (256, 256)
        sent = _sent_image_bytes(srv, tagged, 512)
        assert sent != tagged.read_bytes()
        rotated = Image.open(io.BytesIO(sent))
        assert rotated.size == (256, 512) and not rotated.getexif()  # orientation applied, EXIF gone
        g = Image.open(io.BytesIO(_sent_image_bytes(srv, grey, 512)))
        assert g.mode == "RGB" and g.size == (512, 512)
        b = _sent_image_bytes(srv, bloated, 512)
        assert len(b) < 20000 and b"x" * 1000 not in b


def test_unreadable_image_is_an_image_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"<html>not an image</html>")
    with OpenAITestServer() as srv:
        with pytest.raises(BackendError) as ei:
            run(gen_once(cfg(srv), user("x", images=[ImageInput(sha256="f" * 64, path=bad)])))
        assert ei.value.kind == ErrorKind.image and not srv.chat_records()


# ------------------------------------------------------------------ limits over HTTP


def test_concurrency_limit_is_respected() -> None:
    with OpenAITestServer(latency=0.1) as srv:

        async def go() -> OpenAIBackend:
            b = OpenAIBackend(cfg(srv, concurrency=3))
            await asyncio.gather(*[b.generate(user(f"{i}")) for i in range(12)])
            await b.aclose()
            return b

        b = run(go())
        assert srv.stats().max_concurrent <= 3
        assert b.limiter.peak_in_flight == 3


def test_calls_waiting_for_a_slot_hold_no_built_request(tmp_path: Path) -> None:
    """40 calls gathered at once with concurrency 3: at most 2 x 3 of them have read and encoded their
    image at any moment (10k gathered calls once held 10k encoded images, 516 MB); the rest wait first,
    lowest request_priority first."""
    photo = tmp_path / "p.jpg"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(photo, quality=90)
    with OpenAITestServer(latency=0.05) as srv:

        async def go() -> tuple[int, list[int]]:
            b = OpenAIBackend(cfg(srv, concurrency=3))
            real = b._render
            built, peak, order = 0, 0, []

            async def render(messages):
                nonlocal built, peak
                built += 1
                peak = max(peak, built)
                order.append(int(messages[-1].content))
                return await real(messages)

            async def call(i: int) -> None:
                nonlocal built
                request_priority.set(1 if i < 30 else 0)  # the last ten were asked later but rank first
                img = ImageInput(sha256=f"{i:064x}", path=photo)
                try:
                    await b.generate(user(f"{i}", images=[img]))
                finally:
                    built -= 1

            b._render = render  # type: ignore[method-assign]
            await asyncio.gather(*[call(i) for i in range(40)])
            await b.aclose()
            return peak, order

        peak, order = run(go())
        assert peak == 6
        assert sorted(order) == list(range(40))
        # the first six went straight in; of the 34 that waited, the ten with priority 0 went first
        assert sorted(order[6:16]) == list(range(30, 40))


def test_rpm_limiter_spaces_requests() -> None:
    with OpenAITestServer() as srv:
        n, rpm = 14, 600.0  # 10/s, burst 10: the last 4 must wait for refills

        async def go() -> float:
            b = OpenAIBackend(cfg(srv, concurrency=16, requests_per_minute=rpm))
            t0 = time.monotonic()
            await asyncio.gather(*[b.generate(user(f"{i}")) for i in range(n)])
            await b.aclose()
            return t0

        t0 = run(go())
        starts = sorted(r.t_start for r in srv.chat_records())
        assert len(starts) == n
        assert starts[-1] - t0 >= (n - 10) / (rpm / 60) * 0.95  # at least the refill time for 4 tokens


def test_tpm_limiter_admits_large_estimates_and_records_usage() -> None:
    with OpenAITestServer() as srv:

        async def go() -> OpenAIBackend:
            # Estimates (~max_tokens=1200 each) exceed the bucket (1000): admitted one at a time, in debt.
            b = OpenAIBackend(cfg(srv, tokens_per_minute=60_000, params=GenParams(max_tokens=1200)))
            assert b.limiter.tpm is not None and b.limiter.tpm.capacity == 1000
            await asyncio.gather(*[b.generate(user(f"{i}")) for i in range(2)])
            await b.aclose()
            return b

        b = run(go())
        assert b.stats.succeeded == 2 and b.stats.prompt_tokens > 0 and b.stats.completion_tokens > 0


# ------------------------------------------------------------------ limits (unit)


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_token_bucket_refill_debt_and_adjust() -> None:
    clk = FakeClock()
    tb = TokenBucket(60, capacity=2, clock=clk)  # 1/s
    assert tb.try_acquire() and tb.try_acquire() and not tb.try_acquire()
    clk.t = 1.0
    assert tb.try_acquire() and not tb.try_acquire()
    clk.t = 3.0
    assert tb.try_acquire(5)  # larger than capacity: admitted when full, level goes negative
    assert tb.level == pytest.approx(-3)
    tb.adjust(-10)  # refund, capped at capacity
    assert tb.level == pytest.approx(2)


def test_token_bucket_waits_fifo() -> None:
    async def go() -> list[int]:
        tb = TokenBucket(1200, capacity=1)  # 20/s
        order: list[int] = []

        async def one(i: int, amount: float) -> None:
            await tb.acquire(amount)
            order.append(i)

        await asyncio.gather(one(0, 1), one(1, 1), one(2, 1), one(3, 1))
        return order

    assert run(go()) == [0, 1, 2, 3]


def test_request_limiter_corrects_token_estimates() -> None:
    clk = FakeClock()

    async def go() -> list[float]:
        lim = RequestLimiter(2, tokens_per_minute=6000, clock=clk)  # 100 tokens/s, bucket of 100
        assert lim.tpm is not None
        levels = []
        await lim.acquire(80)
        levels.append(lim.tpm.level)
        lim.release(80, actual_tokens=30)  # used less than estimated: 50 back
        levels.append(lim.tpm.level)
        await lim.acquire(50)
        lim.release(50, actual_tokens=90)  # used more: 40 more taken
        levels.append(lim.tpm.level)
        return levels

    assert run(go()) == [pytest.approx(20), pytest.approx(70), pytest.approx(-20)]


def test_request_limiter_releases_slot_on_cancel() -> None:
    async def go() -> int:
        lim = RequestLimiter(1, requests_per_minute=60)  # burst 1, then 1/s
        await lim.acquire()
        lim.release()
        waiter = asyncio.ensure_future(lim.acquire())
        await asyncio.sleep(0.05)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        return lim.in_flight

    assert run(go()) == 0


def test_retry_policy_full_jitter_and_retry_after() -> None:
    pol = RetryPolicy(max_retries=5, base_s=0.5, max_s=4.0)
    rng = random.Random(0)
    for attempt in range(8):
        d = [pol.delay(attempt, rng=rng) for _ in range(200)]
        cap = min(4.0, 0.5 * 2**attempt)
        assert 0 <= min(d) and max(d) <= cap and max(d) > cap * 0.8
    assert all(3.0 <= pol.delay(0, 3.0, rng=rng) <= 3.5 for _ in range(50))
    assert RetryPolicy(max_retry_after_s=10).delay(0, 999, rng=rng) <= 10.5


def test_parse_retry_after_forms() -> None:
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after": "1.5"}) == 1.5
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    now = time.time()
    assert parse_retry_after({"retry-after": formatdate(now + 30, usegmt=True)}, now=now) == pytest.approx(
        30, abs=1
    )
    assert parse_retry_after({"retry-after": formatdate(now - 30, usegmt=True)}, now=now) == 0.0
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None


# ------------------------------------------------------------------ structured (unit)


@pytest.mark.parametrize(
    "text",
    [
        '{"a": 1, "b": ["x"]}',
        '```json\n{"a": 1, "b": ["x"]}\n```',
        'Here you go: {"a": 1, "b": ["x"]} -- done',
        "{'a': 1, 'b': ['x',],}",
        '```\n{"a": 1, "b": ["x"]}\n```\nThe object above {has} braces.',
        '{"a": 1, "b": ["x"]  // a comment\n}',
    ],
)
def test_extract_json_repairs_common_damage(text: str) -> None:
    assert extract_json(text) == {"a": 1, "b": ["x"]}


def test_extract_json_refuses_text_without_json() -> None:
    with pytest.raises(ValueError):
        extract_json("I cannot help with that.")
    with pytest.raises(ValueError):
        extract_json("   ")


def test_parse_structured_truncated_is_not_completed() -> None:
    cut = '{"query": "abc", "why_safe_alone": "x", "why_risky_with_image": "y'
    assert parse_structured(cut, ComposedQuery).parsed is not None  # ordinary repair completes it
    out = parse_structured(cut, ComposedQuery, truncated=True)
    assert out.parsed is None and "cut off" in (out.error or "")


class Open(BaseModel):
    tags: dict[str, int]


class WithOptional(BaseModel):
    name: str = Field(min_length=2)
    note: str | None = None
    items: list[int] = Field(default_factory=list, max_length=3)


def test_strict_schema_generation() -> None:
    sch, strict = schema_for(WithOptional)
    assert strict and sch["additionalProperties"] is False
    assert sch["required"] == ["name", "note", "items"]
    assert "default" not in json.dumps(sch) and "minLength" not in json.dumps(sch)
    assert sch["properties"]["items"]["maxItems"] == 3
    sch, strict = schema_for(Open)  # an open dict cannot be strict: pydantic's schema, strict False
    assert not strict and response_format_for(Open)["json_schema"]["strict"] is False
    for model in STAGE_SCHEMAS.values():
        assert response_format_for(model)["json_schema"]["strict"] is True


def test_instances_from_strict_schemas_validate() -> None:
    rng = random.Random(3)
    for model in [*STAGE_SCHEMAS.values(), WithOptional]:
        sch = response_format_for(model)["json_schema"]["schema"]
        for _ in range(10):
            model.model_validate(instance_from_schema(sch, rng))


def test_the_openai_sdk_conventions_are_kept_without_the_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    """No base_url configured: OPENAI_BASE_URL is used, as the SDK would; OPENAI_ORG_ID and
    OPENAI_PROJECT_ID go out as its headers; JSON both ways, and a User-Agent naming rmskit."""
    monkeypatch.setenv("RMSKIT_TEST_KEY", "sk-conventions-0123456789")
    monkeypatch.setenv("OPENAI_ORG_ID", "org-rmskit")
    monkeypatch.setenv("OPENAI_PROJECT_ID", "proj_rmskit")
    with OpenAITestServer(keep_bodies=True) as srv:
        monkeypatch.setenv("OPENAI_BASE_URL", srv.base_url + "/")
        c = cfg(srv, base_url=None, api_key_env="RMSKIT_TEST_KEY")

        async def go() -> list[str]:
            b = OpenAIBackend(c)
            try:
                await b.generate(user("x"))
                return await b.list_models()
            finally:
                await b.aclose()

        models = run(go())
        (rec,) = srv.chat_records()
    assert models == ["test-model"]
    h = rec.headers or {}
    assert h["authorization"] == "Bearer sk-conventions-0123456789"
    assert h["openai-organization"] == "org-rmskit" and h["openai-project"] == "proj_rmskit"
    assert h["content-type"] == "application/json" and h["accept"] == "application/json"
    assert h["user-agent"].startswith("rmskit/")
    assert rec.path == "/v1/chat/completions"


@pytest.mark.parametrize(
    ("status", "body", "kind"),
    [
        (200, b"<html>not json</html>", ErrorKind.server),
        (200, b'{"object": "list"}', ErrorKind.server),  # no data[]
        (404, b'{"error": {"message": "no /models here"}}', ErrorKind.bad_request),
        (401, b'{"error": {"message": "bad key"}}', ErrorKind.auth),
        (503, b"busy", ErrorKind.server),
    ],
)
def test_listing_models_turns_every_failure_into_a_backend_error(
    status: int, body: bytes, kind: ErrorKind
) -> None:
    """GET /models, as the capability probe calls it: what servers answer when they have no such
    route or are not ready becomes a BackendError of the right kind (the probe goes on without the list,
    or stops on auth), never a raw exception."""
    import httpx

    async def go() -> BackendError:
        c = BackendConfig(spec="openai:m", base_url="http://127.0.0.1:9/v1")
        b = OpenAIBackend(c)
        await b._wire.aclose()
        b._wire = openai_compat._HttpxWire(
            c,
            httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(status, content=body))),
        )
        try:
            with pytest.raises(BackendError) as ei:
                await b.list_models()
            return ei.value
        finally:
            await b.aclose()

    err = run(go())
    assert err.kind == kind
    if kind != ErrorKind.auth:  # auth says "authentication failed at ..." (tested above)
        assert "listing models at http://127.0.0.1:9" in str(err)


def test_the_backend_never_imports_the_openai_sdk_nor_httpx() -> None:
    """The SDK's import alone was 0.5-0.7 s of CPU and ~26 MB of heap, httpx's ~0.18 s and ~7 MB more
    beside aiohttp (issue 13): a request, a retry and a model listing all go through with `import openai`
    and `import httpx` made to fail, and so do the build's own imports."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['openai'] = sys.modules['httpx'] = None\n"  # their imports now raise
        "import asyncio\n"
        "from rmskit.config import BackendConfig\n"
        "from rmskit.models.base import Message\n"
        "from rmskit.models.openai_compat import OpenAIBackend\n"
        "from rmskit.testing.openai_server import OpenAITestServer\n"
        "async def go(url):\n"
        "    b = OpenAIBackend(BackendConfig(spec='openai:test-model', base_url=url, backoff_base_s=0.01))\n"
        "    r = await b.generate([Message(role='user', content='x')])\n"
        "    names = await b.list_models()\n"
        "    await b.aclose()\n"
        "    return r.attempts, names\n"
        "with OpenAITestServer(script=['server_error']) as srv:\n"
        "    print(asyncio.run(go(srv.base_url)))\n"
        "import rmskit.pipeline.runner\n"  # the build's own imports, too
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["(2,", "['test-model'])"]


def test_the_transport_is_aiohttp_where_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    from rmskit.models import openai_compat

    c = BackendConfig(spec="openai:m", base_url="http://127.0.0.1:9/v1")

    def kind(transport: str) -> str:
        wire = openai_compat.make_wire(c, transport)
        run(wire.aclose())
        return type(wire).__name__

    assert (kind("auto"), kind("aiohttp"), kind("httpx")) == ("_AiohttpWire", "_AiohttpWire", "_HttpxWire")
    with pytest.raises(ValueError, match="unknown transport"):
        openai_compat.make_wire(c, "curl")
    monkeypatch.setattr(openai_compat, "HAVE_AIOHTTP", False)  # an install without aiohttp
    assert kind("auto") == "_HttpxWire"
    with pytest.raises(ValueError, match="needs the aiohttp package"):
        openai_compat.make_wire(c, "aiohttp")


def _proxy_env(monkeypatch: pytest.MonkeyPatch, proxy: str | None, no_proxy: str | None = None) -> None:
    """Both spellings: urllib (and so aiohttp) reads the lower-case one first."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        for n in (name, name.upper()):
            monkeypatch.delenv(n, raising=False)
    for name, value in (("http_proxy", proxy), ("no_proxy", no_proxy)):
        if value is not None:
            monkeypatch.setenv(name, value)
            monkeypatch.setenv(name.upper(), value)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_requests_go_through_the_environments_proxy(monkeypatch: pytest.MonkeyPatch, transport: str) -> None:
    """HTTP_PROXY as httpx (and the openai SDK) honour it: the request for a host this machine cannot
    reach goes to the proxy (the test server, which sees the absolute URL a proxy is sent) with the
    proxy's credentials from its URL, and NO_PROXY exempts a host, whose requests then go straight to it
    while the proxy is dead."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with OpenAITestServer(keep_bodies=True) as srv:
        _proxy_env(monkeypatch, srv.base_url.removesuffix("/v1").replace("//", "//ann:pa%2Fss@"))
        res, _ = run(
            gen_once(cfg(srv, base_url="http://api.rmskit.invalid/v1"), user("x"), transport=transport)
        )
        assert res.text
        (rec,) = srv.chat_records()
        assert rec.path == "http://api.rmskit.invalid/v1/chat/completions"
        assert rec.headers is not None and rec.headers["host"] == "api.rmskit.invalid"
        assert rec.headers["proxy-authorization"] == "Basic " + base64.b64encode(b"ann:pa/ss").decode()
        assert rec.headers["authorization"] == "Bearer EMPTY"  # the endpoint's, not the proxy's

        srv.reset()
        _proxy_env(monkeypatch, "http://127.0.0.1:9", no_proxy="127.0.0.1")
        res, _ = run(gen_once(cfg(srv, max_retries=0), user("x"), transport=transport))
        assert res.text and [r.path for r in srv.chat_records()] == ["/v1/chat/completions"]


def test_the_aiohttp_wire_makes_no_thread_hop_per_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """aiohttp's `trust_env` reads .netrc and the proxy settings in the loop's thread pool on every
    request: two thread hops that more than doubled the client's CPU per request (issue 13). The wire
    looks the proxy up once; warm requests never reach the executor."""
    _proxy_env(monkeypatch, None)

    async def go(url: str) -> list[str]:
        b = OpenAIBackend(BackendConfig(spec="openai:test-model", base_url=url), transport="aiohttp")
        try:
            await b.generate(user("warm"))
            loop = asyncio.get_running_loop()
            hops: list[str] = []
            real = loop.run_in_executor

            def spy(executor: Any, fn: Any, *args: Any) -> Any:
                hops.append(getattr(fn, "__name__", repr(fn)))
                return real(executor, fn, *args)

            monkeypatch.setattr(loop, "run_in_executor", spy)
            replies = await asyncio.gather(*(b.generate(user(f"q{i}")) for i in range(20)))
            assert all(r.text for r in replies)
            return hops
        finally:
            await b.aclose()

    with OpenAITestServer() as srv:
        assert run(go(srv.base_url)) == []


def test_https_endpoints_verify_with_certifi_or_the_environments_bundle(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """As httpx: SSL_CERT_FILE when set, else certifi's bundle (a slim container may have no system CAs);
    a plain-HTTP endpoint loads no certificates at all."""
    import ssl

    import certifi

    from rmskit.models import openai_compat

    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    ctx = openai_compat._ssl_context()
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    certifi_cas = ctx.cert_store_stats()["x509_ca"]
    assert certifi_cas > 50
    one = tmp_path / "one-ca.pem"
    pem = Path(certifi.where()).read_text()
    one.write_text(pem[: pem.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")] + "\n")
    monkeypatch.setenv("SSL_CERT_FILE", str(one))
    assert openai_compat._ssl_context().cert_store_stats()["x509_ca"] == 1

    async def connector_ssl(url: str) -> Any:
        wire = openai_compat._AiohttpWire(BackendConfig(spec="openai:m", base_url=url))
        session = wire._open(url + "/chat/completions")
        try:
            return session.connector._ssl  # type: ignore[union-attr]
        finally:
            await wire.aclose()

    assert isinstance(run(connector_ssl("https://api.rmskit.invalid/v1")), ssl.SSLContext)
    assert run(connector_ssl("http://127.0.0.1:9/v1")) is True  # aiohttp's default, never used for http


def test_request_bodies_are_the_payloads_json_and_what_orjson_refuses_goes_through_json() -> None:
    """The body is the payload, whatever it holds: non-ASCII text as UTF-8 (what servers read), a photo's
    data URL, and an integer past 64 bits (a user's seed), which orjson refuses and json writes."""
    from rmskit.models.openai_compat import request_body

    url = "data:image/jpeg;base64," + base64.b64encode(bytes(range(256)) * 40).decode()
    payload: dict[str, Any] = {
        "model": "m",
        "messages": [
            {"role": "system", "content": 'Ünïcødé ✓ \u2028 "quoted" \\ back\nslash'},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]},
        ],
        "temperature": 0.7,
        "max_tokens": 512,
    }
    body = request_body(payload)
    assert json.loads(body) == payload
    assert "Ünïcødé ✓".encode() in body  # not \\u-escaped: UTF-8, as JSON is sent
    payload["seed"] = 2**70
    assert json.loads(request_body(payload)) == payload


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_compressed_answer_is_capped_at_what_it_inflates_to(transport: str) -> None:
    """A proxy in front of a server may gzip its answers: the declared length is the compressed one, so
    the cap (max_response_bytes) holds for the inflated body. A 33 KB answer that inflates to 32 MB is
    refused; on the aiohttp wire with ~the cap in memory, never read whole first."""
    import gzip
    import threading
    import tracemalloc

    def answer(content: str) -> bytes:
        msg = {"choices": [{"message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}
        return gzip.compress(json.dumps(msg).encode())

    small = json.dumps({"a": "x" * 200_000})
    bodies = [answer(small), answer("x" * 32_000_000)]
    assert len(bodies[1]) < 64_000

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")
        )
        await reader.readexactly(length)
        packed = bodies[0]
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
            + f"Content-Length: {len(packed)}\r\n\r\n".encode()
            + packed
        )
        await writer.drain()
        writer.close()

    ready = threading.Event()
    port: list[int] = []
    loop = asyncio.new_event_loop()

    def run_server() -> None:
        srv = loop.run_until_complete(asyncio.start_server(serve, "127.0.0.1", 0))
        port.append(srv.sockets[0].getsockname()[1])
        ready.set()
        loop.run_forever()
        srv.close()

    t = threading.Thread(target=run_server, daemon=True)
    t.start()
    ready.wait(10)
    c = BackendConfig(spec="openai:m", base_url=f"http://127.0.0.1:{port[0]}/v1", max_retries=0)
    try:
        res, _ = run(
            gen_once(c.model_copy(update={"max_response_bytes": 1 << 20}), user("x"), transport=transport)
        )
        assert res.text == small
        bodies.pop(0)  # the bomb from now on
        tracemalloc.start()
        try:
            with pytest.raises(BackendError) as ei:
                run(
                    gen_once(
                        c.model_copy(update={"max_response_bytes": 65_536}), user("x"), transport=transport
                    )
                )
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert ei.value.kind == ErrorKind.too_large
        if transport == "aiohttp":  # httpx inflates each received chunk whole (see _HttpxWire)
            assert peak < 8_000_000
    finally:
        loop.call_soon_threadsafe(loop.stop)
        t.join(10)
