"""Versioned prompt files (`prompts/<name>.vN.md`) rendered into chat messages.

A file holds `=== system ===` and `=== user ===` sections in Jinja2. Old versions stay in the folder;
PROMPT_VERSIONS pins which one the pipeline uses, and every record stores the version that made it."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2

from rmskit.models.base import ImageInput, Message
from rmskit.pipeline.registry import STAGES

PROMPTS_DIR = Path(__file__).parent / "prompts"

# Pinned versions come from the stage registry (the one list of stages).
PROMPT_VERSIONS: dict[str, str] = {name: spec.version for name, spec in STAGES.items()}


@lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(PROMPTS_DIR),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # prompts are plain text, not HTML
        keep_trailing_newline=False,
        trim_blocks=False,
    )


def prompt_version(name: str) -> str:
    return f"{name}.{PROMPT_VERSIONS[name]}"


@lru_cache(maxsize=64)
def _source(version: str) -> str:
    return (PROMPTS_DIR / f"{version}.md").read_text(encoding="utf-8")


@lru_cache(maxsize=64)
def _sections(version: str) -> tuple[jinja2.Template, jinja2.Template]:
    source = _source(version)
    if "=== system ===" not in source or "=== user ===" not in source:
        raise ValueError(f"prompt {version} lacks '=== system ===' / '=== user ===' sections")
    system_src, user_src = source.split("=== system ===", 1)[1].split("=== user ===", 1)
    env = _env()
    return env.from_string(system_src.strip()), env.from_string(user_src.strip())


def render(name: str, images: list[ImageInput] | None = None, **variables: Any) -> tuple[list[Message], str]:
    """Render prompt `name` at its pinned version; returns (messages, version)."""
    version = prompt_version(name)
    system_t, user_t = _sections(version)
    system = system_t.render(**variables).strip()
    user = user_t.render(**variables).strip()
    return [
        Message(role="system", content=system),
        Message(role="user", content=user, images=images or []),
    ], version


def prompts_fingerprint() -> dict[str, str]:
    """Version -> short content hash of every pinned prompt (and its includes), stored with the run."""
    out: dict[str, str] = {}
    includes = b"".join(p.read_bytes() for p in sorted(PROMPTS_DIR.glob("_*.md")))
    for name in PROMPT_VERSIONS:
        version = prompt_version(name)
        data = (PROMPTS_DIR / f"{version}.md").read_bytes() + includes
        out[version] = hashlib.sha256(data).hexdigest()[:12]
    return out


@lru_cache(maxsize=1)
def _openers() -> dict[str, str]:
    """First line of each pinned prompt's system section -> stage name (static text, no template)."""
    out: dict[str, str] = {}
    for name in STAGES:
        system = _source(prompt_version(name)).split("=== system ===", 1)[1].split("=== user ===", 1)[0]
        line = system.strip().splitlines()[0].strip()
        if line in out:
            raise ValueError(f"prompts {out[line]} and {name} open with the same line: {line[:60]!r}")
        out[line] = name
    return out


def stage_of(system: str) -> str:
    """The stage whose pinned prompt rendered this system message ('unknown' if none): derived from
    the registry's prompt files, so a new stage or prompt version is recognised without edits."""
    first = system.strip().splitlines()[0].strip() if system.strip() else ""
    return _openers().get(first, "unknown")
