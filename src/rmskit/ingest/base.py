"""What every source reader shares: the `Source` protocol, the `Item` a reader proposes, path safety
(every path must stay inside its root), bounded folder walking and depth-safe JSON parsing.

Hostile input must never end a run: a path that leaves its root, a folder nested thousands of levels
deep or JSON nested 100,000 levels deep each becomes one refusal with a reason."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from rmskit.config import IngestConfig
from rmskit.records import Annotation

# Deeper folders are refused, not walked: real collections are a few levels deep, and an unbounded
# walk over a hostile tree hits PATH_MAX, recursion limits or symlink mazes.
MAX_FOLDER_DEPTH = 64
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


@dataclass
class Item:
    """What a source proposes before it is read, hashed and decoded."""

    root: str  # ImageRecord.source_root
    rel: str  # ImageRecord.source_path / Rejection.path
    file: Path | None = None  # a file to read, already checked to be inside its root
    data: bytes | None = None  # or the bytes themselves (datasets, parquet, tar shards)
    refused: str | None = None  # or a refusal decided before reading
    annotation: Annotation | None = None


class Source(Protocol):
    """One resolved source argument. `items` is lazy: nothing is listed or read before iteration."""

    kind: ClassVar[str]
    spec: str

    def items(self, cfg: IngestConfig) -> Iterator[Item]: ...

    def count(self) -> int | None:
        """How many items the source may yield, found without decoding anything (for dry runs);
        None when it cannot be known without downloading (hub streams)."""
        ...


class JSONTooDeep(ValueError):
    """JSON nested deeper than the parser's recursion limit (a hostile or broken document)."""


# ----------------------------------------------------------------------------------------------
# JSON that cannot crash the run


def loads_json(text: str | bytes) -> Any:
    """json.loads, with nesting too deep for the parser turned into a ValueError (never a
    RecursionError, which would otherwise escape every `except ValueError`)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise JSONTooDeep("JSON nested too deeply (hostile or broken document)") from None


def load_json_file(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8-sig") as fh:
            return loads_json(fh.read())
    except JSONTooDeep:
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"source {path}: invalid JSON ({exc})") from None


def read_head(path: Path, n: int = 65536) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(n)


# ----------------------------------------------------------------------------------------------
# path safety


def is_within(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def name_ok(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes in a file name (surrogate escapes)
        return False
    return True


def printable(name: str) -> str:
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def stays_inside(value: str) -> bool:
    """A listed relative name that cannot leave whatever root it is joined to."""
    if not value or os.path.isabs(value) or "\x00" in value or _URL.match(value):
        return False
    norm = os.path.normpath(value)
    return norm != ".." and not norm.startswith("../")


def check_inside(candidate: Path, root: Path, follow_symlinks: bool) -> tuple[Path | None, str | None]:
    """Resolve `candidate` (absolute, lexically normalised, inside the resolved `root`) through any
    symlinks and check the target stays inside `root`. Returns (real path, None) or (None, reason)."""
    try:
        real = candidate.resolve(strict=False)
    except (OSError, RuntimeError):
        return None, "symlink loop"
    via_link = real != candidate  # root is resolved, so any difference comes from a symlink on the way
    if via_link and not is_within(real, root):
        return None, f"symlink leaves the source root (-> {real})"
    if not real.exists():
        if via_link or os.path.lexists(candidate):
            return None, f"dangling symlink (target {real} does not exist)"
        return None, "file not found"
    if via_link and not follow_symlinks:
        return None, "symlink not followed (follow_symlinks_inside_root is off)"
    return real, None


def resolve_listed_path(
    value: str, base: Path, root: Path, cfg: IngestConfig
) -> tuple[Path | None, str, str | None]:
    """A path written in a manifest / COCO file / dataset row -> (real path, display rel, reason)."""
    value = value.strip()
    if _URL.match(value):
        return None, value, "remote URLs are not fetched; download the image and list its local path"
    if "\x00" in value or not name_ok(value):
        return None, printable(value.replace("\x00", "\\0")), "path contains a NUL byte or invalid UTF-8"
    p = Path(value)
    candidate = Path(os.path.normpath(p if p.is_absolute() else base / p))
    if not is_within(candidate, root):
        return None, value, f"path {value!r} leaves the source root {root}"
    real, reason = check_inside(candidate, root, cfg.follow_symlinks_inside_root)
    return real, candidate.relative_to(root).as_posix(), reason


# ----------------------------------------------------------------------------------------------
# bounded walking (no recursion: os.walk recurses once per level in Python 3.11)


def walk_files(
    root: Path, max_depth: int = MAX_FOLDER_DEPTH
) -> Iterator[tuple[Path | None, str, str | None]]:
    """Plain (non-symlink) files under `root`, depth-first, names sorted, hidden names skipped:
    (path, rel, None), or (None, rel, reason) for a folder that cannot be listed or is too deep."""
    stack: list[tuple[Path, str, int]] = [(root, "", 0)]
    while stack:
        folder, prefix, depth = stack.pop()
        if depth > max_depth:
            yield None, prefix, f"folder nested deeper than {max_depth} levels; not walked"
            continue
        try:
            with os.scandir(folder) as it:
                entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
        except OSError as exc:
            yield None, prefix or ".", f"cannot list directory: {exc.strerror or exc}"
            continue
        subdirs = []
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    subdirs.append(e)
                elif e.is_file(follow_symlinks=False):
                    yield Path(e.path), prefix + e.name, None
            except OSError:
                continue
        # files of a folder come before its subfolders; subfolders in sorted order
        stack.extend((Path(e.path), f"{prefix}{e.name}/", depth + 1) for e in reversed(subdirs))
