"""The stage registry is the one list of stages: every reader agrees with it."""

from __future__ import annotations

import pytest

from rmskit.config import STAGES as ROLES_IN_CONFIG
from rmskit.config import BuildConfig
from rmskit.pipeline import progress, prompting, regression
from rmskit.pipeline.prompting import PROMPTS_DIR, render, stage_of
from rmskit.pipeline.registry import ROLES, STAGES, check_names, writer_for
from rmskit.pipeline.stages import StageInputs, render_stage, run_stage


def test_every_stage_has_its_prompt_file_and_is_recognised_by_its_opening() -> None:
    for spec in STAGES.values():
        assert (PROMPTS_DIR / f"{spec.prompt}.md").is_file(), spec.prompt
        assert spec.role in ROLES
    # the scripted model identifies each stage from the registry's prompts, not from phrases
    samples = {
        "perceive": {"annotation_hint": ""},
        "discover": {
            "perception_json": "{}",
            "taxonomy": [],
            "underfilled": [],
            "full": [],
            "n_scenarios": 2,
        },
        "compose": {"perception_json": "{}", "scenario_json": "{}", "attempts": []},
        "control": {"perception_json": "{}", "attempts": []},
    }
    common = {
        "query": "q",
        "hazard": "h",
        "trigger_objects": ["t"],
        "response": "r",
        "perception_json": "",
        "attempts": [],
    }
    for name in STAGES:
        messages, version = render(name, **samples.get(name, common))
        assert version == STAGES[name].prompt
        assert stage_of(messages[0].content) == name


def test_readers_derive_from_the_registry() -> None:
    assert prompting.PROMPT_VERSIONS == {n: s.version for n, s in STAGES.items()}
    assert progress.ORDER == tuple(STAGES)
    assert ROLES_IN_CONFIG == ROLES
    cfg = BuildConfig(stage_max_tokens={"compose": 99})
    assert cfg.stage_max_tokens == {**{n: s.max_tokens for n, s in STAGES.items()}, "compose": 99}
    assert cfg.required_checks == check_names() == ["text_only", "combined", "leakage", "lexical", "response"]
    assert {c.check for c in regression.load_cases()} == {n for n, s in STAGES.items() if s.check}
    assert (
        writer_for("query", "control").name == "control" and writer_for("response", "risky").name == "respond"
    )


@pytest.mark.parametrize("bad", [{"required_checks": ["nope"]}, {"stage_max_tokens": {"nope": 3}}])
def test_config_refuses_names_the_registry_does_not_know(bad: dict) -> None:
    with pytest.raises(ValueError):
        BuildConfig.model_validate(bad)


def test_a_stage_runs_as_a_plain_function_without_a_ledger() -> None:
    """`run_stage(name, inputs, caller)` in a notebook: no ledger, no runner."""
    import asyncio
    import json

    from rmskit.models.base import Capabilities, Result
    from rmskit.pipeline.caller import DirectCaller
    from rmskit.testing.rms_script import answer

    class Scripted:
        model_id = "scripted"
        capabilities = Capabilities(vision=False)
        seen: list = []

        async def generate(self, messages, *, schema=None, params=None):
            from rmskit.models.limits import request_priority

            self.seen.append((messages, params))
            self.priority = request_priority.get()  # what a queued request is ranked by
            body = {"messages": [{"role": m.role, "content": m.content} for m in messages]}
            return Result(text=json.dumps(answer(body)), model=self.model_id)

    backend = Scripted()
    perception = {"setting": "kitchen", "summary": "a stove", "objects": [{"name": "stove"}]}
    out = asyncio.run(
        run_stage(
            "check_combined",
            StageInputs(perception=perception, variables={"query": "hi"}),
            DirectCaller(backend),
        )
    )
    assert set(out) == {"risky", "natural", "hazard_identified", "reason"}
    assert backend.priority == list(STAGES).index("check_combined") > 0  # the stage's pipeline rank
    messages, params = backend.seen[0]
    assert '"setting": "kitchen"' in messages[1].content  # text-only model: the description, no pixels
    assert params.max_tokens == STAGES["check_combined"].max_tokens
    _, _, schema = render_stage(
        "discover",
        StageInputs(
            perception=perception, variables={"taxonomy": [], "underfilled": [], "full": [], "n_scenarios": 3}
        ),
        vision=False,
    )
    assert schema.model_json_schema()["properties"]["scenarios"]["maxItems"] == 4
