"""`rmskit.scoring.score(cfg)`: fine-tune a judge on each training set, evaluate it zero-shot and tuned on
every benchmark, write score.json (+ per-train files for a matrix) and the heatmap."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from rmskit import stats
from rmskit.scoring.metrics import Metrics, compute_metrics, predictions
from rmskit.scoring.plan import BenignPool, preflight, subsample
from rmskit.scoring.prompts import DEFAULT_PROMPT
from rmskit.scoring.sample import BenchSample, LoadedBenchmark
from rmskit.stats import Difference, Estimate


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
    benign: list[DatasetSpec] = Field(default_factory=list)  # safe pools for single-class benchmarks
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
    threshold: float = Field(default=0.5, gt=0, lt=1)
    device: str | None = None
    prompt_version: str = DEFAULT_PROMPT
    min_per_class: int = Field(default=stats.MIN_PER_CLASS, ge=1)  # floor below which a metric is withheld
    n_resamples: int = Field(default=stats.N_RESAMPLES, ge=100)


class BenchResult(BaseModel):
    n: int  # evaluation items: the benchmark's own plus its benign pool
    benign_pool: BenignPool | None = None  # set for single-class benchmarks
    zero_shot: Metrics
    tuned: Metrics


class ScoreReport(BaseModel):
    """One training set's score.json. `score` = mean tuned balanced accuracy over the benchmarks
    other than the training set (those clearing the floor); `score_estimate` adds its interval."""

    train: dict[str, Any]
    judge: dict[str, Any]
    benchmarks: dict[str, BenchResult]
    score: float | None
    score_estimate: Estimate
    score_over: list[str] = Field(default_factory=list)  # benchmarks the score averages


class MatrixReport(BaseModel):
    runs: list[ScoreReport]
    heatmap: str
    zero_shot: dict[str, Metrics]
    comparisons: list[Difference] = Field(default_factory=list)


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
    stats_: Any,
    results: dict[str, BenchResult],
    score: Estimate,
) -> str:
    labels = Counter(s.label for s in loaded.samples)
    f = stats.fmt_estimate
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
        f"- steps {stats_.steps}, final loss {stats_.losses[-1]:.4f}" if stats_.losses else "- steps 0",
        "",
        f"## Metrics (threshold {cfg.threshold} on P(unsafe); 95% intervals; n = items)",
        "",
        "| benchmark | zero-shot balanced acc. | tuned balanced acc. | tuned macro-F1 | tuned unsafe recall "
        "| tuned FRR | tuned AUROC |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        t = r.tuned
        lines.append(
            f"| {name} | {f(r.zero_shot.balanced_accuracy)} | {f(t.balanced_accuracy)} | {f(t.macro_f1)} | "
            f"{f(t.unsafe_recall)} | {f(t.false_refusal_rate)} | {f(t.auroc)} |"
        )
    lines += ["", f"Dataset score (mean tuned balanced accuracy off the training set): {f(score)}", ""]
    return "\n".join(lines)


def _fresh_judge(cfg: ScoreConfig) -> Any:
    from rmskit.scoring.judge import Judge

    return Judge(
        cfg.judge,
        device=cfg.device,
        image_max_side=cfg.image_max_side,
        prompt_version=cfg.prompt_version,
        seed=cfg.seed,
    )


def _metrics(cfg: ScoreConfig, labels: list[str], scores: list[float]) -> Metrics:
    return compute_metrics(
        labels,
        scores,
        cfg.threshold,
        min_per_class=cfg.min_per_class,
        n_resamples=cfg.n_resamples,
        seed=cfg.seed,
    )


def _counted(names: list[str], results: list[dict[str, BenchResult]]) -> list[str]:
    return [b for b in names if all(r[b].tuned.balanced_accuracy.ok for r in results)]


def _headline(
    cfg: ScoreConfig,
    names: list[str],
    labels: dict[str, list[str]],
    preds: list[dict[str, list[bool]]],
    results: list[dict[str, BenchResult]],
) -> Estimate | Difference:
    """Mean balanced accuracy over `names` that clear the floor in every result (one result: the
    score; two: their paired difference)."""
    keep = _counted(names, results)
    ys = [[lab == "unsafe" for lab in labels[b]] for b in keep]
    return stats.mean_balanced_accuracy(
        ys,
        [preds[0][b] for b in keep],
        [preds[1][b] for b in keep] if len(preds) > 1 else None,
        names=("a", "b"),
        n_resamples=cfg.n_resamples,
        seed=cfg.seed,
    )


def score(cfg: ScoreConfig, log: Callable[[str], None] | None = None) -> ScoreReport | MatrixReport:
    """Run the whole evaluation. One training set returns its ScoreReport (DIR/score.json); several
    return a MatrixReport (DIR/score.json for the matrix, DIR/runs/<train>/score.json each).
    Every dataset is checked (`plan.preflight`) before the judge model is loaded."""
    from rmskit.scoring.matrix import write_heatmap

    say = log or (lambda _m: None)
    plan, trains, benches = preflight(cfg)
    for line in plan.lines():
        say(line)
    cfg.out.mkdir(parents=True, exist_ok=True)
    judge = _fresh_judge(cfg)
    labels = {name: [s.label for s in ss] for name, ss in benches.items()}
    zero: dict[str, Metrics] = {}
    for name, ss in benches.items():
        zero[name] = _metrics(cfg, labels[name], judge.score(ss, cfg.batch_size))
        say(f"zero-shot {name}: balanced accuracy {stats.fmt_estimate(zero[name].balanced_accuracy)}")

    runs: list[ScoreReport] = []
    all_preds: dict[str, dict[str, list[bool]]] = {}
    for k, t in enumerate(cfg.train):
        loaded = trains[t.name]
        train_samples = subsample(loaded.samples, cfg.max_samples, cfg.seed)
        if k > 0:  # a fresh base model for every training set
            judge = _fresh_judge(cfg)
        trainable = judge.add_lora(cfg.lora_r)
        say(f"training on {t.name}: {len(train_samples)} samples, {trainable} trainable parameters")
        st = judge.train(
            train_samples,
            epochs=cfg.epochs,
            lr=cfg.lr,
            batch_size=cfg.batch_size,
            lora_r=cfg.lora_r,
            seed=cfg.seed,
            log=say,
        )
        results: dict[str, BenchResult] = {}
        preds: dict[str, list[bool]] = {}
        for name, ss in benches.items():
            sc = judge.score(ss, cfg.batch_size)
            preds[name] = predictions(sc, cfg.threshold)
            tuned = _metrics(cfg, labels[name], sc)
            results[name] = BenchResult(
                n=len(ss), benign_pool=plan.pools.get(name), zero_shot=zero[name], tuned=tuned
            )
            say(f"tuned on {t.name}, {name}: balanced accuracy {stats.fmt_estimate(tuned.balanced_accuracy)}")
        all_preds[t.name] = preds
        off = [b.name for b in cfg.benchmarks if not _same_dataset(b, t)]
        head = _headline(cfg, off, labels, [preds], [results])
        assert isinstance(head, Estimate)
        run_dir = cfg.out if len(cfg.train) == 1 else cfg.out / "runs" / t.name
        adapter_dir = run_dir / "adapter"
        judge.save_adapter(
            adapter_dir, _card(t, loaded, cfg, len(train_samples), trainable, st, results, head)
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
                "threshold": cfg.threshold,
                "min_per_class": cfg.min_per_class,
                "device": judge.device,
                "steps": st.steps,
                "train_seconds": round(st.seconds, 3),
                "final_loss": st.losses[-1] if st.losses else None,
                "adapter": str(adapter_dir),
            },
            benchmarks=results,
            score=head.value,
            score_estimate=head,
            score_over=_counted(off, [results]),
        )
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "score.json").write_text(report.model_dump_json(indent=2) + "\n", encoding="utf-8")
        runs.append(report)
        say(f"score of {t.name}: {stats.fmt_estimate(head)}")
    return _finish(cfg, runs, zero, benches, labels, all_preds, write_heatmap)


def _comparisons(
    cfg: ScoreConfig,
    runs: list[ScoreReport],
    labels: dict[str, list[str]],
    all_preds: dict[str, dict[str, list[bool]]],
) -> list[Difference]:
    """Every pair of training sets on the same items: per benchmark, and the mean over the
    benchmarks that are neither's training set."""
    out: list[Difference] = []
    specs = {t.name: t for t in cfg.train}
    for i, ra in enumerate(runs):
        for rb in runs[i + 1 :]:
            a, b = ra.train["name"], rb.train["name"]
            for bench in labels:
                y = [lab == "unsafe" for lab in labels[bench]]
                d = stats.paired_difference(
                    "balanced_accuracy",
                    y,
                    all_preds[a][bench],
                    all_preds[b][bench],
                    names=(a, b),
                    min_per_class=cfg.min_per_class,
                    n_resamples=cfg.n_resamples,
                    seed=cfg.seed,
                    classes=("unsafe", "safe"),
                )
                d.metric = f"balanced_accuracy on {bench}"
                out.append(d)
            off = [
                x.name
                for x in cfg.benchmarks
                if not _same_dataset(x, specs[a]) and not _same_dataset(x, specs[b])
            ]
            d = _headline(cfg, off, labels, [all_preds[a], all_preds[b]], [ra.benchmarks, rb.benchmarks])
            assert isinstance(d, Difference)
            d.a, d.b = a, b
            d.metric = "mean balanced accuracy (score)"
            out.append(d)
    return out


def _dump(model: BaseModel | None) -> dict[str, Any] | None:
    return None if model is None else model.model_dump()


def _finish(
    cfg: ScoreConfig,
    runs: list[ScoreReport],
    zero: dict[str, Metrics],
    benches: dict[str, list[BenchSample]],
    labels: dict[str, list[str]],
    all_preds: dict[str, dict[str, list[bool]]],
    write_heatmap: Any,
) -> ScoreReport | MatrixReport:
    cols = [b.name for b in cfg.benchmarks]
    rows = ["zero-shot"] + [t.name for t in cfg.train]
    values = [[zero[c].headline() for c in cols]] + [
        [r.benchmarks[c].tuned.headline() for c in cols] for r in runs
    ]
    heatmap = write_heatmap(rows, cols, values, cfg.out / "heatmap.png")
    if len(runs) == 1:
        return runs[0]
    comparisons = _comparisons(cfg, runs, labels, all_preds)
    matrix = MatrixReport(runs=runs, heatmap=str(heatmap), zero_shot=zero, comparisons=comparisons)
    summary = {
        "train": [r.train for r in runs],
        "judge": runs[0].judge | {"adapter": None},
        "benchmarks": {
            c: {
                "n": len(benches[c]),
                "benign_pool": _dump(runs[0].benchmarks[c].benign_pool),
                "zero_shot": zero[c].model_dump(),
                "tuned": {r.train["name"]: r.benchmarks[c].tuned.model_dump() for r in runs},
            }
            for c in cols
        },
        "score": {r.train["name"]: r.score for r in runs},
        "score_estimate": {r.train["name"]: r.score_estimate.model_dump() for r in runs},
        "comparisons": [d.model_dump() for d in comparisons],
    }
    (cfg.out / "score.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return matrix
