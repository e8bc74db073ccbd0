"""The `rmskit` command line: a thin typer layer over the Python API."""

from __future__ import annotations

import os
import signal
import sys
import threading


def _interrupted_at_startup(signum: int, frame: object) -> None:
    # Still importing, so nothing needs closing: leave at once, without a traceback from whatever
    # import was running. `build` and `export` install their own policy (rmskit.interrupts).
    sys.stderr.write("interrupted; re-run the same command to resume\n")
    sys.stderr.flush()
    os._exit(130)


def _startup_guard() -> object:
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGINT, _interrupted_at_startup)


_previous_handler = _startup_guard()

import typer  # noqa: E402 - after the Ctrl-C guard on purpose

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
if _previous_handler is not None:  # importing rmskit.cli must not change a host program's Ctrl-C
    signal.signal(signal.SIGINT, _previous_handler)  # type: ignore[arg-type]


def main() -> None:
    """The `rmskit` program: Ctrl-C exits 130 with the resume hint and no traceback, before, between
    and after the interruptible parts of a command (importing rmskit.cli in-process does not keep
    this handler; see above)."""
    _startup_guard()
    app()


if __name__ == "__main__":
    main()
