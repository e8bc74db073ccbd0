"""`openai:` backend: any OpenAI-compatible chat-completions server (vLLM, SGLang, Ollama, LM Studio,
OpenAI) through the official `openai` SDK.

The SDK's own retries are off (max_retries=0): our policy (rmskit.models.limits) governs retries,
backoff, Retry-After, concurrency and rate limits. Requests go through the SDK's documented generic
`client.post(path, cast_to=Response, body=...)`: the typed `chat.completions.create` adds ~0.6 ms of
CPU per request (parameter transform + response model construction), which is most of our ≤1 ms budget.
When `aiohttp` is installed (`openai[aiohttp]`) the SDK's aiohttp transport is used: about half the
CPU of the default httpx transport at high concurrency.

The API key is read from the environment variable the config names and handed to the SDK client; it
is kept on no pydantic model, never logged, and scrubbed from every error message.
"""

from __future__ import annotations

import asyncio
import base64
import importlib
import io
import json
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import openai
from pydantic import BaseModel, Field

from rmskit.config import BackendConfig
from rmskit.models.base import (
    BackendError,
    Capabilities,
    ErrorKind,
    GenParams,
    ImageInput,
    Message,
    Result,
    Usage,
)
from rmskit.models.limits import RequestLimiter, RetryPolicy, parse_retry_after
from rmskit.models.structured import (
    parse_structured,
    reask_message,
    response_format_for,
    with_json_instruction,
)


def _sdk_http_module() -> Any:
    """The HTTP library the installed SDK is built on (httpx2 for openai >= 3, httpx before)."""
    for cls in openai.DefaultAsyncHttpxClient.__mro__:
        if cls.__name__ == "AsyncClient":
            return importlib.import_module(cls.__module__.split(".")[0])
    import httpx  # pragma: no cover - very old SDKs

    return httpx  # pragma: no cover


_httpx = _sdk_http_module()

PLACEHOLDER_KEY = "EMPTY"  # what local servers without auth expect (vLLM/SGLang accept any key)
_IMAGE_TOKENS_ESTIMATE = 800  # rough per-image prompt tokens, for the tokens-per-minute estimate only
_FORMAT_WORDS = ("response_format", "json_schema", "structured output", "guided", "schema")
_KEY_LIKE = re.compile(r"\b(sk|pk|rk)-[A-Za-z0-9_\-*]{6,}")
_TRANSPORT_DROP_NAMES = {
    "RemoteProtocolError",
    "ReadError",
    "WriteError",
    "ServerDisconnectedError",
    "ClientPayloadError",
    "ClientOSError",
    "ConnectionResetError",
    "BrokenPipeError",
    "ContentLengthError",
    "TransferEncodingError",
}


class OpenAIStats(BaseModel):
    """Live counters of one backend instance, for progress displays and benchmarks."""

    calls: int = 0  # generate() calls
    succeeded: int = 0
    failed: int = 0  # generate() calls that raised BackendError
    requests: int = 0  # HTTP requests sent: first tries, retries and re-asks
    retries: int = 0
    reasks: int = 0
    rate_limited: int = 0  # 429 answers seen
    errors: dict[str, int] = Field(default_factory=dict)  # failed attempts by ErrorKind
    prompt_tokens: int = 0
    completion_tokens: int = 0
    structured_mode: Literal["json_schema", "prompt"] = "json_schema"


class _BadBody(Exception):
    """A 200 whose body is not a chat completion (truncated or invalid JSON)."""


class _FormatRefused(Exception):
    def __init__(self, message: str, attempts: int, *, certain: bool) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.certain = certain  # the server named response_format/json_schema in its refusal


class _Reply:
    __slots__ = (
        "text",
        "finish_reason",
        "model",
        "prompt_tokens",
        "completion_tokens",
        "attempts",
        "refusal",
    )

    def __init__(self, body: bytes) -> None:
        try:
            d = json.loads(body)
        except ValueError as e:
            raise _BadBody(f"response body is not valid JSON ({len(body)} bytes)") from e
        try:
            choice = d["choices"][0]
            msg = choice["message"]
            self.text: str = msg.get("content") or ""
            self.refusal: str | None = msg.get("refusal")
            self.finish_reason: str | None = choice.get("finish_reason")
            self.model: str = d.get("model") or ""
            usage = d.get("usage") or {}
            self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self.completion_tokens = int(usage.get("completion_tokens") or 0)
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as e:
            raise _BadBody("response JSON has no choices[0].message") from e
        self.attempts = 1


class _Failure:
    __slots__ = ("kind", "retriable", "message", "retry_after", "status")

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        retriable: bool,
        retry_after: float | None = None,
        status: int | None = None,
    ) -> None:
        self.kind = kind
        self.message = message
        self.retriable = retriable
        self.retry_after = retry_after
        self.status = status


# ------------------------------------------------------------------ images

_IMAGE_CACHE: OrderedDict[tuple[str, int], str] = OrderedDict()
# Data URLs of recently used images, bounded by bytes: every image in the build's window (default
# 2x concurrency) stays encoded while its stages run, so each image is encoded once, not per request.
_IMAGE_CACHE_MAX_BYTES = 256 * 1024 * 1024
_image_cache_bytes = 0
_IMAGE_CACHE_LOCK = threading.Lock()


def _cache_get(key: tuple[str, int]) -> str | None:
    with _IMAGE_CACHE_LOCK:
        url = _IMAGE_CACHE.get(key)
        if url is not None:
            _IMAGE_CACHE.move_to_end(key)
        return url


def _cache_put(key: tuple[str, int], url: str) -> None:
    global _image_cache_bytes
    with _IMAGE_CACHE_LOCK:
        old = _IMAGE_CACHE.pop(key, None)
        _image_cache_bytes += len(url) - (len(old) if old else 0)
        _IMAGE_CACHE[key] = url
        while _image_cache_bytes > _IMAGE_CACHE_MAX_BYTES and len(_IMAGE_CACHE) > 1:
            _, evicted = _IMAGE_CACHE.popitem(last=False)
            _image_cache_bytes -= len(evicted)


def encode_image_data_url(path: Path, max_side: int, quality: int = 90) -> str:
    """A JPEG data URL of the image at `path`, longest side at most `max_side` (EXIF orientation
    applied, alpha flattened onto white). Blocking: call it off the event loop."""
    from PIL import Image, ImageOps

    with Image.open(path) as src:
        src.draft("RGB", (max_side, max_side))  # JPEG: decode at a reduced scale when much larger
        im = ImageOps.exif_transpose(src)
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            im = Image.new("RGB", rgba.size, (255, 255, 255))
            im.paste(rgba, mask=rgba.getchannel("A"))
        elif im.mode != "RGB":
            im = im.convert("RGB")
        if max(im.size) > max_side:
            im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ------------------------------------------------------------------ helpers


def _is_loopback(url: str | None) -> bool:
    if not url:
        return False
    host = (urlsplit(url).hostname or "").lower()
    return host in ("localhost", "127.0.0.1", "::1") or host.startswith("127.")


def _public_url(url: str | None) -> str:
    """scheme://host:port of the endpoint, without any userinfo, path or query (which may hold secrets)."""
    if not url:
        return "api.openai.com"
    parts = urlsplit(url)
    host = parts.hostname or "?"
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


def _root_names(err: BaseException) -> list[str]:
    names = []
    seen = 0
    cur: BaseException | None = err
    while cur is not None and seen < 8:
        names.append(type(cur).__name__)
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return names


def _make_http_client(cfg: BackendConfig, transport: str) -> Any:
    limits = _httpx.Limits(
        max_connections=cfg.concurrency + 16,
        max_keepalive_connections=cfg.concurrency + 16,
        keepalive_expiry=30.0,
    )
    timeout = _httpx.Timeout(cfg.timeout_s, connect=min(cfg.timeout_s, 15.0))
    if transport in ("auto", "aiohttp"):
        try:
            import aiohttp  # noqa: F401 - presence check for the SDK's aiohttp transport

            return openai.DefaultAioHttpClient(limits=limits, timeout=timeout)
        except (ImportError, RuntimeError, AttributeError):
            if transport == "aiohttp":
                raise ValueError(
                    "transport 'aiohttp' needs the aiohttp package (pip install 'openai[aiohttp]')"
                ) from None
    return openai.DefaultAsyncHttpxClient(limits=limits, timeout=timeout)


# ------------------------------------------------------------------ the backend


class OpenAIBackend:
    """ModelBackend over an OpenAI-compatible `/chat/completions` endpoint.

    One instance per endpoint and event loop; call `aclose()` when done. `stats` holds live counters."""

    def __init__(
        self, cfg: BackendConfig, *, transport: Literal["auto", "aiohttp", "httpx"] = "auto"
    ) -> None:
        if cfg.kind != "openai":
            raise ValueError(f"OpenAIBackend needs an 'openai:NAME' spec, got {cfg.spec!r}")
        if not cfg.name:
            raise ValueError("model name missing: use 'openai:NAME'")
        key = os.environ.get(cfg.api_key_env) or None
        if key is None:
            if cfg.base_url is None:
                raise BackendError(
                    ErrorKind.auth,
                    f"no API key: environment variable {cfg.api_key_env} is not set "
                    "(set it, or pass --base-url for a local server that needs no key)",
                )
            key = PLACEHOLDER_KEY
        self.cfg = cfg
        self.model_id = cfg.spec
        self.capabilities = Capabilities(
            vision=cfg.vision is not False,
            structured="native",
            max_images=8,
            local=_is_loopback(cfg.base_url),
        )
        self.stats = OpenAIStats(structured_mode="prompt" if cfg.structured == "prompt" else "json_schema")
        self.limiter = RequestLimiter(
            cfg.concurrency,
            requests_per_minute=cfg.requests_per_minute,
            tokens_per_minute=cfg.tokens_per_minute,
        )
        self.policy = RetryPolicy(
            max_retries=cfg.max_retries, base_s=cfg.backoff_base_s, max_s=cfg.backoff_max_s
        )
        self._where = _public_url(cfg.base_url)
        self._http = _make_http_client(cfg, transport)
        self._client = openai.AsyncOpenAI(
            api_key=key,
            base_url=cfg.base_url,
            max_retries=0,  # our RetryPolicy governs
            timeout=cfg.timeout_s,
            http_client=self._http,
        )
        self._native_refused = cfg.structured == "prompt"
        self._native_ok = False  # a response_format request has succeeded on this instance
        self._max_tokens_key = "max_tokens"
        self._pending_images: dict[tuple[str, int], asyncio.Future[str]] = {}
        self._rf_cache: dict[type[BaseModel], dict[str, Any]] = {}

    def __repr__(self) -> str:
        return f"OpenAIBackend(spec={self.cfg.spec!r}, endpoint={self._where!r})"

    async def aclose(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> OpenAIBackend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -------------------------------------------------------------- public
    async def generate(
        self,
        messages: list[Message],
        *,
        schema: type[BaseModel] | None = None,
        params: GenParams | None = None,
    ) -> Result:
        self.stats.calls += 1
        try:
            result = await self._generate(messages, schema, params or self.cfg.params)
        except BackendError:
            self.stats.failed += 1
            raise
        self.stats.succeeded += 1
        return result

    async def list_models(self) -> list[str]:
        """Model ids the server offers (`GET /models`)."""
        try:
            page = await self._client.models.list()
        except openai.OpenAIError as e:
            f = self._classify(e, None)
            raise BackendError(
                f.kind, f"{f.message} (listing models at {self._where})", retriable=f.retriable
            ) from None
        return [m.id for m in page.data]

    # -------------------------------------------------------------- internals
    def _scrub(self, text: str) -> str:
        key = self._client.api_key
        if isinstance(key, str) and key and key != PLACEHOLDER_KEY:
            text = text.replace(key, "***")
        return _KEY_LIKE.sub(r"\1-***", text)

    def _payload(self, params: GenParams, messages: list[dict[str, Any]]) -> dict[str, Any]:
        p: dict[str, Any] = {
            "model": self.cfg.name,
            "messages": messages,
            "temperature": params.temperature,
            "top_p": params.top_p,
            self._max_tokens_key: params.max_tokens,
        }
        if params.seed is not None:
            p["seed"] = params.seed
        return p

    async def _image_url(self, img: ImageInput) -> str:
        key = (img.sha256, self.cfg.image_max_side)
        url = _cache_get(key)
        if url is not None:
            return url
        fut = self._pending_images.get(key)
        if fut is None:
            # One encoding per image even when several requests for it start at once.
            fut = asyncio.ensure_future(asyncio.to_thread(encode_image_data_url, img.path, key[1]))
            self._pending_images[key] = fut

            def _done(f: asyncio.Future[str], key: tuple[str, int] = key) -> None:
                self._pending_images.pop(key, None)
                if not f.cancelled() and f.exception() is None:
                    _cache_put(key, f.result())

            fut.add_done_callback(_done)
        try:
            return await asyncio.shield(fut)
        except (OSError, ValueError, SyntaxError) as e:  # PIL raises these for unreadable images
            raise BackendError(ErrorKind.image, f"cannot encode image {img.sha256[:12]}: {e}") from None

    async def _render(self, messages: list[Message]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for m in messages:
            if not m.images:
                out.append({"role": m.role, "content": m.content})
                continue
            if not self.capabilities.vision:
                raise BackendError(
                    ErrorKind.image, f"{self.cfg.spec} is configured without vision (vision: false)"
                )
            parts: list[dict[str, Any]] = [
                {"type": "image_url", "image_url": {"url": await self._image_url(img)}} for img in m.images
            ]
            if m.content:
                parts.append({"type": "text", "text": m.content})
            out.append({"role": m.role, "content": parts})
        return out

    @staticmethod
    def _estimate_tokens(messages: list[Message], params: GenParams, extra_chars: int = 0) -> float:
        chars = extra_chars
        images = 0
        for m in messages:
            chars += len(m.content)
            images += len(m.images)
        return chars / 4 + images * _IMAGE_TOKENS_ESTIMATE + params.max_tokens

    def _classify(self, e: BaseException, payload: dict[str, Any] | None) -> _Failure:
        if isinstance(e, _BadBody):
            return _Failure(ErrorKind.server, f"invalid response from {self._where}: {e}", retriable=True)
        if isinstance(e, openai.APIStatusError):
            status = e.status_code
            detail = self._scrub(_error_detail(e))
            msg = f"HTTP {status} from {self._where}" + (f": {detail}" if detail else "")
            if status == 429:
                self.stats.rate_limited += 1
                ra = parse_retry_after(e.response.headers)
                return _Failure(ErrorKind.rate_limit, msg, retriable=True, retry_after=ra, status=status)
            if status == 408:
                return _Failure(ErrorKind.timeout, msg, retriable=True, status=status)
            if status >= 500 or status in (409, 425):
                ra = parse_retry_after(e.response.headers) if status == 503 else None
                return _Failure(ErrorKind.server, msg, retriable=True, retry_after=ra, status=status)
            if status in (401, 403):
                return _Failure(ErrorKind.auth, msg, retriable=False, status=status)
            return _Failure(ErrorKind.bad_request, msg, retriable=False, status=status)
        names = _root_names(e)
        dropped = any(n in _TRANSPORT_DROP_NAMES for n in names)
        if isinstance(e, (TimeoutError, openai.APITimeoutError)) and not dropped:
            return _Failure(
                ErrorKind.timeout,
                f"no complete response within {self.cfg.timeout_s:g}s from {self._where}",
                retriable=True,
            )
        if isinstance(e, (openai.APIConnectionError, OSError)):
            what = "connection dropped or response cut off" if dropped else "connection failed"
            return _Failure(
                ErrorKind.connection, f"{what} ({names[-1]}) talking to {self._where}", retriable=True
            )
        if isinstance(e, openai.APIResponseValidationError):
            return _Failure(ErrorKind.server, f"invalid response from {self._where}", retriable=True)
        return _Failure(ErrorKind.other, self._scrub(f"{type(e).__name__}: {e}"), retriable=False)

    def _is_format_refusal(self, f: _Failure, payload: dict[str, Any]) -> tuple[bool, bool]:
        """(refused?, certain?) for a failed response_format request."""
        if "response_format" not in payload or f.status not in (400, 422):
            return False, False
        low = f.message.lower()
        if any(w in low for w in _FORMAT_WORDS):
            return True, True
        return (f.status == 400 and not self._native_ok), False

    async def _request(self, payload: dict[str, Any], est_tokens: float) -> _Reply:
        """One logical request, retried per policy. Raises BackendError, or _FormatRefused."""
        attempt = 0
        timeout = self.cfg.timeout_s
        while True:
            await self.limiter.acquire(est_tokens)
            self.stats.requests += 1
            actual: float | None = None
            failure: _Failure | None = None
            try:
                try:
                    async with asyncio.timeout(timeout):  # total deadline, whatever the transport does
                        resp = await self._client.post(
                            "/chat/completions", body=payload, cast_to=_httpx.Response
                        )
                        body = resp.content
                    reply = _Reply(body)
                except (openai.OpenAIError, TimeoutError, OSError, _BadBody) as e:
                    failure = self._classify(e, payload)
                else:
                    actual = reply.prompt_tokens + reply.completion_tokens
                    self.stats.prompt_tokens += reply.prompt_tokens
                    self.stats.completion_tokens += reply.completion_tokens
                    reply.attempts = attempt + 1
                    return reply
            finally:
                self.limiter.release(est_tokens, actual)
            assert failure is not None
            errs = self.stats.errors
            errs[failure.kind.value] = errs.get(failure.kind.value, 0) + 1
            if (
                failure.status == 400
                and "max_tokens" in payload
                and "max_completion_tokens" in failure.message
            ):
                # Newer OpenAI models take max_completion_tokens instead: switch for good and resend.
                self._max_tokens_key = "max_completion_tokens"
                payload["max_completion_tokens"] = payload.pop("max_tokens")
                failure.retriable = True
            else:
                refused, certain = self._is_format_refusal(failure, payload)
                if refused:
                    raise _FormatRefused(failure.message, attempt + 1, certain=certain)
            if not failure.retriable or attempt >= self.policy.max_retries:
                tries = f" after {attempt + 1} attempts" if attempt else ""
                raise BackendError(failure.kind, failure.message + tries, retriable=failure.retriable)
            self.stats.retries += 1
            await asyncio.sleep(self.policy.delay(attempt, failure.retry_after))
            attempt += 1

    async def _generate(
        self, messages: list[Message], schema: type[BaseModel] | None, params: GenParams
    ) -> Result:
        if schema is None:
            rendered = await self._render(messages)
            reply = await self._request(
                self._payload(params, rendered), self._estimate_tokens(messages, params)
            )
            return self._result(
                reply,
                None,
                reply.attempts,
                Usage(prompt_tokens=reply.prompt_tokens, completion_tokens=reply.completion_tokens),
            )

        attempts = 0
        usage = Usage()
        native = not self._native_refused
        rf = self._rf_cache.get(schema) if native else None
        if native and rf is None:
            rf = self._rf_cache[schema] = response_format_for(schema)  # sent as is, never mutated
        reply: _Reply | None = None
        certain = True  # whether a refusal named response_format (only meaningful after one)
        if native:
            rendered = await self._render(messages)
            payload = self._payload(params, rendered)
            payload["response_format"] = rf
            try:
                reply = await self._request(payload, self._estimate_tokens(messages, params))
            except _FormatRefused as e:
                attempts += e.attempts
                if self.cfg.structured == "json_schema":
                    raise BackendError(
                        ErrorKind.bad_request,
                        f"{e} — the server refuses response_format json_schema; "
                        "use structured: auto or prompt",
                    ) from None
                self._native_refused = True
                self.stats.structured_mode = "prompt"
                native = False
                certain = e.certain
            else:
                self._native_ok = True
        if reply is None:
            prompted = with_json_instruction(messages, schema)
            rendered = await self._render(prompted)
            payload = self._payload(params, rendered)
            try:
                reply = await self._request(payload, self._estimate_tokens(prompted, params))
            except BackendError as err:
                if err.kind == ErrorKind.bad_request and not native and not certain and not self._native_ok:
                    # The 400 that sent us here was not about response_format after all.
                    self._native_refused = self.cfg.structured == "prompt"
                    self.stats.structured_mode = "prompt" if self._native_refused else "json_schema"
                raise
        est = self._estimate_tokens(messages, params)
        reasks = 0
        while True:
            attempts += reply.attempts
            usage.prompt_tokens += reply.prompt_tokens
            usage.completion_tokens += reply.completion_tokens
            if not reply.text and reply.refusal:
                error = f"the model refused: {reply.refusal[:200]}"
                outcome_parsed = None
            else:
                outcome = parse_structured(reply.text, schema, truncated=reply.finish_reason == "length")
                outcome_parsed, error = outcome.parsed, outcome.error
            if outcome_parsed is not None:
                return self._result(reply, outcome_parsed, attempts, usage)
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
            except _FormatRefused as e:  # pragma: no cover - a server that accepted it once refusing later
                raise BackendError(ErrorKind.bad_request, str(e)) from None

    def _result(self, reply: _Reply, parsed: dict[str, Any] | None, attempts: int, usage: Usage) -> Result:
        return Result(
            text=reply.text,
            parsed=parsed,
            usage=usage,
            finish_reason=reply.finish_reason,
            model=reply.model or self.cfg.name,
            attempts=attempts,
        )


def _error_detail(e: openai.APIStatusError) -> str:
    """The server's error message, short."""
    body = e.body
    msg = None
    if isinstance(body, dict):
        err = body.get("error", body)
        msg = err.get("message") if isinstance(err, dict) else err
        if msg is None:
            msg = body.get("detail") or body.get("message")
    if msg is None:
        try:
            msg = e.response.text
        except Exception:  # noqa: BLE001 - body may be unreadable
            msg = ""
    return str(msg).replace("\n", " ")[:300]
