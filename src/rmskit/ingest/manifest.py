"""Manifest readers: JSONL (one object per line), a JSON array of objects, and CSV/TSV with a header
naming a path column. Paths are relative to the manifest's folder, or to the image root named with
`manifest::DIR`; every path must stay inside that root. Each unreadable line or row is one refusal
with a reason (invalid JSON, nesting too deep, a field over the CSV limit), never the end of the run."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from rmskit.config import IngestConfig
from rmskit.ingest.base import Item, loads_json, resolve_listed_path
from rmskit.ingest.rows import PATH_KEYS, first, row_annotation

Row = tuple[str, dict[str, Any] | None, str | None]  # (location, row or None, reason it is unreadable)


def header_columns(first_line: str) -> tuple[list[str], str]:
    delim = max((",", "\t", ";", "|"), key=first_line.count)
    try:
        cols = next(csv.reader([first_line], delimiter=delim), [])
    except csv.Error:  # e.g. a lone '\r' inside the line: not a header worth quoting rules
        cols = first_line.split(delim)
    return [c.strip().strip("\ufeff").lower() for c in cols], delim


@dataclass
class ManifestSource:
    kind: ClassVar[str] = "manifest"
    accepts_root: ClassVar[bool] = True
    spec: str
    path: Path
    fmt: Literal["jsonl", "csv", "json"]
    root: Path  # every listed path must stay inside it
    base: Path  # relative paths are joined to it
    delimiter: str = ","
    doc: list[Any] = field(default_factory=list)  # the parsed array of a JSON manifest

    def rows(self) -> Iterator[Row]:
        name = self.path.name
        if self.fmt == "json":
            for i, row in enumerate(self.doc):
                ok = isinstance(row, dict)
                yield f"{name}[{i}]", row if ok else None, None if ok else "manifest entry is not an object"
            return
        with open(self.path, encoding="utf-8-sig", errors="replace", newline="") as fh:
            yield from (self._jsonl(fh, name) if self.fmt == "jsonl" else self._csv(fh, name))

    @staticmethod
    def _jsonl(fh: Any, name: str) -> Iterator[Row]:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = loads_json(line)
            except ValueError as exc:
                yield f"{name}:{n}", None, f"invalid JSON on line {n}: {getattr(exc, 'msg', exc)}"
                continue
            if not isinstance(row, dict):
                yield f"{name}:{n}", None, f"line {n} is not a JSON object"
                continue
            yield f"{name}:{n}", row, None

    def _csv(self, fh: Any, name: str) -> Iterator[Row]:
        reader = csv.DictReader(fh, delimiter=self.delimiter)
        n = 1
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:  # e.g. a field over the csv module's size limit
                stuck = reader.line_num == n
                n = reader.line_num
                yield f"{name}:{n}", None, f"unreadable CSV row {n}: {exc}"
                if stuck:  # the reader did not move on: stop rather than loop
                    return
                continue
            n = reader.line_num
            clean = {str(k).strip().lower(): v for k, v in row.items() if k is not None}
            yield f"{name}:{n}", clean, None

    def count(self) -> int:
        return sum(1 for _ in self.rows())

    def items(self, cfg: IngestConfig) -> Iterator[Item]:
        root_s = str(self.root)
        for loc, row, reason in self.rows():
            if row is None:
                yield Item(root_s, loc, refused=reason)
                continue
            try:
                yield self._row_item(loc, row, cfg)
            except (RecursionError, ValueError, TypeError, OSError) as exc:  # one hostile row, not the run
                yield Item(root_s, loc, refused=f"unusable manifest entry: {type(exc).__name__}")

    def _row_item(self, loc: str, row: dict[str, Any], cfg: IngestConfig) -> Item:
        root_s = str(self.root)
        lower = {str(k).strip().lower(): v for k, v in row.items()}
        value = first(lower, PATH_KEYS)
        if not isinstance(value, str) or not value.strip():
            return Item(
                root_s, loc, refused=f"no image path (expected a column named one of {', '.join(PATH_KEYS)})"
            )
        real, rel, reason = resolve_listed_path(value, self.base, self.root, cfg)
        return Item(root_s, rel, file=real, refused=reason, annotation=row_annotation(lower))
