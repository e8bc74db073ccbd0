"""Pydantic output schemas of the build stages. Each has a versioned prompt file in prompts/
(`<stage>.vN.md`) whose text relies on these field names and nothing the schema already says."""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

Severity = Literal["low", "medium", "high", "critical"]
HarmType = Literal[
    "physical_injury",
    "fire_or_explosion",
    "poisoning_or_health",
    "child_safety",
    "traffic_or_vehicle",
    "animal",
    "electrical",
    "property_damage",
    "privacy",
    "legal_or_fraud",
    "environmental",
    "other",
]


# String caps keep outputs bounded: grammar-constrained decoders enforce them while generating, and
# remote answers that exceed them are re-asked rather than stored. They are generous on purpose.
Short = Annotated[str, Field(max_length=120)]
Text = Annotated[str, Field(max_length=600)]


class SceneObject(BaseModel):
    name: Short
    attributes: list[Short] = Field(default_factory=list, max_length=6)
    affordances: list[Short] = Field(default_factory=list, max_length=6)


class PersonActivity(BaseModel):
    description: Short
    activity: Short


class Perception(BaseModel):
    setting: Short
    summary: Text
    objects: list[SceneObject] = Field(min_length=1, max_length=20)
    people: list[PersonActivity] = Field(default_factory=list, max_length=10)
    visible_text: list[Short] = Field(default_factory=list, max_length=10)
    conditions: list[Short] = Field(default_factory=list, max_length=10)


class RiskScenario(BaseModel):
    hazard: Text
    trigger_objects: list[Short] = Field(min_length=1, max_length=5)
    benign_intent: Text
    harm_type: HarmType
    severity: Severity
    category: str = Field(max_length=60, description="short risk-category name, 1-4 words")
    rationale: Text


class Discovery(BaseModel):
    scenarios: list[RiskScenario] = Field(min_length=1, max_length=8)


@lru_cache(maxsize=16)
def discovery_schema(n_scenarios: int) -> type[Discovery]:
    """Discovery capped at n+1 scenarios: one spare lets coverage steering choose, and the cap bounds
    the output (grammar-constrained decoders stop there instead of filling the list)."""

    class DiscoveryN(Discovery):
        model_config = ConfigDict(title="Discovery")
        scenarios: list[RiskScenario] = Field(min_length=1, max_length=n_scenarios + 1)

    return DiscoveryN


class ComposedQuery(BaseModel):
    query: Text
    why_safe_alone: Text
    why_risky_with_image: Text


class ControlQuery(BaseModel):
    query: Text


class TextOnlyVerdict(BaseModel):
    harmful: bool
    reason: Text


class CombinedVerdict(BaseModel):
    risky: bool
    natural: bool
    hazard_identified: Text
    reason: Text


class LeakageVerdict(BaseModel):
    leaks: bool
    leaked_terms: list[Short] = Field(default_factory=list, max_length=10)
    reason: Text


class GuidanceResponse(BaseModel):
    response: str = Field(max_length=4000)


class ResponseVerdict(BaseModel):
    safe: bool
    helpful: bool
    grounded: bool
    bare_refusal: bool
    reason: Text
