"""Safety of the review page: loopback by default, a token for any other bind, DNS-rebinding guard,
CSRF protection for state-changing requests, and strict response headers (CSP)."""

from __future__ import annotations

import ipaddress
import json
import math
import secrets
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlencode, urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response

TOKEN_COOKIE = "rmskit_token"
TOKEN_HEADER = "x-rmskit-token"
CSRF_HEADER = "x-csrf-token"
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MAX_BODY_BYTES = 1_000_000
MIN_TOKEN_CHARS = 16
MIN_TOKEN_BITS = 64.0  # estimated from the token's own character statistics

# No inline script or style anywhere: every script/style is a file under /static.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def is_loopback(host: str) -> bool:
    host = host.strip().strip("[]")
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_token(token: str) -> None:
    """Refuse a token an attacker could guess: short, with whitespace or control characters (which
    also break cookies and headers), or low in entropy (repeats, few distinct characters). The value
    itself is never part of the message."""
    hint = "generate one with: python -c 'import secrets; print(secrets.token_urlsafe(24))'"
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"a review token must be at least {MIN_TOKEN_CHARS} characters; {hint}")
    if any(c.isspace() or not c.isprintable() or not c.isascii() for c in token):
        raise ValueError(f"a review token must be printable ASCII without spaces; {hint}")
    n = len(token)
    # bits if every character were drawn from the token's own character distribution
    bits = -n * sum((k / n) * math.log2(k / n) for k in Counter(token).values())
    repeats = any(n % p == 0 and token == token[:p] * (n // p) for p in range(1, n // 2 + 1))
    if repeats or bits < MIN_TOKEN_BITS:
        raise ValueError(
            f"the review token is too easy to guess (about {bits:.0f} bits; need {MIN_TOKEN_BITS:.0f}); {hint}"
        )


def resolve_token(host: str, token: str | None, echo: Callable[[str], None] = print) -> str | None:
    """The token the server will require. A non-loopback bind never runs without one: when none is
    given, a fresh one is generated and printed (the only way to learn it)."""
    if token is not None:
        check_token(token)
    if is_loopback(host) or token is not None:
        return token
    token = secrets.token_urlsafe(24)
    echo(f"review token (required because {host} is not a loopback address): {token}")
    return token


def _host_name(host_header: str) -> str:
    """'example:8765' -> 'example', '[::1]:8765' -> '::1'."""
    h = host_header.strip()
    if h.startswith("["):
        return h[1:].split("]", 1)[0]
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def _same_origin(url: str, request: Request) -> bool:
    parts = urlsplit(url)
    host = request.headers.get("host", "")
    return parts.scheme in ("http", "https") and parts.netloc.lower() == host.lower()


def _reject(status: int, detail: str) -> Response:
    return JSONResponse({"detail": detail}, status_code=status)


class Guard:
    """The checks every request passes before it reaches a route (one middleware, run in order)."""

    def __init__(self, token: str | None, csrf_token: str) -> None:
        self.token = token
        self.csrf_token = csrf_token

    def _token_ok(self, request: Request) -> bool:
        assert self.token is not None
        given = request.cookies.get(TOKEN_COOKIE) or request.headers.get(TOKEN_HEADER) or ""
        return secrets.compare_digest(given.encode(), self.token.encode())

    async def __call__(
        self, request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        resp = await self._check(request, call_next)
        for k, v in SECURITY_HEADERS.items():
            resp.headers.setdefault(k, v)
        return resp

    async def _check(self, request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if self.token is None:
            # Without a token the server is loopback-only; refusing other Host names stops DNS rebinding
            # (a page on evil.example resolved to 127.0.0.1 still sends Host: evil.example).
            if not is_loopback(_host_name(request.headers.get("host", ""))):
                return _reject(400, "host not allowed: the review server answers on loopback names only")
        else:
            login = request.query_params.get("token")
            if login is not None and request.method == "GET":
                if not secrets.compare_digest(login.encode(), self.token.encode()):
                    return PlainTextResponse("invalid token", status_code=401)
                rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
                target = request.url.path + (f"?{urlencode(rest)}" if rest else "")
                resp = RedirectResponse(target, status_code=303)
                resp.set_cookie(TOKEN_COOKIE, self.token, httponly=True, samesite="strict", path="/")
                return resp
            if not self._token_ok(request):
                return PlainTextResponse(
                    "token required: open the URL printed by `rmskit review` (…/?token=…)", status_code=401
                )
        if request.method not in SAFE_METHODS:
            site = request.headers.get("sec-fetch-site")
            if site is not None and site not in ("same-origin", "none"):
                return _reject(403, f"cross-site request refused (sec-fetch-site: {site})")
            origin = request.headers.get("origin")
            referer = request.headers.get("referer")
            if origin is not None and not _same_origin(origin, request):
                return _reject(403, "cross-origin request refused")
            if origin is None and referer is not None and not _same_origin(referer, request):
                return _reject(403, "cross-origin request refused")
            ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if ctype != "application/json":
                return _reject(415, "state-changing requests must send application/json")
            given = request.headers.get(CSRF_HEADER, "")
            if not secrets.compare_digest(given.encode(), self.csrf_token.encode()):
                return _reject(403, "missing or wrong CSRF token")
        return await call_next(request)


class BodyLimit:
    """ASGI middleware: request bodies over `limit` bytes get 413 before any route parses them, both
    when Content-Length says so and when a chunked body grows past it."""

    def __init__(self, app: Any, limit: int = MAX_BODY_BYTES) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        try:
            too_big = declared is not None and int(declared) > self.limit
        except ValueError:
            await _send_json(send, 400, "invalid Content-Length")
            return
        if too_big:
            await _send_json(send, 413, f"request body too large (limit {self.limit:,} bytes)")
            return
        # read the body here (bounded), then replay it: a route never sees a body over the limit
        body = b""
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body += message.get("body", b"")
            more = bool(message.get("more_body", False))
            if len(body) > self.limit:
                await _send_json(send, 413, f"request body too large (limit {self.limit:,} bytes)")
                return
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


async def _send_json(send: Any, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
