"""`rmskit build` and `rmskit status`."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from rmskit.config import STAGES, BuildConfig, load_yaml_config
from rmskit.console import error_line, markup_safe, shown, storage_failure, validation_lines
from rmskit.ledger import Ledger, LedgerError
from rmskit.stats import fmt_estimate

# Exit codes of `rmskit build` (README): 0 something was built, 1 storage ran out (resumable),
# 2 unusable arguments, 3 no image finished, 130 interrupted (resumable).
EXIT_STORAGE = 1
EXIT_USAGE = 2
EXIT_NOTHING_BUILT = 3


def _fail(msg: str | list[str]) -> NoReturn:
    for line in [msg] if isinstance(msg, str) else msg:
        error_line(line)
    raise typer.Exit(EXIT_USAGE)


def _check_source(src: str) -> None:
    """A source must exist before anything starts; `FILE::IMAGE_DIR` names a manifest or COCO file
    and its image folder, and both must exist (a real path containing '::' is taken as it is)."""
    if src.startswith("hf://") or os.path.lexists(src):
        return
    if "::" in src:
        target, _, root = src.rpartition("::")
        if not os.path.lexists(target):
            _fail(f"source {target} does not exist (in {src})")
        if not Path(root).expanduser().is_dir():
            _fail(f"image folder {root} of source {src} is not a directory")
        return
    _fail(f"source {src} does not exist")


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
        _fail(validation_lines(exc))
    if not cfg.sources:
        _fail("no sources: give one or more folders, manifests, COCO files or datasets")
    for src in cfg.sources:
        _check_source(src)
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
        base_url: Annotated[
            list[str] | None,
            typer.Option(help="OpenAI-compatible server URL; repeat for several serving one model."),
        ] = None,
        api_key_env: Annotated[
            str | None, typer.Option(help="Env var holding the API key (default OPENAI_API_KEY).")
        ] = None,
        concurrency: Annotated[int | None, typer.Option(help="Max concurrent requests per backend.")] = None,
        rpm: Annotated[float | None, typer.Option(help="Requests per minute limit.")] = None,
        tpm: Annotated[float | None, typer.Option(help="Tokens per minute limit.")] = None,
        timeout: Annotated[float | None, typer.Option(help="Per-request timeout (s).")] = None,
        vision: Annotated[
            bool | None,
            typer.Option("--vision/--no-vision", help="Override the probed vision capability."),
        ] = None,
        structured: Annotated[
            str | None,
            typer.Option(help="auto (probe) | json_schema | json_object_schema | json_object | prompt."),
        ] = None,
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
        agreement: Annotated[
            int | None,
            typer.Option(help="Re-check N verified rounds with a second verifier; report agreement (kappa)."),
        ] = None,
        required_checks: Annotated[
            str | None,
            typer.Option(
                "--required-checks",
                help="Comma list of checks that gate a sample (default: all). All checks still run and "
                "are recorded; gate on fewer only with a verifier too weak to trust (a tiny model).",
            ),
        ] = None,
        no_controls: Annotated[
            bool, typer.Option("--no-controls", help="Skip benign control queries.")
        ] = False,
        dry_run: Annotated[
            bool, typer.Option("--dry-run", help="Estimate requests/tokens; call nothing.")
        ] = False,
        quiet: Annotated[
            bool, typer.Option("--quiet", "-q", help="Print only errors and the final summary line.")
        ] = False,
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
        """Build (or resume) an RMS dataset from real photos.

        Exit codes: 0 at least one image finished; 1 storage ran out; 2 unusable arguments; 3 no
        image finished (the reasons are printed); 130 interrupted. 1 and 130 resume on a re-run."""
        from rmskit.executors import ExecutorConfig
        from rmskit.interrupts import command_scope

        try:
            exec_cfg = ExecutorConfig.model_validate(
                {"kind": executor, "ray_address": ray_address, "workers": workers, "num_gpus": num_gpus}
            )
        except ValidationError as exc:
            _fail(validation_lines(exc))
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
            "verify_agreement": agreement,
            "required_checks": [c.strip() for c in required_checks.split(",") if c.strip()]
            if required_checks is not None
            else None,
        }
        backend = {
            "spec": model,
            "base_url": base_url or None,
            "api_key_env": api_key_env,
            "concurrency": concurrency,
            "requests_per_minute": rpm,
            "tokens_per_minute": tpm,
            "timeout_s": timeout,
            "vision": vision,
            "structured": structured,
        }
        with command_scope(quiet=quiet):
            cfg = resolve_config(sources or [], config, overrides, backend, stage_model or [])
            if dry_run:
                _dry_run(cfg, json_out=json_out)
                return
            summary = _run(cfg, exec_cfg, quiet=quiet)
            _print_summary(cfg, summary, quiet=quiet, json_out=json_out)
            if summary.images_done == 0:
                error_line(f"nothing built: no image finished; {_why_nothing(cfg.out)}")
                raise typer.Exit(EXIT_NOTHING_BUILT)

    @app.command("status")
    def status_cmd(
        run_dir: Annotated[Path, typer.Argument(help="Run directory.")],
        json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    ) -> None:
        """What a run holds: images, refusals, stage counts, samples, tokens."""
        from rmskit.pipeline.status import run_status

        try:
            st = run_status(run_dir)
        except (FileNotFoundError, LedgerError) as exc:
            _fail(str(exc))
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
        _print_quality(con, st)
        for r in st["rejected"][:20]:
            con.print(f"[yellow]refused[/yellow] {markup_safe(r['path'])}: {markup_safe(r['reason'])}")


def _print_quality(con: Console, st: dict[str, Any]) -> None:
    """Pass rates per category and verifier agreement, each figure with its interval and n."""
    for r in st.get("pass_rates") or []:
        con.print(f"pass rate {markup_safe(r['category'])}: {fmt_estimate(r['rate'])}")
    agreement = st.get("agreement") or {}
    for name, c in sorted((agreement.get("checks") or {}).items()):
        con.print(
            f"verifier agreement {name}: kappa {fmt_estimate(c.get('kappa'))}; "
            f"raw {fmt_estimate(c.get('agreement'))}"
        )


def _dry_run(cfg: BuildConfig, *, json_out: bool) -> None:
    from rmskit.pipeline.estimate import estimate

    est = estimate(cfg)
    if json_out:
        typer.echo(est.model_dump_json(indent=2))
        return
    if cfg.model.base_url is not None:  # what the server supports (models/probe.py)
        from rmskit.models.probe import probe_config

        stderr = Console(stderr=True, soft_wrap=True)
        try:
            for probed in probe_config(cfg.model):
                stderr.print(probed.line(), markup=False)
        except Exception as exc:  # noqa: BLE001 - a dry run reports, it does not stop
            stderr.print(f"probe failed: {exc}", markup=False)
    table = Table(title=f"dry run: {est.candidate_images} candidate image(s)")
    for col in ("stage", "requests", "prompt tokens", "completion tokens"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for name, s in est.stages.items():
        table.add_row(name, f"{s.requests:,.0f}", f"{s.prompt_tokens:,.0f}", f"{s.completion_tokens:,.0f}")
    table.add_row("total", f"{est.total_requests:,.0f}", "", f"{est.total_tokens:,.0f} tokens in all")
    Console().print(table)
    Console().print(f"[dim]{est.assumptions}[/dim]")


def _run(cfg: BuildConfig, executor: Any, *, quiet: bool) -> Any:
    """Run the build under the Ctrl-C policy (rmskit.interrupts); map failures to exit codes."""
    from rmskit.interrupts import run_interruptible
    from rmskit.ledger.store import LEDGER_NAME
    from rmskit.pipeline.runner import run_build

    if executor.kind == "ray":  # same stages, on Ray worker actors
        from rmskit.executors.ray import run_build_ray

        main = run_build_ray(cfg, executor, quiet=quiet)
    else:
        main = run_build(cfg, quiet=quiet)
    try:
        return run_interruptible(main)
    except ValidationError as exc:
        _fail(validation_lines(exc))
    except LedgerError as exc:  # corrupt, from a newer rmskit, or locked by another process
        _fail(str(exc))
    except Exception as exc:
        message = storage_failure(exc, Path(cfg.out) / LEDGER_NAME)
        if message is not None:
            error_line(message)
            raise typer.Exit(EXIT_STORAGE) from None
        if isinstance(exc, ValueError | FileNotFoundError):  # unusable source/model arguments
            _fail(str(exc))
        from rmskit.models import AuthenticationError

        if isinstance(exc, AuthenticationError):  # 401/403: nothing can succeed; stop at once
            _fail(exc.args[0])
        raise


def _print_summary(cfg: BuildConfig, summary: Any, *, quiet: bool, json_out: bool) -> None:
    if json_out:
        typer.echo(summary.model_dump_json(indent=2))
        return
    line = (
        f"done: {summary.samples_ok} sample(s) kept, {summary.samples_failed} failed, "
        f"{summary.images_done} image(s) done, {summary.images_failed} failed, "
        f"{summary.images_rejected} refused; {summary.requests} requests, {summary.tokens:,} tokens, "
        f"{summary.elapsed_s:.1f}s"
    )
    if quiet:
        typer.echo(line)
    else:
        Console().print(
            markup_safe(line)
            + f"\n  ledger: {markup_safe(cfg.out)}/rms.sqlite  dataset: {markup_safe(summary.dataset_dir)}"
        )
    if summary.export_error:
        error_line(f"export failed: {summary.export_error}")


def _why_nothing(run_dir: Path) -> str:
    """The top 3 error kinds of the run's ledger, with counts and the latest message of each."""
    from rmskit.ledger import Ledger

    with Ledger(run_dir, readonly=True) as ledger:
        failures = ledger.failures()
        refused = ledger.rejections()
        accepted = sum(ledger.image_counts().values())
    if failures:
        counts = Counter(f["kind"] for f in failures)
        latest = {f["kind"]: f["message"] for f in failures}
        top = [f"{kind} x{n} (e.g. {shown(latest[kind])[:160]})" for kind, n in counts.most_common(3)]
        return f"top errors of {len(failures)} recorded: " + "; ".join(top)
    if accepted == 0:
        reasons = Counter(r.reason for r in refused).most_common(3)
        return f"no image accepted, {len(refused)} refused: " + "; ".join(
            f"{shown(reason)[:160]} x{n}" for reason, n in reasons
        )
    return f"{accepted} image(s) accepted and none finished, with no request failure recorded"


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
        run: Annotated[
            Path | None,
            typer.Option(help="Store the result in this run's ledger (shown in its dataset card)."),
        ] = None,
    ) -> None:
        """Run the verify prompts on cases with known verdicts; print agreement per check."""
        import asyncio

        from rmskit.config import BackendConfig
        from rmskit.models import load_backend
        from rmskit.pipeline.regression import dumps, run_regression

        try:
            cfg = BackendConfig.model_validate(
                {"spec": model, "base_url": base_url, "api_key_env": api_key_env}
            )
        except ValidationError as exc:
            _fail(validation_lines(exc))

        async def go():
            backend = load_backend(cfg)
            try:
                return await run_regression(backend)
            finally:
                await backend.aclose()

        report = asyncio.run(go())
        if run is not None:
            with Ledger(run, lock=True) as ledger:
                ledger.set_meta("prompt_regression", report.model_dump(mode="json", exclude={"cases"}))
        if json_out:
            typer.echo(dumps(report))
            return
        table = Table(title=f"verify-prompt regression: {report.model} ({report.n} cases)")
        table.add_column("check")
        table.add_column("prompt")
        table.add_column("agreement", justify="right")
        for check, est in report.by_check_ci.items():
            table.add_row(check, report.prompt_versions[check], fmt_estimate(est))
        table.add_row("all", "", fmt_estimate(report.agreement_ci))
        Console().print(table)
        Console().print(f"balanced accuracy (chance-corrected): {fmt_estimate(report.balanced_accuracy)}")
        for case in report.cases:
            if not case.agree:
                Console().print(
                    f"[yellow]disagree[/yellow] {case.id}: expected {case.expect}, got "
                    f"{case.error or {k: (case.got or {}).get(k) for k in case.expect}}"
                )
