"""Readers for a folder of images (walked recursively, names sorted) and for one image file."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from PIL import Image

from rmskit.config import IngestConfig
from rmskit.ingest.base import MAX_FOLDER_DEPTH, Item, check_inside, name_ok, printable
from rmskit.ingest.decode import safe_formats


def _listing(d: Path) -> tuple[Iterator[os.DirEntry] | None, str | None]:
    try:
        with os.scandir(d) as it:
            return iter(sorted(it, key=lambda e: e.name)), None
    except OSError as exc:
        return None, f"cannot list directory: {exc.strerror or exc}"


@dataclass
class FolderSource:
    """Depth-first, names sorted at every level; every regular file is an item. Symlinks are followed
    only inside the root and each folder is visited once; folders deeper than MAX_FOLDER_DEPTH are
    one refusal each, not walked."""

    kind: ClassVar[str] = "folder"
    spec: str
    root: Path
    max_depth: int = MAX_FOLDER_DEPTH

    def count(self) -> int:
        return sum(1 for it in self.items(IngestConfig.model_validate({})) if it.file is not None)

    def items(self, cfg: IngestConfig) -> Iterator[Item]:
        root, root_s = self.root, str(self.root)
        first, err = _listing(root)
        if first is None:
            yield Item(root_s, ".", refused=err)
            return
        visited = {root}
        stack: list[tuple[str, Iterator[os.DirEntry]]] = [("", first)]
        while stack:
            prefix, entries = stack[-1]
            entry = next(entries, None)
            if entry is None:
                stack.pop()
                continue
            rel = prefix + entry.name
            if not name_ok(entry.name):
                yield Item(root_s, printable(rel), refused="file name is not valid UTF-8")
                continue
            try:
                item, sub = self._entry(entry, rel, visited, cfg, len(stack))
            except OSError as exc:
                item, sub = Item(root_s, rel, refused=f"cannot access: {exc.strerror or exc}"), None
            if item is not None:
                yield item
            if sub is not None:
                stack.append((rel + "/", sub))

    def _entry(
        self, entry: os.DirEntry, rel: str, visited: set[Path], cfg: IngestConfig, depth: int
    ) -> tuple[Item | None, Iterator[os.DirEntry] | None]:
        """One directory entry -> (an item to yield, a sub-listing to descend into)."""
        root, root_s = self.root, str(self.root)
        path = Path(entry.path)
        folder: Path | None = None
        if entry.is_symlink():
            real, reason = check_inside(path, root, cfg.follow_symlinks_inside_root)
            if reason or real is None:
                return Item(root_s, rel, refused=reason), None
            if not real.is_dir():
                return Item(root_s, rel, file=real), None
            if real in visited:
                seen = real.relative_to(root).as_posix() or "."
                return Item(
                    root_s, rel + "/", refused=f"directory symlink to an already visited folder ({seen})"
                ), None
            folder = real
        elif entry.is_dir(follow_symlinks=False):
            folder = path
        elif entry.is_file(follow_symlinks=False):
            return Item(root_s, rel, file=path), None
        else:
            return Item(root_s, rel, refused="not a regular file (fifo, socket or device)"), None
        if depth >= self.max_depth:
            return Item(
                root_s, rel + "/", refused=f"folder nested deeper than {self.max_depth} levels; not walked"
            ), None
        visited.add(folder)
        sub, err = _listing(folder)
        return (Item(root_s, rel + "/", refused=err), None) if sub is None else (None, sub)


def looks_like_image(path: Path) -> bool:
    try:
        with Image.open(path, formats=safe_formats()):
            return True
    except Image.DecompressionBombError:
        return True  # an image; the decoder refuses it with a reason
    except Exception:
        return False


@dataclass
class ImageFileSource:
    kind: ClassVar[str] = "file"
    spec: str
    path: Path

    @classmethod
    def sniff(cls, spec: str, path: Path, head: bytes) -> ImageFileSource | None:
        return cls(spec, path) if looks_like_image(path) else None

    def count(self) -> int:
        return 1

    def items(self, cfg: IngestConfig) -> Iterator[Item]:
        yield Item(str(self.path.parent), self.path.name, file=self.path)
