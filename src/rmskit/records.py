"""Pydantic records that cross module boundaries: ingested images, refusals, and dataset samples."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class Annotation(BaseModel):
    """What a source already says about an image (COCO captions/instances, manifest captions)."""

    captions: list[str] = Field(default_factory=list)
    objects: list[str] = Field(default_factory=list)  # instance category names, one per instance
    license: str | None = None
    source_url: str | None = None
    attribution: str | None = None


class ImageRecord(BaseModel):
    """An accepted image. Identity is the sha256 of the original bytes."""

    sha256: str
    phash: str  # hex perceptual hash (imagehash.phash) of the normalised RGB image
    source_root: str  # absolute path (or dataset id) of the source it came from
    source_path: str  # relative to source_root (posix), or "<dataset>#<index>"
    path: str  # absolute path of a normalised RGB PNG/JPEG copy the pipeline reads
    width: int
    height: int
    orig_format: str | None = None
    orig_mode: str | None = None
    annotation: Annotation = Field(default_factory=Annotation)


class Rejection(BaseModel):
    source_root: str
    path: str  # relative to source_root where possible
    reason: str  # human-readable


# The fields every line of dataset/samples.jsonl must carry (issue contract); Sample adds optional ones.
CONTRACT_FIELDS = (
    "id",
    "image",
    "image_sha256",
    "source_path",
    "query",
    "response",
    "label",
    "kind",
    "category",
    "checks",
    "rounds",
    "models",
    "prompt_versions",
    "license",
)


class Sample(BaseModel):
    """One line of dataset/samples.jsonl (the export contract)."""

    id: str
    image: str  # path inside dataset/
    image_sha256: str
    source_path: str
    query: str
    response: str
    label: Literal["unsafe", "safe"]
    kind: Literal["risky", "control"]
    category: str
    checks: dict[str, Any] = Field(default_factory=dict)
    rounds: int = 1
    models: dict[str, str] = Field(default_factory=dict)
    prompt_versions: dict[str, str] = Field(default_factory=dict)
    license: str | None = None
    split: Literal["train", "test"] | None = None
    scenario: dict[str, Any] | None = None
    source_url: str | None = None
    edited: dict[str, Any] | None = None  # review edits: {"fields": [...], "at": ts, "original": {...}}
