"""The OpenAI-compatible test server itself: schema-valid instances, faults on the wire, capacity and
utilisation accounting, and the `python -m rmskit.testing.openai_server` entry point."""

from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
import sys
import threading
from typing import Any

import httpx
import pytest

from rmskit.testing.openai_server import OpenAITestServer, instance_from_schema, schema_from_messages

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}


def test_instance_from_schema_handles_keywords() -> None:
    schema = {
        "$defs": {
            "Item": {
                "type": "object",
                "properties": {"name": {"type": "string", "minLength": 12, "maxLength": 20}},
                "required": ["name"],
            }
        },
        "type": "object",
        "properties": {
            "kind": {"enum": ["a", "b"]},
            "const": {"const": 7},
            "maybe": {"anyOf": [{"type": "integer", "minimum": 3, "maximum": 5}, {"type": "null"}]},
            "score": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
            "items": {"type": "array", "items": {"$ref": "#/$defs/Item"}, "minItems": 2, "maxItems": 3},
            "both": {"allOf": [{"$ref": "#/$defs/Item"}]},
            "flag": {"type": ["boolean", "null"]},
        },
        "required": ["kind", "const", "maybe", "score", "items", "both", "flag"],
    }
    rng = random.Random(0)
    seen_null = seen_int = False
    for _ in range(60):
        v = instance_from_schema(schema, rng)
        assert v["kind"] in ("a", "b") and v["const"] == 7
        assert v["maybe"] is None or 3 <= v["maybe"] <= 5
        seen_null |= v["maybe"] is None
        seen_int |= isinstance(v["maybe"], int)
        assert 0 < v["score"] <= 1
        assert 2 <= len(v["items"]) <= 3 and all(12 <= len(i["name"]) <= 20 for i in v["items"])
        assert 12 <= len(v["both"]["name"]) <= 20
        assert v["flag"] in (True, False, None)
    assert seen_null and seen_int


def test_schema_from_messages_finds_embedded_schema() -> None:
    sch = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
    msgs = [
        {"role": "system", "content": "Answer in JSON:\n```json\n" + json.dumps(sch) + "\n```"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "x"}}],
        },
    ]
    assert schema_from_messages(msgs) == sch
    assert schema_from_messages([{"role": "user", "content": "no schema here"}]) is None


def test_faults_on_the_wire() -> None:
    with OpenAITestServer(
        script=["rate_limit", "unavailable", "truncated", "drop", "bad_body", "malformed", "refuse_format"],
        retry_after=2,
    ) as srv:
        url = srv.base_url + "/chat/completions"
        r = httpx.post(url, json=CHAT)
        assert r.status_code == 429 and r.headers["retry-after"] == "2"
        assert httpx.post(url, json=CHAT).status_code == 503
        with pytest.raises(httpx.RemoteProtocolError, match="expected"):  # short of Content-Length
            httpx.post(url, json=CHAT)
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.post(url, json=CHAT)
        r = httpx.post(url, json=CHAT)
        assert r.status_code == 200
        with pytest.raises(json.JSONDecodeError):
            r.json()
        content = httpx.post(url, json=CHAT).json()["choices"][0]["message"]["content"]
        with pytest.raises(json.JSONDecodeError):
            json.loads(content)
        r = httpx.post(url, json=CHAT)
        assert r.status_code == 400 and "response_format" in r.json()["error"]["message"]
        ok = httpx.post(url, json=CHAT).json()
        assert ok["choices"][0]["finish_reason"] == "stop" and ok["usage"]["total_tokens"] > 0
        recs = srv.chat_records()
        assert [r.delivered for r in recs] == [True, True, False, False, False, True, True, True]
        assert httpx.get(srv.base_url + "/models").json()["data"][0]["id"] == "test-model"


def test_capacity_queues_and_utilisation_is_measured() -> None:
    with OpenAITestServer(latency=0.1, capacity=2) as srv:
        url = srv.base_url + "/chat/completions"
        threads = [threading.Thread(target=httpx.post, args=(url,), kwargs={"json": CHAT}) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        st = srv.stats()
        assert st.requests == 6 and st.delivered == 6
        assert st.max_in_service == 2 and st.max_concurrent >= 2
        assert st.busy_s >= 6 * 0.1
        assert 0 < st.utilisation() <= 1.0 + 1e-6  # busy <= span * C when at most C are served at once
        assert st.span_s >= 3 * 0.1  # 6 requests, 2 at a time


def test_unknown_fault_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown fault"):
        OpenAITestServer(script=["explode"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_module_entry_point_serves_and_stops() -> None:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "rmskit.testing.openai_server", "--port", str(port), "--latency", "0.01"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        assert line == ["READY", f"http://127.0.0.1:{port}/v1"]
        body: dict[str, Any] = {
            **CHAT,
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "X",
                    "schema": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
                },
            },
        }
        r = httpx.post(f"{line[1]}/chat/completions", json=body)
        assert isinstance(json.loads(r.json()["choices"][0]["message"]["content"])["n"], int)
        st = httpx.get(f"http://127.0.0.1:{port}/stats").json()
        assert st["requests"] == 1 and st["delivered"] == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0 and "requests=1" in err
