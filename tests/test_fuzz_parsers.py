"""Property-based tests for the other parsers of untrusted input: model answers (JSON extraction,
repair and schema validation in rmskit.models.structured) and config YAML (load_yaml_config, then
BuildConfig validation). Each must return a result or a clear error, never raise anything else.

Deeply nested answers and YAML documents once crashed with RecursionError (found by fuzzing);
their tests below keep them errors, not crashes."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import yaml
from fuzzing import json_values
from hypothesis import example, given
from hypothesis import strategies as st
from pydantic import ValidationError

from rmskit.config import BuildConfig, load_yaml_config
from rmskit.models.structured import JSONExtractError, extract_json, parse_structured
from rmskit.pipeline import schemas

MODELS = [
    schemas.Perception,
    schemas.Discovery,
    schemas.ComposedQuery,
    schemas.ControlQuery,
    schemas.TextOnlyVerdict,
    schemas.CombinedVerdict,
    schemas.LeakageVerdict,
    schemas.GuidanceResponse,
    schemas.ResponseVerdict,
]
_n = itertools.count()

# What a model may answer: JSON (valid, cut off, with prose or fences around it), near-JSON, junk.
json_text = json_values.map(json.dumps)
answers = st.one_of(
    st.text(max_size=200),
    json_text,
    st.tuples(json_text, st.integers(0, 200)).map(lambda t: t[0][: t[1]]),  # truncated
    st.tuples(st.text(max_size=30), json_text, st.text(max_size=30)).map(lambda t: f"{t[0]}\n{t[1]}\n{t[2]}"),
    st.tuples(
        st.sampled_from(["```json\n", "```\n", "```"]), json_text, st.sampled_from(["\n```", "", "```"])
    ).map("".join),
    json_text.map(lambda s: s.replace('"', "'").replace("}", ",}")),  # single quotes, trailing commas
)


@given(text=answers, model=st.sampled_from(MODELS), truncated=st.booleans())
@example(
    text='{"setting": "kitchen", "summary": "s", "objects": [{"name": "knife"}]}',
    model=schemas.Perception,
    truncated=False,
)
def test_fuzz_model_answers(text, model, truncated):
    out = parse_structured(text, model, truncated=truncated)
    assert (out.parsed is None) != (out.error is None)
    if out.parsed is not None:
        model.model_validate(out.parsed)  # what is returned is valid against the schema
    else:
        assert out.error.strip()
    try:
        extract_json(text)
    except JSONExtractError as exc:
        assert str(exc)


@pytest.mark.parametrize("text", ["[" * 100_000, "x " + '{"a":' * 5_000])
def test_model_answer_nested_too_deeply_is_an_error_not_a_crash(text):
    out = parse_structured(text, schemas.Perception)
    assert out.parsed is None and out.error


# ----------------------------------------------------------------------------------------------
# config YAML

FIELDS = list(BuildConfig.model_fields)
config_docs = st.dictionaries(
    st.sampled_from(FIELDS) | st.text(max_size=10),
    json_values
    | st.dictionaries(
        st.sampled_from(["spec", "base_url", "concurrency", "max_pixels", "x"]), json_values, max_size=3
    ),
    max_size=6,
)
yaml_texts = st.one_of(
    config_docs.map(lambda d: yaml.safe_dump(d, allow_unicode=True)),
    json_values.map(lambda v: yaml.safe_dump(v)),
    st.text(max_size=120),
    st.sampled_from(
        ["a: &x [1]\nb: *x\n", "!!python/object:os.system {}\n", "a: b: c\n", "- [\n", "\t- x\n"]
    ),
)


def _load(tmp: Path, text: str, raw: bytes | None = None) -> None:
    p = tmp / f"c{next(_n)}.yaml"
    p.write_bytes(raw if raw is not None else text.encode("utf-8", "surrogateescape"))
    try:
        data = load_yaml_config(p)
    except (ValueError, yaml.YAMLError) as exc:  # UnicodeDecodeError is a ValueError
        assert str(exc)
        return
    assert isinstance(data, dict)
    try:
        BuildConfig.model_validate(data)
    except ValidationError as exc:
        assert exc.errors()


@pytest.fixture(scope="module")
def cfg_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("yaml")


@given(text=yaml_texts, raw=st.none() | st.binary(max_size=40))
def test_fuzz_config_yaml(cfg_dir, text, raw):
    _load(cfg_dir, text, raw)


def test_config_yaml_nested_too_deeply_is_an_error_not_a_crash(tmp_path):
    _load(tmp_path, "[" * 100_000 + "]" * 100_000)


@given(doc=config_docs | st.dictionaries(st.text(max_size=10), json_values, max_size=6), sort=st.booleans())
def test_card_yaml_through_libyaml_reads_back_as_written(doc, sort):
    """The card's YAML blocks (mappings) go through libyaml's emitter for speed: what it writes reads
    back as the data written. (PyYAML's own emitter fails this: a key '\\x85' read back as ' '.)"""
    from rmskit.export.card import safe_dump

    for kwargs in (
        {"sort_keys": sort, "allow_unicode": True, "width": 1000},
        {"sort_keys": sort, "allow_unicode": True},
    ):
        assert yaml.safe_load(safe_dump(doc, **kwargs)) == doc
