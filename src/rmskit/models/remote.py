"""The shared request layer of every remote backend: concurrency and rate limits, retries with
backoff, the connection-refused outage window, auth stops, format refusals recognised by content,
the structured-output mode ladder with re-asks, lenient caps, and the capability probe.

A remote backend subclasses `RemoteBackend` and supplies only its wire format and transport:
`_send` (one HTTP exchange -> body bytes, or raise), `_classify` (exception -> Failure), `_render`
(messages -> the server's message list) and `_payload`/`_parse_reply`. openai_compat.py is one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, Field

from rmskit.config import BackendConfig
from rmskit.models.base import (
    AuthenticationError,
    BackendError,
    Capabilities,
    ErrorKind,
    GenParams,
    Message,
    Result,
    Usage,
)
from rmskit.models.limits import PrioritySlots, RequestLimiter, RetryPolicy, request_priority
from rmskit.models.structured import (
    STRUCTURED_MODES,
    parse_structured,
    reask_message,
    response_format_for,
    with_json_instruction,
)

# Words that mark an error body as a refusal of the structured-output request, whatever the status
# (llama-cpp-python answers json_schema with a 500 "Input should be 'text' or 'json_object'").
FORMAT_WORDS = (
    "response_format",
    "json_schema",
    "json_object",
    "structured output",
    "guided",
    "schema",
    "grammar",
    "maxlength",
    "'text'",
)


# calls admitted per concurrency slot: enough that a freed slot always finds a built payload waiting
ADMIT_PER_SLOT = 2


class RemoteStats(BaseModel):
    """Live counters of one backend instance, for progress displays and benchmarks."""

    calls: int = 0  # generate() calls
    succeeded: int = 0
    failed: int = 0  # generate() calls that raised BackendError
    requests: int = 0  # HTTP requests sent: first tries, retries and re-asks
    retries: int = 0
    reasks: int = 0
    rate_limited: int = 0  # 429 answers seen
    refused_connections: int = 0
    errors: dict[str, int] = Field(default_factory=dict)  # failed attempts by ErrorKind
    prompt_tokens: int = 0
    completion_tokens: int = 0
    structured_mode: str = "json_schema"
    adjustments: int = 0  # answers whose caps were enforced by truncation


class Failure:
    __slots__ = ("kind", "retriable", "message", "retry_after", "status", "refused")

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        retriable: bool,
        retry_after: float | None = None,
        status: int | None = None,
        refused: bool = False,
    ) -> None:
        self.kind = kind
        self.message = message
        self.retriable = retriable
        self.retry_after = retry_after
        self.status = status
        self.refused = refused  # connection refused: retried within the outage window


class Reply:
    __slots__ = (
        "text",
        "finish_reason",
        "model",
        "prompt_tokens",
        "completion_tokens",
        "attempts",
        "refusal",
    )

    def __init__(
        self,
        text: str,
        *,
        finish_reason: str | None = None,
        model: str = "",
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        refusal: str | None = None,
    ) -> None:
        self.text = text
        self.finish_reason = finish_reason
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.refusal = refusal
        self.attempts = 1


class FormatRefused(Exception):
    def __init__(self, message: str, attempts: int, *, certain: bool) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.certain = certain  # the server's error body named the format or schema


class RemoteBackend:
    """Generic remote backend. Subclasses implement the abstract wire methods below."""

    where: str = "?"  # scheme://host:port of the endpoint (no secrets), for messages

    def __init__(self, cfg: BackendConfig) -> None:
        self.cfg = cfg
        self.model_id = cfg.spec
        self.capabilities = Capabilities(vision=cfg.vision is not False, structured="native", max_images=8)
        mode = "json_schema" if cfg.structured == "auto" else cfg.structured
        self.stats = RemoteStats(structured_mode=mode)
        self.limiter = RequestLimiter(
            cfg.concurrency,
            requests_per_minute=cfg.requests_per_minute,
            tokens_per_minute=cfg.tokens_per_minute,
        )
        self.policy = RetryPolicy(
            max_retries=cfg.max_retries, base_s=cfg.backoff_base_s, max_s=cfg.backoff_max_s
        )
        self.full_constraints = False  # set by the probe when the server accepts maxLength & co.
        self.probe_result: Any = None
        self._mode_ok = False  # a request in the current structured mode has succeeded
        self._probe_lock = asyncio.Lock()
        # Calls past this gate build their payload (images read and base64-encoded); the rest wait
        # without one. 10k calls gathered at once held 10k encoded images (516 MB RSS; issue 13 §5).
        self._admit = PrioritySlots(ADMIT_PER_SLOT * cfg.concurrency)

    # ---------------------------------------------------------- wire (subclasses)
    async def _send(self, payload: dict[str, Any]) -> bytes:
        raise NotImplementedError

    def _classify(self, e: BaseException) -> Failure:
        raise NotImplementedError

    async def _render(self, messages: list[Message]) -> list[dict[str, Any]]:
        raise NotImplementedError

    def _payload(self, params: GenParams, messages: list[dict[str, Any]]) -> dict[str, Any]:
        raise NotImplementedError

    def _parse_reply(self, body: bytes) -> Reply:
        raise NotImplementedError

    def _adapt(self, failure: Failure, payload: dict[str, Any]) -> bool:
        """A chance to fix the payload after a failure (e.g. a renamed parameter); True to resend."""
        return False

    async def aclose(self) -> None:
        return None

    # ---------------------------------------------------------- probing
    async def start(self, store: Any = None, *, echo: Any = None) -> Any:
        """Probe the server's capabilities once (cached in `store`'s meta when given, else in memory)
        and apply them. Raises AuthenticationError on 401/403."""
        from rmskit.models.probe import probe_and_apply

        async with self._probe_lock:
            if self.probe_result is None:
                self.probe_result = await probe_and_apply(self, store, echo=echo)
        return self.probe_result

    def set_mode(self, mode: str) -> None:
        self.stats.structured_mode = mode
        self.capabilities = self.capabilities.model_copy(update={"structured_mode": mode})
        self._mode_ok = False

    # ---------------------------------------------------------- public
    async def generate(
        self,
        messages: list[Message],
        *,
        schema: type[BaseModel] | None = None,
        params: GenParams | None = None,
    ) -> Result:
        self.stats.calls += 1
        await self._admit.acquire(request_priority.get())
        try:
            result = await self._generate(messages, schema, params or self.cfg.params)
        except BackendError:
            self.stats.failed += 1
            raise
        finally:
            self._admit.release()
        self.stats.succeeded += 1
        return result

    # ---------------------------------------------------------- the request loop
    def _count(self, failure: Failure) -> None:
        errs = self.stats.errors
        errs[failure.kind.value] = errs.get(failure.kind.value, 0) + 1

    async def _once(self, payload: dict[str, Any], est_tokens: float) -> Reply | Failure:
        await self.limiter.acquire(est_tokens)
        self.stats.requests += 1
        actual: float | None = None
        try:
            try:
                async with asyncio.timeout(self.cfg.timeout_s):  # total deadline, whatever the transport
                    body = await self._send(payload)
                reply = self._parse_reply(body)
            except BackendError:
                raise
            except Exception as e:  # noqa: BLE001 - classified below; unknown kinds are final
                return self._classify(e)
            actual = reply.prompt_tokens + reply.completion_tokens
            self.stats.prompt_tokens += reply.prompt_tokens
            self.stats.completion_tokens += reply.completion_tokens
            return reply
        finally:
            self.limiter.release(est_tokens, actual)

    def _is_format_refusal(self, f: Failure, payload: dict[str, Any]) -> tuple[bool, bool]:
        """(refused?, certain?): any 4xx/5xx whose body names the format is a refusal; a bare 400/422
        before the mode ever worked is an uncertain one."""
        if "response_format" not in payload or f.status is None or f.status < 400:
            return False, False
        low = f.message.lower()
        if any(w in low for w in FORMAT_WORDS):
            return True, True
        return (f.status in (400, 422) and not self._mode_ok), False

    async def _request(self, payload: dict[str, Any], est_tokens: float) -> Reply:
        """One logical request, retried per policy. Raises BackendError, or FormatRefused."""
        attempt = 0
        outage_t0: float | None = None
        outage_try = 0
        while True:
            got = await self._once(payload, est_tokens)
            if isinstance(got, Reply):
                got.attempts = attempt + outage_try + 1
                return got
            failure = got
            self._count(failure)
            if failure.kind == ErrorKind.auth:
                raise AuthenticationError(self.where, failure.status)
            if failure.refused:
                # Server down or restarting: wait it out for up to the outage window, without
                # spending the retry budget meant for a misbehaving server.
                self.stats.refused_connections += 1
                now = time.monotonic()
                outage_t0 = now if outage_t0 is None else outage_t0
                left = self.cfg.outage_window_s - (now - outage_t0)
                if left > 0:
                    await asyncio.sleep(min(left, self.policy.delay(min(outage_try, 6), None)))
                    outage_try += 1
                    continue
                raise BackendError(
                    ErrorKind.connection,
                    f"{failure.message} (for {now - outage_t0:.0f}s, outage window "
                    f"{self.cfg.outage_window_s:g}s)",
                    retriable=True,
                )
            outage_t0 = None
            if self._adapt(failure, payload):
                failure.retriable = True
            else:
                refused, certain = self._is_format_refusal(failure, payload)
                if refused:
                    raise FormatRefused(failure.message, attempt + 1, certain=certain)
            if not failure.retriable or attempt >= self.policy.max_retries:
                tries = f" after {attempt + 1} attempts" if attempt else ""
                raise BackendError(failure.kind, failure.message + tries, retriable=failure.retriable)
            self.stats.retries += 1
            await asyncio.sleep(self.policy.delay(attempt, failure.retry_after))
            attempt += 1

    @staticmethod
    def _estimate_tokens(messages: list[Message], params: GenParams, extra_chars: int = 0) -> float:
        chars = extra_chars + sum(len(m.content) for m in messages)
        images = sum(len(m.images) for m in messages)
        return chars / 4 + images * 800 + params.max_tokens  # ~800 prompt tokens per image

    # ---------------------------------------------------------- structured output
    def _next_mode(self, mode: str) -> str:
        return STRUCTURED_MODES[min(STRUCTURED_MODES.index(mode) + 1, len(STRUCTURED_MODES) - 1)]

    async def _first_reply(
        self, messages: list[Message], schema: type[BaseModel], params: GenParams
    ) -> tuple[Reply, dict[str, Any], int]:
        """Send in the current mode; on a format refusal (auto only) step down the ladder and resend
        at once, without spending retries. Returns (reply, payload, attempts)."""
        attempts = 0
        tried_uncertain: str | None = None
        while True:
            mode = self.stats.structured_mode
            rf = response_format_for(schema, mode, full=self.full_constraints)
            prompted = (
                messages
                if mode == "json_schema"
                else with_json_instruction(messages, schema, brief=mode == "json_object_schema")
            )
            payload = self._payload(params, await self._render(prompted))
            if rf is not None:
                payload["response_format"] = rf
            try:
                reply = await self._request(payload, self._estimate_tokens(prompted, params))
            except FormatRefused as e:
                attempts += e.attempts
                if self.cfg.structured != "auto":
                    raise BackendError(
                        ErrorKind.bad_request,
                        f"{e} — the server refuses response_format {mode}; use structured: auto or prompt",
                    ) from None
                if e.certain:
                    self.set_mode(self._next_mode(mode))
                else:  # a bare 400: only a request without response_format can tell what it was about
                    tried_uncertain = tried_uncertain or mode
                    self.set_mode("prompt")
                continue
            except BackendError as err:
                if tried_uncertain and err.kind == ErrorKind.bad_request and not self._mode_ok:
                    # The bare 400 that moved us down was not about the format after all.
                    self.set_mode(tried_uncertain)
                raise
            self._mode_ok = True
            reply.attempts += attempts
            return reply, payload, attempts

    async def _generate(
        self, messages: list[Message], schema: type[BaseModel] | None, params: GenParams
    ) -> Result:
        if schema is None:
            reply = await self._request(
                self._payload(params, await self._render(messages)), self._estimate_tokens(messages, params)
            )
            usage = Usage(prompt_tokens=reply.prompt_tokens, completion_tokens=reply.completion_tokens)
            return self._result(reply, None, reply.attempts, usage)
        reply, payload, _ = await self._first_reply(messages, schema, params)
        est = self._estimate_tokens(messages, params)
        attempts, reasks, usage = 0, 0, Usage()
        while True:
            attempts += reply.attempts
            usage.prompt_tokens += reply.prompt_tokens
            usage.completion_tokens += reply.completion_tokens
            if not reply.text and reply.refusal:
                error: str | None = f"the model refused: {reply.refusal[:200]}"
                parsed, notes = None, []
            else:
                outcome = parse_structured(reply.text, schema, truncated=reply.finish_reason == "length")
                parsed, error, notes = outcome.parsed, outcome.error, outcome.adjustments
            if parsed is not None:
                self.stats.adjustments += bool(notes)
                return self._result(reply, parsed, attempts, usage, notes)
            if reasks >= self.cfg.max_reasks:
                cut = " (finish_reason=length)" if reply.finish_reason == "length" else ""
                raise BackendError(
                    ErrorKind.parse,
                    f"answer did not validate as {schema.__name__} after {reasks + 1} "
                    f"{'try' if reasks == 0 else 'tries'}{cut}: {error}",
                )
            reasks += 1
            self.stats.reasks += 1
            payload = {
                **payload,
                "messages": [
                    *payload["messages"],
                    {"role": "assistant", "content": reply.text},
                    {"role": "user", "content": reask_message(error or "invalid answer", schema).content},
                ],
            }
            try:
                reply = await self._request(payload, est + len(reply.text) / 4)
            except FormatRefused as e:  # pragma: no cover - a server that accepted it once refusing later
                raise BackendError(ErrorKind.bad_request, str(e)) from None

    def _result(
        self,
        reply: Reply,
        parsed: dict[str, Any] | None,
        attempts: int,
        usage: Usage,
        notes: Sequence[str] = (),
    ) -> Result:
        return Result(
            text=reply.text,
            parsed=parsed,
            usage=usage,
            finish_reason=reply.finish_reason,
            model=reply.model or self.cfg.name,
            attempts=attempts,
            adjustments=list(notes),
        )
