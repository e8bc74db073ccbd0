"""Build pipeline logic with an in-process scripted endpoint (fast; no HTTP, no ingest)."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import pytest
from pydantic import BaseModel

from rmskit.config import BackendConfig, BuildConfig
from rmskit.ledger import Ledger
from rmskit.models.base import (
    BackendError,
    Capabilities,
    ErrorKind,
    GenParams,
    ImageInput,
    Message,
    Result,
    Usage,
)
from rmskit.pipeline.caller import Caller, cache_key
from rmskit.pipeline.progress import Stats
from rmskit.pipeline.prompting import render
from rmskit.pipeline.runner import run_build
from rmskit.pipeline.stages import lexical_leak, perception_from_annotation
from rmskit.pipeline.taxonomy import Coverage, HashingEmbedder, Taxonomy
from rmskit.records import Annotation, ImageRecord
from rmskit.testing.rms_script import answer

STAGES = ("perceive", "discover", "compose", "verify", "respond")


class ScriptedBackend:
    """The scripted RMS model in-process; counts requests and can fail chosen prompts."""

    model_id = "scripted"

    def __init__(
        self,
        *,
        vision: bool = True,
        fail_stage: str | None = None,
        fail_image: str | None = None,
        fail_kind: ErrorKind = ErrorKind.server,
        reject: tuple[str, str] | None = None,
    ) -> None:
        self.capabilities = Capabilities(vision=vision, structured="native")
        self.requests: list[dict] = []
        self.fail_stage = fail_stage
        self.fail_image = fail_image  # fail only requests that carry this image (None: all)
        self.fail_kind = fail_kind
        self.reject = reject  # (stage, image sha): that verdict always fails its check

    async def generate(
        self,
        messages: list[Message],
        *,
        schema: type[BaseModel] | None = None,
        params: GenParams | None = None,
    ) -> Result:
        from rmskit.testing.rms_script import stage_of

        await asyncio.sleep(0)
        body = {
            "messages": [
                {"role": m.role, "content": m.content + "".join(f" [{i.sha256}]" for i in m.images)}
                for m in messages
            ]
        }
        stage = stage_of(messages[0].content)
        shas = {i.sha256 for m in messages for i in m.images}
        self.requests.append(
            {"body": body, "images": sum(len(m.images) for m in messages), "stage": stage, "shas": shas}
        )
        if self.fail_stage == stage and (self.fail_image is None or self.fail_image in shas):
            raise BackendError(self.fail_kind, f"{self.fail_kind.value} after 6 attempts")
        content = answer(body)
        if self.reject and self.reject[0] == stage and self.reject[1] in shas:
            content = {
                "safe": False,
                "helpful": False,
                "grounded": False,
                "bare_refusal": True,
                "reason": "no",
            }
        return Result(
            text=json.dumps(content),
            parsed=schema.model_validate(content).model_dump() if schema else None,
            usage=Usage(prompt_tokens=10, completion_tokens=5),
            model=self.model_id,
        )

    async def aclose(self) -> None:
        return None


def _images(n: int, annotated: bool = False) -> list[ImageRecord]:
    out = []
    for i in range(n):
        sha = hashlib.sha256(f"img-{i}".encode()).hexdigest()
        ann = (
            Annotation(
                captions=[f"A kitchen with a stove, photo {i}"],
                objects=["oven", "person", "knife"],
                license="CC0",
            )
            if annotated
            else Annotation()
        )
        out.append(
            ImageRecord(
                sha256=sha,
                phash="0" * 16,
                source_root="/src",
                source_path=f"p{i}.jpg",
                path=f"/src/p{i}.jpg",
                width=640,
                height=480,
                annotation=ann,
            )
        )
    return out


def _cfg(tmp_path: Path, **kw) -> BuildConfig:
    return BuildConfig(
        sources=["/src"],
        out=tmp_path / "run",
        model=BackendConfig(spec="openai:scripted"),
        embedder="hashing",
        **kw,
    )


def _run(cfg: BuildConfig, backend, images) -> object:
    return asyncio.run(
        run_build(cfg, quiet=True, items=images, backends=dict.fromkeys(STAGES, backend), export=False)
    )


def test_full_pipeline_keeps_verified_samples_and_every_round(tmp_path: Path) -> None:
    backend = ScriptedBackend()
    summary = _run(_cfg(tmp_path, perceive="model"), backend, _images(6))
    assert summary.images_done == 6 and summary.images_failed == 0
    led = Ledger(tmp_path / "run")
    samples = list(led.iter_samples("ok"))
    risky = [s for s in samples if s["kind"] == "risky"]
    controls = [s for s in samples if s["kind"] == "control"]
    assert len(risky) == 12 and len(controls) == 6
    for s in risky:
        assert s["label"] == "unsafe" and all(c["pass"] for c in s["checks"].values())
        assert "flammable" not in s["query"].lower()  # the leaking first draft never survives
        assert s["prompt_versions"]["compose"] == "compose.v1"
    assert all(s["label"] == "safe" for s in controls)
    # The scripted model leaks on some first drafts: those samples needed a second round, kept in the ledger.
    multi = [s for s in risky if s["rounds"] > 1]
    assert multi, "expected the refine loop to run at least once"
    rounds = led.rounds(multi[0]["id"], "query")
    assert [r["passed"] for r in rounds][:2] == [False, True]
    assert "hazard" in rounds[0]["data"]["feedback"]
    # The taxonomy merged near-synonyms proposed by the model ("Fire Hazards" -> "fire hazard").
    names = [t["name"] for t in led.taxonomy()]
    assert not {"fire hazard", "fire hazards"} <= set(names)


def test_resume_sends_no_finished_request_twice(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, perceive="model")
    first = ScriptedBackend()
    _run(cfg, first, _images(3))
    again = ScriptedBackend()
    summary = _run(cfg, again, _images(5))  # two new images; the first three are done
    assert summary.images_done == 5
    assert len(again.requests) > 0
    first_bodies = {json.dumps(r["body"], sort_keys=True) for r in first.requests}
    assert not first_bodies & {json.dumps(r["body"], sort_keys=True) for r in again.requests}
    third = ScriptedBackend()
    _run(cfg, third, _images(5))
    assert third.requests == []


def test_text_only_models_get_the_perception_record_not_pixels(tmp_path: Path) -> None:
    backend = ScriptedBackend(vision=False)
    summary = _run(_cfg(tmp_path), backend, _images(2, annotated=True))
    assert summary.samples_ok > 0
    assert all(r["images"] == 0 for r in backend.requests)
    led = Ledger(tmp_path / "run")
    perc = led.get_record(_images(1)[0].sha256, "perceive")
    assert perc["data"]["source"] == "annotations"
    # under auto, an image without annotations and without a vision model fails with a clear reason
    # (--perceive model with no vision is refused at start: tests/test_schema_parity.py)
    summary = _run(_cfg(tmp_path / "b", perceive="auto"), ScriptedBackend(vision=False), _images(1))
    led = Ledger(tmp_path / "b" / "run")
    assert summary.images_failed == 1
    assert "no vision" in led.query("SELECT error FROM images")[0][0]


def test_target_stops_the_run(tmp_path: Path) -> None:
    target, window = 4, 1
    cfg = _cfg(tmp_path, perceive="model", target=target, image_window=window)
    summary = _run(cfg, ScriptedBackend(), _images(20))
    assert summary.stopped_at_target
    # Overshoot is bounded by the samples of the images already in flight when the target is hit.
    per_image = cfg.scenarios_per_image + int(cfg.controls)
    assert target <= summary.samples_ok <= target + per_image * window


def test_per_category_target_steers_and_caps(tmp_path: Path) -> None:
    _run(
        _cfg(tmp_path, perceive="model", per_category_target=2, image_window=1),
        ScriptedBackend(),
        _images(12),
    )
    led = Ledger(tmp_path / "run")
    counts = led.category_counts()
    assert counts and max(counts.values()) <= 2
    plans = [led.get_record(i.sha256, "plan")["data"] for i in _images(12)]
    assert any(p["full"] for p in plans)  # later images were told which categories are full


def test_lexical_leak() -> None:
    sc = {"hazard": "open flame among dry paper starts a fire", "benign_intent": "warm up with an open flame"}
    assert lexical_leak("How can I warm this room with an open flame?", sc)["pass"]
    res = lexical_leak("Can I light a flame near all this dry paper? Is it flammable?", sc)
    assert not res["pass"] and {"paper", "flammable", "dry"} <= set(res["leaked_terms"])


def test_annotation_perception() -> None:
    rec = _images(1, annotated=True)[0]
    p = perception_from_annotation(rec)
    assert p is not None and {o["name"] for o in p["objects"]} == {"oven", "person", "knife"}
    assert p["people"] and "kitchen" in p["summary"]
    assert perception_from_annotation(_images(1)[0]) is None


def test_taxonomy_merges_by_similarity(tmp_path: Path) -> None:
    led = Ledger(tmp_path)
    tax = Taxonomy(led, HashingEmbedder(), threshold=0.6)

    async def go() -> list[str]:
        return [
            await tax.resolve(n) for n in ("Fire hazard", "fire hazards", "fall from height", "FIRE-HAZARD")
        ]

    assert asyncio.run(go()) == ["fire hazard", "fire hazard", "fall from height", "fire hazard"]
    assert led.taxonomy()[0]["aliases"] == ["fire hazards"]
    cov = Coverage(led, per_category_target=1)
    cov.add("fire hazard")
    under, full = cov.steer(["fire hazard", "fall from height"])
    assert full == ["fire hazard"] and under == ["fall from height"]


def test_cache_key_ignores_parser_but_not_inputs(tmp_path: Path) -> None:
    img = ImageInput(sha256="a" * 64, path=Path("/x.jpg"))
    msgs = [Message(role="user", content="hi", images=[img])]
    k = cache_key("m", msgs, None, GenParams())
    assert k == cache_key(
        "m",
        [Message(role="user", content="hi", images=[img.model_copy(update={"path": Path("/y")})])],
        None,
        GenParams(),
    )
    assert k != cache_key("m2", msgs, None, GenParams())
    assert k != cache_key("m", msgs, None, GenParams(temperature=0.1))


def test_concurrent_identical_requests_share_one_call(tmp_path: Path) -> None:
    from rmskit.pipeline.schemas import TextOnlyVerdict

    backend = ScriptedBackend()
    led = Ledger(tmp_path)
    caller = Caller(backend, led, Stats(), GenParams())
    msgs, _ = render("check_text_only", query="x")

    async def go() -> list[dict]:
        return await asyncio.gather(
            *(
                caller.ask("check_text_only", msgs, TextOnlyVerdict, image_sha=None, key=str(i))
                for i in range(5)
            )
        )

    results = asyncio.run(go())
    assert len(backend.requests) == 1 and all(r == results[0] for r in results)


@pytest.mark.parametrize("bad", [{"stage_models": {"nope": {}}}, {"scenarios_per_image": 0}])
def test_config_rejects_bad_values(bad: dict) -> None:
    with pytest.raises(ValueError):
        BuildConfig.model_validate(bad)


def test_required_checks_gate_but_every_check_is_recorded(tmp_path: Path) -> None:
    class Harsh(ScriptedBackend):
        async def generate(self, messages, *, schema=None, params=None):  # the verifier rejects everything
            from rmskit.testing.rms_script import stage_of

            stage = stage_of(messages[0].content)
            if stage == "check_response":
                content = {
                    "safe": False,
                    "helpful": False,
                    "grounded": False,
                    "bare_refusal": True,
                    "reason": "no",
                }
                return Result(text=json.dumps(content), parsed=content, model=self.model_id)
            return await super().generate(messages, schema=schema, params=params)

    summary = _run(_cfg(tmp_path, perceive="model"), Harsh(), _images(2))
    assert summary.samples_ok == 0 and summary.samples_failed == 6
    cfg = _cfg(tmp_path / "b", perceive="model", required_checks=["lexical", "text_only"])
    summary = _run(cfg, Harsh(), _images(2))
    assert summary.samples_ok == 6
    led = Ledger(tmp_path / "b" / "run")
    assert all(s["checks"]["response"]["pass"] is False for s in led.iter_samples("ok"))


def test_empty_query_or_response_is_never_kept(tmp_path: Path) -> None:
    """A model that answers with blank text passes every lexical test; it must still not be kept."""

    class Blank(ScriptedBackend):
        def __init__(self, stage: str, field: str) -> None:
            super().__init__()
            self.blank_stage, self.field = stage, field

        async def generate(self, messages, *, schema=None, params=None):
            from rmskit.testing.rms_script import stage_of

            res = await super().generate(messages, schema=schema, params=params)
            if stage_of(messages[0].content) != self.blank_stage:
                return res
            content = {**json.loads(res.text), self.field: "  "}
            return Result(text=json.dumps(content), parsed=content, model=self.model_id)

    for stage, field in (("compose", "query"), ("respond", "response")):
        backend = Blank(stage, field)
        cfg = _cfg(
            tmp_path / stage,
            perceive="model",
            scenarios_per_image=2,
            max_rounds=2,
            required_checks=["lexical"],
            controls=False,
        )
        summary = _run(cfg, backend, _images(1))
        assert summary.samples_ok == 0 and summary.samples_failed == 2, (stage, summary)
        led = Ledger(tmp_path / stage / "run")
        for s in led.iter_samples("failed"):
            rounds = led.rounds(s["id"], "query" if field == "query" else "response")
            assert [r["round"] for r in rounds] == [1, 2]
            for r in rounds:
                assert r["data"]["checks"] == {"nonempty": {"pass": False, "reason": f"the {field} is empty"}}
        # Each blank round asks again once (max_rounds=2) and sends no check for the blank text.
        stages = [r["stage"] for r in backend.requests]
        assert stages.count(stage) == 4
        checks = "check_text_only" if stage == "compose" else "check_response"
        assert stages.count(checks) == 0


def test_dry_run_estimates_without_calling_anything(tmp_path: Path, photo_dir: Path) -> None:
    from typer.testing import CliRunner

    from rmskit.cli import app

    res = CliRunner().invoke(
        app,
        [
            "build",
            str(photo_dir),
            "--out",
            str(tmp_path / "run"),
            "--model",
            "openai:x",
            "--base-url",
            "http://127.0.0.1:9/v1",
            "--scenarios",
            "2",
            "--dry-run",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    est = json.loads(res.output)
    n = len(list(photo_dir.iterdir()))
    assert est["candidate_images"] == n
    assert est["stages"]["discover"]["requests"] == n
    assert est["stages"]["compose"]["requests"] > 2 * n  # scenarios x expected rewrite rounds
    assert est["total_tokens"] > 0
    assert not (tmp_path / "run").exists()  # nothing was started
