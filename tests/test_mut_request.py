"""The request layer's helpers with exact expected values (issue 15 §1: the mutants that
test_openai_backend.py let live): the strict schema variant, lenient caps, the brief and full JSON
instructions, JSON recovery without repair, and the messages a model is shown after a bad answer."""

from __future__ import annotations

import asyncio
import copy
import json
from enum import StrEnum
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, create_model

from rmskit.config import BackendConfig
from rmskit.models import limits, remote
from rmskit.models.base import AuthenticationError, BackendError, ErrorKind, GenParams, ImageInput, Message
from rmskit.models.remote import Failure, RemoteBackend, Reply
from rmskit.models.structured import (
    JSONExtractError,
    clamp_to_schema,
    extract_json,
    format_validation_error,
    json_brief,
    json_instruction,
    parse_structured,
    reask_message,
    response_format_for,
    schema_for,
    schema_name,
    with_json_instruction,
)


class Color(StrEnum):
    red = "red"
    blue = "blue"


class Inner(BaseModel):
    label: str = Field(max_length=5, description="short label")
    tags: list[str] = Field(default_factory=list, max_length=2)
    words: list[Annotated[str, Field(max_length=3)]] = []


class Outer(BaseModel):
    name: str = Field(min_length=1, max_length=4)
    inner: Inner = Field(description="the inner one")
    maybe: Inner | None = None
    many: list[Inner] = Field(default_factory=list, max_length=2)
    pair: tuple[int, Annotated[str, Field(max_length=3)]]
    color: Color
    score: float = 0.5
    flag: bool = False
    count: int | None = None
    opt_words: list[Annotated[str, Field(max_length=3)]] | None = None


INNER_STRICT = {
    "properties": {
        "label": {"description": "short label", "title": "Label", "type": "string"},
        "tags": {"items": {"type": "string"}, "maxItems": 2, "title": "Tags", "type": "array"},
        "words": {"items": {"type": "string"}, "title": "Words", "type": "array"},
    },
    "required": ["label", "tags", "words"],
    "title": "Inner",
    "type": "object",
    "additionalProperties": False,
}
OUTER_STRICT_PROPS = {
    "name": {"title": "Name", "type": "string"},
    "inner": {"$ref": "#/$defs/Inner"},  # the description beside the $ref is dropped
    "maybe": {"anyOf": [{"$ref": "#/$defs/Inner"}, {"type": "null"}]},
    "many": {"items": {"$ref": "#/$defs/Inner"}, "maxItems": 2, "title": "Many", "type": "array"},
    "pair": {
        "maxItems": 2,
        "minItems": 2,
        "prefixItems": [{"type": "integer"}, {"type": "string"}],  # the maxLength dropped
        "title": "Pair",
        "type": "array",
    },
    "color": {"$ref": "#/$defs/Color"},
    "score": {"title": "Score", "type": "number"},
    "flag": {"title": "Flag", "type": "boolean"},
    "count": {"anyOf": [{"type": "integer"}, {"type": "null"}], "title": "Count"},
    "opt_words": {
        "anyOf": [{"items": {"type": "string"}, "type": "array"}, {"type": "null"}],
        "title": "Opt Words",
    },
}
COLOR = {"enum": ["red", "blue"], "title": "Color", "type": "string"}


def test_strict_schema_of_a_nested_model_is_exact() -> None:
    sch, strict = schema_for(Outer)
    assert strict is True
    assert sch == {
        "$defs": {"Color": COLOR, "Inner": INNER_STRICT},
        "properties": OUTER_STRICT_PROPS,
        "required": list(OUTER_STRICT_PROPS),
        "title": "Outer",
        "type": "object",
        "additionalProperties": False,
    }
    rf = response_format_for(Outer)
    assert rf == {"type": "json_schema", "json_schema": {"name": "Outer", "schema": sch, "strict": True}}


def test_full_strict_schema_keeps_length_caps_everywhere_and_drops_only_defaults() -> None:
    sch, strict = schema_for(Outer, full=True)
    assert strict is True
    inner = sch["$defs"]["Inner"]["properties"]
    assert inner["label"] == {
        "description": "short label",
        "maxLength": 5,
        "title": "Label",
        "type": "string",
    }
    assert inner["words"] == {"items": {"maxLength": 3, "type": "string"}, "title": "Words", "type": "array"}
    props = sch["properties"]
    assert props["name"] == {"maxLength": 4, "minLength": 1, "title": "Name", "type": "string"}
    assert props["opt_words"]["anyOf"][0] == {"items": {"maxLength": 3, "type": "string"}, "type": "array"}
    assert props["pair"]["prefixItems"] == [{"type": "integer"}, {"maxLength": 3, "type": "string"}]
    assert "default" not in json.dumps(sch)
    assert sch["required"] == list(OUTER_STRICT_PROPS)


# Keywords pydantic itself does not emit, from a hand-written field schema (WithJsonSchema).
Exotic = Annotated[
    str,
    WithJsonSchema(
        {
            "allOf": [
                {"properties": {"a": {"type": "string", "default": "x"}}}
            ],  # an object by its properties
            "oneOf": [{"type": "object", "properties": {"b": {"type": "integer", "minLength": 1}}}],
            "not": {"type": "object", "properties": {"c": {"type": "string", "maxLength": 2}}},
            "definitions": {"D": {"type": "object", "properties": {"d": {"type": "string", "default": ""}}}},
            "title": "E",
            "additionalProperties": False,  # on a node that is no object: kept as it is
        }
    ),
]


class WithExotic(BaseModel):
    e: Exotic


def test_strict_variant_recurses_into_every_subschema_keyword() -> None:
    sch, strict = schema_for(WithExotic)
    assert strict is True

    def closed(name: str, typ: str) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {name: {"type": typ}},
            "additionalProperties": False,
            "required": [name],
        }

    untyped = closed("a", "string")
    del untyped["type"]
    assert sch["properties"]["e"] == {
        "allOf": [untyped],
        "oneOf": [closed("b", "integer")],
        "not": closed("c", "string"),
        "definitions": {"D": closed("d", "string")},
        "title": "E",
        "additionalProperties": False,
    }
    full, _ = schema_for(WithExotic, full=True)  # only `default` goes; lengths stay, in every branch
    assert full["properties"]["e"]["oneOf"][0]["properties"]["b"] == {"type": "integer", "minLength": 1}
    assert full["properties"]["e"]["not"]["properties"]["c"] == {"type": "string", "maxLength": 2}
    assert full["properties"]["e"]["definitions"]["D"]["properties"]["d"] == {"type": "string"}
    assert full["properties"]["e"]["allOf"][0]["properties"]["a"] == {"type": "string"}


class AnyObject(BaseModel):
    o: Annotated[dict[str, int], WithJsonSchema({"type": "object"})]


class ExtraAllowed(BaseModel):
    model_config = ConfigDict(extra="allow")
    a: str


class ExtraForbidden(BaseModel):
    model_config = ConfigDict(extra="forbid")
    a: str = "x"


class Empty(BaseModel):
    pass


def test_open_or_empty_objects_are_not_strict_and_closed_ones_are() -> None:
    sch, strict = schema_for(ExtraAllowed)  # declared properties, but open: not expressible
    assert strict is False and sch == ExtraAllowed.model_json_schema()
    assert response_format_for(ExtraAllowed) == {
        "type": "json_schema",
        "json_schema": {"name": "ExtraAllowed", "schema": sch, "strict": False},
    }
    sch, strict = schema_for(AnyObject)  # an object that declares no properties
    assert strict is False and sch == AnyObject.model_json_schema()
    sch, strict = schema_for(Empty)
    assert strict is False and sch == {"properties": {}, "title": "Empty", "type": "object"}
    sch, strict = schema_for(ExtraForbidden)  # already closed: stays strict
    assert strict is True
    assert sch == {
        "additionalProperties": False,
        "properties": {"a": {"title": "A", "type": "string"}},
        "required": ["a"],
        "title": "ExtraForbidden",
        "type": "object",
    }


def test_json_object_schema_mode_drops_lengths_at_every_depth() -> None:
    rf = response_format_for(Outer, "json_object_schema")
    assert rf is not None and rf["type"] == "json_object" and set(rf) == {"type", "schema"}
    text = json.dumps(rf["schema"])
    assert "maxLength" not in text and "minLength" not in text
    expected = copy.deepcopy(Outer.model_json_schema())
    del expected["properties"]["name"]["maxLength"], expected["properties"]["name"]["minLength"]
    del expected["$defs"]["Inner"]["properties"]["label"]["maxLength"]
    del expected["$defs"]["Inner"]["properties"]["words"]["items"]["maxLength"]
    del expected["properties"]["opt_words"]["anyOf"][0]["items"]["maxLength"]
    del expected["properties"]["pair"]["prefixItems"][1]["maxLength"]
    assert rf["schema"] == expected  # everything else (defaults, maxItems, descriptions) kept
    assert response_format_for(Outer, "json_object") == {"type": "json_object"}
    assert response_format_for(Outer, "prompt") is None


def test_schema_name_is_sanitised_and_bounded() -> None:
    assert schema_name(create_model("My Model!", x=(int, 0))) == "My_Model_"
    assert schema_name(create_model("a" * 70, x=(int, 0))) == "a" * 64
    assert schema_name(create_model("", x=(int, 0))) == "output"


def test_brief_instruction_names_every_field_kind() -> None:
    assert json_brief(Outer) == (
        "Answer with one JSON object: {name: text, "
        "inner: {label: text, tags: list of text, words: list of text}, "
        "maybe: {label: text, tags: list of text, words: list of text} or value, "
        "many: list of {label: text, tags: list of text, words: list of text}, "
        "pair: list of value, color: one of red|blue, score: number, flag: true/false, "
        "count: integer or value, opt_words: list of text or value}"
    )


class Handwritten(BaseModel):
    """A model whose schema is written by hand: refs that resolve nowhere, an object without
    properties, a list of types."""

    @classmethod
    def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {
                "a": {"$ref": "#/$defs/Nope"},
                "b": {"$ref": "Nope"},
                "c": {"type": "object"},
                "d": {"type": ["string", "null"]},
            },
        }


def test_brief_instruction_of_odd_schemas_says_value() -> None:
    assert json_brief(Handwritten) == "Answer with one JSON object: {a: value, b: value, c: {}, d: value}"


def test_json_instruction_goes_into_the_system_message() -> None:
    sys_msg = Message(role="system", content="Be careful.")
    u1, u2 = Message(role="user", content="one"), Message(role="user", content="two")
    full = json_instruction(Outer)
    assert full.startswith("Answer with one JSON object and nothing else")
    assert json.dumps(Outer.model_json_schema(), separators=(",", ":")) in full
    out = with_json_instruction([sys_msg, u1, u2], Outer)
    assert [m.role for m in out] == ["system", "user", "user"]
    assert out[0].content == "Be careful.\n\n" + full and out[1:] == [u1, u2]
    out = with_json_instruction([sys_msg, u1, u2], Outer, brief=True)
    assert out[0].content == "Be careful.\n\n" + json_brief(Outer) and out[1:] == [u1, u2]
    empty = Message(role="system", content="")
    assert with_json_instruction([empty, u1], Outer)[0].content == full  # no leading blank lines
    out = with_json_instruction([u1, u2], Outer)  # no system message: one is added in front
    assert out == [Message(role="system", content=full), u1, u2]
    assert with_json_instruction([], Outer) == [Message(role="system", content=full)]
    assert sys_msg.content == "Be careful."  # the caller's message is not modified


def _outer_answer() -> dict[str, Any]:
    return {
        "name": "abcdefg",
        "inner": {"label": "toolongx", "tags": ["a", "b", "c"], "words": ["abcd", "ab"]},
        "maybe": {"label": "123456", "tags": [], "words": []},
        "many": [{"label": "x" * 7}, {"label": "y"}, {"label": "z"}],
        "pair": [1, "s"],
        "color": "red",
        "count": 3,
        "opt_words": ["wxyz", "ok"],
    }


CLAMP_NOTES = [
    "name: truncated 7 -> 4 chars",
    "inner.label: truncated 8 -> 5 chars",
    "inner.tags: truncated to 2 items",
    "inner.words[0]: truncated 4 -> 3 chars",
    "maybe.label: truncated 6 -> 5 chars",
    "many: truncated to 2 items",
    "many[0].label: truncated 7 -> 5 chars",
    "opt_words[0]: truncated 4 -> 3 chars",
]


def test_clamp_truncates_at_every_depth_and_says_where() -> None:
    obj = _outer_answer()
    notes = clamp_to_schema(obj, Outer.model_json_schema())
    assert notes == CLAMP_NOTES
    assert obj == {
        "name": "abcd",
        "inner": {"label": "toolo", "tags": ["a", "b"], "words": ["abc", "ab"]},
        "maybe": {"label": "12345", "tags": [], "words": []},
        "many": [{"label": "xxxxx"}, {"label": "y"}],
        "pair": [1, "s"],
        "color": "red",
        "count": 3,
        "opt_words": ["wxy", "ok"],
    }
    exact = {
        "name": "abcd",
        "inner": {"label": "abcde", "tags": ["a", "b"], "words": ["abc"]},
        "many": [{}, {}],
    }
    assert clamp_to_schema(exact, Outer.model_json_schema()) == []  # at the cap: nothing cut
    # hand-written schemas: a $ref that resolves nowhere clamps nothing; every branch of a union is applied
    assert clamp_to_schema({"label": "abcdefgh"}, {"$ref": "#/$defs/Inner"}) == []
    assert clamp_to_schema({"label": "abcdefgh"}, {"$ref": "#/$defs/Gone", "$defs": {}}) == []
    cap = {"properties": {"label": {"maxLength": 2}}}
    assert clamp_to_schema({"label": "abcd"}, {"$ref": "Cap", "$defs": {"Cap": cap}}) == [
        "label: truncated 4 -> 2 chars"
    ]
    union = {
        "anyOf": [
            {"type": "object", "properties": {"a": {"maxLength": 1}}},
            {"type": "object", "properties": {"b": {"maxLength": 1}}},
        ]
    }
    assert clamp_to_schema({"a": "xx", "b": "yy"}, union) == [
        "a: truncated 2 -> 1 chars",
        "b: truncated 2 -> 1 chars",
    ]
    ref = {"$ref": "#/$defs/Inner"}  # a $ref at the top resolves against the root given
    assert clamp_to_schema({"label": "abcdefgh"}, ref, _root=Outer.model_json_schema()) == [
        "label: truncated 8 -> 5 chars"
    ]


def test_parse_structured_clamps_caps_and_validates() -> None:
    out = parse_structured(json.dumps(_outer_answer()), Outer)
    assert out.error is None and out.adjustments == CLAMP_NOTES
    assert out.parsed is not None and out.parsed["color"] == "red"  # mode="json": the enum's value
    assert out.parsed["pair"] == [1, "s"] and out.parsed["name"] == "abcd"
    assert out.parsed["many"] == [
        {"label": "xxxxx", "tags": [], "words": []},
        {"label": "y", "tags": [], "words": []},
    ]
    bad = _outer_answer() | {"color": "green"}  # caps fixable, but another error: not accepted
    out = parse_structured(json.dumps(bad), Outer)
    assert out.parsed is None and out.adjustments == []
    assert out.error == (
        "the JSON does not match the schema:\n- name: String should have at most 4 characters\n"
        "- inner.label: String should have at most 5 characters\n"
        "- inner.tags: List should have at most 2 items after validation, not 3\n"
        "- inner.words.0: String should have at most 3 characters\n"
        "- maybe.label: String should have at most 5 characters\n"
        "- many: List should have at most 2 items after validation, not 3\n"
        "- ... and 2 more"  # color and opt_words.0
    )


def test_parse_structured_errors_are_exact() -> None:
    assert parse_structured("[1, 2]", Inner).error == "expected a JSON object, got a JSON list"
    assert parse_structured("  ", Inner).error == "the answer is empty"
    assert parse_structured("no json here", Inner).error == (
        "no JSON object found in the answer (starts: 'no json here')"
    )
    out = parse_structured('{"label": "ab', Inner, truncated=True)
    assert out.error == "the answer was cut off before the JSON object was complete; answer more briefly"
    out = parse_structured('{"tags": []}', Inner)
    assert out.error == "the JSON does not match the schema:\n- label: Field required"
    ok = parse_structured('{"label": "ab"}', Inner)
    assert ok.parsed == {"label": "ab", "tags": [], "words": []} and ok.adjustments == []


class Many(BaseModel):
    a: int
    b: int
    c: int
    d: int
    e: int
    f: int
    g: int


class Root(BaseModel):
    x: int


def _error(model: type[BaseModel], obj: Any) -> ValidationError:
    with pytest.raises(ValidationError) as ei:
        model.model_validate(obj)
    return ei.value


def test_validation_errors_are_rendered_briefly() -> None:
    err = _error(Many, {})
    lines = [f"- {k}: Field required" for k in "abcdef"]
    assert format_validation_error(err) == "\n".join([*lines, "- ... and 1 more"])
    assert format_validation_error(err, max_errors=7) == "\n".join([*lines, "- g: Field required"])
    assert format_validation_error(_error(Many, {k: 1 for k in "abcdef"})) == "- g: Field required"
    assert format_validation_error(_error(Root, [1])) == (
        "- (root): Input should be a valid dictionary or instance of Root"
    )


def test_reask_message_quotes_the_error_and_names_the_schema() -> None:
    m = reask_message("bad thing", Inner)
    assert m.role == "user"
    assert m.content == (
        "Your previous answer could not be used: bad thing\n"
        "Reply again with only the corrected JSON object (Inner) that validates against the schema. "
        "No prose, no markdown fences."
    )
    assert reask_message("x").content == (
        "Your previous answer could not be used: x\n"
        "Reply again with only the corrected JSON object that validates against the schema. "
        "No prose, no markdown fences."
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('Note: {"a": "x}y", "b": [1, {"c": 2}]} and {"d": 3}', {"a": "x}y", "b": [1, {"c": 2}]}),
        ('x {"a": "he said \\"}\\" ok"} tail', {"a": 'he said "}" ok'}),
        ('pre {"a": "don\'t } stop"} post', {"a": "don't } stop"}),
        ('pre {"a": "back\\\\"} post }', {"a": "back\\"}),
        ("list: [1, [2]] then {}", [1, [2]]),
        ('obj: {"a": {"b": 1}} and [3]', {"a": {"b": 1}}),
        ('use {x} then:\n```json\n{"a": 1}', {"a": 1}),  # an unclosed fence wins over earlier prose
        ('```{"a": 1}', {"a": 1}),
        ('```json\n{"a": 1}\n```\nand also {"b": 2}', {"a": 1}),
        ('``` {"a": [1]}\n', {"a": [1]}),
        ('```json [v2]\n{"a": 1}', {"a": 1}),  # an unclosed fence: its language line is skipped
        ('```json\n{"a":\n1}', {"a": 1}),
        ('```json {"a": 1}', {"a": 1}),
        ('``` {"a":\n1}', {"a": 1}),
        ('```{"a":\n1}', {"a": 1}),
        ('see {"a": 1}, or not', {"a": 1}),  # the span ends at its closing bracket
        ('x {"": 1} y', {"": 1}),  # an empty string: its closing quote is no escaped character
        ('a ] b {"a": 1} c', {"a": 1}),  # text before the opening bracket does not count
        ('don\'t {"a": 1} end', {"a": 1}),
    ],
)
def test_extract_json_without_repair_finds_the_exact_span(text: str, expected: Any) -> None:
    assert extract_json(text, repair=False) == expected


def test_extract_json_repairs_only_when_allowed_and_refuses_empty_repairs() -> None:
    broken = 'Sure: {"a": 1, "b": [2, 3'
    with pytest.raises(JSONExtractError):
        extract_json(broken, repair=False)
    assert extract_json(broken) == {"a": 1, "b": [2, 3]}
    assert extract_json('```\n```\n{"a": 1,}') == {"a": 1}  # an empty fenced block is skipped
    # a candidate the repairer gives up on (it raises on 5000 open brackets) does not end the search
    assert extract_json("```\n" + "[" * 5000 + '\n```\n```\n{"a": 1,}\n```') == {"a": 1}
    # the first candidate that parses is taken, even if a later one would too
    assert extract_json('```\n{"a": 1,}\n```\n```\n{"b": 2}\n```') == {"b": 2}
    assert extract_json('```\n{"a": 1,}\n```\n```\n{"b": 2,}\n```') == {"a": 1}
    with pytest.raises(JSONExtractError) as ei:  # repaired to {}: nothing usable
        extract_json("{,}\n" + "x" * 100)
    assert str(ei.value) == f"no JSON object found in the answer (starts: {('{,} ' + 'x' * 76)!r})"


# ------------------------------------------------------------------ the request loop (remote.py)
# A RemoteBackend whose wire is a script: each send pops one step (a Failure to raise, or a reply).
# Sleeps and the clock are remote.py's own (replaced below), so backoff and outage arithmetic is exact.


class Boom(Exception):
    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


def fail(
    kind: ErrorKind = ErrorKind.server,
    message: str = "boom",
    *,
    retriable: bool = True,
    status: int | None = 500,
    retry_after: float | None = None,
    refused: bool = False,
) -> Failure:
    return Failure(
        kind, message, retriable=retriable, status=status, retry_after=retry_after, refused=refused
    )


def ok(text: str = "hi", *, finish: str = "stop", model: str = "m-1", pt: int = 3, ct: int = 4, refusal=None):
    return {"text": text, "finish_reason": finish, "model": model, "pt": pt, "ct": ct, "refusal": refusal}


class Scripted(RemoteBackend):
    where = "http://scripted:1"

    def __init__(self, cfg: BackendConfig, script: list[Any]) -> None:
        super().__init__(cfg)
        self.script = list(script)
        self.sent: list[dict[str, Any]] = []
        self.adapt: Any = None

    async def _send(self, payload: dict[str, Any]) -> bytes:
        self.sent.append(copy.deepcopy(payload))
        step = self.script.pop(0)
        if isinstance(step, Failure):
            raise Boom(step)
        if isinstance(step, BaseException):
            raise step
        if isinstance(step, float):  # a stalled server
            await _REAL_SLEEP(step)
            raise AssertionError("the total deadline did not fire")
        return json.dumps(step).encode()

    def _classify(self, e: BaseException) -> Failure:
        if isinstance(e, TimeoutError):
            return fail(ErrorKind.timeout, "timed out", status=None)
        assert isinstance(e, Boom), e
        return e.failure

    async def _render(self, messages: list[Message]) -> list[dict[str, Any]]:
        return [{"role": m.role, "content": m.content} for m in messages]

    def _payload(self, params: GenParams, messages: list[dict[str, Any]]) -> dict[str, Any]:
        return {"messages": messages, "max_tokens": params.max_tokens}

    def _parse_reply(self, body: bytes) -> Reply:
        d = json.loads(body)
        return Reply(
            d["text"],
            finish_reason=d["finish_reason"],
            model=d["model"],
            prompt_tokens=d["pt"],
            completion_tokens=d["ct"],
            refusal=d["refusal"],
        )

    def _adapt(self, failure: Failure, payload: dict[str, Any]) -> bool:
        return self.adapt(failure, payload) if self.adapt else super()._adapt(failure, payload)


_REAL_SLEEP = asyncio.sleep


class Clock:
    """remote.py's `time` and `asyncio.sleep`: sleeping advances the clock and is recorded."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, s: float) -> None:
        self.sleeps.append(round(s, 6))
        self.now += s
        await _REAL_SLEEP(0)


class Limiter:
    def __init__(self) -> None:
        self.log: list[tuple[str, float, float | None]] = []

    async def acquire(self, est: float = 0.0) -> None:
        self.log.append(("acquire", est, None))

    def release(self, est: float = 0.0, actual: float | None = None) -> None:
        self.log.append(("release", est, actual))


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(remote, "time", c)
    monkeypatch.setattr(
        remote, "asyncio", SimpleNamespace(sleep=c.sleep, timeout=asyncio.timeout, Lock=asyncio.Lock)
    )
    monkeypatch.setattr(limits.random, "random", lambda: 1.0)  # backoff at its ceiling: exact delays
    return c


def rcfg(**kw: Any) -> BackendConfig:
    base: dict[str, Any] = {
        "spec": "openai:the-model",
        "base_url": "http://scripted:1/v1",
        "backoff_base_s": 1.0,
        "backoff_max_s": 100.0,
        "max_retries": 3,
        "outage_window_s": 300.0,
        "timeout_s": 5.0,
    }
    return BackendConfig(**(base | kw))


def go(b: Scripted, msgs: list[Message] | None = None, schema: type[BaseModel] | None = None, **kw: Any):
    return asyncio.run(b.generate(msgs or [Message(role="user", content="abcdefgh")], schema=schema, **kw))


class Small(BaseModel):
    label: str = Field(max_length=5)


def test_construction_reads_the_config() -> None:
    b = Scripted(rcfg(concurrency=3, requests_per_minute=60, tokens_per_minute=600, max_retries=2), [])
    assert b.capabilities.vision is True and b.capabilities.max_images == 8
    assert b.capabilities.structured == "native"
    assert Scripted(rcfg(vision=False), []).capabilities.vision is False
    assert Scripted(rcfg(vision=None), []).capabilities.vision is True
    assert b.stats.structured_mode == "json_schema" and b.model_id == "openai:the-model"
    assert Scripted(rcfg(structured="json_object"), []).stats.structured_mode == "json_object"
    assert b.limiter.concurrency == 3
    assert b.limiter.rpm is not None and b.limiter.rpm.rate_per_s == 1.0
    assert b.limiter.tpm is not None and b.limiter.tpm.rate_per_s == 10.0
    assert (b.policy.max_retries, b.policy.base_s, b.policy.max_s) == (2, 1.0, 100.0)
    assert b.full_constraints is False and b.probe_result is None
    b.set_mode("json_object")
    assert b.capabilities.structured_mode == "json_object" and b.stats.structured_mode == "json_object"


def test_a_plain_answer_counts_tokens_and_releases_the_limiter_with_the_actual_use(clock: Clock) -> None:
    b = Scripted(rcfg(), [ok(pt=30, ct=12)])
    b.limiter = Limiter()  # type: ignore[assignment]
    res = go(b, [Message(role="system", content="x" * 40), Message(role="user", content="y" * 20)])
    assert res.text == "hi" and res.parsed is None and res.model == "m-1" and res.finish_reason == "stop"
    assert res.usage.prompt_tokens == 30 and res.usage.completion_tokens == 12 and res.attempts == 1
    est = 60 / 4 + 1024
    assert b.limiter.log == [("acquire", est, None), ("release", est, 42)]  # type: ignore[attr-defined]
    assert b.sent == [
        {
            "messages": [{"role": "system", "content": "x" * 40}, {"role": "user", "content": "y" * 20}],
            "max_tokens": 1024,
        }
    ]
    s = b.stats
    assert (s.calls, s.succeeded, s.failed, s.requests, s.retries) == (1, 1, 0, 1, 0)
    assert (s.prompt_tokens, s.completion_tokens) == (30, 12)
    assert clock.sleeps == []
    b.script.append(ok(pt=1, ct=2))
    go(b)  # the counters add up over calls
    assert (s.calls, s.succeeded, s.requests, s.prompt_tokens, s.completion_tokens) == (2, 2, 2, 31, 14)


def test_images_and_params_enter_the_token_estimate(clock: Clock) -> None:
    b = Scripted(rcfg(), [ok(model="")])
    b.limiter = Limiter()  # type: ignore[assignment]
    img = ImageInput(sha256="0" * 64, path=Path("/nowhere.jpg"))
    msgs = [Message(role="user", content="z" * 8, images=[img, img])]
    res = asyncio.run(b.generate(msgs, params=GenParams(max_tokens=10)))
    assert b.limiter.log[0] == ("acquire", 8 / 4 + 2 * 800 + 10, None)  # type: ignore[attr-defined]
    assert b.sent[0]["max_tokens"] == 10
    assert res.model == "the-model"  # the server named no model: the configured one


def test_retries_back_off_exponentially_and_honour_retry_after(clock: Clock) -> None:
    script = [fail(), fail(retry_after=5.0), fail(ErrorKind.rate_limit, status=429), ok()]
    b = Scripted(rcfg(), script)
    b.limiter = Limiter()  # type: ignore[assignment]
    res = go(b)
    assert clock.sleeps == [1.0, 5.0 + 1.0, 4.0]  # base*2**attempt; Retry-After plus jitter <= base
    assert res.attempts == 4 and b.stats.retries == 3 and b.stats.requests == 4
    assert b.stats.errors == {"server": 2, "rate_limit": 1}
    releases = [a for k, _, a in b.limiter.log if k == "release"]  # type: ignore[attr-defined]
    assert releases == [None, None, None, 7]


def test_retries_stop_at_the_budget_with_a_clear_error(clock: Clock) -> None:
    b = Scripted(rcfg(max_retries=2), [fail(message="HTTP 503")] * 3)
    with pytest.raises(BackendError) as ei:
        go(b)
    assert str(ei.value) == "server: HTTP 503 after 3 attempts" and ei.value.retriable is True
    assert ei.value.kind == ErrorKind.server and clock.sleeps == [1.0, 2.0] and not b.script
    assert (b.stats.calls, b.stats.failed, b.stats.succeeded) == (1, 1, 0)
    b = Scripted(rcfg(max_retries=0), [fail(message="HTTP 503")])
    with pytest.raises(BackendError) as ei:
        go(b)
    assert str(ei.value) == "server: HTTP 503" and clock.sleeps == [1.0, 2.0]  # no suffix, no wait
    b.script.append(fail())
    with pytest.raises(BackendError):
        go(b)
    assert (b.stats.calls, b.stats.failed, b.stats.succeeded) == (2, 2, 0)


def test_a_final_failure_is_not_retried(clock: Clock) -> None:
    b = Scripted(rcfg(), [fail(ErrorKind.bad_request, "HTTP 400: nope", retriable=False, status=400)])
    with pytest.raises(BackendError) as ei:
        go(b)
    assert str(ei.value) == "bad_request: HTTP 400: nope" and ei.value.retriable is False
    assert b.stats.errors == {"bad_request": 1} and b.stats.retries == 0 and clock.sleeps == []


def test_a_backend_error_from_the_wire_passes_through_unclassified(clock: Clock) -> None:
    b = Scripted(rcfg(), [BackendError(ErrorKind.too_large, "body over the cap")])
    with pytest.raises(BackendError) as ei:
        go(b)
    assert str(ei.value) == "too_large: body over the cap" and b.stats.errors == {}


def test_the_total_deadline_is_a_retried_timeout(clock: Clock) -> None:
    b = Scripted(rcfg(timeout_s=0.05), [5.0, ok()])
    res = go(b)
    assert res.attempts == 2 and b.stats.errors == {"timeout": 1} and clock.sleeps == [1.0]


def test_rejected_credentials_stop_at_once(clock: Clock) -> None:
    b = Scripted(rcfg(), [fail(ErrorKind.auth, "HTTP 401", retriable=False, status=401), ok()])
    with pytest.raises(AuthenticationError) as ei:
        go(b)
    assert str(ei.value) == (
        "auth: authentication failed at http://scripted:1 (HTTP 401): check the API key variable"
    )
    assert len(b.sent) == 1 and b.stats.errors == {"auth": 1} and clock.sleeps == []


def test_a_refused_connection_waits_out_the_outage_window_without_spending_retries(clock: Clock) -> None:
    refused = fail(ErrorKind.connection, "connection refused", status=None, refused=True)
    b = Scripted(rcfg(max_retries=0), [refused] * 9 + [ok()])
    res = go(b)
    # backoff ceiling per outage try, the exponent capped at 6: 1, 2, ..., 64, 64, 64
    assert clock.sleeps == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 64.0, 64.0]
    assert res.attempts == 10 and b.stats.refused_connections == 9 and b.stats.retries == 0
    assert b.stats.errors == {"connection": 9}

    b = Scripted(rcfg(max_retries=0), [refused] * 12)
    clock.now, clock.sleeps = 1000.0, []
    with pytest.raises(BackendError) as ei:
        go(b)
    assert clock.sleeps == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 64.0, 64.0, 45.0]  # up to 300 s
    assert str(ei.value) == "connection: connection refused (for 300s, outage window 300s)"
    assert ei.value.retriable is True and len(b.script) == 1


def test_the_last_wait_of_an_outage_is_cut_to_the_window(clock: Clock) -> None:
    refused = fail(ErrorKind.connection, "refused", status=None, refused=True)
    b = Scripted(rcfg(outage_window_s=3.5), [refused] * 4)
    with pytest.raises(BackendError):
        go(b)
    assert clock.sleeps == [1.0, 2.0, 0.5] and len(b.sent) == 4


def test_another_failure_restarts_the_outage_window(clock: Clock) -> None:
    refused = fail(ErrorKind.connection, "refused", status=None, refused=True)
    b = Scripted(rcfg(outage_window_s=10.0), [refused] * 3 + [fail()] + [refused] * 2 + [ok()])
    res = go(b)
    # 1+2+4 = 7 s of outage, a 1 s retry, then a fresh 10 s window (the outage exponent keeps counting)
    assert clock.sleeps == [1.0, 2.0, 4.0, 1.0, 8.0, 2.0]
    assert res.attempts == 7 and b.stats.retries == 1


def test_adapt_may_fix_the_payload_and_resend(clock: Clock) -> None:
    b = Scripted(
        rcfg(), [fail(ErrorKind.bad_request, "use max_completion_tokens", retriable=False, status=400), ok()]
    )

    def adapt(f: Failure, payload: dict[str, Any]) -> bool:
        payload["max_completion_tokens"] = payload.pop("max_tokens")
        return True

    b.adapt = adapt
    res = go(b)
    assert res.attempts == 2 and b.sent[1]["max_completion_tokens"] == 1024 and "max_tokens" not in b.sent[1]
    assert b.stats.retries == 1 and clock.sleeps == [1.0]


MODES_TEXT = "Answer with one JSON object"


@pytest.mark.parametrize(
    "word",
    [
        "response_format",
        "JSON_OBJECT",
        "structured output",
        "guided",
        "schema",
        "grammar",
        "maxLength",
        "'text'",
    ],
)
def test_an_error_naming_the_format_steps_down_one_mode(clock: Clock, word: str) -> None:
    b = Scripted(rcfg(), [fail(message=f"HTTP 500: bad {word} here"), ok('{"label": "ab"}')])
    res = go(b, schema=Small)
    assert res.parsed == {"label": "ab"} and res.attempts == 2 and clock.sleeps == []
    assert b.sent[0]["response_format"]["type"] == "json_schema"
    assert b.sent[1]["response_format"] == {
        "type": "json_object",
        "schema": Small.model_json_schema() | {"properties": {"label": {"title": "Label", "type": "string"}}},
    }
    assert b.stats.structured_mode == "json_object_schema" and b.stats.retries == 0
    assert b.sent[1]["messages"][0] == {"role": "system", "content": json_brief(Small)}


def test_the_mode_ladder_ends_at_prompt(clock: Clock) -> None:
    refusals = [fail(message="json_schema unsupported", status=422)] * 3
    b = Scripted(rcfg(), [*refusals, ok('{"label": "ab"}'), ok('{"label": "cd"}')])
    res = go(b, schema=Small)
    assert [p.get("response_format", {}).get("type") for p in b.sent] == [
        "json_schema",
        "json_object",
        "json_object",
        None,
    ]
    assert (
        b.sent[1]["response_format"].get("schema") is not None
        and "schema" not in b.sent[2]["response_format"]
    )
    assert b.sent[2]["messages"][0]["content"] == json_instruction(Small)  # full schema in the prompt
    assert b.sent[3]["messages"][0]["content"] == json_instruction(Small)
    assert res.attempts == 4 and b.stats.structured_mode == "prompt"
    assert go(b, schema=Small).parsed == {"label": "cd"} and len(b.sent) == 5  # stays in prompt mode


def test_an_error_without_response_format_or_below_400_is_not_a_refusal(clock: Clock) -> None:
    b = Scripted(rcfg(max_retries=0), [fail(message="schema trouble", retriable=False, status=400)])
    with pytest.raises(BackendError):
        go(b)  # no schema: no response_format in the payload
    b = Scripted(rcfg(max_retries=0), [fail(message="schema trouble", retriable=False, status=399)])
    with pytest.raises(BackendError):
        go(b, schema=Small)
    assert b.stats.structured_mode == "json_schema" and len(b.sent) == 1
    b = Scripted(rcfg(max_retries=0), [fail(message="schema trouble", retriable=False, status=None)])
    with pytest.raises(BackendError):
        go(b, schema=Small)
    assert b.stats.structured_mode == "json_schema" and len(b.sent) == 1


def test_a_fixed_mode_refused_is_a_clear_final_error(clock: Clock) -> None:
    b = Scripted(rcfg(structured="json_object"), [fail(message="json_object not supported", status=400)])
    with pytest.raises(BackendError) as ei:
        go(b, schema=Small)
    assert ei.value.kind == ErrorKind.bad_request and ei.value.retriable is False
    assert str(ei.value) == (
        "bad_request: json_object not supported — the server refuses response_format json_object; "
        "use structured: auto or prompt"
    )


def test_a_bare_400_tries_prompt_mode_and_keeps_it_when_that_works(clock: Clock) -> None:
    bare = fail(ErrorKind.bad_request, "HTTP 400", retriable=False, status=400)
    b = Scripted(rcfg(), [bare, ok('{"label": "ab"}')])
    res = go(b, schema=Small)
    assert res.parsed == {"label": "ab"} and res.attempts == 2 and b.stats.structured_mode == "prompt"
    assert "response_format" not in b.sent[1]
    # a bare 400 after the mode has worked is an ordinary bad request, not a refusal
    b = Scripted(rcfg(), [ok('{"label": "ab"}'), bare])
    go(b, schema=Small)
    with pytest.raises(BackendError) as ei:
        go(b, schema=Small)
    assert str(ei.value) == "bad_request: HTTP 400" and b.stats.structured_mode == "json_schema"
    # a 422 the same; a 500 without format words is a server error, retried
    b = Scripted(
        rcfg(), [fail(ErrorKind.bad_request, "HTTP 422", retriable=False, status=422), ok('{"label": "ab"}')]
    )
    assert go(b, schema=Small).parsed == {"label": "ab"} and b.stats.structured_mode == "prompt"
    b = Scripted(rcfg(), [fail(message="HTTP 500"), ok('{"label": "ab"}')])
    assert go(b, schema=Small).attempts == 2 and b.stats.structured_mode == "json_schema"
    assert clock.sleeps == [1.0]


def test_a_bare_400_that_was_not_about_the_format_restores_the_mode(clock: Clock) -> None:
    bare = fail(ErrorKind.bad_request, "HTTP 400", retriable=False, status=400)
    b = Scripted(rcfg(structured="auto"), [bare, bare])
    with pytest.raises(BackendError) as ei:
        go(b, schema=Small)
    assert str(ei.value) == "bad_request: HTTP 400" and b.stats.structured_mode == "json_schema"
    b = Scripted(rcfg(), [bare, fail(message="server down", retriable=False)])
    with pytest.raises(BackendError):
        go(b, schema=Small)
    assert b.stats.structured_mode == "prompt"  # only a bad request restores it


def test_reasks_quote_the_error_sum_usage_and_are_bounded(clock: Clock) -> None:
    b = Scripted(
        rcfg(max_reasks=2),
        [ok("nothing", pt=5, ct=1), ok('{"label": 3}', pt=7, ct=2), ok('{"label": "abcdefg"}', pt=11, ct=3)],
    )
    b.limiter = Limiter()  # type: ignore[assignment]
    res = go(b, schema=Small)
    assert res.parsed == {"label": "abcde"} and res.adjustments == ["label: truncated 7 -> 5 chars"]
    assert res.attempts == 3 and res.usage.prompt_tokens == 23 and res.usage.completion_tokens == 6
    assert b.stats.reasks == 2 and b.stats.adjustments == 1
    second = b.sent[1]["messages"]
    assert second[-2] == {"role": "assistant", "content": "nothing"}
    assert second[-1] == {
        "role": "user",
        "content": reask_message("no JSON object found in the answer (starts: 'nothing')", Small).content,
    }
    assert b.sent[2]["messages"][:-2] == second and b.sent[2]["messages"][-2]["content"] == '{"label": 3}'
    est = 8 / 4 + 1024
    acquired = [e for k, e, _ in b.limiter.log if k == "acquire"]  # type: ignore[attr-defined]
    assert acquired == [est, est + len("nothing") / 4, est + len('{"label": 3}') / 4]


def test_an_answer_that_never_validates_is_a_parse_error(clock: Clock) -> None:
    b = Scripted(rcfg(max_reasks=1), [ok("nothing"), ok('{"label": ', finish="length")])
    with pytest.raises(BackendError) as ei:
        go(b, schema=Small)
    assert str(ei.value) == (
        "parse: answer did not validate as Small after 2 tries (finish_reason=length): the answer was cut "
        "off before the JSON object was complete; answer more briefly"
    )
    assert ei.value.retriable is False and b.stats.failed == 1
    b = Scripted(rcfg(max_reasks=0), [ok("", refusal="I will not " + "x" * 300)])
    with pytest.raises(BackendError) as ei:
        go(b, schema=Small)
    assert (
        str(ei.value)
        == f"parse: answer did not validate as Small after 1 try: the model refused: I will not {'x' * 189}"
    )
    b = Scripted(rcfg(max_reasks=1), [ok("", refusal="no"), ok('{"label": "ok"}')])
    res = go(b, schema=Small)
    assert res.parsed == {"label": "ok"} and b.stats.adjustments == 0
    assert b.sent[1]["messages"][-1]["content"] == reask_message("the model refused: no", Small).content


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('Result: {"a": "b", X} then {"c": 1} ok', {"a": "b"}),
        ('{"a": 1, X"b": 2}  trailing {x}', {"a": 1, 'X"b': 2}),
    ],
)
def test_repair_sees_only_the_first_balanced_span(text: str, expected: Any) -> None:
    # a bare X is neither a quote nor a bracket: the span still ends at the first balanced "}"
    assert extract_json(text) == expected


class Bare(Scripted):
    """A server that reports neither usage nor the model's name."""

    def _parse_reply(self, body: bytes) -> Reply:
        return Reply(json.loads(body)["text"])


def test_a_reply_without_usage_or_model_counts_zero_and_names_the_configured_model(clock: Clock) -> None:
    res = go(Bare(rcfg(), [ok()]))
    assert (res.usage.prompt_tokens, res.usage.completion_tokens) == (0, 0)
    assert res.model == "the-model" and res.finish_reason is None and res.attempts == 1


def test_a_known_server_gets_the_full_schema_with_its_length_caps(clock: Clock) -> None:
    b = Scripted(rcfg(), [ok('{"label": "ab"}')])
    b.full_constraints = True  # what the probe sets when the server accepts maxLength & co.
    go(b, schema=Small)
    sch = b.sent[0]["response_format"]["json_schema"]["schema"]
    assert sch["properties"]["label"] == {"maxLength": 5, "title": "Label", "type": "string"}


def test_the_capability_probe_runs_once_and_is_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, Any, Any]] = []

    async def probe(backend: Any, store: Any, *, echo: Any = None) -> str:
        calls.append((backend, store, echo))
        return f"probed #{len(calls)}"

    monkeypatch.setattr("rmskit.models.probe.probe_and_apply", probe)
    b = Scripted(rcfg(), [])
    store, echo = object(), print

    async def twice() -> list[Any]:
        return list(await asyncio.gather(b.start(store, echo=echo), b.start(None)))

    assert asyncio.run(twice()) == ["probed #1", "probed #1"]
    assert calls == [(b, store, echo)] and b.probe_result == "probed #1"


def test_a_refusal_beside_a_usable_answer_is_ignored_and_adjustments_add_up(clock: Clock) -> None:
    b = Scripted(rcfg(), [ok('{"label": "abcdefg"}', refusal="meh"), ok('{"label": "abcdefg"}')])
    assert go(b, schema=Small).parsed == {"label": "abcde"}
    assert go(b, schema=Small).parsed == {"label": "abcde"}
    assert b.stats.adjustments == 2 and b.stats.reasks == 0


def test_a_format_refused_on_a_reask_is_a_final_bad_request(clock: Clock) -> None:
    b = Scripted(rcfg(), [ok("nothing"), fail(message="HTTP 500: schema gone")])
    with pytest.raises(BackendError) as ei:
        go(b, schema=Small)
    assert ei.value.kind == ErrorKind.bad_request and str(ei.value) == "bad_request: HTTP 500: schema gone"
    assert b.stats.structured_mode == "json_schema" and len(b.sent) == 2
