"""Verifier agreement (Cohen's kappa per check, on a seeded sample of kept samples) and pass rates
per category, on real scripted builds."""

from __future__ import annotations

import json
from pathlib import Path

from test_build_pipeline import ScriptedBackend, _cfg, _images, _run

from rmskit.ledger import Ledger
from rmskit.models.base import Message, Result
from rmskit.pipeline.quality import pass_rates_by_category, shuffled_instructions


class Contrarian(ScriptedBackend):
    """A second verifier that disagrees on the combined check for every other sample."""

    model_id = "contrarian"

    async def generate(self, messages, *, schema=None, params=None):
        res = await super().generate(messages, schema=schema, params=params)
        stage = self.requests[-1]["stage"]
        if stage == "check_combined" and len(self.requests) % 2:
            data = {**json.loads(res.text), "risky": False}
            return Result(text=json.dumps(data), parsed=data, model=self.model_id)
        return res


def test_second_verifier_agreement_is_measured_per_check(tmp_path: Path) -> None:
    import asyncio

    from rmskit.config import BackendConfig
    from rmskit.pipeline.runner import run_build

    imgs = _images(4)
    cfg = _cfg(
        tmp_path,
        perceive="model",
        verify_agreement=1000,  # every verified round
        stage_models={"verify2": BackendConfig(spec="openai:x")},
    )
    # the first verifier rejects every response of one image: failed rounds are re-checked too, so
    # the first verifier is not a constant "pass" (which would make kappa meaningless)
    main, second = ScriptedBackend(reject=("check_response", imgs[0].sha256)), Contrarian()
    backends = dict.fromkeys(("perceive", "discover", "compose", "verify", "respond"), main) | {
        "verify2": second
    }
    asyncio.run(run_build(cfg, quiet=True, items=imgs, backends=backends, export=False))
    led = Ledger(tmp_path / "run")
    agreement = led.get_meta("agreement")
    n_rounds = sum(1 for r in led.iter_rounds() if r["data"].get("checks"))
    assert agreement["n_rounds"] == n_rounds and agreement["second_verifier"] == "contrarian"
    checks = agreement["checks"]
    response = checks["response"]["kappa"]["n_per_class"]
    assert response["fail"] > 0 and response["pass"] > 0
    # same scripted verdicts on text-only: perfect raw agreement; the contrarian flips combined
    # verdicts. Below 20 rounds per class kappa is insufficient with its counts, never a number.
    assert checks["text_only"]["agreement"]["value"] == 1.0
    assert checks["combined"]["agreement"]["value"] < 1.0
    kappa = checks["combined"]["kappa"]
    assert kappa["value"] is None and kappa["insufficient"] and kappa["n"] == checks["combined"]["n"]
    sent = [r["stage"] for r in second.requests]
    assert sent.count("check_combined") == checks["combined"]["n"] and "compose" not in sent
    # seeded: a second identical run picks the same rounds (all requests served by the cache)
    again = Contrarian()
    asyncio.run(run_build(cfg, quiet=True, items=imgs, backends=backends | {"verify2": again}, export=False))
    assert again.requests == [] and Ledger(tmp_path / "run").get_meta("agreement") == agreement


def test_same_model_agreement_shuffles_the_instructions(tmp_path: Path) -> None:
    backend = ScriptedBackend()
    summary = _run(_cfg(tmp_path, perceive="model", verify_agreement=3), backend, _images(3))
    led = Ledger(tmp_path / "run")
    agreement = led.get_meta("agreement")
    assert agreement["n_rounds"] == 3 and "shuffled" in agreement["second_verifier"]
    assert summary.samples_ok == 9
    msgs = [Message(role="system", content="a\n\nb\n\nc\n\nd"), Message(role="user", content="u")]
    out = shuffled_instructions(msgs, seed=1)
    assert sorted(out[0].content.split("\n\n")) == ["a", "b", "c", "d"] and out[1].content == "u"
    assert out[0].content != msgs[0].content


def test_pass_rates_by_category(tmp_path: Path) -> None:
    class RejectSome(ScriptedBackend):
        async def generate(self, messages, *, schema=None, params=None):
            res = await super().generate(messages, schema=schema, params=params)
            if self.requests[-1]["stage"] == "check_response" and _hard(messages[1].content):
                data = {**json.loads(res.text), "safe": False}
                return Result(text=json.dumps(data), parsed=data, model=self.model_id)
            return res

    _run(_cfg(tmp_path, perceive="model", max_rounds=1), RejectSome(), _images(8))
    led = Ledger(tmp_path / "run")
    rates = pass_rates_by_category(led)
    risky = [s for s in led.iter_samples(None) if s["kind"] == "risky"]
    assert sum(r.n for r in rates) == len(risky)
    assert sum(r.kept for r in rates) == sum(s["status"] == "ok" for s in risky)
    for r in rates:
        mine = [s for s in risky if s["category"] == r.category]
        rate = r.rate.value
        assert r.n == len(mine) and rate == sum(s["status"] == "ok" for s in mine) / len(mine)
        assert r.rate.low is not None and r.rate.high is not None
        assert 0 <= r.rate.low <= rate <= r.rate.high <= 1 and r.rate.n == r.n
    # categories whose responses the verifier always rejects keep nothing; others keep all
    assert {0.0, 1.0} <= {r.rate.value for r in rates}
    assert all(r.rate.value == 0.0 for r in rates if _hard(r.category))


def test_kappa_per_check_is_chance_corrected_with_an_interval() -> None:
    from rmskit.pipeline.quality import _agreement

    same = [(True, True)] * 30 + [(False, False)] * 30
    k = _agreement(same).kappa
    assert k.value == 1.0 and k.low is not None and k.low > 0.9
    flipped = [(a, not a) for a, _ in same]
    assert _agreement(flipped).kappa.value == -1.0
    # a second verifier that always says "pass" agrees 50% of the time here, but kappa is 0
    constant = [(a, True) for a, _ in same]
    assert _agreement(constant).agreement.value == 0.5 and _agreement(constant).kappa.value == 0.0


def _hard(text: str) -> bool:
    return "drowning" in text.lower() or "child safety" in text.lower()


def test_pass_rates_count_in_sqlite_without_reading_every_sample(tmp_path: Path) -> None:
    """The counts of a Python pass over every sample (category missing or empty: "unknown"; controls not
    counted), without holding every sample's JSON: the finish reads this at 96k samples."""
    import tracemalloc

    with Ledger(tmp_path / "run") as led:
        for i in range(3000):
            cat = ("fire", "", None, "drugs")[i % 4]
            data = {"id": f"s{i}", "kind": "control" if i % 7 == 0 else "risky", "response": "x" * 2000}
            if cat is not None:
                data["category"] = cat
            led.put_sample(f"s{i}", "abc", data["kind"], cat, "ok" if i % 3 else "failed", data)
        expected: dict[str, list[int]] = {}
        for s in led.iter_samples(None):
            if s["kind"] == "risky":
                c = expected.setdefault(s.get("category") or "unknown", [0, 0])
                c[0] += 1
                c[1] += s["status"] == "ok"
        tracemalloc.start()
        try:
            rates = pass_rates_by_category(led)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert {r.category: [r.n, r.kept] for r in rates} == expected
    assert [r.n for r in rates] == sorted((r.n for r in rates), reverse=True)
    assert peak < 1_000_000, peak  # every sample's JSON is > 6 MB here (35 MB traced reading them)
