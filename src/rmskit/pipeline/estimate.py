"""`rmskit build --dry-run`: requests and tokens per stage before any call is made."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from rmskit.config import BuildConfig
from rmskit.models.base import ImageInput
from rmskit.pipeline.registry import STAGES, StageSpec
from rmskit.pipeline.stages import StageInputs, render_stage

# Expected rounds when checks fail sometimes: deliberately conservative (budgets are real money).
_EXPECTED_ROUNDS = {"query": 1.4, "response": 1.1}
_CONTROL_ROUNDS = {"query": 1.1, "response": 1.05}
_PERCEPTION_TOKENS = 450


class StageEstimate(BaseModel):
    requests: float
    prompt_tokens: float
    completion_tokens: float


class Estimate(BaseModel):
    candidate_images: int
    stages: dict[str, StageEstimate]
    total_requests: float
    total_tokens: float
    assumptions: str


def count_candidates(source: str) -> int:
    """Items a source may yield, without decoding any image: files in a folder, records in a JSONL /
    JSON / CSV manifest (quoted multi-line CSV fields count once), images listed in a COCO file, rows
    of parquet shards and saved datasets. The source is classified by the same sniffer as the build
    (so `FILE::IMAGE_DIR` works); an unusable source or a hub stream counts 0."""
    from rmskit.ingest.sources import resolve_source  # Pillow and friends load only for a dry run

    try:
        src = resolve_source(source)
        return src.count() or 0
    except ValueError:
        return 0


def _requests_per_image(spec: StageSpec, cfg: BuildConfig) -> float:
    """Expected requests of one stage per image, from where the registry places it."""
    if spec.unit == "image":
        return 0.0 if spec.role == "perceive" and cfg.perceive == "annotations" else 1.0
    n = 0.0
    if "risky" in spec.kinds:
        n += cfg.scenarios_per_image * _EXPECTED_ROUNDS[spec.unit]
    if "control" in spec.kinds and cfg.controls:
        n += _CONTROL_ROUNDS[spec.unit]
    return n


def _prompt_tokens(spec: StageSpec, cfg: BuildConfig, image_tokens: int) -> int:
    """Prompt tokens of one request (chars / 4), rendered with typical-size stand-in inputs."""
    attach = spec.sees_image and _vision(cfg, spec)
    variables = {
        "annotation_hint": "",
        "taxonomy": ["x"] * 20,
        "underfilled": [],
        "full": [],
        "n_scenarios": cfg.scenarios_per_image,
        "scenario_json": "x" * 400,
        "attempts": [],
        "query": "x" * 120,
        "hazard": "x" * 80,
        "trigger_objects": ["x"],
        "response": "x" * 1400,
    }
    inputs = StageInputs(perception={"scene": "x" * (_PERCEPTION_TOKENS * 4)}, variables=variables)
    inputs.image = ImageInput(sha256="0" * 64, path=Path("x.jpg")) if attach else None
    messages, _, _ = render_stage(spec.name, inputs, vision=attach)
    return sum(len(m.content) for m in messages) // 4 + (image_tokens if attach else 0)


def _vision(cfg: BuildConfig, spec: StageSpec) -> bool:
    bc = cfg.backend_for(spec.role)
    return bc.vision is not False and bc.kind in ("openai", "vllm")


def estimate(cfg: BuildConfig) -> Estimate:
    n = sum(count_candidates(s) for s in cfg.sources)
    if cfg.limit_images:
        n = min(n, cfg.limit_images)
    per_side = min(cfg.model.image_max_side, 1024)
    img_tokens = (per_side // 28) ** 2  # ViT-style 28px patches; OpenAI "high" detail is similar
    stages = {}
    for spec in STAGES.values():
        r = _requests_per_image(spec, cfg)
        if r:
            stages[spec.name] = StageEstimate(
                requests=round(r * n, 1),
                prompt_tokens=round(r * n * _prompt_tokens(spec, cfg, img_tokens)),
                completion_tokens=round(r * n * spec.out_tokens),
            )
    total_r = sum(s.requests for s in stages.values())
    total_t = sum(s.prompt_tokens + s.completion_tokens for s in stages.values())
    return Estimate(
        candidate_images=n,
        stages=stages,
        total_requests=round(total_r, 1),
        total_tokens=round(total_t),
        assumptions=(
            f"{cfg.scenarios_per_image} scenario(s)/image, {_EXPECTED_ROUNDS['query']} query rounds on "
            f"average, ~{img_tokens} tokens per attached image, annotation perception "
            f"{'on' if cfg.perceive == 'annotations' else 'when available (counted as model)'}; "
            "candidate images counted without decoding (refusals not subtracted)"
        ),
    )
