"""Versioned judge prompts (`judge.v1.md`, ...): old versions stay so scores remain reproducible."""

from __future__ import annotations

from importlib import resources

DEFAULT_PROMPT = "judge.v1"


def load_prompt(version: str = DEFAULT_PROMPT) -> str:
    return resources.files(__name__).joinpath(f"{version}.md").read_text(encoding="utf-8").strip()
