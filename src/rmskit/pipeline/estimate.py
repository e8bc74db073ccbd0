"""`rmskit build --dry-run`: requests and tokens per stage before any call is made."""

from __future__ import annotations

from pydantic import BaseModel

from rmskit.config import BuildConfig
from rmskit.pipeline.prompting import render

# Typical output lengths (tokens) per prompt, and the expected number of rounds when checks fail
# sometimes; both are deliberately conservative (budgets are real money).
_OUT_TOKENS = {
    "perceive": 450,
    "discover": 700,
    "compose": 120,
    "control": 60,
    "check_text_only": 80,
    "check_combined": 110,
    "check_leakage": 90,
    "respond": 350,
    "respond_control": 250,
    "check_response": 110,
}
_EXPECTED_ROUNDS = 1.4
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


def _prompt_tokens(name: str, image_tokens: int, **variables: object) -> int:
    messages, _ = render(name, **variables)
    return sum(len(m.content) for m in messages) // 4 + image_tokens


def estimate(cfg: BuildConfig) -> Estimate:
    n = sum(count_candidates(s) for s in cfg.sources)
    if cfg.limit_images:
        n = min(n, cfg.limit_images)
    k = cfg.scenarios_per_image
    per_side = min(cfg.model.image_max_side, 1024)
    img_tokens = (per_side // 28) ** 2  # ViT-style 28px patches; OpenAI "high" detail is similar
    pj = "x" * (_PERCEPTION_TOKENS * 4)
    scen = "x" * 400

    def vis(stage: str) -> int:
        bc = cfg.backend_for(stage)
        return img_tokens if bc.vision is not False and bc.kind in ("openai", "vllm") else 0

    reqs = {
        "perceive": 0.0 if cfg.perceive == "annotations" else 1.0,
        "discover": 1.0,
        "compose": k * _EXPECTED_ROUNDS,
        "check_text_only": k * _EXPECTED_ROUNDS,
        "check_combined": k * _EXPECTED_ROUNDS,
        "check_leakage": k * _EXPECTED_ROUNDS,
        "respond": k * 1.1,
        "check_response": k * 1.1,
    }
    if cfg.controls:
        reqs.update({"control": 1.1, "respond_control": 1.05})
        reqs["check_text_only"] += 1.1
        reqs["check_combined"] += 1.1
        reqs["check_response"] += 1.05
    ptoks = {
        "perceive": _prompt_tokens("perceive", vis("perceive"), annotation_hint=""),
        "discover": _prompt_tokens(
            "discover",
            vis("discover"),
            perception_json=pj,
            taxonomy=["x"] * 20,
            underfilled=[],
            full=[],
            n_scenarios=k,
        ),
        "compose": _prompt_tokens("compose", 0, perception_json=pj, scenario_json=scen, attempts=[]),
        "control": _prompt_tokens("control", 0, perception_json=pj, attempts=[]),
        "check_text_only": _prompt_tokens("check_text_only", 0, query="x" * 120),
        "check_combined": _prompt_tokens(
            "check_combined", vis("verify"), perception_json="", query="x" * 120
        ),
        "check_leakage": _prompt_tokens(
            "check_leakage", 0, hazard="x" * 80, trigger_objects=["x"], query="x" * 120
        ),
        "respond": _prompt_tokens(
            "respond", vis("respond"), perception_json="", query="x" * 120, attempts=[]
        ),
        "respond_control": _prompt_tokens(
            "respond_control", vis("respond"), perception_json="", query="x" * 120, attempts=[]
        ),
        "check_response": _prompt_tokens(
            "check_response",
            vis("verify"),
            perception_json="",
            query="x" * 120,
            hazard="x" * 80,
            response="x" * 1400,
        ),
    }
    stages = {
        s: StageEstimate(
            requests=round(r * n, 1),
            prompt_tokens=round(r * n * ptoks[s]),
            completion_tokens=round(r * n * _OUT_TOKENS[s]),
        )
        for s, r in reqs.items()
        if r
    }
    total_r = sum(s.requests for s in stages.values())
    total_t = sum(s.prompt_tokens + s.completion_tokens for s in stages.values())
    return Estimate(
        candidate_images=n,
        stages=stages,
        total_requests=round(total_r, 1),
        total_tokens=round(total_t),
        assumptions=(
            f"{k} scenario(s)/image, {_EXPECTED_ROUNDS} query rounds on average, "
            f"~{img_tokens} tokens per attached image, annotation perception "
            f"{'on' if cfg.perceive == 'annotations' else 'when available (counted as model)'}; "
            "candidate images counted without decoding (refusals not subtracted)"
        ),
    )
