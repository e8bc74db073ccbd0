"""The verify-prompt regression set: harness agreement on oracle / inverted models, and the CLI."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

from rmskit.models.base import Capabilities, Result
from rmskit.pipeline.prompting import render
from rmskit.pipeline.regression import load_cases, run_regression
from rmskit.pipeline.stages import lexical_leak
from rmskit.testing.openai_server import OpenAITestServer
from rmskit.testing.rms_script import answer, responder, stage_of

CASES = {c.id: c for c in load_cases()}


class Oracle:
    """Answers each case with its expected verdict (or the opposite when inverted)."""

    model_id = "oracle"
    capabilities = Capabilities(vision=False)

    def __init__(self, invert: bool = False) -> None:
        self.invert = invert

    async def generate(self, messages, *, schema=None, params=None):
        case = next(
            c
            for c in CASES.values()
            if c.vars["query"] in messages[1].content
            and stage_of(messages[0].content) == c.check
            and c.vars.get("response", "") in messages[1].content
        )
        data = {
            name: False if field.annotation is bool else "" for name, field in schema.model_fields.items()
        }
        data.update({k: (not v) if self.invert else v for k, v in case.expect.items()})
        if "leaked_terms" in data:
            data["leaked_terms"] = []
        obj = schema.model_validate(data).model_dump()
        return Result(text=json.dumps(obj), parsed=obj, model=self.model_id)

    async def aclose(self) -> None:
        return None


def test_cases_cover_every_verify_prompt_and_both_outcomes() -> None:
    checks = {c.check for c in CASES.values()}
    assert checks == {"check_text_only", "check_combined", "check_leakage", "check_response"}
    for check in checks:  # each check has at least one positive and one negative expectation
        values = {v for c in CASES.values() if c.check == check for v in c.expect.values()}
        assert values == {True, False}, check


def test_agreement_is_measured_not_assumed() -> None:
    good = asyncio.run(run_regression(Oracle()))
    bad = asyncio.run(run_regression(Oracle(invert=True)))
    assert good.n == bad.n == len(CASES)
    assert good.agreement == 1.0 and bad.agreement == 0.0
    assert set(good.by_check) == {"check_text_only", "check_combined", "check_leakage", "check_response"}
    # every rate carries n and an interval; 14 cases are below the per-class floor for the
    # chance-corrected balanced accuracy, which is withheld rather than reported as a number
    assert good.agreement_ci.n == len(CASES) and good.agreement_ci.low is not None
    assert good.agreement_ci.low < 1.0 == good.agreement_ci.value
    assert good.balanced_accuracy.value is None and good.balanced_accuracy.insufficient


def test_lexical_check_agrees_with_leakage_cases() -> None:
    for c in CASES.values():
        if c.check == "check_leakage":
            res = lexical_leak(c.vars["query"], {"hazard": c.vars["hazard"], "benign_intent": ""})
            if c.expect["leaks"]:
                assert not res["pass"], c.id


def test_cli_against_a_server(tmp_path) -> None:
    from rmskit.ledger import Ledger

    run_dir = tmp_path / "run"
    Ledger(run_dir).close()
    with OpenAITestServer(responder=responder) as srv:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "rmskit.cli",
                "prompts",
                "regress",
                "--model",
                "openai:test-model",
                "--base-url",
                srv.base_url,
                "--json",
                "--run",
                str(run_dir),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    report = json.loads(out)
    # The scripted model's verdict on each case, computed here from its rendered prompt: the
    # harness must report exactly this agreement (the scripted model gets some cases wrong).
    agree = []
    for c in CASES.values():
        messages, _ = render(c.check, **{"perception_json": "", **c.vars})
        got = answer({"messages": [{"role": m.role, "content": m.content} for m in messages]})
        agree.append(all(got.get(k) == v for k, v in c.expect.items()))
    expected = sum(agree) / len(agree)
    assert 0 < expected < 1
    assert report["n"] == len(CASES) and report["agreement"] == expected
    assert {c["id"] for c in report["cases"]} == set(CASES)
    assert report["prompt_versions"]["check_leakage"] == "check_leakage.v1"
    with Ledger(run_dir, readonly=True) as led:  # --run stores it for the dataset card
        stored = led.get_meta("prompt_regression")
    assert stored["agreement"] == expected and stored["agreement_ci"]["n"] == len(CASES)
