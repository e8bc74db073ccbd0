"""`rmskit score`, `rmskit probe` and `rmskit benchmarks [list|inspect]`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from rmskit.console import error_line

err = Console(stderr=True)


def _fail(msg: str | list[str]) -> None:
    """Unusable arguments: one escaped line per problem on stderr, exit 2 (as `rmskit build`)."""
    for line in [msg] if isinstance(msg, str) else msg:
        error_line(line)
    raise typer.Exit(2)


def _pairs(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for it in items:
        k, sep, v = it.partition("=")
        if not sep or not k or not v:
            _fail(f"{what} must look like NAME=VALUE, got {it!r}")
        out[k] = v
    return out


def _options(columns: str | None, label_default: str | None, variant: str | None = None) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if columns:
        opts["columns"] = _pairs([c.strip() for c in columns.split(",") if c.strip()], "--columns")
    if label_default:
        opts["label_default"] = label_default
    if variant:
        opts["variant"] = variant
    return opts


ColumnsOpt = Annotated[
    str | None,
    typer.Option(
        "--columns",
        help="Column map for generic/RMS2 tables: field=column,... (fields: id, image, "
        "query, response, label, safe, category).",
    ),
]
LabelDefaultOpt = Annotated[
    str | None, typer.Option("--label-default", help="Label for tables without a label column: safe|unsafe.")
]


def register(app: typer.Typer) -> None:
    """Add this area's commands to `app`."""

    @app.command("score")
    def score_cmd(
        train: Annotated[
            str | None,
            typer.Argument(help="Training dataset (an rmskit run/dataset dir or any benchmark layout)."),
        ] = None,
        train_format: Annotated[str | None, typer.Option("--train-format", help="Format of TRAIN.")] = None,
        trains: Annotated[
            list[str], typer.Option("--train", help="More training sets, NAME=PATH (matrix).")
        ] = [],  # noqa: B006
        bench: Annotated[
            list[str],
            typer.Option(
                "--bench", help="Benchmark NAME=PATH (NAME = format when it names an adapter; else detected)."
            ),
        ] = [],  # noqa: B006
        bench_format: Annotated[
            list[str],
            typer.Option("--format", help="NAME=FORMAT for a --bench/--train whose name is not its format."),
        ] = [],  # noqa: B006
        benign: Annotated[
            list[str],
            typer.Option(
                "--benign",
                help="Safe pool NAME=PATH for single-class benchmarks (default: the safe items of the "
                "other benchmarks, else the training run's controls).",
            ),
        ] = [],  # noqa: B006
        min_per_class: Annotated[
            int,
            typer.Option(
                "--min-per-class",
                min=1,
                help="Below this many items per class a metric is reported as insufficient.",
            ),
        ] = 20,
        judge: Annotated[
            str, typer.Option("--judge", help="HF VLM id or local path (hf: prefix allowed).")
        ] = ("hf:Qwen/Qwen2-VL-2B-Instruct"),
        out: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("score-out"),
        epochs: Annotated[int, typer.Option(min=1)] = 1,
        lr: Annotated[float, typer.Option()] = 2e-4,
        lora_r: Annotated[int, typer.Option("--lora-r", min=1)] = 8,
        batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 4,
        max_samples: Annotated[
            int | None, typer.Option("--max-samples", min=1, help="Cap on training samples per training set.")
        ] = None,
        max_eval_samples: Annotated[int | None, typer.Option("--max-eval-samples", min=1)] = None,
        seed: Annotated[int, typer.Option()] = 0,
        image_max_side: Annotated[int, typer.Option("--image-max-side", min=28)] = 448,
        skip_missing_images: Annotated[bool, typer.Option("--skip-missing-images")] = False,
        device: Annotated[
            str | None, typer.Option("--device", help="cuda / cpu (default: cuda if available).")
        ] = None,
        columns: ColumnsOpt = None,
        label_default: LabelDefaultOpt = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print score.json to stdout.")] = False,
    ) -> None:
        """Fine-tune a judge on TRAIN and evaluate it zero-shot and tuned on every --bench."""
        from pydantic import ValidationError

        from rmskit.scoring.adapters import AdapterError
        from rmskit.scoring.api import DatasetSpec, ScoreConfig, score

        formats = _pairs(bench_format, "--format")
        opts = _options(columns, label_default)
        train_specs = []
        if train:
            spec = DatasetSpec.parse(train, formats, opts)
            if train_format:
                spec.format = train_format
            train_specs.append(spec)
        train_specs += [DatasetSpec.parse(t, formats, opts) for t in trains]
        if not train_specs:
            _fail("give a training dataset (TRAIN or --train NAME=PATH)")
        if not bench:
            _fail("give at least one --bench NAME=PATH")
        try:
            cfg = ScoreConfig(
                train=train_specs,
                benchmarks=[DatasetSpec.parse(b, formats, opts) for b in bench],
                benign=[DatasetSpec.parse(g, formats, opts) for g in benign],
                min_per_class=min_per_class,
                judge=judge,
                out=out,
                epochs=epochs,
                lr=lr,
                lora_r=lora_r,
                batch_size=batch_size,
                max_samples=max_samples,
                max_eval_samples=max_eval_samples,
                seed=seed,
                image_max_side=image_max_side,
                skip_missing_images=skip_missing_images,
                device=device,
            )
        except ValidationError as exc:
            from rmskit.console import validation_lines

            _fail(validation_lines(exc))  # never str(exc): it repeats the values given
        try:
            score(cfg, log=lambda m: err.print(m, highlight=False))
        except AdapterError as exc:
            _fail(str(exc))
        text = (out / "score.json").read_text(encoding="utf-8")
        if as_json:
            typer.echo(text)
        else:
            from rmskit.stats import fmt_difference, fmt_estimate

            data = json.loads(text)
            est = data["score_estimate"]
            per = est.items() if "metric" not in est else [(data["train"]["name"], est)]
            for name, e in per:
                err.print(f"score of {name} (mean balanced accuracy): {fmt_estimate(e)}", highlight=False)
            for d in data.get("comparisons", []):
                err.print(f"{d['metric']}: {fmt_difference(d)}", highlight=False)
            err.print(f"wrote {out / 'score.json'} and {out / 'heatmap.png'}")

    @app.command("probe")
    def probe_cmd(
        dataset: Annotated[
            str, typer.Argument(help="Dataset folder/file (rmskit run or any benchmark layout).")
        ],
        fmt: Annotated[str | None, typer.Option("--format", help="Adapter name (default: detect).")] = None,
        as_json: Annotated[bool, typer.Option("--json")] = False,
        folds: Annotated[int, typer.Option(min=2)] = 5,
        seed: Annotated[int, typer.Option()] = 0,
        columns: ColumnsOpt = None,
        label_default: LabelDefaultOpt = None,
    ) -> None:
        """CPU probes: text-only leakage, diversity, near-duplicates, category entropy."""
        from rmskit.scoring.adapters import AdapterError
        from rmskit.scoring.probes import probe

        try:
            rep = probe(dataset, fmt, options=_options(columns, label_default), folds=folds, seed=seed)
        except (AdapterError, ValueError) as exc:
            _fail(str(exc))
        if as_json:
            typer.echo(rep.model_dump_json(indent=2))
            return
        t = Table(title=f"probes: {dataset} ({rep.n} queries, {rep.seconds:.1f}s)")
        t.add_column("probe")
        t.add_column("value")

        from rmskit.stats import fmt_estimate

        lk = rep.leakage
        t.add_row(
            "text-only leakage balanced accuracy",
            fmt_estimate(lk.balanced_accuracy) + (f"  ({lk.note})" if lk.note else ""),
        )
        t.add_row("text-only leakage AUROC", fmt_estimate(lk.auroc))
        t.add_row(
            "text-only leakage accuracy (secondary)",
            f"{fmt_estimate(lk.accuracy)}; majority baseline {fmt_estimate(lk.majority_baseline)}",
        )
        t.add_row("Vendi score", fmt_estimate(rep.vendi, 1))
        t.add_row("mean pairwise cosine distance", fmt_estimate(rep.mean_pairwise_cosine_distance, 3))
        t.add_row("near-duplicate rate", fmt_estimate(rep.near_duplicates, 3))
        t.add_row(
            f"category entropy, normalised ({rep.n_categories} categories)",
            fmt_estimate(rep.category_entropy_normalized, 3),
        )
        Console().print(t)

    bench_app = typer.Typer(
        help="Benchmark adapters: list them, inspect a local copy.", no_args_is_help=False
    )

    @bench_app.callback(invoke_without_command=True)
    def bench_default(ctx: typer.Context) -> None:
        if ctx.invoked_subcommand is None:
            _list()

    def _list() -> None:
        from rmskit.scoring.adapters import ADAPTERS

        t = Table(title="benchmark formats")
        t.add_column("name")
        t.add_column("layout")
        t.add_column("HF id")
        for name, a in ADAPTERS.items():
            t.add_row(name, a.title, a.hf_id or "-")
        Console().print(t)

    @bench_app.command("list")
    def bench_list() -> None:
        """List the benchmark adapters."""
        _list()

    @bench_app.command("inspect")
    def bench_inspect(
        name: Annotated[str, typer.Argument(help="Adapter name (see `rmskit benchmarks list`).")],
        path: Annotated[str, typer.Argument(help="Local folder/file or HF dataset id.")],
        as_json: Annotated[bool, typer.Option("--json")] = False,
        split: Annotated[
            str | None, typer.Option("--split", help="train / test where the format has both.")
        ] = None,
        skip_missing_images: Annotated[bool, typer.Option("--skip-missing-images")] = False,
        columns: ColumnsOpt = None,
        label_default: LabelDefaultOpt = None,
    ) -> None:
        """Count samples, labels, categories and missing image files of a benchmark copy."""
        from rmskit.scoring.adapters import AdapterError, load_benchmark

        try:
            loaded = load_benchmark(
                name,
                path,
                split=split,
                skip_missing_images=skip_missing_images,
                count_missing_only=not skip_missing_images,
                options=_options(columns, label_default),
            )
        except AdapterError as exc:
            _fail(str(exc))
        ins = loaded.inspection()
        if as_json:
            typer.echo(ins.model_dump_json())
            return
        Console().print(
            f"{loaded.name} at {path}: {ins.n} samples, labels {ins.labels}, "
            f"{ins.missing_images} with missing images"
        )
        for cat, n in ins.categories.items():
            Console().print(f"  {cat}: {n}")

    app.add_typer(bench_app, name="benchmarks")
