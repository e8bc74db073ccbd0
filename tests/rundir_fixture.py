"""A run directory made by the real build, once per test session, for the review / report / export tests.

`rmskit.pipeline.runner.run_build` ingests real photos (scikit-image; plus a grayscale one and two files
ingest refuses) and runs every stage against the scripted RMS model (`rmskit.testing.rms_script`)
in-process, so the ledger has exactly the runner's shape: its record kinds, check names, sample ids,
control samples, refine rounds, taxonomy, cache usage, probes and dataset export. A thin layer over
the script steers a few photos into the cases the tests need (an image that fails at perceive, model
output with markup in it, a sample refined once, one that never passes, one kept with an advisory
check failed). Review decisions go through the Ledger API, the dataset is re-exported by the real
exporter afterwards (as a user would), and score.json is a real `ScoreReport` of real metrics."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydantic import BaseModel

from rmskit.config import BackendConfig, BuildConfig
from rmskit.export import write_dataset
from rmskit.ingest.sources import iter_sources
from rmskit.ledger import Ledger
from rmskit.models.base import BackendError, Capabilities, ErrorKind, GenParams, Message, Result, Usage
from rmskit.pipeline.runner import run_build
from rmskit.pipeline.stages import sample_id
from rmskit.records import ImageRecord
from rmskit.testing.rms_script import answer, stage_of

HOSTILE_QUERY = "<script>alert(1)</script> how do I carry this to the sofa?"
HOSTILE_RESPONSE = '"><img src=x onerror=alert(2)> Please be careful: the liquid is very hot.'
HOSTILE_CATEGORY = '"><img src=x onerror=alert(3)>'
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")  # colour photos that go through every stage
REQUIRED_CHECKS = ["text_only", "combined", "leakage", "response"]  # lexical advisory: soft failures exist

# Hazards the steering layer puts first in a photo's discovery, and what compose then answers.
_HOSTILE_HAZARD = "Scalding liquid spilling over the lap"
_NEVER_PASSES = "Exhaust plume near the launch gantry"
_REFINED = "Cat chewing a lily leaf on the windowsill"
_SOFT_FAIL = "Tripping on the tower stairs"
_LEAKY = "How do I light a fire next to this flammable shelf to warm up?"


@dataclass
class RunInfo:
    run_dir: Path
    shas: dict[str, str]  # photo name -> sha256 (of the normalised image)
    ok_ids: list[str] = field(default_factory=list)
    failed_ids: list[str] = field(default_factory=list)
    control_ids: list[str] = field(default_factory=list)
    hostile_id: str = ""  # coffee's first scenario: markup in category, query and response
    rejected_id: str = ""  # rejected in the fixture's review log
    accepted_id: str = ""
    refined_id: str = ""  # chelsea's first scenario: round 1 leaked, round 2 passed
    never_passes_id: str = ""  # rocket's first scenario: leaks in every round, failed after max_rounds
    soft_fail_id: str = ""  # astronaut's first scenario: kept with the advisory lexical check failed
    failed_image: str = "camera"  # perceive fails (503, transient): the image is left pending for a re-run


class FixtureModel:
    """The scripted RMS model in-process, with per-photo steering (photo known from the image sha at
    perceive, then from the perception summary that later prompts quote)."""

    model_id = "scripted"

    def __init__(self, names: dict[str, str]) -> None:
        self.capabilities = Capabilities(vision=True, structured="native")
        self.names = names

    async def generate(
        self,
        messages: list[Message],
        *,
        schema: type[BaseModel] | None = None,
        params: GenParams | None = None,
    ) -> Result:
        await asyncio.sleep(0)
        stage = stage_of(messages[0].content)
        shas = [i.sha256 for m in messages for i in m.images]
        photo = self.names.get(shas[0], "") if shas else ""
        user = messages[-1].content
        if stage == "perceive" and photo == "camera":
            raise BackendError(ErrorKind.server, "HTTP 503 after 6 attempts")
        body = {
            "messages": [
                {"role": m.role, "content": m.content + "".join(f" [{i.sha256}]" for i in m.images)}
                for m in messages
            ]
        }
        content = _steer(stage, photo, user, answer(body))
        return Result(
            text=json.dumps(content),
            parsed=schema.model_validate(content).model_dump() if schema else None,
            usage=Usage(prompt_tokens=40 + len(user) // 4, completion_tokens=len(json.dumps(content)) // 4),
            model=self.model_id,
        )

    async def aclose(self) -> None:
        return None


def _steer(stage: str, photo: str, user: str, content: dict[str, Any]) -> dict[str, Any]:
    if stage == "perceive":
        content["summary"] += f" (photo: {photo})"
    elif stage == "discover":
        first = {
            "coffee": (_HOSTILE_HAZARD, HOSTILE_CATEGORY),
            "rocket": (_NEVER_PASSES, "launch hazards"),
            "chelsea": (_REFINED, "animal safety"),
            "astronaut": (_SOFT_FAIL, "fall from height"),
        }
        for name, (hazard, category) in first.items():
            if f"(photo: {name})" in user:
                content["scenarios"][0].update(hazard=hazard, category=category, trigger_objects=["chair"])
    elif stage == "compose":
        retry = "Earlier attempts failed" in user
        if _HOSTILE_HAZARD in user:
            content["query"] = HOSTILE_QUERY
        elif _NEVER_PASSES in user or (_REFINED in user and not retry):
            content["query"] = _LEAKY
        elif _REFINED in user:
            content["query"] = "Which of these plants would she enjoy nibbling?"
        elif _SOFT_FAIL in user:
            content["query"] = "Which way down the tower stairs is quickest in this suit?"
        elif _LEAKY in content["query"]:  # every other sample passes round 1 and every check: exact counts
            content["query"] = "What's the quickest way to warm this place up?"
        content["query"] = content["query"].replace(" burn ", " use ")
    elif stage == "respond" and HOSTILE_QUERY in user:
        content["response"] = HOSTILE_RESPONSE
    return content


def _photos(root: Path) -> Path:
    import skimage.data

    d = root / "photos"
    d.mkdir(parents=True)
    for name in PHOTOS:
        Image.fromarray(getattr(skimage.data, name)()[..., :3]).save(d / f"{name}.jpg", quality=90)
    Image.fromarray(skimage.data.camera()).save(d / "camera.jpg", quality=90)  # grayscale
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    Image.new("RGB", (12, 12), "red").save(d / "tiny.png")
    return d


def _score_json(run_dir: Path) -> None:
    """score.json as `rmskit score` writes it for one training set: a ScoreReport of real metrics."""
    from rmskit import stats
    from rmskit.scoring.api import BenchResult, ScoreReport
    from rmskit.scoring.metrics import compute_metrics

    rng = np.random.default_rng(0)
    benches = {}
    labels_of: dict[str, list[str]] = {}
    preds_of: dict[str, list[bool]] = {}
    for bench, n in (("vlguard", 120), ("siuo", 40), ("mssbench", 80)):
        labels = ["unsafe"] * n if bench == "siuo" else ["unsafe", "safe"] * (n // 2)  # siuo: one class
        truth = np.array([lbl == "unsafe" for lbl in labels], dtype=float)
        zero = np.clip(0.5 + 0.15 * (truth - 0.5) + rng.normal(0, 0.25, n), 0, 1)
        tuned = np.clip(0.5 + 0.6 * (truth - 0.5) + rng.normal(0, 0.2, n), 0, 1)
        labels_of[bench], preds_of[bench] = labels, [bool(x >= 0.5) for x in tuned]
        benches[bench] = BenchResult(
            n=n,
            zero_shot=compute_metrics(labels, zero.tolist()),
            tuned=compute_metrics(labels, tuned.tolist()),
        )
    # the score: mean tuned balanced accuracy over the benchmarks with both classes, with its interval
    both = [b for b in benches if b != "siuo"]
    head = stats.mean_balanced_accuracy(
        [[lbl == "unsafe" for lbl in labels_of[b]] for b in both], [preds_of[b] for b in both]
    )
    assert isinstance(head, stats.Estimate)
    report = ScoreReport(
        train={"name": "fixture", "path": str(run_dir / "dataset"), "format": "rmskit", "n": 10},
        judge={"model": "hf:tiny-random-qwen2-vl", "prompt": "judge.v1", "lora_r": 8},
        benchmarks=benches,
        score=head.value,
        score_estimate=head,
        score_over=both,
    )
    (run_dir / "score").mkdir()
    (run_dir / "score" / "score.json").write_text(report.model_dump_json(indent=1))


def build_run(root: Path) -> RunInfo:
    """Build, review and export a run under `root`; return what the tests need to know about it."""
    photos = _photos(root)
    run_dir = root / "run"
    cfg = BuildConfig(
        sources=[str(photos)],
        out=run_dir,
        model=BackendConfig(spec="openai:scripted"),
        embedder="hashing",
        required_checks=REQUIRED_CHECKS,
    )
    items = list(iter_sources(cfg.sources, cfg.ingest, run_dir / "images"))  # the runner's own ingest
    names = {r.sha256: Path(r.source_path).stem for r in items if isinstance(r, ImageRecord)}
    backend = FixtureModel(names)
    stages = ("perceive", "discover", "compose", "verify", "respond")
    asyncio.run(run_build(cfg, quiet=True, items=items, backends=dict.fromkeys(stages, backend)))
    info = RunInfo(run_dir=run_dir, shas={n: s for s, n in names.items()})
    with Ledger(run_dir) as led:
        for s in led.iter_samples(None):
            (info.ok_ids if s["status"] == "ok" else info.failed_ids).append(s["id"])
            if s["kind"] == "control" and s["status"] == "ok":
                info.control_ids.append(s["id"])
        first = {name: sample_id(info.shas[name], "risky", 0) for name in PHOTOS}
        info.hostile_id, info.never_passes_id = first["coffee"], first["rocket"]
        info.refined_id, info.soft_fail_id = first["chelsea"], first["astronaut"]
        info.rejected_id = sample_id(info.shas["rocket"], "control", 0)
        info.accepted_id = sample_id(info.shas["coffee"], "control", 0)
        led.add_decision(info.rejected_id, "reject", {})
        led.add_decision(info.accepted_id, "accept", {})
    _score_json(run_dir)
    write_dataset(run_dir)  # export again after review, as a user would
    return info


def read_exported_ids(run_dir: Path) -> list[str]:
    path = Path(run_dir) / "dataset" / "samples.jsonl"
    return [json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip()]


# -- helpers shared by the review/report tests (the fixtures themselves live in conftest.py) -----------------------------------------
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def chromium_skip_reason() -> str | None:
    if not CHROMIUM.exists():
        return "chromium is not installed (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright (python) is not installed"
    return None
