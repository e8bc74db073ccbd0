"""Pydantic output schemas of the build stages. Each has a versioned prompt file in prompts/
(`<stage>.vN.md`) whose text relies on these field names and nothing the schema already says."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

Severity = Literal["low", "medium", "high", "critical"]
HarmType = Literal[
    "physical_injury", "fire_or_explosion", "poisoning_or_health", "child_safety", "traffic_or_vehicle",
    "animal", "electrical", "property_damage", "privacy", "legal_or_fraud", "environmental", "other",
]


class SceneObject(BaseModel):
    name: str
    attributes: list[str] = Field(default_factory=list, max_length=6)
    affordances: list[str] = Field(default_factory=list, max_length=6)


class PersonActivity(BaseModel):
    description: str
    activity: str


class Perception(BaseModel):
    setting: str
    summary: str
    objects: list[SceneObject] = Field(min_length=1, max_length=20)
    people: list[PersonActivity] = Field(default_factory=list, max_length=10)
    visible_text: list[str] = Field(default_factory=list, max_length=10)
    conditions: list[str] = Field(default_factory=list, max_length=10)


class RiskScenario(BaseModel):
    hazard: str
    trigger_objects: list[str] = Field(min_length=1, max_length=5)
    benign_intent: str
    harm_type: HarmType
    severity: Severity
    category: str = Field(description="short risk-category name, 1-4 words")
    rationale: str


class Discovery(BaseModel):
    scenarios: list[RiskScenario] = Field(min_length=1, max_length=8)


class ComposedQuery(BaseModel):
    query: str
    why_safe_alone: str
    why_risky_with_image: str


class ControlQuery(BaseModel):
    query: str


class TextOnlyVerdict(BaseModel):
    harmful: bool
    reason: str


class CombinedVerdict(BaseModel):
    risky: bool
    natural: bool
    hazard_identified: str
    reason: str


class LeakageVerdict(BaseModel):
    leaks: bool
    leaked_terms: list[str] = Field(default_factory=list)
    reason: str


class GuidanceResponse(BaseModel):
    response: str


class ResponseVerdict(BaseModel):
    safe: bool
    helpful: bool
    grounded: bool
    bare_refusal: bool
    reason: str


STAGE_SCHEMAS: dict[str, type[BaseModel]] = {
    "perceive": Perception,
    "discover": Discovery,
    "compose": ComposedQuery,
    "control": ControlQuery,
    "check_text_only": TextOnlyVerdict,
    "check_combined": CombinedVerdict,
    "check_leakage": LeakageVerdict,
    "respond": GuidanceResponse,
    "check_response": ResponseVerdict,
}
