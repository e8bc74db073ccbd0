"""`rmskit build` and `rmskit status`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from rmskit.config import STAGES, BuildConfig, load_yaml_config

err = Console(stderr=True, soft_wrap=True)  # no hard wraps: messages stay greppable


def _fail(msg: str) -> None:
    err.print(f"[red]error:[/red] {msg}")
    raise typer.Exit(2)


def resolve_config(
    sources: list[str],
    config: Path | None,
    overrides: dict[str, Any],
    backend_overrides: dict[str, Any],
    stage_specs: list[str],
) -> BuildConfig:
    """defaults < YAML (--config) < CLI flags. Unusable values exit 2 with the reason."""
    data: dict[str, Any] = {}
    if config is not None:
        if not config.is_file():
            _fail(f"config file {config} does not exist")
        try:
            data = load_yaml_config(config)
        except Exception as exc:
            _fail(f"config file {config}: {exc}")
    if sources:
        data["sources"] = sources
    data.update({k: v for k, v in overrides.items() if v is not None})
    model = dict(data.get("model") or {})
    model.update({k: v for k, v in backend_overrides.items() if v is not None})
    data["model"] = model
    stage_models = dict(data.get("stage_models") or {})
    for item in stage_specs:
        stage, sep, spec = item.partition("=")
        if not sep or stage not in STAGES:
            _fail(f"--stage-model expects STAGE=SPEC with STAGE one of {', '.join(STAGES)}; got {item!r}")
        # A stage model inherits the main endpoint settings unless the YAML says otherwise.
        stage_models[stage] = {**model, **(stage_models.get(stage) or {}), "spec": spec}
    data["stage_models"] = stage_models
    try:
        cfg = BuildConfig.model_validate(data)
    except ValidationError as exc:
        _fail(
            "invalid configuration:\n"
            + "\n".join(f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        )
        raise  # unreachable
    if not cfg.sources:
        _fail("no sources: give one or more folders, manifests, COCO files or datasets")
    for src in cfg.sources:
        if not src.startswith("hf://") and not Path(src).exists():
            _fail(f"source {src} does not exist")
    return cfg


def register(app: typer.Typer) -> None:
    _register_prompts(app)

    @app.command("build")
    def build_cmd(
        sources: Annotated[
            list[str] | None,
            typer.Argument(
                help="Folders, JSONL/CSV manifests, COCO files, parquet/HF datasets (hf://org/name)."
            ),
        ] = None,
        out: Annotated[
            Path | None, typer.Option("--out", "-o", help="Run directory (ledger + dataset).")
        ] = None,
        model: Annotated[
            str | None,
            typer.Option(help="openai:NAME | hf:ORG/NAME | PATH | vllm:NAME | embedded (default)."),
        ] = None,
        base_url: Annotated[str | None, typer.Option(help="OpenAI-compatible server URL.")] = None,
        api_key_env: Annotated[
            str | None, typer.Option(help="Env var holding the API key (default OPENAI_API_KEY).")
        ] = None,
        concurrency: Annotated[int | None, typer.Option(help="Max concurrent requests per backend.")] = None,
        rpm: Annotated[float | None, typer.Option(help="Requests per minute limit.")] = None,
        tpm: Annotated[float | None, typer.Option(help="Tokens per minute limit.")] = None,
        timeout: Annotated[float | None, typer.Option(help="Per-request timeout (s).")] = None,
        stage_model: Annotated[
            list[str] | None,
            typer.Option("--stage-model", help="STAGE=SPEC, e.g. verify=openai:other-model (repeatable)."),
        ] = None,
        config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML BuildConfig.")] = None,
        target: Annotated[int | None, typer.Option(help="Stop when N samples are kept.")] = None,
        per_category_target: Annotated[int | None, typer.Option(help="Stop filling a category at N.")] = None,
        scenarios: Annotated[int | None, typer.Option(help="Risk scenarios per image.")] = None,
        max_rounds: Annotated[int | None, typer.Option(help="Rewrite rounds per sample.")] = None,
        perceive: Annotated[str | None, typer.Option(help="auto | annotations | model")] = None,
        embedder: Annotated[str | None, typer.Option(help="Taxonomy embedder: minilm | hashing.")] = None,
        limit: Annotated[int | None, typer.Option(help="Process at most N images.")] = None,
        seed: Annotated[int | None, typer.Option()] = None,
        no_controls: Annotated[
            bool, typer.Option("--no-controls", help="Skip benign control queries.")
        ] = False,
        dry_run: Annotated[
            bool, typer.Option("--dry-run", help="Estimate requests/tokens; call nothing.")
        ] = False,
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No live progress.")] = False,
        json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
        executor: Annotated[
            str, typer.Option(help="local (asyncio, default) | ray (worker actors).")
        ] = "local",
        ray_address: Annotated[
            str | None,
            typer.Option(
                help="Ray cluster to join ('auto' or the head's host:port); default: start a local one."
            ),
        ] = None,
        workers: Annotated[int, typer.Option(help="Ray worker actors (images sharded by sha256).")] = 2,
        num_gpus: Annotated[
            float | None, typer.Option(help="GPUs per Ray worker (default: 1 for in-process models on GPU).")
        ] = None,
    ) -> None:
        """Build (or resume) an RMS dataset from real photos."""
        from rmskit.executors import ExecutorConfig

        try:
            exec_cfg = ExecutorConfig.model_validate(
                {"kind": executor, "ray_address": ray_address, "workers": workers, "num_gpus": num_gpus}
            )
        except ValidationError as exc:
            _fail(f"executor options: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}")
            return
        overrides = {
            "out": out,
            "target": target,
            "per_category_target": per_category_target,
            "scenarios_per_image": scenarios,
            "max_rounds": max_rounds,
            "perceive": perceive,
            "embedder": embedder,
            "limit_images": limit,
            "seed": seed,
            "controls": False if no_controls else None,
        }
        backend = {
            "spec": model,
            "base_url": base_url,
            "api_key_env": api_key_env,
            "concurrency": concurrency,
            "requests_per_minute": rpm,
            "tokens_per_minute": tpm,
            "timeout_s": timeout,
        }
        cfg = resolve_config(sources or [], config, overrides, backend, stage_model or [])
        if dry_run:
            from rmskit.pipeline.estimate import estimate

            est = estimate(cfg)
            if json_out:
                typer.echo(est.model_dump_json(indent=2))
                return
            table = Table(title=f"dry run: {est.candidate_images} candidate image(s)")
            for col in ("stage", "requests", "prompt tokens", "completion tokens"):
                table.add_column(col, justify="left" if col == "stage" else "right")
            for name, s in est.stages.items():
                table.add_row(
                    name, f"{s.requests:,.0f}", f"{s.prompt_tokens:,.0f}", f"{s.completion_tokens:,.0f}"
                )
            table.add_row("total", f"{est.total_requests:,.0f}", "", f"{est.total_tokens:,.0f} tokens in all")
            Console().print(table)
            Console().print(f"[dim]{est.assumptions}[/dim]")
            return
        from rmskit.pipeline.runner import build

        try:
            summary = build(cfg, quiet=quiet, executor=exec_cfg)
        except (ValueError, FileNotFoundError) as exc:  # unusable source/model arguments
            _fail(str(exc))
            return
        if json_out:
            typer.echo(summary.model_dump_json(indent=2))
        elif not quiet:
            Console().print(
                f"[bold]done[/bold]: {summary.samples_ok} sample(s) kept, {summary.samples_failed} failed, "
                f"{summary.images_done} image(s) done, {summary.images_failed} failed, "
                f"{summary.images_rejected} refused; {summary.requests} requests, {summary.tokens:,} tokens, "
                f"{summary.elapsed_s:.1f}s\n  ledger: {cfg.out}/rms.sqlite  dataset: {summary.dataset_dir}"
                + (f"\n  [red]export failed[/red]: {summary.export_error}" if summary.export_error else "")
            )

    @app.command("status")
    def status_cmd(
        run_dir: Annotated[Path, typer.Argument(help="Run directory.")],
        json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    ) -> None:
        """What a run holds: images, refusals, stage counts, samples, tokens."""
        from rmskit.pipeline.status import run_status

        try:
            st = run_status(run_dir)
        except FileNotFoundError as exc:
            _fail(str(exc))
            return
        if json_out:
            typer.echo(json.dumps(st, indent=2, ensure_ascii=False))
            return
        con = Console()
        im = st["images"]
        con.print(
            f"images: {im['accepted']} accepted ({im['done']} done, {im['failed']} failed, "
            f"{im['pending']} pending), {im['rejected']} refused; samples kept: {st['samples']} "
            f"{st['samples_by_kind']}, failed: {st['samples_failed']}"
        )
        table = Table(title="stages")
        for col in ("stage", "ok", "failed", "requests", "prompt tokens", "completion tokens"):
            table.add_column(col, justify="left" if col == "stage" else "right")
        for name, s in st["stages"].items():
            table.add_row(
                name,
                str(s.get("ok", 0)),
                str(s.get("failed", 0)),
                str(s.get("requests", 0)),
                f"{s.get('prompt_tokens', 0):,}",
                f"{s.get('completion_tokens', 0):,}",
            )
        con.print(table)
        for r in st["rejected"][:20]:
            con.print(f"[yellow]refused[/yellow] {r['path']}: {r['reason']}")


def _register_prompts(app: typer.Typer) -> None:
    prompts_app = typer.Typer(
        help="Versioned prompts: regression checks of the verify prompts.", no_args_is_help=True
    )
    app.add_typer(prompts_app, name="prompts")

    @prompts_app.command("regress")
    def regress_cmd(
        model: Annotated[str, typer.Option(help="Model spec, as for build.")] = "embedded",
        base_url: Annotated[str | None, typer.Option(help="OpenAI-compatible server URL.")] = None,
        api_key_env: Annotated[str, typer.Option(help="Env var holding the API key.")] = "OPENAI_API_KEY",
        json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    ) -> None:
        """Run the verify prompts on cases with known verdicts; print agreement per check."""
        import asyncio

        from rmskit.config import BackendConfig
        from rmskit.models import load_backend
        from rmskit.pipeline.regression import dumps, run_regression

        try:
            cfg = BackendConfig(spec=model, base_url=base_url, api_key_env=api_key_env)
        except ValidationError as exc:
            _fail(str(exc))
            return

        async def go():
            backend = load_backend(cfg)
            try:
                return await run_regression(backend)
            finally:
                await backend.aclose()

        report = asyncio.run(go())
        if json_out:
            typer.echo(dumps(report))
            return
        table = Table(title=f"verify-prompt regression: {report.model} ({report.n} cases)")
        table.add_column("check")
        table.add_column("prompt")
        table.add_column("agreement", justify="right")
        for check, agree in report.by_check.items():
            table.add_row(check, report.prompt_versions[check], f"{agree:.0%}")
        table.add_row("all", "", f"{report.agreement:.0%}")
        Console().print(table)
        for case in report.cases:
            if not case.agree:
                Console().print(
                    f"[yellow]disagree[/yellow] {case.id}: expected {case.expect}, got "
                    f"{case.error or {k: (case.got or {}).get(k) for k in case.expect}}"
                )
