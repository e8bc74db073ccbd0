"""Resume semantics stated exactly (transient vs final failures), content-derived sample ids under
concurrency, the no-identical-rounds invariant, and perceive provenance."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from test_build_pipeline import ScriptedBackend, _cfg, _images, _run

from rmskit.ledger import Ledger
from rmskit.models.base import ErrorKind
from rmskit.pipeline.stages import sample_id


def test_resume_retries_exactly_the_transient_work(tmp_path: Path) -> None:
    """Image A: respond fails with 503 (transient) -> A stays pending, its risky samples are not
    written, its control is kept. Image B: discover fails with a bad request (final) -> B failed.
    Image C: every response is rejected (content, final) -> C done with failed samples.
    A re-run re-sends exactly A's two respond requests and their two checks, nothing else."""
    a, b, c = _images(3)
    cfg = _cfg(tmp_path, perceive="model", max_rounds=2)

    class Run1(ScriptedBackend):
        async def generate(self, messages, *, schema=None, params=None):
            shas = {i.sha256 for m in messages for i in m.images}
            if b.sha256 in shas:
                self.fail_stage, self.fail_image, self.fail_kind = "discover", b.sha256, ErrorKind.bad_request
            else:
                self.fail_stage, self.fail_image, self.fail_kind = "respond", a.sha256, ErrorKind.server
            return await super().generate(messages, schema=schema, params=params)

    summary = _run(cfg, Run1(reject=("check_response", c.sha256)), [a, b, c])
    assert (summary.images_done, summary.images_failed, summary.images_pending) == (1, 1, 1)
    led = Ledger(tmp_path / "run")
    assert [led.image_status(i.sha256) for i in (a, b, c)] == ["pending", "failed", "done"]
    by_image = {
        i.sha256: Counter(
            (s["kind"], s["status"]) for s in led.iter_samples(None) if s["image_sha256"] == i.sha256
        )
        for i in (a, b, c)
    }
    assert by_image[a.sha256] == {("control", "ok"): 1}  # risky ones are not failed: left for a re-run
    assert by_image[b.sha256] == {}
    assert by_image[c.sha256] == {("risky", "failed"): 2, ("control", "failed"): 1}
    assert all("response failed checks" in s["error"] for s in led.iter_samples("failed"))
    led.close()

    again = ScriptedBackend()
    summary = _run(cfg, again, [a, b, c])
    sent = Counter(r["stage"] for r in again.requests)
    assert sent == {"respond": 2, "check_response": 2}, sent
    assert all(r["shas"] == {a.sha256} for r in again.requests)
    assert (summary.images_done, summary.images_failed, summary.images_pending) == (2, 1, 0)
    led = Ledger(tmp_path / "run")
    assert Counter(s["kind"] for s in led.iter_samples("ok") if s["image_sha256"] == a.sha256) == {
        "risky": 2,
        "control": 1,
    }
    led.close()
    third = ScriptedBackend()
    _run(cfg, third, [a, b, c])
    assert third.requests == []


def test_transient_failure_of_discover_leaves_the_image_pending(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, perceive="model")
    img = _images(1)
    summary = _run(cfg, ScriptedBackend(fail_stage="discover", fail_kind=ErrorKind.timeout), img)
    assert summary.images_pending == 1 and summary.images_failed == 0
    again = ScriptedBackend()
    summary = _run(cfg, again, img)
    assert summary.images_done == 1 and summary.samples_ok == 3
    assert "perceive" not in {r["stage"] for r in again.requests}  # finished stage reused


def test_two_fresh_concurrent_runs_keep_the_same_sample_ids(tmp_path: Path) -> None:
    """Completion order differs between runs (discovery finishes in image order in one run and in
    reverse order in the other); the chosen scenarios and their ids must not."""
    import asyncio

    order = {img.sha256: i for i, img in enumerate(_images(10))}

    class Ordered(ScriptedBackend):
        def __init__(self, reverse: bool) -> None:
            super().__init__()
            self.reverse = reverse

        async def generate(self, messages, *, schema=None, params=None):
            res = await super().generate(messages, schema=schema, params=params)
            if self.requests[-1]["stage"] == "discover":
                (sha,) = self.requests[-1]["shas"]
                i = order[sha]
                await asyncio.sleep(0.005 * ((9 - i) if self.reverse else i))
            return res

    ids = []
    for n, reverse in enumerate((False, True)):
        cfg = _cfg(tmp_path / str(n), perceive="model", image_window=10)
        _run(cfg, Ordered(reverse), _images(10))
        led = Ledger(tmp_path / str(n) / "run")
        ids.append({s["id"] for s in led.iter_samples(None)})
        chosen = [led.get_record(i.sha256, "select")["data"]["chosen"] for i in _images(10)]
        for image, ch in zip(_images(10), chosen, strict=True):
            assert [c["sample_id"] for c in ch] == [sample_id(image.sha256, "risky", c["index"]) for c in ch]
        led.close()
    assert ids[0] == ids[1] and len(ids[0]) == 30


def test_no_two_rounds_of_a_sample_send_the_same_request(tmp_path: Path) -> None:
    """A verifier that rejects everything forces every round, in every phase: each round's
    request is new (none served from the cache), for queries, controls and responses."""
    from rmskit.models.base import Result

    class Harsh(ScriptedBackend):
        async def generate(self, messages, *, schema=None, params=None):
            res = await super().generate(messages, schema=schema, params=params)
            stage = self.requests[-1]["stage"]
            flips = {"check_text_only": {"harmful": True}, "check_response": {"safe": False}}
            if stage in flips:
                data = {**json.loads(res.text), **flips[stage]}
                return Result(text=json.dumps(data), parsed=data, model=self.model_id)
            return res

    rounds = 3
    backend = Harsh()
    _run(_cfg(tmp_path, perceive="model", max_rounds=rounds), backend, _images(2))
    sent = Counter(r["stage"] for r in backend.requests)
    assert sent["compose"] == 2 * 2 * rounds  # 2 images x 2 scenarios x every round sent
    assert sent["control"] == 2 * rounds  # control.v1 sent 1 request for 3 rounds (cache hits)
    bodies = [json.dumps(r["body"], sort_keys=True) for r in backend.requests]
    assert len(bodies) == len(set(bodies))
    led = Ledger(tmp_path / "run")
    controls = [s for s in led.iter_samples(None) if s["kind"] == "control"]
    assert controls and all(len(led.rounds(s["id"], "query")) == rounds for s in controls)
    led.close()
    # the response phase: queries pass, every response is rejected
    backend = ScriptedBackend(reject=("check_response", _images(1)[0].sha256))
    _run(_cfg(tmp_path / "r", perceive="model", max_rounds=rounds), backend, _images(1))
    sent = Counter(r["stage"] for r in backend.requests)
    assert sent["respond"] == 2 * rounds and sent["respond_control"] == rounds
    # respond.v2 shows the writer its own earlier drafts next to the reviewer's notes
    last = [json.dumps(r["body"]) for r in backend.requests if r["stage"] == "respond"][-1]
    assert "Draft 1:" in last and "Draft 2:" in last and "Draft 3:" not in last


def test_a_prompt_without_feedback_cannot_repeat_a_round(tmp_path: Path, monkeypatch) -> None:
    """With a control prompt that ignores earlier attempts (control.v1), the second round would be
    the first one again: the pipeline refuses to send it and fails the sample with that reason."""
    from dataclasses import replace

    from rmskit.pipeline import registry

    monkeypatch.setitem(registry.STAGES, "control", replace(registry.STAGES["control"], version="v1"))
    from rmskit.pipeline import prompting

    monkeypatch.setitem(prompting.PROMPT_VERSIONS, "control", "v1")

    class RejectControls(ScriptedBackend):
        async def generate(self, messages, *, schema=None, params=None):
            from rmskit.models.base import Result

            res = await super().generate(messages, schema=schema, params=params)
            if self.requests[-1]["stage"] == "check_text_only":
                data = {"harmful": True, "reason": "x"}
                return Result(text=json.dumps(data), parsed=data, model=self.model_id)
            return res

    backend = RejectControls()
    _run(_cfg(tmp_path, perceive="model"), backend, _images(1))
    assert Counter(r["stage"] for r in backend.requests)["control"] == 1
    led = Ledger(tmp_path / "run")
    (control,) = [s for s in led.iter_samples(None) if s["kind"] == "control"]
    assert control["status"] == "failed" and "repeat an earlier round" in control["error"]


def test_annotation_perception_is_recorded_as_such(tmp_path: Path) -> None:
    _run(_cfg(tmp_path), ScriptedBackend(), _images(1, annotated=True))
    _run(_cfg(tmp_path / "m", perceive="model"), ScriptedBackend(), _images(1))
    led = Ledger(tmp_path / "run")
    samples = list(led.iter_samples("ok"))
    assert samples and all(s["models"]["perceive"] == "annotations" for s in samples)
    assert all("perceive" not in s["prompt_versions"] for s in samples)
    assert all(s["models"]["compose"] == "scripted" for s in samples)
    led = Ledger(tmp_path / "m" / "run")
    samples = list(led.iter_samples("ok"))
    assert samples and all(s["models"]["perceive"] == "scripted" for s in samples)
    assert all(s["prompt_versions"]["perceive"] == "perceive.v1" for s in samples)


def test_a_resumed_selection_holds_its_category_reservations(tmp_path: Path) -> None:
    """A pending image resumes with its stored selection: its scenarios count against a full
    category again (each sample releases its reservation when it ends)."""
    import asyncio

    from rmskit.pipeline.progress import Stats
    from rmskit.pipeline.runner import Pipeline
    from rmskit.pipeline.taxonomy import Coverage, HashingEmbedder, Taxonomy

    led = Ledger(tmp_path)
    (rec,) = _images(1)
    chosen = [{"index": 0, "sample_id": "s0", "category": "fire hazard", "proposed": "fire"}]
    led.put_record(rec.sha256, "select", "", {"chosen": chosen, "dropped": []})
    coverage = Coverage(led, per_category_target=1)
    cfg = _cfg(tmp_path, per_category_target=1)
    pipeline = Pipeline(cfg, led, {}, Stats(), Taxonomy(led, HashingEmbedder(), 0.6), coverage)
    assert asyncio.run(pipeline._select(rec, {"scenarios": []})) == chosen
    assert coverage.is_full("fire hazard")
