"""Versioned judge prompts (`judge.v1.md`, ...): old versions stay so scores remain reproducible.

`judge_turns` is the one place a (query, label, category) becomes the judge's user text and target
answer: `rmskit score` trains on it and `rmskit export --format judge` writes it, so a guard
trained outside rmskit on the export sees exactly what `score` measures."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

DEFAULT_PROMPT = "judge.v1"


@lru_cache(maxsize=8)
def load_prompt(version: str = DEFAULT_PROMPT) -> str:
    return resources.files(__name__).joinpath(f"{version}.md").read_text(encoding="utf-8").strip()


def judge_answer(label: str, category: str) -> str:
    """The target verdict: `safe`, or `unsafe` and a category line."""
    if label == "unsafe":
        return f"unsafe\ncategory: {category}"
    return "safe"


def judge_turns(query: str, label: str, category: str, version: str = DEFAULT_PROMPT) -> tuple[str, str]:
    """(user text after the image(s), assistant answer) for one judge training item."""
    return load_prompt(version).format(query=query), judge_answer(label, category)
