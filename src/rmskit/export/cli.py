"""`rmskit export`."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from rmskit.console import error_line, shown, storage_failure

EXIT_STORAGE = 1  # as for `rmskit build`
EXIT_USAGE = 2


class ExportFormat(StrEnum):
    jsonl = "jsonl"
    hf = "hf"
    llava = "llava"
    sharegpt = "sharegpt"
    judge = "judge"


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export_cmd(
        run_dir: Annotated[Path, typer.Argument(help="Run directory (the --out of rmskit build).")],
        fmt: Annotated[
            ExportFormat | None,
            typer.Option(
                "--format",
                "-f",
                help="jsonl | hf | llava | sharegpt | judge. Without it, rewrites DIR/dataset/ "
                "(samples.jsonl, images, parquet, card) from the ledger and review log.",
            ),
        ] = None,
        out: Annotated[
            Path | None, typer.Option("--out", "-o", help="Output folder (default DIR/exports/FORMAT).")
        ] = None,
        balance: Annotated[int | None, typer.Option(min=1, help="Cap risky samples per category.")] = None,
    ) -> None:
        """Curate a run (review decisions, near-duplicates, split by image) and write it out."""
        from rmskit.interrupts import command_scope

        with command_scope(quiet=False):
            _export(run_dir, fmt, out, balance)


def _export(run_dir: Path, fmt: ExportFormat | None, out: Path | None, balance: int | None) -> None:
    from rmskit.export import ExportError, export_summary, is_run_dir, write_dataset
    from rmskit.interrupts import interruptible
    from rmskit.ledger import LEDGER_NAME, LedgerError, RunLock

    if not run_dir.is_dir():
        error_line(f"{run_dir} does not exist or is not a directory")
        raise typer.Exit(EXIT_USAGE)
    if not is_run_dir(run_dir):
        error_line(
            f"{run_dir} is not a run directory (no rms.sqlite); give the --out folder of `rmskit build`"
        )
        raise typer.Exit(EXIT_USAGE)
    if fmt is not None and out is None:
        out = run_dir / "exports" / fmt.value
    try:
        # Ctrl-C: the half-written temporary folder is removed (here or by the next export) and the
        # previous output stays in place; see rmskit.interrupts for the exit policy.
        # The run lock: no export beside a running build or a writing review (the build's own
        # export step runs under the build's lock, so it is taken here, not in write_dataset).
        with interruptible(), RunLock(run_dir):
            if fmt is None:
                summary = write_dataset(run_dir, balance=balance)
            else:
                summary = export_summary(run_dir, fmt.value, out, balance=balance)
    except (ExportError, LedgerError) as exc:
        error_line(str(exc))
        raise typer.Exit(EXIT_USAGE) from None
    except OSError as exc:
        message = storage_failure(exc, run_dir / LEDGER_NAME)
        if message is None:
            raise
        error_line(message.replace("re-run the same command to resume", "re-run the export"))
        raise typer.Exit(EXIT_STORAGE) from None
    splits = ", ".join(f"{k} {v}" for k, v in summary.splits.items()) or "no samples"
    dropped = ", ".join(f"{k} {v}" for k, v in summary.dropped.items()) or "none"
    typer.echo(
        f"wrote {shown(summary.path)} ({summary.format}): {summary.samples} samples ({splits}), "
        f"{summary.images} images; dropped: {dropped}"
    )
