"""`rmskit.scoring.score(cfg)`: fine-tune a judge on each training set, evaluate it zero-shot and tuned on
every benchmark, write score.json (+ per-train files for a matrix) and the heatmap."""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from rmskit.scoring.adapters import load_benchmark
from rmskit.scoring.metrics import Metrics, compute_metrics
from rmskit.scoring.prompts import DEFAULT_PROMPT
from rmskit.scoring.sample import BenchSample, LoadedBenchmark


class DatasetSpec(BaseModel):
    """A dataset to train on or test against. `format` None = detect from the local layout."""

    model_config = ConfigDict(extra="forbid")

    name: str
    path: str
    format: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def parse(
        cls, spec: str, formats: dict[str, str] | None = None, options: dict[str, Any] | None = None
    ) -> DatasetSpec:
        """`NAME=PATH` (NAME doubles as the format when it names an adapter) or a bare PATH."""
        from rmskit.scoring.adapters import ADAPTERS, ALIASES

        name, sep, path = spec.partition("=")
        if not sep:
            path, name = spec, Path(spec.rstrip("/")).name or spec
        fmt = (formats or {}).get(name)
        if fmt is None and (name.lower() in ADAPTERS or name.lower() in ALIASES):
            fmt = name.lower()
        return cls(name=name, path=path, format=fmt, options=dict(options or {}))


class ScoreConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    train: list[DatasetSpec] = Field(min_length=1)
    benchmarks: list[DatasetSpec] = Field(min_length=1)
    judge: str
    out: Path
    epochs: int = Field(1, ge=1)
    lr: float = Field(2e-4, gt=0)
    lora_r: int = Field(8, ge=1)
    batch_size: int = Field(4, ge=1)
    max_samples: int | None = Field(None, ge=1)  # cap on training samples per training set
    max_eval_samples: int | None = Field(None, ge=1)  # cap per benchmark (quick runs)
    seed: int = 0
    image_max_side: int = Field(448, ge=28)
    skip_missing_images: bool = False
    threshold: float = Field(0.5, gt=0, lt=1)
    device: str | None = None
    prompt_version: str = DEFAULT_PROMPT


class BenchResult(BaseModel):
    n: int
    zero_shot: Metrics
    tuned: Metrics


class ScoreReport(BaseModel):
    """One training set's score.json: exactly train / judge / benchmarks / score."""

    train: dict[str, Any]
    judge: dict[str, Any]
    benchmarks: dict[str, BenchResult]
    score: float | None


class MatrixReport(BaseModel):
    runs: list[ScoreReport]
    heatmap: str
    zero_shot: dict[str, Metrics]


def _subsample(samples: list[BenchSample], k: int | None, seed: int) -> list[BenchSample]:
    if k is None or len(samples) <= k:
        return samples
    idx = sorted(random.Random(seed).sample(range(len(samples)), k))
    return [samples[i] for i in idx]


def _same_dataset(a: DatasetSpec, b: DatasetSpec) -> bool:
    pa, pb = Path(a.path), Path(b.path)
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a.name == b.name or a.path == b.path


def _card(
    train: DatasetSpec,
    loaded: LoadedBenchmark,
    cfg: ScoreConfig,
    n_train: int,
    trainable: int,
    stats: Any,
    results: dict[str, BenchResult],
    score: float | None,
) -> str:
    labels = Counter(s.label for s in loaded.samples)
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {cfg.judge.removeprefix('hf:')}",
        "tags: [rmskit, safety-judge, lora]",
        "---",
        "",
        f"# rmskit safety judge — LoRA on `{cfg.judge}`",
        "",
        "A binary safe/unsafe judge for (image, request) pairs, trained by `rmskit score`.",
        "",
        "## Data",
        f"- training set: `{train.name}` ({loaded.name} format) from `{train.path}`",
        f"- training samples: {n_train} (of {len(loaded.samples)}; unsafe {labels.get('unsafe', 0)}, "
        f"safe {labels.get('safe', 0)} before capping)",
        "",
        "## Hyperparameters",
        f"- prompt: `{cfg.prompt_version}`; LoRA r={cfg.lora_r}, alpha={2 * cfg.lora_r}, "
        "on the language model's q/k/v/o projections",
        f"- trainable parameters: {trainable}",
        f"- epochs {cfg.epochs}, lr {cfg.lr}, batch size {cfg.batch_size}, seed {cfg.seed}, "
        f"image max side {cfg.image_max_side}",
        f"- steps {stats.steps}, final loss {stats.losses[-1]:.4f}" if stats.losses else "- steps 0",
        "",
        "## Metrics (threshold 0.5 on P(unsafe))",
        "",
        "| benchmark | n | zero-shot macro-F1 | tuned macro-F1 | tuned unsafe recall | tuned FRR "
        "| tuned AUROC |",
        "|---|---|---|---|---|---|---|",
    ]

    def f(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    for name, r in results.items():
        lines.append(
            f"| {name} | {r.n} | {f(r.zero_shot.macro_f1)} | {f(r.tuned.macro_f1)} | "
            f"{f(r.tuned.unsafe_recall)} | {f(r.tuned.false_refusal_rate)} | {f(r.tuned.auroc)} |"
        )
    lines += ["", f"Dataset score (mean tuned headline metric off the training set): {f(score)}", ""]
    return "\n".join(lines)


def score(cfg: ScoreConfig, log: Callable[[str], None] | None = None) -> ScoreReport | MatrixReport:
    """Run the whole evaluation. One training set returns its ScoreReport (DIR/score.json); several
    return a MatrixReport (DIR/score.json for the matrix, DIR/runs/<train>/score.json each)."""
    from rmskit.scoring.judge import Judge
    from rmskit.scoring.matrix import write_heatmap

    say = log or (lambda _m: None)
    cfg.out.mkdir(parents=True, exist_ok=True)
    benches: dict[str, list[BenchSample]] = {}
    for b in cfg.benchmarks:
        loaded = load_benchmark(
            b.format, b.path, split="test", skip_missing_images=cfg.skip_missing_images, options=b.options
        )
        benches[b.name] = _subsample(loaded.samples, cfg.max_eval_samples, cfg.seed)
        say(f"benchmark {b.name}: {len(benches[b.name])} samples ({loaded.name})")

    judge = Judge(
        cfg.judge,
        device=cfg.device,
        image_max_side=cfg.image_max_side,
        prompt_version=cfg.prompt_version,
        seed=cfg.seed,
    )
    labels = {name: [s.label for s in ss] for name, ss in benches.items()}
    zero: dict[str, Metrics] = {}
    for name, ss in benches.items():
        zero[name] = compute_metrics(labels[name], judge.score(ss, cfg.batch_size), cfg.threshold)
        say(f"zero-shot {name}: {zero[name].model_dump(exclude={'undefined'})}")

    runs: list[ScoreReport] = []
    for k, t in enumerate(cfg.train):
        loaded = load_benchmark(
            t.format, t.path, split="train", skip_missing_images=cfg.skip_missing_images, options=t.options
        )
        train_samples = _subsample(loaded.samples, cfg.max_samples, cfg.seed)
        if not train_samples:
            raise ValueError(f"training set {t.name} has no samples")
        if k > 0:  # a fresh base model for every training set
            judge = Judge(
                cfg.judge,
                device=cfg.device,
                image_max_side=cfg.image_max_side,
                prompt_version=cfg.prompt_version,
                seed=cfg.seed,
            )
        trainable = judge.add_lora(cfg.lora_r)
        say(f"training on {t.name}: {len(train_samples)} samples, {trainable} trainable parameters")
        stats = judge.train(
            train_samples,
            epochs=cfg.epochs,
            lr=cfg.lr,
            batch_size=cfg.batch_size,
            lora_r=cfg.lora_r,
            seed=cfg.seed,
            log=say,
        )
        results: dict[str, BenchResult] = {}
        for name, ss in benches.items():
            tuned = compute_metrics(labels[name], judge.score(ss, cfg.batch_size), cfg.threshold)
            results[name] = BenchResult(n=len(ss), zero_shot=zero[name], tuned=tuned)
            say(f"tuned on {t.name}, {name}: {tuned.model_dump(exclude={'undefined'})}")
        heads = [results[b.name].tuned.headline() for b in cfg.benchmarks if not _same_dataset(b, t)]
        heads = [h for h in heads if h is not None]
        value = sum(heads) / len(heads) if heads else None
        run_dir = cfg.out if len(cfg.train) == 1 else cfg.out / "runs" / t.name
        adapter_dir = run_dir / "adapter"
        judge.save_adapter(
            adapter_dir, _card(t, loaded, cfg, len(train_samples), trainable, stats, results, value)
        )
        report = ScoreReport(
            train={
                "name": t.name,
                "path": t.path,
                "format": loaded.name,
                "n": len(train_samples),
                "labels": dict(Counter(s.label for s in train_samples)),
            },
            judge={
                "model": cfg.judge,
                "prompt": cfg.prompt_version,
                "lora_r": cfg.lora_r,
                "epochs": cfg.epochs,
                "lr": cfg.lr,
                "batch_size": cfg.batch_size,
                "seed": cfg.seed,
                "device": judge.device,
                "steps": stats.steps,
                "train_seconds": round(stats.seconds, 3),
                "final_loss": stats.losses[-1] if stats.losses else None,
                "adapter": str(adapter_dir),
            },
            benchmarks=results,
            score=value,
        )
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "score.json").write_text(report.model_dump_json(indent=2) + "\n", encoding="utf-8")
        runs.append(report)
        say(f"score of {t.name}: {value}")

    cols = [b.name for b in cfg.benchmarks]
    rows = ["zero-shot"] + [t.name for t in cfg.train]
    values = [[zero[c].headline() for c in cols]] + [
        [r.benchmarks[c].tuned.headline() for c in cols] for r in runs
    ]
    heatmap = write_heatmap(rows, cols, values, cfg.out / "heatmap.png")
    if len(runs) == 1:
        return runs[0]
    matrix = MatrixReport(runs=runs, heatmap=str(heatmap), zero_shot=zero)
    summary = {
        "train": [r.train for r in runs],
        "judge": runs[0].judge | {"adapter": None},
        "benchmarks": {
            c: {
                "n": len(benches[c]),
                "zero_shot": zero[c].model_dump(),
                "tuned": {r.train["name"]: r.benchmarks[c].tuned.model_dump() for r in runs},
            }
            for c in cols
        },
        "score": {r.train["name"]: r.score for r in runs},
    }
    (cfg.out / "score.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return matrix
