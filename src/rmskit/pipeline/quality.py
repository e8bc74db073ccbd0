"""Measures of the build's own quality, computed from the ledger (others display them).

- `verifier_agreement`: re-check a seeded sample of N kept samples with a second verifier and
  report Cohen's kappa per check (issue: is "safe alone, risky together" judged consistently?).
  The second verifier is `stage_models.verify2` when configured, else the verify model at another
  temperature with the instruction paragraphs of each check prompt in a shuffled order.
- `pass_rates_by_category` (pipeline/pass_rates.py, re-exported here): share of risky samples kept per
  taxonomy category, with a Wilson interval: which hazards the model can encode without leakage, and
  which it cannot."""

from __future__ import annotations

import asyncio
import logging
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from rmskit.config import BuildConfig
from rmskit.ledger import Ledger
from rmskit.models import ModelBackend, load_backend
from rmskit.models.base import ImageInput, Message
from rmskit.pipeline.caller import Caller, StageFailed
from rmskit.pipeline.pass_rates import CategoryRate, pass_rates_by_category
from rmskit.pipeline.progress import Stats
from rmskit.pipeline.registry import STAGES, StageSpec
from rmskit.pipeline.stages import StageInputs, render_stage
from rmskit.stats import Estimate, classifier_metric, wilson

__all__ = ["CategoryRate", "pass_rates_by_category"]  # their home is light: the export reads them

log = logging.getLogger("rmskit.pipeline")
SECOND_TEMPERATURE = 1.0  # when the same model re-checks: another temperature ...


def shuffled_instructions(messages: list[Message], seed: int) -> list[Message]:
    """... and the system prompt's paragraphs in another (seeded) order."""
    out = []
    for m in messages:
        if m.role == "system":
            paras = m.content.split("\n\n")
            random.Random(seed).shuffle(paras)
            m = m.model_copy(update={"content": "\n\n".join(paras)})
        out.append(m)
    return out


class CheckAgreement(BaseModel):
    n: int
    agreement: Estimate  # observed share of equal verdicts (Wilson interval); not chance-corrected
    kappa: Estimate  # Cohen's kappa with a stratified bootstrap interval, or insufficient/undefined


class Agreement(BaseModel):
    n_rounds: int  # verified rounds re-checked (query and response rounds, passed and failed)
    seed: int
    second_verifier: str
    checks: dict[str, CheckAgreement]
    errors: int = 0


async def verifier_agreement(
    ledger: Ledger, verifier: Caller, n: int, seed: int, *, shuffle: bool
) -> Agreement:
    """Re-run the model checks of `n` seeded verified rounds (passed and failed alike: kept samples
    alone would make the first verifier a constant 'pass' and kappa meaningless) with `verifier`."""
    rounds = [r for r in ledger.iter_rounds() if (r["data"] or {}).get("checks")]
    rounds.sort(key=lambda r: (r["sample_id"], r["phase"], r["round"]))
    chosen = random.Random(seed).sample(rounds, min(n, len(rounds)))
    pairs: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
    errors = 0

    async def one(rnd: dict[str, Any]) -> None:
        nonlocal errors
        sample = ledger.get_sample(rnd["sample_id"])
        rec = ledger.get_image(sample["image_sha256"]) if sample else None
        perception = (ledger.get_record(rec.sha256, "perceive") or {}).get("data") if rec else None
        if sample is None or rec is None or perception is None:
            return
        data = rnd["data"]
        texts = {"query": data.get("query") or sample.get("query", ""), "response": data.get("response", "")}
        for spec in STAGES.values():
            first = data["checks"].get(spec.check.name) if spec.check else None
            if spec.check is None or first is None or sample["kind"] not in spec.kinds:
                continue
            try:
                verdict = await _recheck(
                    spec, sample, texts, rec.sha256, rec.path, perception, verifier, shuffle, seed
                )
            except StageFailed:
                errors += 1
                continue
            pairs[spec.check.name].append((bool(first["pass"]), spec.check.passes(verdict, sample["kind"])))

    await asyncio.gather(*(one(r) for r in chosen))
    return Agreement(
        n_rounds=len(chosen),
        seed=seed,
        second_verifier=f"{verifier.model_id}"
        + (" (shuffled instructions, another temperature)" if shuffle else ""),
        checks={name: _agreement(p) for name, p in sorted(pairs.items())},
        errors=errors,
    )


async def _recheck(
    spec: StageSpec,
    sample: dict[str, Any],
    texts: dict[str, str],
    sha: str,
    path: str,
    perception: dict[str, Any],
    verifier: Caller,
    shuffle: bool,
    seed: int,
) -> dict[str, Any]:
    scenario = sample.get("scenario") or {}
    inputs = StageInputs(
        image=ImageInput(sha256=sha, path=Path(path)),
        perception=perception,
        variables={
            "query": texts["query"],
            "response": texts["response"],
            "hazard": scenario.get("hazard", ""),
            "trigger_objects": scenario.get("trigger_objects", []),
        },
    )
    messages, _, schema = render_stage(spec.name, inputs, verifier.vision)
    if shuffle:
        messages = shuffled_instructions(messages, seed)
    return await verifier.ask(
        f"agreement:{spec.name}", messages, schema, image_sha=sha, key=f"agreement:{sample['id']}"
    )


def _agreement(pairs: list[tuple[bool, bool]]) -> CheckAgreement:
    a = [x for x, _ in pairs]
    b = [y for _, y in pairs]
    same = sum(x == y for x, y in pairs)
    return CheckAgreement(
        n=len(pairs),
        agreement=wilson(same, len(pairs), metric="agreement"),
        kappa=classifier_metric("kappa", a, b, classes=("pass", "fail")),
    )


async def measure_agreement(
    cfg: BuildConfig,
    ledger: Ledger,
    callers: dict[str, Caller],
    stats: Stats,
    backends: dict[str, ModelBackend],
    created: list[ModelBackend],
) -> None:
    """The second verifier re-checks a seeded sample of kept samples; kappa per check -> meta."""
    if "verify2" in cfg.stage_models or "verify2" in backends:
        bcfg = cfg.backend_for("verify2")
        backend = backends.get("verify2")
        if backend is None:
            backend = load_backend(bcfg)
            created.append(backend)
        second, shuffle = Caller(backend, ledger, stats, bcfg.params), False
    else:  # the same model at another temperature, with the instruction order shuffled
        first = callers["verify"]
        temp = SECOND_TEMPERATURE if first.params.temperature != SECOND_TEMPERATURE else 0.3
        second = Caller(first.backend, ledger, stats, first.params.model_copy(update={"temperature": temp}))
        shuffle = True
    result = await verifier_agreement(ledger, second, cfg.verify_agreement, cfg.seed, shuffle=shuffle)
    ledger.set_meta("agreement", result.model_dump(mode="json"))
    log.info("verifier agreement: %s", result.model_dump_json())
