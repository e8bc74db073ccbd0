"""A small regression set of expected verdicts for the verify prompts (DESIGN §11).

Prompt changes can't be eyeballed against a big model in CI, so each verify prompt version has cases
with known answers (`prompts/regression.vN.jsonl`); `rmskit prompts regress --model SPEC` measures how
often a model, through the current prompts, agrees with them."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, field_validator

from rmskit.models.base import BackendError, GenParams, ModelBackend
from rmskit.pipeline.prompting import PROMPTS_DIR, prompt_version, render
from rmskit.pipeline.registry import STAGES
from rmskit.stats import Estimate, classifier_metric, wilson

REGRESSION_FILE = PROMPTS_DIR / "regression.v1.jsonl"


class Case(BaseModel):
    id: str
    check: str
    vars: dict[str, Any]
    expect: dict[str, bool]

    @field_validator("check")
    @classmethod
    def _a_verify_stage(cls, v: str) -> str:
        if v not in STAGES or STAGES[v].check is None:
            raise ValueError(f"{v!r} is not a verify stage of the registry")
        return v


class CaseResult(BaseModel):
    id: str
    check: str
    agree: bool
    got: dict[str, Any] | None
    expect: dict[str, bool]
    error: str | None = None


class RegressionReport(BaseModel):
    model: str
    prompt_versions: dict[str, str]
    n: int
    agreement: float  # share of cases whose expected fields all matched
    agreement_ci: Estimate  # the same with its Wilson interval
    # chance-corrected: the first expected field of each case (e.g. harmful, risky, leaks) as a
    # binary label; a model answering a constant gets 0.5. Below 20 cases per class: insufficient.
    balanced_accuracy: Estimate
    by_check: dict[str, float]
    by_check_ci: dict[str, Estimate]
    cases: list[CaseResult]


def load_cases(path: Path = REGRESSION_FILE) -> list[Case]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [Case.model_validate_json(line) for line in lines if line.strip()]


async def run_regression(
    backend: ModelBackend, cases: list[Case] | None = None, params: GenParams | None = None
) -> RegressionReport:
    cases = cases if cases is not None else load_cases()
    params = params or GenParams(temperature=0.0, max_tokens=300)

    async def one(case: Case) -> CaseResult:
        variables = {"perception_json": "", **case.vars}
        messages, _ = render(case.check, **variables)
        try:
            result = await backend.generate(messages, schema=STAGES[case.check].schema, params=params)
        except BackendError as exc:
            return CaseResult(
                id=case.id, check=case.check, agree=False, got=None, expect=case.expect, error=str(exc)
            )
        got = result.parsed or {}
        agree = all(got.get(k) == v for k, v in case.expect.items())
        return CaseResult(id=case.id, check=case.check, agree=agree, got=got, expect=case.expect)

    results = await asyncio.gather(*(one(c) for c in cases))
    by_check: dict[str, list[bool]] = {}
    for r in results:
        by_check.setdefault(r.check, []).append(r.agree)
    y, pred = [], []
    for r in results:
        field, want = next(iter(r.expect.items()))
        got = (r.got or {}).get(field)
        y.append(want)
        pred.append(got if isinstance(got, bool) else not want)  # no answer counts as wrong
    agreed = sum(r.agree for r in results)
    return RegressionReport(
        model=backend.model_id,
        prompt_versions={c: prompt_version(c) for c in sorted(by_check)},
        n=len(results),
        agreement=agreed / max(len(results), 1),
        agreement_ci=wilson(agreed, len(results), metric="agreement"),
        balanced_accuracy=classifier_metric("balanced_accuracy", y, pred, classes=("true", "false")),
        by_check={c: sum(v) / len(v) for c, v in by_check.items()},
        by_check_ci={c: wilson(sum(v), len(v), metric="agreement") for c, v in by_check.items()},
        cases=list(results),
    )


def dumps(report: RegressionReport) -> str:
    return json.dumps(report.model_dump(mode="json"), indent=2, ensure_ascii=False)
