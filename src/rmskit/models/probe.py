"""Capability probe of a remote server, once per base URL + model: what it really supports, found
with a few tiny requests instead of assumed.

1. `GET /models` (401/403 stop here with AuthenticationError);
2. a text-only request: the baseline prompt-token count (it goes through the full retry/outage
   path, so a server still starting is waited for); skipped when vision is forced;
3. vision: the same text with a small red image. Vision counts only when the request succeeds and
   the prompt grew: llama-cpp-python under chatml answers 200 but drops the image *and* that
   message's text, so its prompt shrinks; a 4xx/5xx ("image input is not supported") means no;
4. structured output, best first: json_schema with full constraints (maxLength kept), json_schema
   strict (constraints dropped, enforced leniently), json_object + schema (llama.cpp), plain
   json_object; a mode counts when the answer parses and validates. Else JSON-in-prompt + repair.

Steps 2-4 start together (one request latency when the server is up); only the baseline waits out a
server that is still starting, and a step whose early request met no server is redone after it.
Overrides (`vision`, `structured` in BackendConfig) skip the matching step. The result is cached in
the run's ledger meta when a store is given, else in memory for the process.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, Field

from rmskit.models.base import BackendError, ErrorKind, GenParams, Message
from rmskit.models.remote import FORMAT_WORDS, Failure, RemoteBackend, Reply
from rmskit.models.structured import parse_structured, response_format_for, with_json_instruction

log = logging.getLogger("rmskit.models")
PROBE_VERSION = 1
_MEMORY: dict[str, dict[str, Any]] = {}
_PARAMS = GenParams(temperature=0.0, max_tokens=24, seed=0)
_QUESTION = "What is the main colour of this picture? Answer with one word."


class ProbeAnswer(BaseModel):
    colour: str = Field(max_length=24)


class ProbeResult(BaseModel):
    version: int = PROBE_VERSION
    endpoint: str
    model: str
    models: list[str] | None = None  # ids from /models, None when the route failed
    vision: bool
    vision_how: str  # "probed: ..." or "forced"
    structured_mode: str
    structured_how: str
    full_constraints: bool = False
    tried: dict[str, str] = Field(default_factory=dict)  # mode -> "ok" or why not

    def line(self) -> str:
        tried = ", ".join(f"{k}: {v}" for k, v in self.tried.items() if v != "ok")
        return (
            f"probe {self.endpoint} {self.model}: vision {'yes' if self.vision else 'no'} ({self.vision_how}); "
            f"structured {self.structured_mode} ({self.structured_how}"
            + (", full constraints" if self.full_constraints else "")
            + ")"
            + (f"; refused: {tried}" if tried else "")
        )


def _red_png() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (220, 20, 20)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# Retried within a probe step. Not base.TRANSIENT_KINDS: a 5xx to a probe request may be the server
# refusing that format (llama.cpp answers 500), read as the step's answer, not retried.
_TRANSIENT = (ErrorKind.rate_limit, ErrorKind.timeout, ErrorKind.connection)


class _NotUpYet(Exception):
    """An early probe request (sent beside the baseline) met a server that is not answering yet."""


async def _call(b: RemoteBackend, payload: dict[str, Any], early: bool = False) -> Reply | Failure:
    """One probe request; transient failures (429, timeouts, drops) are retried a few times. `early`:
    still transient after those, raise _NotUpYet (the step is redone once the baseline got through)
    instead of reading the failure as the server's answer."""
    got: Reply | Failure = Failure(ErrorKind.other, "not sent", retriable=False)
    for attempt in range(3):
        got = await b._once(payload, 200)
        if isinstance(got, Reply):
            return got
        if got.kind == ErrorKind.auth:
            from rmskit.models.base import AuthenticationError

            raise AuthenticationError(b.where, got.status)
        if got.kind not in _TRANSIENT:
            return got
        await asyncio.sleep(b.policy.delay(attempt, got.retry_after))
    if early:
        raise _NotUpYet(got.message)
    return got


def _why(got: Failure) -> str:
    return got.message[:120]


async def _vision_reply(b: RemoteBackend, early: bool = False) -> Reply | Failure:
    parts = [{"type": "image_url", "image_url": {"url": _red_png()}}, {"type": "text", "text": _QUESTION}]
    return await _call(b, b._payload(_PARAMS, [{"role": "user", "content": parts}]), early)


def _vision_verdict(got: Reply | Failure, base_tokens: int) -> tuple[bool, str]:
    if isinstance(got, Failure):
        return False, f"probed: image request refused ({_why(got)})"
    if got.prompt_tokens and base_tokens:
        if got.prompt_tokens > base_tokens:
            return True, f"probed: prompt tokens {got.prompt_tokens} with image vs {base_tokens} without"
        return False, (
            f"probed: image silently dropped (prompt tokens {got.prompt_tokens} with image vs "
            f"{base_tokens} without)"
        )
    seen = "red" in got.text.lower()
    return seen, f"probed: no token counts; answer {'names' if seen else 'does not name'} the colour"


async def _probe_structured(b: RemoteBackend, early: bool = False) -> tuple[str, bool, dict[str, str]]:
    tried: dict[str, str] = {}
    msgs = [Message(role="user", content="Name the colour of a ripe tomato.")]
    ladder = [
        ("json_schema", True),
        ("json_schema", False),
        ("json_object_schema", False),
        ("json_object", False),
    ]
    for mode, full in ladder:
        label = mode + (" (full constraints)" if full else " (strict)" if mode == "json_schema" else "")
        prompted = (
            msgs
            if mode == "json_schema"
            else with_json_instruction(msgs, ProbeAnswer, brief=mode != "json_object")
        )
        payload = b._payload(_PARAMS.model_copy(update={"max_tokens": 48}), await b._render(prompted))
        payload["response_format"] = response_format_for(ProbeAnswer, mode, full=full)
        got = await _call(b, payload, early)
        if isinstance(got, Failure):
            named = any(w in got.message.lower() for w in FORMAT_WORDS)
            tried[label] = ("refused: " if named else "failed: ") + _why(got)
            continue
        outcome = parse_structured(got.text, ProbeAnswer)
        if outcome.parsed is None:
            tried[label] = "accepted but the answer did not validate (format ignored?)"
            continue
        tried[label] = "ok"
        return mode, full, tried
    return "prompt", False, tried


async def run_probe(b: RemoteBackend) -> ProbeResult:
    cfg = b.cfg
    list_models = getattr(b, "list_models", None)

    async def models_listed() -> list[str] | None:
        """GET /models, beside the probe's requests (a round trip of its own on a remote server)."""
        try:
            return await list_models() if list_models is not None else None
        except BackendError as e:
            if e.kind == ErrorKind.auth:
                raise
            log.info("probe: /models failed at %s: %s", b.where, e)
            return None

    models_task = asyncio.ensure_future(models_listed())
    probe_vision, probe_structured = cfg.vision is None, cfg.structured in ("auto", "json_schema")
    # One latency when the server is up: the text-only baseline, the image request and the first
    # structured-output request go out together. Only the baseline takes the full retry/outage path
    # (a server still starting is waited for there, once); a step whose early request met no server
    # yet is redone after the baseline got through, so a late server is not read as "no vision".
    base_task = (
        asyncio.ensure_future(b._request(b._payload(_PARAMS, [{"role": "user", "content": _QUESTION}]), 200))
        if probe_vision
        else None
    )

    async def step(fn: Any) -> Any:
        if base_task is None:
            return await fn(False)
        try:
            return await fn(True)
        except _NotUpYet:
            await asyncio.shield(base_task)
            return await fn(False)

    tasks: list[asyncio.Future[Any]] = [
        t
        for t in (
            models_task,
            base_task,
            asyncio.ensure_future(step(lambda e: _vision_reply(b, e))) if probe_vision else None,
            asyncio.ensure_future(step(lambda e: _probe_structured(b, e))) if probe_structured else None,
        )
        if t is not None
    ]
    try:
        await asyncio.gather(*tasks)
    finally:  # one failed (an outage past the window, auth): the others are not left running
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    models = models_task.result()
    results: Iterator[Any] = iter([t.result() for t in tasks[2 if probe_vision else 1 :]])
    if probe_vision:
        assert base_task is not None
        vision, vision_how = _vision_verdict(next(results), base_task.result().prompt_tokens)
    else:
        vision, vision_how = bool(cfg.vision), "forced"
    probed_mode, full, tried = next(results) if probe_structured else (cfg.structured, False, {})
    mode, how = (probed_mode, "probed") if cfg.structured == "auto" else (cfg.structured, "forced")
    return ProbeResult(
        endpoint=b.where,
        model=cfg.name,
        models=models,
        vision=vision,
        vision_how=vision_how,
        structured_mode=mode,
        structured_how=how,
        full_constraints=full,
        tried=tried,
    )


def apply(b: RemoteBackend, r: ProbeResult) -> None:
    b.capabilities = b.capabilities.model_copy(update={"vision": r.vision})
    b.full_constraints = r.full_constraints
    b.set_mode(r.structured_mode)


async def probe_and_apply(b: RemoteBackend, store: Any = None, *, echo: Any = None) -> ProbeResult | None:
    """Probe (or reuse a cached probe of) `b`'s server, apply the result, and report it in one line
    (logged, and passed to `echo` when given). A server that fails the probe for any reason but
    authentication (down past the outage window, answering 5xx) is reported and left unprobed: the
    run goes on with the configured settings and the per-request fallbacks, and its items fail
    (transiently) on their own, so the exit code and the ledger say what happened."""
    key = f"probe:{b.where}|{b.cfg.name}|vision={b.cfg.vision}|structured={b.cfg.structured}"
    cached = store.get_meta(key) if store is not None else _MEMORY.get(key)
    result: ProbeResult | None = None
    if isinstance(cached, dict) and cached.get("version") == PROBE_VERSION:
        result = ProbeResult.model_validate(cached)
    if result is None:
        try:
            result = await run_probe(b)
        except BackendError as e:
            if e.kind == ErrorKind.auth:
                raise
            line = f"probe {b.where}: failed ({e}); not probed, using the configured settings"
            log.warning("%s", line)
            if echo is not None:
                echo(line)
            return None
        data = result.model_dump(mode="json")
        if store is not None:
            store.set_meta(key, data)
        _MEMORY[key] = data
    apply(b, result)
    log.info("%s", result.line())
    if echo is not None:
        echo(result.line())
    return result


def probe_config(cfg: Any) -> list[ProbeResult]:
    """Probe the server(s) of a remote BackendConfig from sync code (e.g. `build --dry-run`); []
    for local kinds. Raises AuthenticationError on 401/403."""
    import asyncio

    from rmskit.models import load_backend
    from rmskit.models.registry import resolve

    if not resolve(cfg.spec).kind.remote:
        return []
    # A look, not a run: fail fast instead of waiting out an outage.
    cfg = cfg.model_copy(
        update={"outage_window_s": 0.0, "max_retries": 0, "timeout_s": min(cfg.timeout_s, 15.0)}
    )

    async def go() -> list[ProbeResult]:
        backend: Any = load_backend(cfg)
        try:
            got = await backend.start(None)
            return got if isinstance(got, list) else [got]
        finally:
            await backend.aclose()

    return asyncio.run(go())
