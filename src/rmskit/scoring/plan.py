"""Before any model loads: read every --train / --bench / --benign set (path, format, split file,
image files), draw the benign pools, and say what the run will do. A bad argument fails here, in
seconds, with every problem listed at once."""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from rmskit.scoring.adapters import AdapterError, load_benchmark
from rmskit.scoring.sample import BenchSample

if TYPE_CHECKING:
    from rmskit.scoring.api import DatasetSpec, ScoreConfig


class PreflightError(AdapterError):
    """One or more datasets given to `score` cannot be used; the message lists each."""


class BenignPool(BaseModel):
    """Safe items added to a single-class benchmark so balanced accuracy is defined on the union."""

    sources: dict[str, int] = Field(default_factory=dict)  # dataset name -> items drawn
    n: int = 0
    requested: int = 0  # as many as the benchmark has unsafe items
    available: int = 0
    seed: str = ""
    ids_sha256: str = ""  # of the drawn "source:id" keys, sorted: pins the exact draw
    origin: str = "none"  # "--benign", "other benchmarks", "training-set controls", "none"
    note: str | None = None


class PlannedSet(BaseModel):
    name: str
    role: str  # train / bench / benign
    format: str
    path: str
    n: int
    labels: dict[str, int]
    missing_images: int = 0


class Plan(BaseModel):
    sets: list[PlannedSet]
    pools: dict[str, BenignPool]
    device: str
    train_steps: dict[str, int]
    eval_items: int
    judge_passes: int  # forward passes of the judge over eval items (zero-shot + once per train set)

    def lines(self) -> list[str]:
        out = ["plan:"]
        for s in self.sets:
            lab = ", ".join(f"{k} {v}" for k, v in sorted(s.labels.items()))
            out.append(f"  {s.role:6} {s.name} ({s.format}, {s.path}): {s.n} items [{lab}]")
        for b, p in self.pools.items():
            src = ", ".join(f"{k} {v}" for k, v in p.sources.items()) or "none"
            out.append(f"  benign pool for {b}: {p.n} of {p.requested} safe items ({p.origin}: {src})")
            if p.note:
                out.append(f"    note: {p.note}")
        steps = ", ".join(f"{k} {v}" for k, v in self.train_steps.items())
        out.append(
            f"  device {self.device}; training steps: {steps}; eval items {self.eval_items}, "
            f"{self.judge_passes} judge passes"
        )
        return out


def subsample(samples: list[BenchSample], k: int | None, seed: int) -> list[BenchSample]:
    if k is None or len(samples) <= k:
        return samples
    idx = sorted(random.Random(seed).sample(range(len(samples)), k))
    return [samples[i] for i in idx]


def _load(spec: DatasetSpec, split: str, cfg: ScoreConfig, errors: list[str], role: str) -> Any:
    try:
        loaded = load_benchmark(
            spec.format,
            spec.path,
            split=split,
            skip_missing_images=cfg.skip_missing_images,
            options=spec.options,
        )
    except (AdapterError, OSError, ValueError) as exc:
        errors.append(f"--{role} {spec.name}={spec.path}: {exc}")
        return None
    if not loaded.samples:
        errors.append(f"--{role} {spec.name}={spec.path}: no {split} samples")
        return None
    return loaded


def draw_pool(
    bench: str, n_wanted: int, candidates: dict[str, list[BenchSample]], seed: int, origin: str
) -> tuple[list[BenchSample], BenignPool]:
    """Seeded draw of `n_wanted` safe items from `candidates` (source name -> safe samples)."""
    flat = [(src, s) for src in sorted(candidates) for s in sorted(candidates[src], key=lambda s: s.id)]
    key = f"{seed}:{bench}"
    if not flat:
        return [], BenignPool(
            requested=n_wanted,
            seed=key,
            note="no benign items available: pass --benign NAME=PATH; balanced accuracy stays undefined",
        )
    picked = sorted(random.Random(key).sample(range(len(flat)), min(n_wanted, len(flat))))
    chosen = [flat[i] for i in picked]
    keys = sorted(f"{src}:{s.id}" for src, s in chosen)
    pool = BenignPool(
        sources=dict(Counter(src for src, _ in chosen)),
        n=len(chosen),
        requested=n_wanted,
        available=len(flat),
        seed=key,
        ids_sha256=hashlib.sha256("\n".join(keys).encode()).hexdigest(),
        origin=origin,
        note=None if len(chosen) == n_wanted else f"only {len(flat)} benign items available",
    )
    # the pooled items keep their ids, prefixed so they cannot collide with the benchmark's own
    return [s.model_copy(update={"id": f"benign:{src}:{s.id}"}) for src, s in chosen], pool


def _pool_candidates(
    bench: str,
    benches: dict[str, list[BenchSample]],
    benign: dict[str, list[BenchSample]],
    controls: dict[str, list[BenchSample]],
) -> tuple[dict[str, list[BenchSample]], str]:
    if benign:
        return benign, "--benign"
    others = {k: [s for s in v if s.label == "safe"] for k, v in benches.items() if k != bench}
    others = {k: v for k, v in others.items() if v}
    if others:
        return others, "other benchmarks"
    if controls:
        return controls, "training-set controls"
    return {}, "none"


def preflight(cfg: ScoreConfig) -> tuple[Plan, dict[str, Any], dict[str, list[BenchSample]]]:
    """Load and check everything, draw pools. Returns (plan, loaded train sets by name, eval items
    by benchmark: the benchmark's items plus its benign pool when it is single-class)."""
    errors: list[str] = []
    trains = {t.name: _load(t, "train", cfg, errors, "train") for t in cfg.train}
    loaded_b = {b.name: _load(b, "test", cfg, errors, "bench") for b in cfg.benchmarks}
    loaded_g = {g.name: _load(g, "test", cfg, errors, "benign") for g in cfg.benign}
    if errors:
        raise PreflightError("cannot start scoring:\n  " + "\n  ".join(errors))
    benches = {k: subsample(v.samples, cfg.max_eval_samples, cfg.seed) for k, v in loaded_b.items()}
    benign = {k: [s for s in v.samples if s.label == "safe"] for k, v in loaded_g.items()}
    for k, v in benign.items():
        if not v:
            errors.append(f"--benign {k}: has no safe items")
    controls = {}
    for t in cfg.train:
        if trains[t.name].name == "rmskit":  # the run's own controls, test split when it has one
            held = load_benchmark("rmskit", t.path, split="test", count_missing_only=True).samples
            ctl = [s for s in held if s.label == "safe"] or [
                s for s in trains[t.name].samples if s.label == "safe"
            ]
            if ctl:
                controls[t.name] = ctl
    if errors:
        raise PreflightError("cannot start scoring:\n  " + "\n  ".join(errors))
    pools: dict[str, BenignPool] = {}
    eval_items: dict[str, list[BenchSample]] = {}
    for name, ss in benches.items():
        labels = Counter(s.label for s in ss)
        if labels.get("safe") and labels.get("unsafe"):
            eval_items[name] = ss
            continue
        cands, origin = _pool_candidates(name, benches, benign, controls)
        extra, pools[name] = draw_pool(name, labels.get("unsafe", 0), cands, cfg.seed, origin)
        eval_items[name] = ss + extra
    return _plan(cfg, trains, loaded_b, loaded_g, pools, eval_items), trains, eval_items


def _plan(
    cfg: ScoreConfig,
    trains: dict[str, Any],
    benches: dict[str, Any],
    benign: dict[str, Any],
    pools: dict[str, BenignPool],
    eval_items: dict[str, list[BenchSample]],
) -> Plan:
    from rmskit.scoring.judge import pick_device

    sets = []
    for role, group, specs in (
        ("train", trains, cfg.train),
        ("bench", benches, cfg.benchmarks),
        ("benign", benign, cfg.benign),
    ):
        for spec in specs:
            lb = group[spec.name]
            sets.append(
                PlannedSet(
                    name=spec.name,
                    role=role,
                    format=lb.name,
                    path=spec.path,
                    n=len(lb.samples),
                    labels=dict(Counter(s.label for s in lb.samples)),
                    missing_images=lb.missing_images,
                )
            )
    steps = {
        k: cfg.epochs * math.ceil(min(len(v.samples), cfg.max_samples or len(v.samples)) / cfg.batch_size)
        for k, v in trains.items()
    }
    n_eval = sum(len(v) for v in eval_items.values())
    return Plan(
        sets=sets,
        pools=pools,
        device=pick_device(cfg.device),
        train_steps=steps,
        eval_items=n_eval,
        judge_passes=n_eval * (1 + len(trains)),
    )
