"""The run report: `write_report(run_dir, out=None)` writes one self-contained HTML file with plots."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rmskit.report.build import write_report

__all__ = ["write_report"]


def __getattr__(name: str) -> Any:
    # matplotlib is imported only when a report is actually written.
    if name == "write_report":
        from rmskit.report.build import write_report

        return write_report
    raise AttributeError(name)
