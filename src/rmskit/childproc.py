"""The environment of rmskit's own helper processes (`python -m rmskit....`: the finish worker, the
one-off MiniLM export)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path


def environment(defaults: Mapping[str, str] | None = None) -> dict[str, str]:
    """The parent's environment over `defaults`; when this rmskit is not in an installed site directory
    (a source tree on sys.path), its folder goes on PYTHONPATH. A site directory itself never does:
    PYTHONPATH comes before the standard library, and a site directory there could shadow it."""
    import site

    import rmskit

    root = Path(rmskit.__file__).resolve().parent.parent
    sites = {Path(p).resolve() for p in [*site.getsitepackages(), site.getusersitepackages()]}
    env = {**(defaults or {}), **os.environ}
    if root not in sites:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    return env


def lower_priority(n: int) -> None:
    """This process yields the cores to its parent by `n` nice steps (a no-op where there is no nice)."""
    with contextlib.suppress(OSError, AttributeError):  # not on Windows
        os.nice(n)
