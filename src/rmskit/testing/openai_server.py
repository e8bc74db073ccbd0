"""An OpenAI-compatible test server on 127.0.0.1: real HTTP/1.1 (keep-alive) over TCP, run in a
background thread (or as `python -m rmskit.testing.openai_server`).

It speaks `/v1/chat/completions` and `/v1/models` (+ `/stats` with its own counters) and can inject
latency, a capacity limit and faults: 429 with Retry-After, 500/503, stalls, truncated bodies,
dropped connections, malformed JSON inside a 200, invalid response bodies, and refusal of
`response_format` (to exercise the JSON-in-prompt fallback).

Built on asyncio streams + h11 (the HTTP/1.1 state machine uvicorn and httpx use) rather than an ASGI
framework because the faults need byte-level control of the socket (close with no response; declare
a Content-Length and send less), which ASGI servers do not allow, and so that the server's own CPU
cost stays small next to the client's in benchmarks.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import h11
from pydantic import BaseModel, Field

FAULT_KINDS = (
    "rate_limit",  # 429 with Retry-After
    "server_error",  # 500
    "unavailable",  # 503
    "stall",  # no answer for `stall_s` (past the client's timeout), then close
    "truncated",  # declares Content-Length, sends half the body, closes
    "bad_body",  # a complete 200 whose body is half a JSON document
    "drop",  # closes the connection without any response
    "malformed",  # a valid 200 whose assistant content is broken JSON
    "refuse_format",  # 400 mentioning response_format
    "bad_request",  # 400 that says nothing about response_format
    "unauthorized",  # 401 echoing the presented key, as some servers do (clients must scrub it)
)
# The mix used by `fault_rate` unless told otherwise: every transport/server fault, no stalls (they
# cost a client timeout each) and no format refusal (that changes the client's mode for good).
DEFAULT_FAULT_MIX = (
    "rate_limit",
    "server_error",
    "unavailable",
    "truncated",
    "bad_body",
    "drop",
    "malformed",
)

_WORDS = (
    "kitchen stove pan oil towel knife child ladder window cable socket bottle shelf table chair lamp "
    "candle door stairs floor water bucket glass plant dog cat car bike road helmet rope box paper"
).split()
_FENCE_RE = re.compile(r"```(?:json)?\s*\n(.*?)```", re.S)


class Reply(BaseModel):
    """What a responder may return instead of a plain str/dict, to control the finish reason."""

    content: str | dict[str, Any]
    finish_reason: str = "stop"


Responder = Callable[[dict[str, Any]], "str | dict[str, Any] | Reply"]
FaultFn = Callable[[dict[str, Any], int], "str | None"]


class RequestRecord(BaseModel):
    index: int
    path: str
    t_start: float  # time.monotonic() when the full request had been read
    t_end: float = 0.0
    messages_hash: str = ""
    status: int = 0  # 0: no HTTP response (dropped / stalled)
    delivered: bool = False  # a full, well-formed HTTP response was written
    fault: str | None = None
    response_format: bool = False
    authorization: str | None = None
    body: dict[str, Any] | None = None  # only with keep_bodies=True
    headers: dict[str, str] | None = None  # lower-cased names; only with keep_bodies=True


class ServerStats(BaseModel):
    requests: int = 0  # chat requests received
    delivered: int = 0  # chat requests answered with a complete 200
    busy_s: float = 0.0  # sum of service times of requests that were served
    first_start: float | None = None
    last_end: float | None = None
    last_end_unix: float | None = None  # wall clock (time.time) of last_end: compare with a client's end
    max_concurrent: int = 0  # most chat requests inside the server at once (any stage)
    max_in_service: int = 0  # most requests being served at once (<= capacity)
    capacity: int | None = None
    statuses: dict[str, int] = Field(default_factory=dict)
    faults: dict[str, int] = Field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def span_s(self) -> float:
        if self.first_start is None or self.last_end is None:
            return 0.0
        return max(0.0, self.last_end - self.first_start)

    def utilisation(self, capacity: int | None = None) -> float:
        """busy / (span * C)."""
        c = capacity or self.capacity
        span = self.span_s
        return self.busy_s / (span * c) if c and span > 0 else 0.0


# ---------------------------------------------------------------- schema-valid instances


def _resolve_ref(ref: str, root: dict[str, Any]) -> dict[str, Any]:
    if not ref.startswith("#/"):
        return {}
    node: Any = root
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        node = node.get(part, {}) if isinstance(node, dict) else {}
    return node if isinstance(node, dict) else {}


def _text(rng: random.Random, min_len: int = 1, max_len: int | None = None) -> str:
    target = max(min_len, rng.randint(8, 40))
    if max_len is not None:
        target = min(target, max_len)
    words: list[str] = []
    length = 0
    while length < target:
        w = rng.choice(_WORDS)
        words.append(w)
        length += len(w) + (1 if len(words) > 1 else 0)
    s = " ".join(words)
    if max_len is not None:
        s = s[:max_len].rstrip() if max_len >= min_len else s[:max_len]
    while len(s) < min_len:
        s += "x"
    return s


def instance_from_schema(
    schema: dict[str, Any],
    rng: random.Random | None = None,
    *,
    _root: dict[str, Any] | None = None,
    _depth: int = 0,
) -> Any:
    """A random JSON value valid against `schema`: $defs/$ref, allOf, anyOf/oneOf (nullable),
    enum/const, objects (all required + some optional properties), arrays (minItems/maxItems),
    strings (minLength/maxLength), integers and numbers (minimum/maximum, exclusive bounds)."""
    rng = rng or random.Random(0)
    root = _root if _root is not None else schema
    if not isinstance(schema, dict):
        return None
    if "$ref" in schema:
        target = _resolve_ref(schema["$ref"], root)
        merged = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        return instance_from_schema(merged, rng, _root=root, _depth=_depth + 1)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema and schema["enum"]:
        return rng.choice(schema["enum"])
    for key in ("anyOf", "oneOf"):
        if schema.get(key):
            opts = [o for o in schema[key] if isinstance(o, dict)]
            non_null = [o for o in opts if o.get("type") != "null"]
            if non_null and (len(non_null) == len(opts) or rng.random() < 0.8):
                return instance_from_schema(rng.choice(non_null), rng, _root=root, _depth=_depth + 1)
            return None
    if schema.get("allOf"):
        merged: dict[str, Any] = {}
        for sub in schema["allOf"]:
            sub = _resolve_ref(sub["$ref"], root) if isinstance(sub, dict) and "$ref" in sub else sub
            for k, v in sub.items():
                if k == "properties":
                    merged.setdefault("properties", {}).update(v)
                elif k == "required":
                    merged.setdefault("required", []).extend(v)
                else:
                    merged[k] = v
        merged.update({k: v for k, v in schema.items() if k != "allOf"})
        return instance_from_schema(merged, rng, _root=root, _depth=_depth + 1)

    typ = schema.get("type")
    if isinstance(typ, list):
        non_null = [t for t in typ if t != "null"]
        typ = rng.choice(non_null) if non_null and rng.random() < 0.9 else (typ[0] if typ else None)
    if typ is None:
        typ = "object" if "properties" in schema else "array" if "items" in schema else "string"
    deep = _depth > 10

    if typ == "null":
        return None
    if typ == "boolean":
        return rng.random() < 0.5
    if typ in ("integer", "number"):
        lo = schema.get("minimum")
        hi = schema.get("maximum")
        if "exclusiveMinimum" in schema and not isinstance(schema["exclusiveMinimum"], bool):
            lo = schema["exclusiveMinimum"] + (1 if typ == "integer" else 1e-6)
        if "exclusiveMaximum" in schema and not isinstance(schema["exclusiveMaximum"], bool):
            hi = schema["exclusiveMaximum"] - (1 if typ == "integer" else 1e-6)
        lo = lo if lo is not None else (hi - 100 if hi is not None else 0)
        hi = hi if hi is not None else lo + 100
        if typ == "integer":
            import math

            ilo, ihi = math.ceil(lo), math.floor(hi)
            return rng.randint(ilo, max(ilo, ihi))
        return round(rng.uniform(lo, hi), 3) if hi > lo else lo
    if typ == "string":
        fmt = schema.get("format")
        if fmt == "date-time":
            return "2024-01-01T00:00:00Z"
        if fmt == "date":
            return "2024-01-01"
        if fmt in ("uri", "url"):
            return "https://example.com/x"
        return _text(rng, int(schema.get("minLength", 1)), schema.get("maxLength"))
    if typ == "array":
        lo = int(schema.get("minItems", 0))
        hi = schema.get("maxItems")
        hi = lo + 3 if hi is None else int(hi)
        n = lo if deep else rng.randint(lo, max(lo, min(hi, lo + 3)))
        prefix = schema.get("prefixItems") or []
        items = schema.get("items", {})
        out = []
        for i in range(n):
            sub = prefix[i] if i < len(prefix) else items
            out.append(
                instance_from_schema(sub if isinstance(sub, dict) else {}, rng, _root=root, _depth=_depth + 1)
            )
        return out
    if typ == "object":
        props: dict[str, Any] = schema.get("properties", {})
        required = set(schema.get("required", []))
        obj = {}
        for name, sub in props.items():
            if name in required or (not deep and rng.random() < 0.5):
                obj[name] = instance_from_schema(sub, rng, _root=root, _depth=_depth + 1)
        return obj
    return None


def schema_from_messages(messages: Sequence[Any]) -> dict[str, Any] | None:
    """The JSON schema a JSON-in-prompt request embeds (last fenced JSON block that looks like a
    schema), or None."""
    found = None
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        texts = (
            [content]
            if isinstance(content, str)
            else [p.get("text", "") for p in content or [] if isinstance(p, dict)]
        )
        for t in texts:
            for block in _FENCE_RE.findall(t or ""):
                try:
                    obj = json.loads(block)
                except ValueError:
                    continue
                if isinstance(obj, dict) and ("properties" in obj or "$defs" in obj or "type" in obj):
                    found = obj
    return found


def make_default_responder(seed: int = 0) -> Responder:
    """Schema-valid JSON for response_format requests and for JSON-in-prompt requests whose schema is
    embedded in a fenced block; plain text otherwise."""
    rng = random.Random(seed)

    def respond(body: dict[str, Any]) -> str | dict[str, Any]:
        rf = body.get("response_format") or {}
        if rf.get("type") == "json_schema":
            schema = (rf.get("json_schema") or {}).get("schema") or {}
            return instance_from_schema(schema, rng)
        if rf.get("type") == "json_object" and isinstance(rf.get("schema"), dict):  # llama.cpp extension
            return instance_from_schema(rf["schema"], rng)
        schema = schema_from_messages(body.get("messages") or [])
        if schema is not None:
            return instance_from_schema(schema, rng)
        return "A short helpful answer about " + " ".join(rng.choice(_WORDS) for _ in range(4)) + "."

    return respond


def _text_chars(messages: Sequence[Any]) -> tuple[int, int]:
    chars = images = 0
    for m in messages:
        c = m.get("content") if isinstance(m, dict) else None
        if isinstance(c, str):
            chars += len(c)
        elif isinstance(c, list):
            for p in c:
                if isinstance(p, dict):
                    if p.get("type") == "text":
                        chars += len(p.get("text", ""))
                    elif p.get("type") == "image_url":
                        images += 1
    return chars, images


# ---------------------------------------------------------------- the server


class OpenAITestServer:
    """Start with `with OpenAITestServer(...) as srv:` or `srv.start()` / `srv.stop()`; point clients
    at `srv.base_url` (ends in /v1).

    Faults, first match wins: `fault_fn(body, index)`; then the next entry of `script` (None = no fault);
    then `fault_rate` drawn from `fault_kinds`. `refuse_response_format` answers 400 to every request
    carrying response_format."""

    def __init__(
        self,
        *,
        responder: Responder | None = None,
        latency: float | Callable[[dict[str, Any]], float] = 0.0,
        capacity: int | None = None,
        fault_rate: float = 0.0,
        fault_kinds: Sequence[str] = DEFAULT_FAULT_MIX,
        script: Sequence[str | None] = (),
        fault_fn: FaultFn | None = None,
        refuse_response_format: bool = False,
        retry_after: float | None = 1.0,
        retry_after_ms: float | None = None,
        stall_s: float = 30.0,
        model: str = "test-model",
        seed: int = 0,
        keep_bodies: bool = False,
        fault_messages: Mapping[str, str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        personality: str | None = None,
        auth_token: str | None = None,
        max_body_repeat: int = 1,
        models_latency: float = 0.0,
    ) -> None:
        if personality is not None:
            from rmskit.testing.personalities import PERSONALITIES

            if personality not in PERSONALITIES:
                raise ValueError(f"unknown personality {personality!r}; known: {', '.join(PERSONALITIES)}")
        self.personality = personality  # behave like a real server (rmskit.testing.personalities)
        self.auth_token = auth_token  # when set, any other Bearer token gets 401 (chat and /models)
        self.max_body_repeat = max_body_repeat  # >1: pad answers with whitespace to this many copies
        # A remote server's GET /models is a round trip too; each one's (start, end), time.monotonic().
        self.models_latency = models_latency
        self.models_spans: list[tuple[float, float]] = []
        unknown = {k for k in [*fault_kinds, *(s for s in script if s)] if k not in FAULT_KINDS}
        if unknown:
            raise ValueError(f"unknown fault kind(s) {sorted(unknown)}; known: {', '.join(FAULT_KINDS)}")
        self.responder = responder or make_default_responder(seed)
        self.latency = latency
        self.capacity = capacity
        self.fault_rate = fault_rate
        self.fault_kinds = tuple(fault_kinds)
        self.script = list(script)
        self.fault_fn = fault_fn
        self.refuse_response_format = refuse_response_format
        self.retry_after = retry_after
        self.retry_after_ms = retry_after_ms
        self.stall_s = stall_s
        self.model = model
        self.keep_bodies = keep_bodies
        self.fault_messages = dict(fault_messages or {})  # override the error text of a fault kind
        self.host = host
        self.port = port
        self._rng = random.Random(seed + 1)
        self.records: list[RequestRecord] = []
        self._stats = ServerStats(capacity=capacity)
        self._lock = threading.Lock()
        self._active = 0
        self._in_service = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._ready = threading.Event()
        self._stopped: asyncio.Event | None = None
        self._sem: asyncio.Semaphore | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._error: BaseException | None = None

    # ------------------------------------------------------------ lifecycle
    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> OpenAITestServer:
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._run_thread, name="openai-test-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("test server did not start")
        if self._error is not None:
            raise RuntimeError(f"test server failed to start: {self._error}")
        return self

    def stop(self) -> None:
        if self._thread is None:  # never started, or already stopped
            return
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        if self._thread is not None:
            self._thread.join(10)
        self._thread = None

    def __enter__(self) -> OpenAITestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run_thread(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self.serve())
        except BaseException as e:  # noqa: BLE001 - surfaced through start()
            self._error = e
            self._ready.set()
        finally:
            loop.close()

    async def serve(self, on_ready: Callable[[], None] | None = None) -> None:
        """Run until `stop()` (or a signal in the CLI). Usable directly inside an event loop."""
        self._stopped = asyncio.Event()
        self._sem = asyncio.Semaphore(self.capacity) if self.capacity else None
        self._server = await asyncio.start_server(
            self._serve_conn, self.host, self.port, limit=2**20, backlog=1024
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        if on_ready:
            on_ready()
        try:
            await self._stopped.wait()
        finally:
            self._server.close()
            for t in list(self._tasks):
                t.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()

    # ------------------------------------------------------------ inspection
    def stats(self) -> ServerStats:
        with self._lock:
            return self._stats.model_copy(deep=True)

    def chat_records(self) -> list[RequestRecord]:
        with self._lock:
            return [r for r in self.records if r.path.endswith("/chat/completions")]

    def reset(self) -> None:
        with self._lock:
            self.records.clear()
            self._stats = ServerStats(capacity=self.capacity)

    # ------------------------------------------------------------ HTTP
    async def _serve_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=1 << 20)
        try:
            while True:
                got = await self._read_request(conn, reader)
                if got is None:
                    break
                req, body = got
                keep = await self._dispatch(conn, writer, req, body)
                if not keep or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    break
                conn.start_next_cycle()
        except (ConnectionError, h11.ProtocolError, asyncio.CancelledError, OSError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _read_request(
        self, conn: h11.Connection, reader: asyncio.StreamReader
    ) -> tuple[h11.Request, bytes] | None:
        req: h11.Request | None = None
        chunks: list[bytes] = []
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                conn.receive_data(await reader.read(1 << 18))
            elif isinstance(ev, h11.Request):
                req = ev
            elif isinstance(ev, h11.Data):
                chunks.append(bytes(ev.data))
            elif isinstance(ev, h11.EndOfMessage):
                assert req is not None
                return req, b"".join(chunks)
            elif isinstance(ev, h11.ConnectionClosed) or ev is h11.PAUSED:
                return None

    async def _send(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        status: int,
        payload: bytes,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        hdrs = [("content-type", "application/json"), ("content-length", str(len(payload))), *headers]
        writer.write(conn.send(h11.Response(status_code=status, headers=hdrs)))
        writer.write(conn.send(h11.Data(data=payload)))
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()

    async def _dispatch(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, req: h11.Request, raw: bytes
    ) -> bool:
        path = req.target.decode("latin-1").split("?", 1)[0]
        method = req.method.decode()
        if method == "POST" and path.rstrip("/").endswith("/chat/completions"):
            auth = next((v.decode("latin-1") for k, v in req.headers if k == b"authorization"), None)
            headers = (
                {k.decode("latin-1"): v.decode("latin-1") for k, v in req.headers}
                if self.keep_bodies
                else None
            )
            return await self._chat(conn, writer, path, raw, auth, headers)
        if method == "GET" and path.rstrip("/").endswith("/models"):
            t_start = time.monotonic()
            if self.models_latency:
                await asyncio.sleep(self.models_latency)
            self.models_spans.append((t_start, time.monotonic()))
            auth = next((v.decode("latin-1") for k, v in req.headers if k == b"authorization"), None)
            if self.auth_token is not None and auth != f"Bearer {self.auth_token}":
                await self._send(
                    conn, writer, 401, self._error_body("invalid api key", "authentication_error")
                )
                return True
            data = {
                "object": "list",
                "data": [{"id": self.model, "object": "model", "created": 0, "owned_by": "rmskit"}],
            }
            await self._send(conn, writer, 200, json.dumps(data).encode())
            return True
        if method == "GET" and path.rstrip("/") == "/stats":
            st = self.stats()
            payload = {**st.model_dump(), "span_s": st.span_s, "utilisation": st.utilisation()}
            await self._send(conn, writer, 200, json.dumps(payload).encode())
            return True
        if method == "GET" and path.rstrip("/") == "/timeline":  # (start, end) of each chat request
            spans = [[r.t_start, r.t_end] for r in self.chat_records()]
            await self._send(conn, writer, 200, json.dumps(spans).encode())
            return True
        if method == "POST" and path.rstrip("/") == "/reset":
            self.reset()
            await self._send(conn, writer, 200, b"{}")
            return True
        await self._send(
            conn, writer, 404, json.dumps({"error": {"message": f"no route {method} {path}"}}).encode()
        )
        return True

    def _pick_fault(self, body: dict[str, Any], index: int) -> str | None:
        if self.fault_fn is not None:
            f = self.fault_fn(body, index)
            if f is not None:
                return f
        with self._lock:
            if self.script:
                return self.script.pop(0)
        if self.refuse_response_format and body.get("response_format"):
            return "refuse_format"
        if self.fault_rate > 0 and self._rng.random() < self.fault_rate:
            return self._rng.choice(self.fault_kinds)
        return None

    def _error_body(self, message: str, typ: str, param: str | None = None) -> bytes:
        return json.dumps({"error": {"message": message, "type": typ, "param": param, "code": None}}).encode()

    async def _chat(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        path: str,
        raw: bytes,
        auth: str | None,
        headers: dict[str, str] | None = None,
    ) -> bool:
        t_start = time.monotonic()
        try:
            body = json.loads(raw)
            if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
                raise ValueError("body must be an object with a messages list")
        except ValueError as e:
            await self._send(
                conn, writer, 400, self._error_body(f"invalid request body: {e}", "invalid_request_error")
            )
            return True
        mhash = hashlib.sha256(json.dumps(body["messages"], sort_keys=True).encode()).hexdigest()[:16]
        with self._lock:
            index = self._stats.requests
            self._stats.requests += 1
            if self._stats.first_start is None:
                self._stats.first_start = t_start
            self._active += 1
            self._stats.max_concurrent = max(self._stats.max_concurrent, self._active)
            rec = RequestRecord(
                index=index,
                path=path,
                t_start=t_start,
                messages_hash=mhash,
                response_format=bool(body.get("response_format")),
                authorization=auth,
                body=body if self.keep_bodies else None,
                headers=headers,
            )
            self.records.append(rec)
        fault = self._pick_fault(body, index)
        verdict = None
        if self.auth_token is not None and auth != f"Bearer {self.auth_token}":
            fault = fault or "unauthorized"
        elif self.personality is not None and fault is None:
            from rmskit.testing import personalities

            body, verdict = personalities.apply(self.personality, body)
        rec.fault = fault
        active_done = False

        def finish(status: int, delivered: bool) -> None:
            # Called just before the response is written: the request leaves the server's concurrency
            # count first, so a client that frees its slot on receipt is never seen as one too many.
            nonlocal active_done
            with self._lock:
                if not active_done:
                    self._active -= 1
                    active_done = True
                rec.status = status
                rec.delivered = delivered
                rec.t_end = time.monotonic()
                self._stats.last_end = rec.t_end
                self._stats.last_end_unix = time.time()
                key = str(status) if status else "none"
                self._stats.statuses[key] = self._stats.statuses.get(key, 0) + 1
                if fault:
                    self._stats.faults[fault] = self._stats.faults.get(fault, 0) + 1
                if delivered and status == 200:
                    self._stats.delivered += 1

        def undeliver() -> None:
            with self._lock:
                if rec.delivered and rec.status == 200:
                    self._stats.delivered -= 1
                rec.delivered = False

        try:
            if verdict is not None:
                finish(verdict.status, True)
                await self._send(conn, writer, verdict.status, verdict.body)
                return True
            if fault == "refuse_format":
                finish(400, True)
                msg = "response_format of type json_schema is not supported by this server"
                await self._send(
                    conn, writer, 400, self._error_body(msg, "invalid_request_error", "response_format")
                )
                return True
            if fault == "bad_request":
                finish(400, True)
                msg400 = self.fault_messages.get("bad_request", "invalid request: injected fault")
                body400 = self._error_body(msg400, "invalid_request_error")
                await self._send(conn, writer, 400, body400)
                return True
            if fault == "unauthorized":
                finish(401, True)
                token = (auth or "").removeprefix("Bearer ").strip()
                body401 = self._error_body(f"Incorrect API key provided: {token}", "invalid_request_error")
                await self._send(conn, writer, 401, body401)
                return True
            if fault == "rate_limit":
                hdrs = []
                if self.retry_after is not None:
                    hdrs.append(("retry-after", f"{self.retry_after:g}"))
                if self.retry_after_ms is not None:
                    hdrs.append(("retry-after-ms", f"{self.retry_after_ms:g}"))
                finish(429, True)
                await self._send(
                    conn, writer, 429, self._error_body("Rate limit reached", "rate_limit_error"), hdrs
                )
                return True
            if fault in ("server_error", "unavailable"):
                status = 500 if fault == "server_error" else 503
                finish(status, True)
                await self._send(
                    conn, writer, status, self._error_body("injected server error", "server_error")
                )
                return True
            if fault == "drop":
                finish(0, False)
                writer.transport.abort()
                return False
            if fault == "stall":
                await asyncio.sleep(self.stall_s)
                finish(0, False)
                writer.transport.abort()
                return False

            content, finish_reason, t_service = await self._serve(body, fault)
            response = self._completion(body, content, finish_reason)
            payload = json.dumps(response).encode()
            if self.max_body_repeat > 1:  # an oversized answer (valid JSON, whitespace padded)
                payload = payload + b" " * (len(payload) * (self.max_body_repeat - 1))
            with self._lock:
                self._stats.busy_s += t_service
                self._stats.prompt_tokens += response["usage"]["prompt_tokens"]
                self._stats.completion_tokens += response["usage"]["completion_tokens"]
            if fault == "truncated":
                finish(200, False)
                hdrs = [("content-type", "application/json"), ("content-length", str(len(payload)))]
                writer.write(conn.send(h11.Response(status_code=200, headers=hdrs)))
                writer.write(conn.send(h11.Data(data=payload[: len(payload) // 2])))
                await writer.drain()
                writer.transport.abort()
                return False
            if fault == "bad_body":
                finish(200, False)
                await self._send(conn, writer, 200, payload[: len(payload) // 2])
                return True
            finish(200, True)
            await self._send(conn, writer, 200, payload)
            return True
        except (ConnectionError, OSError):
            undeliver()  # the write failed: the client did not get this response
            raise
        finally:
            if not active_done:  # cancelled (server stopping) or the client went away mid-way
                finish(0, False)

    async def _serve(self, body: dict[str, Any], fault: str | None) -> tuple[str, str, float]:
        """The service itself, under the capacity limit: latency, then the responder."""
        lat = self.latency(body) if callable(self.latency) else self.latency
        if self._sem is not None:
            await self._sem.acquire()
        t0 = time.monotonic()
        with self._lock:
            self._in_service += 1
            self._stats.max_in_service = max(self._stats.max_in_service, self._in_service)
        try:
            if lat > 0:
                await asyncio.sleep(lat)
            out = self.responder(body)
        finally:
            with self._lock:
                self._in_service -= 1
            if self._sem is not None:
                self._sem.release()
        t_service = time.monotonic() - t0
        finish_reason = "stop"
        if isinstance(out, Reply):
            finish_reason = out.finish_reason
            out = out.content
        content = out if isinstance(out, str) else json.dumps(out)
        if fault == "malformed":
            content = "Sure! Here is the JSON: {" + content[: max(1, len(content) // 3)]
        return content, finish_reason, t_service

    def _completion(self, body: dict[str, Any], content: str, finish_reason: str) -> dict[str, Any]:
        chars, images = _text_chars(body.get("messages") or [])
        prompt_tokens = chars // 4 + 85 * images + 1
        completion_tokens = len(content) // 4 + 1
        return {
            "id": f"chatcmpl-{self._rng.getrandbits(48):012x}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="OpenAI-compatible test server (rmskit.testing.openai_server)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on stdout)")
    p.add_argument("--latency", type=float, default=0.0, help="seconds of service time per request")
    p.add_argument("--capacity", type=int, default=None, help="requests served at once (others queue)")
    p.add_argument("--fault-rate", type=float, default=0.0)
    p.add_argument("--faults", default=",".join(DEFAULT_FAULT_MIX), help="comma-separated fault kinds")
    p.add_argument("--retry-after", type=float, default=1.0)
    p.add_argument("--stall", type=float, default=30.0)
    p.add_argument("--refuse-response-format", action="store_true")
    p.add_argument("--model", default="test-model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--personality", default=None, help="llama-cpp-python | llama-server | vllm | openai-strict"
    )
    p.add_argument(
        "--script",
        choices=["schema", "rms"],
        default="schema",
        help="schema: any schema-valid JSON; rms: rmskit's scripted stage answers (rms_script)",
    )
    args = p.parse_args(argv)
    responder: Responder | None = None
    if args.script == "rms":
        from rmskit.testing.rms_script import responder as rms_responder

        responder = rms_responder
    srv = OpenAITestServer(
        responder=responder,
        latency=args.latency,
        capacity=args.capacity,
        fault_rate=args.fault_rate,
        fault_kinds=[k for k in args.faults.split(",") if k],
        retry_after=args.retry_after,
        stall_s=args.stall,
        refuse_response_format=args.refuse_response_format,
        model=args.model,
        seed=args.seed,
        personality=args.personality,
        host=args.host,
        port=args.port,
    )

    async def run() -> None:
        loop = asyncio.get_running_loop()

        def ready() -> None:
            print(f"READY {srv.base_url}", flush=True)
            assert srv._stopped is not None
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, srv._stopped.set)

        await srv.serve(on_ready=ready)

    asyncio.run(run())
    st = srv.stats()
    print(
        f"requests={st.requests} delivered={st.delivered} utilisation={st.utilisation():.3f} "
        f"max_concurrent={st.max_concurrent}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
