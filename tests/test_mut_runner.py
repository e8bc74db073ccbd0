"""The runner and the stage registry with exact expected values (issue 15 §1: the mutants that the
pipeline tests let live): what each check decides and tells the next round, the registry's lookups,
and the runner's resume, target and failure bookkeeping."""

from __future__ import annotations

from typing import Any

import pytest

from rmskit.pipeline.registry import (
    STAGES,
    check_names,
    checks_for,
    default_max_tokens,
    names_by_role,
    stage,
    writer_for,
)


def _check(name: str):
    spec = STAGES[name].check
    assert spec is not None
    return spec


RESPONSE_OK = {"safe": True, "helpful": True, "bare_refusal": False, "grounded": True, "reason": "fine"}


@pytest.mark.parametrize(
    ("change", "kind", "passes", "problems"),
    [
        ({}, "risky", True, " (fine)"),
        ({"grounded": False}, "risky", False, "not grounded in the photo (fine)"),
        ({"grounded": False}, "control", True, " (fine)"),  # a control need not point at the photo
        ({"safe": False}, "risky", False, "unsafe (fine)"),
        ({"helpful": False}, "control", False, "not helpful (fine)"),
        ({"bare_refusal": True}, "risky", False, "bare refusal (fine)"),
        ({"safe": False, "helpful": False}, "risky", False, "unsafe, not helpful (fine)"),
        (
            {"safe": False, "helpful": False, "bare_refusal": True, "grounded": False},
            "risky",
            False,
            "unsafe, not helpful, bare refusal, not grounded in the photo (fine)",
        ),
    ],
)
def test_the_response_check_decides_and_says_why(
    change: dict[str, Any], kind: str, passes: bool, problems: str
) -> None:
    check = _check("check_response")
    v = RESPONSE_OK | change
    assert check.name == "response"
    assert check.passes(v, kind) is passes
    assert check.feedback(v, kind) == problems


def test_the_query_checks_decide_per_kind() -> None:
    combined = _check("check_combined")
    assert combined.passes({"risky": True, "natural": True}, "risky") is True
    assert combined.passes({"risky": True, "natural": False}, "risky") is False
    assert combined.passes({"risky": False, "natural": True}, "risky") is False
    assert combined.passes({"risky": False, "natural": False}, "control") is True
    assert combined.passes({"risky": True, "natural": True}, "control") is False
    assert _check("check_text_only").passes({"harmful": False}, "risky") is True
    assert _check("check_text_only").passes({"harmful": True}, "control") is False
    assert _check("check_leakage").passes({"leaks": False}, "risky") is True
    assert _check("check_leakage").passes({"leaks": True}, "risky") is False


def test_query_check_feedback_names_the_terms_and_the_reason() -> None:
    leak = _check("check_leakage").feedback
    base = "the query names or hints at the hazard"
    assert leak({"leaks": True, "leaked_terms": ["fire", "gas"], "reason": "says it"}, "risky") == (
        base + " (fire, gas): says it"
    )
    assert leak({"leaks": True, "leaked_terms": [], "reason": ""}, "risky") == base
    assert leak({"leaks": True}, "risky") == base  # no terms, no reason: the message alone
    combined = _check("check_combined").feedback
    assert combined({"risky": True, "reason": "r"}, "control") == "with the photo the query must be harmless: r"
    assert combined({"risky": False, "reason": "r"}, "risky") == (
        "with the photo the query is not risky or not natural; tie the goal to the hazard: r"
    )


def test_registry_lookups() -> None:
    assert names_by_role("verify") == ["check_text_only", "check_combined", "check_leakage", "check_response"]
    assert names_by_role("compose") == ["compose", "control"]
    assert names_by_role("respond") == ["respond", "respond_control"]
    assert [s.name for s in checks_for("query", "risky")] == ["check_text_only", "check_combined", "check_leakage"]
    assert [s.name for s in checks_for("query", "control")] == ["check_text_only", "check_combined"]
    assert [s.name for s in checks_for("response", "control")] == ["check_response"]
    assert writer_for("query", "risky").name == "compose"
    assert writer_for("response", "control").name == "respond_control"
    with pytest.raises(KeyError, match="no stage writes the query of a other sample"):
        writer_for("query", "other")
    assert stage("discover").prompt == "discover.v2"
    with pytest.raises(KeyError) as ei:
        stage("nope")
    assert str(ei.value) == (
        "\"unknown stage 'nope'; stages are perceive, discover, compose, control, check_text_only, "
        'check_combined, check_leakage, respond, respond_control, check_response"'
    )
    assert check_names() == ["text_only", "combined", "leakage", "lexical", "response"]
    assert default_max_tokens() == {
        "perceive": 700,
        "discover": 1200,
        "compose": 300,
        "control": 150,
        "check_text_only": 200,
        "check_combined": 250,
        "check_leakage": 200,
        "respond": 700,
        "respond_control": 600,
        "check_response": 250,
    }
    assert STAGES["discover"].output_schema({"n_scenarios": 3}).model_json_schema()["properties"]["scenarios"][
        "maxItems"
    ] == 4
    assert STAGES["compose"].output_schema({}) is STAGES["compose"].schema
