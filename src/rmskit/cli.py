"""The `rmskit` command line: a thin typer layer over the Python API."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="rmskit",
    help="Build real-world multimodal safety datasets image-first, and score safety datasets.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register_subcommands() -> None:
    # Each area owns its commands; heavy imports stay inside the command bodies.
    from rmskit.export import cli as export_cli
    from rmskit.models import cli as models_cli
    from rmskit.pipeline import cli as build_cli
    from rmskit.report import cli as report_cli
    from rmskit.review import cli as review_cli
    from rmskit.scoring import cli as score_cli

    for module in (build_cli, export_cli, models_cli, score_cli, review_cli, report_cli):
        module.register(app)


_register_subcommands()

if __name__ == "__main__":
    app()
