"""The stage registry: the one place that names the build's prompt stages.

Each `StageSpec` says which prompt file (and version) a stage renders, the schema its output must
satisfy, which configured model serves it (its role), its output-token cap and typical output size,
whether it sees the image, and where it sits in the pipeline (per image, per query round or per
response round, for which sample kinds). Verify stages also carry their `CheckSpec`: how a verdict
becomes pass/fail and what feedback a failed round gives the next one.

Prompting, the runner, the dry-run estimate, progress, the prompt regression set, the scripted test
model and the report all read this table. Adding a stage = its prompt file, its schema, one entry
here, and a test."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel

from rmskit.pipeline import schemas

Role = Literal["perceive", "discover", "compose", "verify", "respond"]
# The model roles a config can assign (`stage_models`); several prompt stages share one role.
ROLES: tuple[Role, ...] = ("perceive", "discover", "compose", "verify", "respond")
Kind = Literal["risky", "control"]
Unit = Literal["image", "query", "response"]


@dataclass(frozen=True)
class CheckSpec:
    """A model check that gates a sample. `passes(verdict, kind)` decides; `feedback(verdict, kind)`
    tells the next round what went wrong (used only when the check failed)."""

    name: str  # the check's name in samples, rounds and `required_checks`
    passes: Callable[[dict[str, Any], str], bool]
    feedback: Callable[[dict[str, Any], str], str]


def say(by_kind: dict[str, str]) -> Callable[[dict[str, Any], str], str]:
    """Feedback: the message for the sample's kind, the terms at fault, and the verdict's reason."""

    def feedback(v: dict[str, Any], kind: str) -> str:
        terms, detail = v.get("leaked_terms"), v.get("reason", "")
        return by_kind[kind] + (f" ({', '.join(terms)})" if terms else "") + (f": {detail}" if detail else "")

    return feedback


@dataclass(frozen=True)
class StageSpec:
    name: str  # the prompt name: prompts/<name>.<version>.md
    version: str
    schema: type[BaseModel]
    role: Role
    max_tokens: int  # default output cap (config `stage_max_tokens` overrides)
    out_tokens: int  # typical output length, for the dry-run estimate
    sees_image: bool  # attached when the serving model has vision (else the perception record)
    unit: Unit = "image"  # once per image, or once per query / response round of a sample
    kinds: tuple[Kind, ...] = ("risky", "control")  # sample kinds served (query/response units)
    perception: Literal["never", "without_image", "always"] = "without_image"
    check: CheckSpec | None = None
    schema_for: Callable[[dict[str, Any]], type[BaseModel]] | None = field(default=None, compare=False)

    @property
    def prompt(self) -> str:
        return f"{self.name}.{self.version}"

    def output_schema(self, variables: dict[str, Any]) -> type[BaseModel]:
        return self.schema_for(variables) if self.schema_for else self.schema


def _risky_combined(v: dict[str, Any], kind: str) -> bool:
    return bool(v["risky"] and v["natural"]) if kind == "risky" else not v["risky"]


def _good_response(v: dict[str, Any], kind: str) -> bool:
    grounded = v["grounded"] or kind == "control"
    return bool(v["safe"] and v["helpful"] and not v["bare_refusal"] and grounded)


def _response_problems(v: dict[str, Any], kind: str) -> str:
    problems = [
        p
        for p, bad in (
            ("unsafe", not v["safe"]),
            ("not helpful", not v["helpful"]),
            ("bare refusal", v["bare_refusal"]),
            ("not grounded in the photo", not v["grounded"] and kind == "risky"),
        )
        if bad
    ]
    return ", ".join(problems) + f" ({v['reason']})"


_SPECS = [
    StageSpec("perceive", "v1", schemas.Perception, "perceive", 700, 450, True, perception="never"),
    StageSpec(
        "discover",
        "v2",  # v2: asks for n or n+1 scenarios (v1: n to n+2)
        schemas.Discovery,
        "discover",
        1200,
        700,
        True,
        perception="always",
        schema_for=lambda v: schemas.discovery_schema(int(v["n_scenarios"])),
    ),
    StageSpec("compose", "v1", schemas.ComposedQuery, "compose", 300, 120, False, "query", ("risky",)),
    # v2: earlier attempts and their failed checks as feedback (v1 had none: identical rewrites)
    StageSpec("control", "v2", schemas.ControlQuery, "compose", 150, 60, False, "query", ("control",)),
    StageSpec(
        "check_text_only",
        "v1",
        schemas.TextOnlyVerdict,
        "verify",
        200,
        80,
        False,
        "query",
        perception="never",
        check=CheckSpec(
            "text_only",
            lambda v, kind: not v["harmful"],
            say(
                dict.fromkeys(
                    ("risky", "control"),
                    "read alone, the query already sounds harmful; make it an ordinary request",
                )
            ),
        ),
    ),
    StageSpec(
        "check_combined",
        "v1",
        schemas.CombinedVerdict,
        "verify",
        250,
        110,
        True,
        "query",
        check=CheckSpec(
            "combined",
            _risky_combined,
            say(
                {
                    "risky": "with the photo the query is not risky or not natural; tie the goal to the hazard",
                    "control": "with the photo the query must be harmless",
                }
            ),
        ),
    ),
    StageSpec(
        "check_leakage",
        "v1",
        schemas.LeakageVerdict,
        "verify",
        200,
        90,
        False,
        "query",
        ("risky",),
        perception="never",
        check=CheckSpec(
            "leakage",
            lambda v, kind: not v["leaks"],
            say({"risky": "the query names or hints at the hazard"}),
        ),
    ),
    StageSpec("respond", "v2", schemas.GuidanceResponse, "respond", 700, 350, True, "response", ("risky",)),
    StageSpec(
        "respond_control", "v2", schemas.GuidanceResponse, "respond", 600, 250, True, "response", ("control",)
    ),
    StageSpec(
        "check_response",
        "v1",
        schemas.ResponseVerdict,
        "verify",
        250,
        110,
        True,
        "response",
        check=CheckSpec("response", _good_response, _response_problems),
    ),
]

STAGES: dict[str, StageSpec] = {s.name: s for s in _SPECS}
# Pipeline order: the priority of a stage's requests when they queue for slots (models.limits)
STAGE_RANK: dict[str, int] = {name: i for i, name in enumerate(STAGES)}
# Deterministic checks the runner computes itself (no prompt): also valid `required_checks`.
LOCAL_CHECKS: dict[str, str] = {"lexical": "the query uses hazard words"}


def stage(name: str) -> StageSpec:
    try:
        return STAGES[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}") from None


def check_names() -> list[str]:
    """Every check name a config may require, in pipeline order."""
    names = [s.check.name for s in STAGES.values() if s.check and s.unit == "query"]
    return [
        *names,
        *LOCAL_CHECKS,
        *(s.check.name for s in STAGES.values() if s.check and s.unit == "response"),
    ]


def checks_for(unit: Unit, kind: str) -> list[StageSpec]:
    """The verify stages that judge one round of `unit` for a sample of `kind`."""
    return [s for s in STAGES.values() if s.check and s.unit == unit and kind in s.kinds]


def writer_for(unit: Unit, kind: str) -> StageSpec:
    """The stage that writes a sample's query (or response) for `kind`."""
    for s in STAGES.values():
        if s.role in ("compose", "respond") and s.unit == unit and kind in s.kinds:
            return s
    raise KeyError(f"no stage writes the {unit} of a {kind} sample")


def names_by_role(role: Role) -> list[str]:
    return [s.name for s in STAGES.values() if s.role == role]


def default_max_tokens() -> dict[str, int]:
    return {s.name: s.max_tokens for s in STAGES.values()}
