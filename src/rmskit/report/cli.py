"""CLI commands of this area (registered on the main app by rmskit.cli)."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add this area's commands to `app`."""

    @app.command()
    def report(
        run_dir: Path = typer.Argument(..., help="Run directory (holds rms.sqlite)."),
        out: Path | None = typer.Option(
            None, "--out", "-o", help="HTML file to write (default RUN_DIR/report.html)."
        ),
        score: Path | None = typer.Option(
            None, "--score", help="score.json (or a folder of them) to include; default: RUN_DIR/score*/."
        ),
    ) -> None:
        """Write one self-contained HTML report with plots about a run."""
        from rmskit.ledger import LedgerError
        from rmskit.report.build import write_report

        try:
            path = write_report(run_dir, out, score=score)
        except (FileNotFoundError, LedgerError) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from e
        typer.echo(str(path))
