"""Structured-output helpers shared by all backends.

- `response_format_for(model)`: OpenAI `response_format` with a JSON schema generated from a pydantic
  model, made strict-compatible (every object closed, every property required) when the schema allows.
- `json_instruction` / `with_json_instruction`: the JSON-in-prompt fallback for servers that refuse
  `response_format` (the schema is embedded in the system message).
- `extract_json`: JSON out of model text (code fences, leading prose, trailing commas, single quotes,
  ...). A cheap exact path first; then the `json-repair` library for the rest.
- `parse_structured`: extract + validate against the model; `reask_message` quotes what went wrong.
"""

from __future__ import annotations

import copy
import json
import re
from functools import lru_cache
from typing import Any

from pydantic import BaseModel, ValidationError

from rmskit.models.base import Message

# Keywords OpenAI's strict mode rejects; they are dropped from the strict variant only (pydantic still
# enforces them on our side, and a violation leads to a re-ask).
_STRICT_UNSUPPORTED = (
    "default",
    "minLength",
    "maxLength",
    "minProperties",
    "maxProperties",
    "patternProperties",
)
_NAME_RE = re.compile(r"[^a-zA-Z0-9_-]")
_FENCE_RE = re.compile(r"```[ \t]*(?:json5?|JSON5?|javascript|js)?[ \t]*\r?\n?(.*?)```", re.S)


class _NotStrict(Exception):
    pass


def _strictify(node: Any, drop: tuple[str, ...] = _STRICT_UNSUPPORTED) -> Any:
    """Return a strict-mode copy of a schema node (closed objects, every property required, `drop`
    keywords removed), or raise _NotStrict when it cannot be expressed."""
    if isinstance(node, list):
        return [_strictify(x, drop) for x in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, val in node.items():
        if key in drop:
            continue
        if key in ("properties", "$defs", "definitions"):
            out[key] = {k: _strictify(v, drop) for k, v in val.items()}
        elif key in ("items", "anyOf", "oneOf", "allOf", "prefixItems", "not"):
            out[key] = _strictify(val, drop)
        elif key == "additionalProperties":
            if val not in (False,):
                raise _NotStrict("open object (dict-like field)")
            out[key] = False
        else:
            out[key] = val
    is_object = out.get("type") == "object" or "properties" in out
    if is_object:
        props = out.get("properties")
        if not props:
            raise _NotStrict("object without declared properties")
        out["additionalProperties"] = False
        out["required"] = list(props)
    # A $ref with sibling keywords (e.g. description) is rejected by some strict validators: keep the ref.
    if "$ref" in out and len(out) > 1:
        out = {"$ref": out["$ref"]}
    return out


def _without(node: Any, keys: tuple[str, ...]) -> Any:
    if isinstance(node, dict):
        return {k: _without(v, keys) for k, v in node.items() if k not in keys}
    if isinstance(node, list):
        return [_without(v, keys) for v in node]
    return node


@lru_cache(maxsize=512)
def schema_for(model: type[BaseModel], full: bool = False) -> tuple[dict[str, Any], bool]:
    """(JSON schema, strict?) for `model`: the strict-compatible variant when possible, else pydantic's
    own schema with strict False. `full` keeps the length/size constraints (maxLength, ...) for
    servers that accept them; the strict variant drops them and they are enforced leniently
    (`clamp_to_schema`). Cached: built once per model class, not per request."""
    base = model.model_json_schema()
    try:
        return _strictify(copy.deepcopy(base), ("default",) if full else _STRICT_UNSUPPORTED), True
    except _NotStrict:
        return base, False


def schema_name(model: type[BaseModel]) -> str:
    return _NAME_RE.sub("_", model.__name__)[:64] or "output"


# Structured-output modes of OpenAI-compatible servers, best first. json_object_schema is
# llama.cpp's grammar-constrained extension `{"type": "json_object", "schema": {...}}`.
STRUCTURED_MODES = ("json_schema", "json_object_schema", "json_object", "prompt")


@lru_cache(maxsize=512)
def _response_format_json(model: type[BaseModel], mode: str = "json_schema", full: bool = False) -> str:
    if mode == "json_object":
        return json.dumps({"type": "json_object"})
    if mode == "json_object_schema":
        # llama.cpp compiles maxLength into one grammar rule per character: a 4000-character cap made
        # a real server fail to parse the grammar and crash (make interop). Lengths are enforced
        # leniently instead (clamp_to_schema), like the strict json_schema variant.
        schema = _without(model.model_json_schema(), ("maxLength", "minLength"))
        return json.dumps({"type": "json_object", "schema": schema})
    schema, strict = schema_for(model, full)
    return json.dumps(
        {
            "type": "json_schema",
            "json_schema": {"name": schema_name(model), "schema": schema, "strict": strict},
        }
    )


def response_format_for(
    model: type[BaseModel], mode: str = "json_schema", *, full: bool = False
) -> dict[str, Any] | None:
    """The `response_format` for `model` in `mode` (a fresh dict), None for mode "prompt"."""
    if mode == "prompt":
        return None
    return json.loads(_response_format_json(model, mode, full))


def clamp_to_schema(
    obj: Any, schema: dict[str, Any], *, _root: dict[str, Any] | None = None, _path: str = ""
) -> list[str]:
    """Truncate, in place, strings over maxLength and lists over maxItems that `schema` declares, so
    a length cap alone never fails an answer. Returns what was cut ("category: 61 -> 60 chars")."""
    root = _root if _root is not None else schema
    notes: list[str] = []
    if "$ref" in schema:
        schema = root.get("$defs", {}).get(schema["$ref"].rsplit("/", 1)[-1], {})
    for alt in schema.get("anyOf", []):
        if alt.get("type") not in (None, "null") or "$ref" in alt:
            notes += clamp_to_schema(obj, alt, _root=root, _path=_path)
    if isinstance(obj, dict):
        for k, sub in (schema.get("properties") or {}).items():
            if k not in obj:
                continue
            where = f"{_path}.{k}" if _path else k
            val = obj[k]
            if isinstance(val, str) and isinstance(sub.get("maxLength"), int) and len(val) > sub["maxLength"]:
                obj[k] = val[: sub["maxLength"]]
                notes.append(f"{where}: truncated {len(val)} -> {sub['maxLength']} chars")
            elif (
                isinstance(val, list) and isinstance(sub.get("maxItems"), int) and len(val) > sub["maxItems"]
            ):
                del val[sub["maxItems"] :]
                notes.append(f"{where}: truncated to {sub['maxItems']} items")
            notes += clamp_to_schema(obj[k], sub, _root=root, _path=where)
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        item = schema["items"]
        for i, val in enumerate(obj):
            where = f"{_path}[{i}]"
            if (
                isinstance(val, str)
                and isinstance(item.get("maxLength"), int)
                and len(val) > item["maxLength"]
            ):
                obj[i] = val[: item["maxLength"]]
                notes.append(f"{where}: truncated {len(val)} -> {item['maxLength']} chars")
            else:
                notes += clamp_to_schema(val, item, _root=root, _path=where)
    return notes


@lru_cache(maxsize=256)
def json_instruction(model: type[BaseModel]) -> str:
    """The JSON-in-prompt instruction: the full pydantic schema (with descriptions) embedded."""
    schema = json.dumps(model.model_json_schema(), separators=(",", ":"), ensure_ascii=False)
    return (
        "Answer with one JSON object and nothing else: no prose before or after it, no markdown fences. "
        "The object must validate against this JSON Schema:\n```json\n" + schema + "\n```"
    )


def _brief(node: dict[str, Any], root: dict[str, Any]) -> str:
    if "$ref" in node:
        node = root.get("$defs", {}).get(node["$ref"].rsplit("/", 1)[-1], {})
    if "anyOf" in node:
        return " or ".join(_brief(n, root) for n in node["anyOf"])
    if "enum" in node:
        return "one of " + "|".join(str(v) for v in node["enum"])
    kind = node.get("type")
    if kind == "object":
        props = node.get("properties", {})
        return "{" + ", ".join(f"{k}: {_brief(v, root)}" for k, v in props.items()) + "}"
    if kind == "array":
        return f"list of {_brief(node.get('items', {}), root)}"
    names = {"string": "text", "boolean": "true/false", "integer": "integer", "number": "number"}
    return names.get(kind, "value") if isinstance(kind, str) else "value"


def json_brief(model: type[BaseModel]) -> str:
    """A compact field list for grammar-constrained decoders: the grammar fixes the shape, this only
    tells the model what the fields are, at a fraction of the full schema's prompt tokens."""
    schema = model.model_json_schema()
    return "Answer with one JSON object: " + _brief(schema, schema)


def with_json_instruction(
    messages: list[Message], model: type[BaseModel], *, brief: bool = False
) -> list[Message]:
    """Messages with the JSON instruction appended to the system message (one is created if absent).
    `brief` uses the compact field list (for grammar-constrained decoding)."""
    text = json_brief(model) if brief else json_instruction(model)
    if messages and messages[0].role == "system":
        first = messages[0]
        sep = "\n\n" if first.content else ""
        return [first.model_copy(update={"content": first.content + sep + text}), *messages[1:]]
    return [Message(role="system", content=text), *messages]


class JSONExtractError(ValueError):
    """No JSON value could be recovered from the text."""


def _balanced_span(text: str, start: int) -> str | None:
    """The bracket-balanced JSON-ish span starting at text[start] ('{' or '['), string-aware."""
    depth = 0
    in_str: str | None = None
    esc = False
    for i in range(start, len(text)):
        ch = text[i]
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == in_str:
                in_str = None
        elif ch in "\"'":
            in_str = ch
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return text[start : i + 1]
    return None


def _candidates(text: str) -> list[str]:
    out = [m.group(1).strip() for m in _FENCE_RE.finditer(text)]
    body = text
    if not out and "```" in text:  # an unclosed fence (truncated answer): take what follows it
        body = text.split("```", 1)[1]
        body = body.split("\n", 1)[1] if "\n" in body and not body.lstrip().startswith("{") else body
        out.append(body.strip())
    starts = [i for i in (body.find("{"), body.find("[")) if i >= 0]
    if starts:
        start = min(starts)
        span = _balanced_span(body, start)
        out.append(span if span is not None else body[start:].strip())
    return out


def extract_json(text: str, *, repair: bool = True) -> Any:
    """Recover a JSON value from model text.

    Tries, in order: the whole text; fenced blocks; the first bracket-balanced span after any leading
    prose; then (if `repair`) json-repair on those candidates (trailing commas, single quotes, comments,
    unquoted keys, missing closing brackets). Raises JSONExtractError when nothing usable is found."""
    s = text.strip()
    if not s:
        raise JSONExtractError("the answer is empty")
    # RecursionError: a hostile or broken answer nested thousands deep is a bad answer, not a crash.
    try:
        return json.loads(s)
    except (ValueError, RecursionError):
        pass
    cands = _candidates(s)
    for c in cands:
        try:
            return json.loads(c)
        except (ValueError, RecursionError):
            continue
    if repair:
        import json_repair  # light, pure Python; only needed on the repair path

        for c in [*cands, s]:
            if not c:
                continue
            try:
                obj = json_repair.repair_json(c, return_objects=True, skip_json_loads=True)
            except Exception:  # noqa: BLE001 - the repairer may raise anything on hostile input
                continue
            if isinstance(obj, (dict, list)) and obj:
                return obj
    snippet = s[:80].replace("\n", " ")
    raise JSONExtractError(f"no JSON object found in the answer (starts: {snippet!r})")


def format_validation_error(err: ValidationError, *, max_errors: int = 6) -> str:
    """A short, model-readable rendering of a pydantic ValidationError."""
    lines = []
    for e in err.errors()[:max_errors]:
        loc = ".".join(str(p) for p in e.get("loc", ())) or "(root)"
        lines.append(f"- {loc}: {e.get('msg', 'invalid')}")
    more = err.error_count() - max_errors
    if more > 0:
        lines.append(f"- ... and {more} more")
    return "\n".join(lines)


class ParseOutcome(BaseModel):
    parsed: dict[str, Any] | None = None
    error: str | None = None  # model-readable; None when parsed
    adjustments: list[str] = []  # caps enforced by truncation (see clamp_to_schema)


def parse_structured(text: str, model: type[BaseModel], *, truncated: bool = False) -> ParseOutcome:
    """Extract JSON from `text` and validate it against `model`.

    `truncated` (finish_reason "length"): no bracket-completing repair, since a repaired cut-off object
    would silently lose content; a cut-off answer must be asked again instead."""
    try:
        obj = extract_json(text, repair=not truncated)
    except JSONExtractError as e:
        msg = str(e)
        if truncated:
            msg = "the answer was cut off before the JSON object was complete; answer more briefly"
        return ParseOutcome(error=msg)
    if not isinstance(obj, dict):
        return ParseOutcome(error=f"expected a JSON object, got a JSON {type(obj).__name__}")
    try:
        inst = model.model_validate(obj)
        notes: list[str] = []
    except ValidationError as e:
        notes = clamp_to_schema(obj, _plain_schema(model))
        try:
            inst = model.model_validate(obj) if notes else None
        except ValidationError:
            inst = None
        if inst is None:
            return ParseOutcome(error="the JSON does not match the schema:\n" + format_validation_error(e))
    return ParseOutcome(parsed=inst.model_dump(mode="json"), adjustments=notes)


@lru_cache(maxsize=256)
def _plain_schema(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_json_schema()


def reask_message(error: str, model: type[BaseModel] | None = None) -> Message:
    """The user turn sent after an unusable answer: quotes the error and repeats the ask."""
    name = f" ({model.__name__})" if model is not None else ""
    return Message(
        role="user",
        content=(
            f"Your previous answer could not be used: {error}\n"
            f"Reply again with only the corrected JSON object{name} that validates against the schema. "
            "No prose, no markdown fences."
        ),
    )
