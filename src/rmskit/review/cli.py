"""CLI commands of this area (registered on the main app by rmskit.cli)."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add this area's commands to `app`."""

    @app.command()
    def review(
        run_dir: Path = typer.Argument(..., help="Run directory (holds rms.sqlite)."),
        host: str = typer.Option("127.0.0.1", help="Bind address. Anything but loopback requires a token."),
        port: int = typer.Option(8765, min=0, max=65535, help="Port."),
        token: str | None = typer.Option(
            None,
            envvar="RMSKIT_REVIEW_TOKEN",
            help="Access token (generated and printed for non-loopback hosts).",
        ),
        read_only: bool = typer.Option(
            False, "--read-only", help="Browse without writing decisions (works while a build runs)."
        ),
    ) -> None:
        """Browse the run's samples in a browser; accept / reject / edit them (written to the ledger)."""
        from rmskit.ledger import LedgerError
        from rmskit.review.app import serve

        try:
            serve(run_dir, host=host, port=port, token=token, read_only=read_only)
        except (FileNotFoundError, ValueError, LedgerError) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from e
