"""`rmskit export`."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

err = Console(stderr=True)


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
        from rmskit.export import ExportError, export_summary, is_run_dir, write_dataset

        if not run_dir.is_dir():
            err.print(f"[red]error:[/red] {run_dir} does not exist or is not a directory")
            raise typer.Exit(2)
        if not is_run_dir(run_dir):
            err.print(
                f"[red]error:[/red] {run_dir} is not a run directory (no rms.sqlite); "
                "give the --out folder of `rmskit build`"
            )
            raise typer.Exit(2)
        if fmt is not None and out is None:
            out = run_dir / "exports" / fmt.value
        try:
            if fmt is None:
                summary = write_dataset(run_dir, balance=balance)
            else:
                summary = export_summary(run_dir, fmt.value, out, balance=balance)
        except ExportError as exc:
            err.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from None
        splits = ", ".join(f"{k} {v}" for k, v in summary.splits.items()) or "no samples"
        dropped = ", ".join(f"{k} {v}" for k, v in summary.dropped.items()) or "none"
        typer.echo(
            f"wrote {summary.path} ({summary.format}): {summary.samples} samples ({splits}), "
            f"{summary.images} images; dropped: {dropped}"
        )
