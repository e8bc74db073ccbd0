"""Behaviours of real OpenAI-compatible servers, for the test server (`personality=`).

Each was observed on the real thing (issue 8) and is kept to what matters to a client:

- `llama-cpp-python` (its `[server]` extra, `--chat_format chatml`): `response_format` json_schema
  -> HTTP 500 whose body says "Input should be 'text' or 'json_object'"; `{"type": "json_object",
  "schema": ...}` is honoured (grammar) unless a maxLength is large (the grammar builder fails:
  HTTP 500 here; the real server segfaulted); image parts are dropped silently together with the text of
  their message, so the prompt shrinks and the answer is about nothing.
- `llama-server` (llama.cpp's C++ server, text-only GGUF): json_schema honoured; any image part ->
  HTTP 500 "image input is not supported".
- `vllm`: a vision model; json_schema with full constraints honoured; a response_format it does not
  know (json_object + schema) -> HTTP 400.
- `openai-strict`: OpenAI's strict structured outputs: a schema with maxLength/minLength ->
  HTTP 400 "'maxLength' is not permitted"; unknown response_format keys -> 400; vision honoured.
"""

from __future__ import annotations

import json
from typing import Any

PERSONALITIES = ("llama-cpp-python", "llama-server", "vllm", "openai-strict")
_STRICT_FORBIDDEN = ("maxLength", "minLength", "minProperties", "maxProperties", "patternProperties")


class Verdict:
    """An error answer: HTTP status and error JSON body."""

    __slots__ = ("status", "body")

    def __init__(self, status: int, message: str, typ: str = "invalid_request_error") -> None:
        self.status = status
        self.body = json.dumps(
            {"error": {"message": message, "type": typ, "param": None, "code": None}}
        ).encode()


def _has_image(body: dict[str, Any]) -> bool:
    for m in body.get("messages") or []:
        c = m.get("content") if isinstance(m, dict) else None
        if isinstance(c, list) and any(isinstance(p, dict) and p.get("type") == "image_url" for p in c):
            return True
    return False


def _drop_image_messages(body: dict[str, Any]) -> dict[str, Any]:
    """llama-cpp-python's chatml formatter keeps only string contents: a message whose content is a
    list of parts becomes empty, text included."""
    msgs = []
    for m in body.get("messages") or []:
        c = m.get("content") if isinstance(m, dict) else None
        msgs.append({**m, "content": ""} if isinstance(c, list) else m)
    return {**body, "messages": msgs}


def _keywords(node: Any) -> set[str]:
    if isinstance(node, dict):
        out = set(node)
        for v in node.values():
            out |= _keywords(v)
        return out
    if isinstance(node, list):
        out = set()
        for v in node:
            out |= _keywords(v)
        return out
    return set()


GRAMMAR_MAX_LENGTH = 1000  # llama.cpp's grammar builder gives up (and the server died) on 4000


def _max_length(node: Any) -> int:
    if isinstance(node, dict):
        cap = node.get("maxLength")
        own: int = cap if isinstance(cap, int) else 0
        return max([own, *(_max_length(v) for v in node.values())])
    if isinstance(node, list):
        return max([0, *(_max_length(v) for v in node)])
    return 0


def apply(personality: str, body: dict[str, Any]) -> tuple[dict[str, Any], Verdict | None]:
    """(the body the 'model' sees, an error answer or None) for one chat request."""
    rf = body.get("response_format") or {}
    typ = rf.get("type") if isinstance(rf, dict) else None
    if personality == "llama-cpp-python":
        if typ not in (None, "text", "json_object"):
            detail = [
                {
                    "type": "literal_error",
                    "loc": ["body", "response_format", "type"],
                    "msg": "Input should be 'text' or 'json_object'",
                    "input": typ,
                }
            ]
            return body, Verdict(500, str(detail), "internal_server_error")
        if typ == "json_object" and _max_length(rf.get("schema")) >= GRAMMAR_MAX_LENGTH:
            # Seen with llama-cpp-python 0.3.36 (make interop): maxLength 4000 expands into thousands of
            # nested grammar rules, "failed to parse grammar", and the server process segfaulted.
            return body, Verdict(500, "failed to parse grammar", "internal_server_error")
        return _drop_image_messages(body), None
    if personality == "llama-server":
        if _has_image(body):
            return body, Verdict(
                500,
                "image input is not supported - hint: if this is unexpected, you may need to provide the mmproj",
                "server_error",
            )
        return body, None
    if personality == "vllm":
        if typ == "json_object" and "schema" in rf:
            return body, Verdict(
                400, "1 validation error for ResponseFormat: schema: Extra inputs are not permitted"
            )
        if typ not in (None, "text", "json_object", "json_schema", "structural_tag"):
            return body, Verdict(400, f"unknown response_format type {typ!r}")
        return body, None
    if personality == "openai-strict":
        if isinstance(rf, dict) and set(rf) - {"type", "json_schema"}:
            extra = sorted(set(rf) - {"type", "json_schema"})[0]
            return body, Verdict(400, f"Unrecognized request argument supplied: response_format.{extra}")
        if typ == "json_schema":
            js = rf.get("json_schema") or {}
            bad = sorted(_keywords(js.get("schema")) & set(_STRICT_FORBIDDEN)) if js.get("strict") else []
            if bad:
                name = js.get("name", "output")
                return body, Verdict(
                    400, f"Invalid schema for response_format '{name}': '{bad[0]}' is not permitted."
                )
        if typ == "json_object" and "json" not in json.dumps(body.get("messages")).lower():
            return body, Verdict(
                400,
                "'messages' must contain the word 'json' in some form, to use 'response_format' of type 'json_object'.",
            )
        return body, None
    raise ValueError(f"unknown personality {personality!r}; known: {', '.join(PERSONALITIES)}")
