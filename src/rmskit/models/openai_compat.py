"""`openai:` backend: any OpenAI-compatible chat-completions server (vLLM, SGLang, llama.cpp, Ollama,
LM Studio, OpenAI) over aiohttp's client, or httpx's where aiohttp is not installed (or asked for).

Why aiohttp's own client and not httpx over it (the `httpx-aiohttp` adapter the openai SDK vendors,
used here until issue 13's last profile): the adapter runs every request through httpx's models as
well (URL parsing and merging, header merging, cookie extraction, a Request and a Response object):
about half of the HTTP path's CPU in a cProfile of job (b) (bench/peers; 2.6 of the 5.2 s spent in
sending requests and reading their bodies). The request here is always
one pre-encoded JSON body to one URL, so the wire (`_AiohttpWire`) is a few lines over
`ClientSession.request`, with the same per-read timeouts, proxies from the environment, certifi's CA
bundle (as httpx) and redirects followed.

Why not the `openai` SDK: rmskit sends one kind of request (POST /chat/completions, JSON in and out;
GET /models at the probe) and governs retries, backoff, Retry-After, concurrency and rate limits itself
(rmskit.models.limits). It had already bypassed the SDK's typed `chat.completions.create` (~0.6 ms of
CPU per request for its parameter transform and response models) and used only the SDK's HTTP client,
headers and exception classes. Importing the SDK for those was a third of a build's CPU to its first
request (bench/startup.py: 1.41-1.50 s with it, 0.92-0.96 s without; its `openai.types` alone 0.35-0.5 s)
and 11.6 MB more memory than httpx and aiohttp alone (issue 13). The SDK's conventions are kept:
OPENAI_BASE_URL when no base_url is configured, OPENAI_ORG_ID and OPENAI_PROJECT_ID sent as its
headers, redirects followed.

The API key is read from the environment variable the config names; it is kept on no pydantic model,
never logged, and scrubbed from every error message.
"""

from __future__ import annotations

import errno
import json
import os
import re
import sys
from collections.abc import AsyncIterator, Mapping
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

import orjson

import rmskit
from rmskit.config import BackendConfig
from rmskit.models.base import BackendError, ErrorKind, GenParams, Message
from rmskit.models.images import ImageURLs, encode_image_data_url  # noqa: F401 - re-exported
from rmskit.models.limits import parse_retry_after
from rmskit.models.remote import Failure, RemoteBackend, RemoteStats, Reply

try:  # a dependency; without it (a trimmed install), httpx's client
    import aiohttp

    HAVE_AIOHTTP = True
except ImportError:  # pragma: no cover
    HAVE_AIOHTTP = False

PLACEHOLDER_KEY = "EMPTY"  # what local servers without auth expect (vLLM/SGLang accept any key)
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
OpenAIStats = RemoteStats  # the name benchmarks and older callers use


class _BadBody(Exception):
    """A 200 whose body is not a chat completion (truncated or invalid JSON)."""


class _TooLarge(Exception):
    """The response body is over cfg.max_response_bytes."""


class _ConnectionFailed(Exception):
    """The request could not be sent or its response not read (the cause is chained)."""


class HTTPStatusError(Exception):
    """An HTTP error status from the endpoint, with its headers and body (parsed JSON, else text)."""

    def __init__(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.text = body.decode("utf-8", "replace")
        try:
            self.body: Any = json.loads(body)
        except ValueError:
            self.body = self.text
        super().__init__(f"Error code: {status} - {self.body}")


def request_body(payload: dict[str, Any]) -> bytes:
    """The payload as compact UTF-8 JSON. orjson: ~4 instead of ~130 us for a body with a 320-pixel
    photo (json's encoder scans the image's base64 text character by character), a tenth of the client's
    CPU per request (issue 13). What orjson refuses (an integer past 64 bits, a non-str key) goes through
    json as before."""
    try:
        return orjson.dumps(payload)
    except TypeError:  # orjson.JSONEncodeError
        return json.dumps(payload).encode()


def parse_chat_completion(body: bytes) -> Reply:
    try:
        d = json.loads(body)
    except ValueError as e:
        raise _BadBody(f"response body is not valid JSON ({len(body)} bytes)") from e
    try:
        choice = d["choices"][0]
        msg = choice["message"]
        usage = d.get("usage") or {}
        return Reply(
            msg.get("content") or "",
            refusal=msg.get("refusal"),
            finish_reason=choice.get("finish_reason"),
            model=d.get("model") or "",
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
        )
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as e:
        raise _BadBody("response JSON has no choices[0].message") from e


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


async def _read_capped(chunks: AsyncIterator[bytes], cap: int) -> bytes:
    """The body from its chunks as they arrive (inflated, where it was compressed), refused as soon as it
    passes `cap` bytes: an oversized answer costs bounded memory."""
    buf = bytearray()
    async for chunk in chunks:
        buf += chunk
        if len(buf) > cap:
            raise _TooLarge(f"over {cap:,} bytes")
    return bytes(buf)


class Wire(Protocol):
    """One HTTP exchange: the response body, at most `cap` bytes of it (read as it streams, so an
    oversized answer costs bounded memory). Raises `HTTPStatusError` on an error status, `_TooLarge`,
    `_ConnectionFailed` when the request could not be sent; a timeout (`TimeoutError`, httpx's
    TimeoutException) and errors while reading the body come out as the HTTP library raised them."""

    async def exchange(
        self, method: str, url: str, content: bytes | None, headers: Mapping[str, str], cap: int
    ) -> bytes: ...

    async def aclose(self) -> None: ...


class _AiohttpWire:
    """aiohttp's ClientSession: made on the first request, in the running event loop (aiohttp binds a
    session to its loop); a connection pool of concurrency + 16, kept alive 30 s; each connect and each
    read limited to `timeout_s` (the request's total deadline is RemoteBackend's); the endpoint's proxy
    from the environment (HTTP(S)_PROXY, NO_PROXY), as httpx reads it; no cookie jar (an API client has
    no use for one, and it costs a parse per response). The proxy is looked up once, not per request
    with aiohttp's `trust_env`: that reads .netrc and the proxy settings in a thread for every request,
    two thread hops that made the client's CPU per request 1.5-2.1 instead of 0.8-1.0 ms (bench/peers
    job (a))."""

    def __init__(self, cfg: BackendConfig) -> None:
        self._cfg = cfg
        self._session: aiohttp.ClientSession | None = None
        self._proxy: Any = None

    def _open(self, url: str) -> aiohttp.ClientSession:
        t = self._cfg.timeout_s
        connector = aiohttp.TCPConnector(
            limit=self._cfg.concurrency + 16,
            keepalive_timeout=30.0,
            ssl=_ssl_context() if url.startswith("https:") else True,
        )
        self._proxy = _env_proxy(url)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, connect=t, sock_connect=min(t, 15.0), sock_read=t),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        return self._session

    async def exchange(
        self, method: str, url: str, content: bytes | None, headers: Mapping[str, str], cap: int
    ) -> bytes:
        session = self._session or self._open(url)
        try:
            resp = await session.request(method, url, data=content, headers=headers, proxy=self._proxy)
        except TimeoutError:
            raise  # classified as a timeout as it is
        except Exception as e:
            raise _ConnectionFailed from e
        try:
            declared = resp.content_length
            if declared is not None and declared > cap:
                raise _TooLarge(f"{declared:,} bytes declared")
            if declared is not None and "Content-Encoding" not in resp.headers:
                body = await resp.read()  # one buffer, no chunk loop: the usual answer
            else:  # compressed (its declared length is not what it inflates to), or of unknown length
                body = await _read_capped(resp.content.iter_any(), cap)
            if resp.status >= 400:
                raise HTTPStatusError(resp.status, resp.headers, body)
        except BaseException:
            resp.close()  # unread bytes may follow: the connection is not reused
            raise
        resp.release()
        return body

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _env_proxy(url: str) -> Any:
    """The proxy URL for `url` from the environment (its credentials in it: aiohttp deprecates
    `proxy_auth`), or None: none is set, or NO_PROXY exempts the host."""
    from aiohttp.helpers import get_env_proxy_for_url
    from yarl import URL

    try:
        proxy, auth = get_env_proxy_for_url(URL(url))
    except LookupError:
        return None
    return proxy if auth is None else proxy.with_user(auth.login).with_password(auth.password)


def _ssl_context() -> Any:
    """The CA bundle httpx (and the openai SDK) verify with: SSL_CERT_FILE or SSL_CERT_DIR when set,
    else certifi's, not the system's (which a slim container may lack)."""
    import ssl

    if cafile := os.environ.get("SSL_CERT_FILE"):
        return ssl.create_default_context(cafile=cafile)
    if capath := os.environ.get("SSL_CERT_DIR"):
        return ssl.create_default_context(capath=capath)
    import certifi

    return ssl.create_default_context(cafile=certifi.where())


class _HttpxWire:
    """httpx's own client and transport (its default pool, timeouts and environment handling): the
    fallback where aiohttp is not installed. Two costs it has and the aiohttp wire has not: its pool
    scans every connection for every queued request (httpcore), 12-15 ms of CPU per request at
    concurrency 64 against ~0.5 (measured 2026-12-03), and it inflates each received chunk of a
    compressed answer whole, so a small gzip body that inflates past max_response_bytes is refused only
    after it is in memory."""

    def __init__(self, cfg: BackendConfig, client: Any = None) -> None:
        import httpx

        self._httpx = httpx
        self._client = client or httpx.AsyncClient(
            limits=httpx.Limits(
                max_connections=cfg.concurrency + 16,
                max_keepalive_connections=cfg.concurrency + 16,
                keepalive_expiry=30.0,
            ),
            timeout=httpx.Timeout(cfg.timeout_s, connect=min(cfg.timeout_s, 15.0)),
            follow_redirects=True,
        )

    async def exchange(
        self, method: str, url: str, content: bytes | None, headers: Mapping[str, str], cap: int
    ) -> bytes:
        req = self._client.build_request(method, url, content=content, headers=headers)
        try:
            resp = await self._client.send(req, stream=True)
        except self._httpx.TimeoutException:
            raise  # classified as a timeout as it is
        except Exception as e:
            raise _ConnectionFailed from e
        try:
            declared = resp.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > cap:
                raise _TooLarge(f"{int(declared):,} bytes declared")
            body = await _read_capped(resp.aiter_bytes(), cap)
            if resp.status_code >= 400:
                raise HTTPStatusError(resp.status_code, resp.headers, body)
            return body
        finally:
            await resp.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()


def make_wire(cfg: BackendConfig, transport: str) -> Wire:
    """aiohttp for "auto" where installed, else httpx; "aiohttp" or "httpx" as asked."""
    if transport not in ("auto", "aiohttp", "httpx"):
        raise ValueError(f"unknown transport {transport!r}: choose auto, aiohttp or httpx")
    if transport != "httpx" and HAVE_AIOHTTP:
        return _AiohttpWire(cfg)
    if transport == "aiohttp":
        raise ValueError("transport 'aiohttp' needs the aiohttp package (pip install aiohttp)")
    return _HttpxWire(cfg)


def _httpx_errors(name: str) -> tuple[type[BaseException], ...]:
    """httpx's exception class `name` when httpx is in use (loaded), else none: the aiohttp wire never
    imports it."""
    httpx = sys.modules.get("httpx")
    return (getattr(httpx, name),) if httpx is not None else ()


def _headers(key: str) -> dict[str, str]:
    """What every request carries: the bearer key, JSON both ways, and the organisation and project the
    openai SDK would send from the same environment variables."""
    headers = {
        "Authorization": f"Bearer {key}",
        "Content-Type": "application/json",
        "Accept": "application/json",
        "User-Agent": f"rmskit/{rmskit.__version__}",
    }
    for env, name in (("OPENAI_ORG_ID", "OpenAI-Organization"), ("OPENAI_PROJECT_ID", "OpenAI-Project")):
        if value := os.environ.get(env):
            headers[name] = value
    return headers


# ------------------------------------------------------------------ the backend


def _is_refused(err: BaseException) -> bool:
    """Connection refused anywhere in the cause chain (aiohttp wraps it in ClientConnectorError, httpx in
    ConnectError)."""
    cur: BaseException | None = err
    for _ in range(8):
        if cur is None:
            return False
        if isinstance(cur, ConnectionRefusedError) or getattr(cur, "errno", None) == errno.ECONNREFUSED:
            return True
        os_error = getattr(cur, "os_error", None)  # aiohttp.ClientConnectorError
        if isinstance(os_error, OSError) and os_error.errno == errno.ECONNREFUSED:
            return True
        if "connection refused" in str(cur).lower() or "connect call failed" in str(cur).lower():
            return True
        cur = cur.__cause__ or cur.__context__
    return False


class OpenAIBackend(RemoteBackend):
    """ModelBackend over an OpenAI-compatible `/chat/completions` endpoint.

    One instance per endpoint and event loop; call `aclose()` when done. `stats` holds live counters;
    `await start(store)` probes the server's capabilities (models/probe.py)."""

    def __init__(
        self, cfg: BackendConfig, *, transport: Literal["auto", "aiohttp", "httpx"] = "auto"
    ) -> None:
        if cfg.kind != "openai":
            raise ValueError(f"OpenAIBackend needs an 'openai:NAME' spec, got {cfg.spec!r}")
        if isinstance(cfg.base_url, list):
            raise ValueError("OpenAIBackend takes one base_url; several go through models.pool.EndpointPool")
        base_url, url_key = _split_userinfo(cfg.base_url)
        # A key written into the URL (http://user:KEY@host/v1) is used as the bearer key: aiohttp
        # refuses a URL with credentials next to an Authorization header.
        key = os.environ.get(cfg.api_key_env) or url_key
        if key is None:
            if cfg.base_url is None:
                raise BackendError(
                    ErrorKind.auth,
                    f"no API key: environment variable {cfg.api_key_env} is not set "
                    "(set it, or pass --base-url for a local server that needs no key)",
                )
            key = PLACEHOLDER_KEY
        super().__init__(cfg)
        self.capabilities = self.capabilities.model_copy(update={"local": _is_loopback(cfg.base_url)})
        self.where = _public_url(cfg.base_url)
        self._wire = make_wire(cfg, transport)
        self._key = key
        self._max_tokens_key = "max_tokens"
        self._images = ImageURLs()
        # as the openai SDK resolves it: the configured URL, else OPENAI_BASE_URL, else OpenAI's
        root = (base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1").rstrip("/")
        self._chat_url = f"{root}/chat/completions"
        self._models_url = f"{root}/models"
        self._headers = _headers(key)

    def __repr__(self) -> str:
        return f"OpenAIBackend(spec={self.cfg.spec!r}, endpoint={self.where!r})"

    async def aclose(self) -> None:
        await self._wire.aclose()

    async def __aenter__(self) -> OpenAIBackend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def list_models(self) -> list[str]:
        """Model ids the server offers (`GET /models`)."""
        try:
            body = await self._exchange("GET", self._models_url)
            try:
                return [str(m["id"]) for m in json.loads(body)["data"]]
            except (ValueError, KeyError, TypeError) as e:
                raise _BadBody("GET /models answered no data[].id list") from e
        except Exception as e:
            f = self._classify(e)
            if f.kind == ErrorKind.auth:
                from rmskit.models.base import AuthenticationError

                raise AuthenticationError(self.where, f.status) from None
            raise BackendError(
                f.kind, f"{f.message} (listing models at {self.where})", retriable=f.retriable
            ) from None

    # -------------------------------------------------------------- wire
    async def _send(self, payload: dict[str, Any]) -> bytes:
        """POST /chat/completions and read the body."""
        return await self._exchange("POST", self._chat_url, request_body(payload))

    async def _exchange(self, method: str, url: str, content: bytes | None = None) -> bytes:
        """One request and its body (`Wire.exchange`); a failure to send names the endpoint."""
        try:
            return await self._wire.exchange(method, url, content, self._headers, self.cfg.max_response_bytes)
        except _ConnectionFailed as e:
            raise _ConnectionFailed(f"{type(e.__cause__).__name__} sending to {self.where}") from e.__cause__

    def _parse_reply(self, body: bytes) -> Reply:
        return parse_chat_completion(body)

    def _scrub(self, text: str) -> str:
        key = self._key
        if key and key != PLACEHOLDER_KEY:
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

    def _adapt(self, failure: Failure, payload: dict[str, Any]) -> bool:
        if failure.status == 400 and "max_tokens" in payload and "max_completion_tokens" in failure.message:
            # Newer OpenAI models take max_completion_tokens instead: switch for good and resend.
            self._max_tokens_key = "max_completion_tokens"
            payload["max_completion_tokens"] = payload.pop("max_tokens")
            return True
        return False

    async def _render(self, messages: list[Message]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for m in messages:
            if not m.images:
                out.append({"role": m.role, "content": m.content})
                continue
            if not self.capabilities.vision:
                raise BackendError(
                    ErrorKind.image, f"{self.cfg.spec} has no vision (probed, or vision: false)"
                )
            parts: list[dict[str, Any]] = [
                {
                    "type": "image_url",
                    "image_url": {"url": await self._images.url(img, self.cfg.image_max_side)},
                }
                for img in m.images
            ]
            if m.content:
                parts.append({"type": "text", "text": m.content})
            out.append({"role": m.role, "content": parts})
        return out

    def _classify(self, e: BaseException) -> Failure:
        if isinstance(e, _BadBody):
            return Failure(ErrorKind.server, f"invalid response from {self.where}: {e}", retriable=True)
        if isinstance(e, _TooLarge):
            return Failure(
                ErrorKind.too_large,
                f"response from {self.where} too large ({e}; limit max_response_bytes)",
                retriable=False,
            )
        if isinstance(e, HTTPStatusError):
            status = e.status
            detail = self._scrub(_error_detail(e))
            msg = f"HTTP {status} from {self.where}" + (f": {detail}" if detail else "")
            if status == 429:
                self.stats.rate_limited += 1
                ra = parse_retry_after(e.headers)
                return Failure(ErrorKind.rate_limit, msg, retriable=True, retry_after=ra, status=status)
            if status == 408:
                return Failure(ErrorKind.timeout, msg, retriable=True, status=status)
            if status >= 500 or status in (409, 425):
                ra = parse_retry_after(e.headers) if status == 503 else None
                return Failure(ErrorKind.server, msg, retriable=True, retry_after=ra, status=status)
            if status in (401, 403):
                return Failure(ErrorKind.auth, msg, retriable=False, status=status)
            return Failure(ErrorKind.bad_request, msg, retriable=False, status=status)
        if _is_refused(e):
            return Failure(
                ErrorKind.connection, f"connection refused by {self.where}", retriable=True, refused=True
            )
        names = _root_names(e)
        dropped = any(n in _TRANSPORT_DROP_NAMES for n in names)
        if isinstance(e, (TimeoutError, *_httpx_errors("TimeoutException"))) and not dropped:
            return Failure(
                ErrorKind.timeout,
                f"no complete response within {self.cfg.timeout_s:g}s from {self.where}",
                retriable=True,
            )
        # Errors while streaming the body come from the HTTP library itself, not wrapped.
        if dropped or isinstance(e, (_ConnectionFailed, OSError, *_httpx_errors("TransportError"))):
            what = "connection dropped or response cut off" if dropped else "connection failed"
            return Failure(
                ErrorKind.connection, f"{what} ({names[-1]}) talking to {self.where}", retriable=True
            )
        return Failure(ErrorKind.other, self._scrub(f"{type(e).__name__}: {e}"), retriable=False)


def _error_detail(e: HTTPStatusError) -> str:
    """The server's error message, short."""
    body = e.body
    msg = None
    if isinstance(body, dict):
        err = body.get("error", body)
        msg = err.get("message") if isinstance(err, dict) else err
        if msg is None:
            msg = body.get("detail") or body.get("message")
    if msg is None:
        msg = e.text
    return str(msg).replace("\n", " ")[:300]


def _split_userinfo(url: str | None) -> tuple[str | None, str | None]:
    """(`url` without `user:password@`, the password or else the user name, if any)."""
    if not url:
        return url, None
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None
    host = parts.hostname or ""
    netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc)), parts.password or parts.username
