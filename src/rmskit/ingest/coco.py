"""COCO annotation files: an object with an "images" list (and optionally "annotations", "categories",
"licenses"). Captions and instances files over the same images are merged so each image is ingested
once with both kinds of annotation.

The image root is found from the usual layouts (`images/`, `../<split>`, `../images/<split>`, then any
folder beside the json) or named with `annotations.json::IMAGE_DIR`. Only names that stay inside a
root take part in finding it: a hostile `../../../etc/passwd` entry cannot decide the root, and is
refused on its own with a reason."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from rmskit.config import IngestConfig
from rmskit.ingest.base import Item, resolve_listed_path, stays_inside
from rmskit.ingest.rows import ATTRIBUTION_KEYS, first, opt_str
from rmskit.records import Annotation

_ROOT_PROBES = 20  # names tried per candidate folder when looking for the image root
_SCAN_LIMIT = 10_000  # image entries scanned to collect those names


def _key(v: Any) -> Any:
    """A JSON value usable as a dict key (ids may be anything in a hostile file)."""
    return v if isinstance(v, (str, int, float)) else None


def _is_file(p: Path) -> bool:
    try:
        return p.is_file()
    except (OSError, ValueError):  # name too long, NUL byte, ...
        return False


def coco_image_root(path: Path, doc: dict[str, Any]) -> Path:
    """Find the folder the COCO file's `file_name`s are relative to (common layouts), else raise."""
    names: list[str] = []
    for im in doc.get("images", [])[:_SCAN_LIMIT]:
        n = im.get("file_name") if isinstance(im, dict) else None
        if isinstance(n, str) and stays_inside(n):
            names.append(n)
            if len(names) >= _ROOT_PROBES:
                break
    here, parent = path.parent, path.parent.parent
    if not names:
        return here
    m = re.search(r"(train|val|test|minival|valminusminival)(20\d\d)?", path.stem)
    candidates = [here, here / "images", parent, parent / "images"]
    if m:
        split = m.group(0)
        candidates += [here / split, parent / split, here / "images" / split, parent / "images" / split]
    for cand in candidates:
        if any(_is_file(cand / n) for n in names):
            return cand.resolve()
    for d in (here, parent):  # then any folder beside the json (e.g. examples/photos/)
        try:
            subdirs = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            continue
        for cand in subdirs:
            if any(_is_file(cand / n) for n in names):
                return cand.resolve()
    tried = ", ".join(str(c) for c in candidates)
    raise ValueError(
        f"source {path}: cannot find the COCO images (looked for {names[0]!r} in {tried}); "
        f"name the image folder with '{path}::IMAGE_DIR'"
    )


def _new_entry() -> dict[str, Any]:
    return {"captions": [], "objects": [], "license": None, "source_url": None, "attribution": None}


def coco_table(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """file_name -> {"captions", "objects", "license", "source_url", "attribution"} in images order."""
    licenses = {_key(lic.get("id")): lic for lic in _dicts(doc.get("licenses"))}
    categories = {_key(c.get("id")): str(c.get("name")) for c in _dicts(doc.get("categories"))}
    by_id: dict[Any, str] = {}
    table: dict[str, dict[str, Any]] = {}
    for im in _dicts(doc.get("images")):
        fn = im.get("file_name")
        if not isinstance(fn, str):
            continue
        by_id[_key(im.get("id"))] = fn
        lic = licenses.get(_key(im.get("license")), {})
        entry = table.setdefault(fn, _new_entry())
        entry["license"] = entry["license"] or opt_str(lic.get("name") or lic.get("url"))
        entry["source_url"] = entry["source_url"] or opt_str(
            first(im, ("flickr_url", "coco_url", "url", "source_url"))
        )
        entry["attribution"] = entry["attribution"] or opt_str(first(im, ATTRIBUTION_KEYS))
    by_id.pop(None, None)
    for ann in _dicts(doc.get("annotations")):
        image_id = _key(ann.get("image_id"))
        if image_id is None or image_id not in by_id:
            continue
        entry = table[by_id[image_id]]
        cap = ann.get("caption")
        if isinstance(cap, str) and cap.strip() and cap.strip() not in entry["captions"]:
            entry["captions"].append(cap.strip())
        cat = _key(ann.get("category_id"))
        if cat is not None and cat in categories:
            entry["objects"].append(categories[cat])
    return table


def _dicts(value: Any) -> Iterator[dict[str, Any]]:
    if isinstance(value, list):
        yield from (v for v in value if isinstance(v, dict))


@dataclass
class CocoSource:
    kind: ClassVar[str] = "coco"
    accepts_root: ClassVar[bool] = True
    spec: str
    path: Path
    root: Path
    table: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_doc(cls, spec: str, path: Path, doc: dict[str, Any], root: Path | None) -> CocoSource:
        return cls(spec, path, root or coco_image_root(path, doc), coco_table(doc))

    def merge(self, other: CocoSource) -> None:
        """Fold another COCO file over the same image root into this one (captions + instances)."""
        for fn, entry in other.table.items():
            m = self.table.setdefault(fn, _new_entry())
            m["captions"] += [c for c in entry["captions"] if c not in m["captions"]]
            m["objects"] += entry["objects"]
            for k in ("license", "source_url", "attribution"):
                m[k] = m[k] or entry[k]

    def count(self) -> int:
        return len(self.table)

    def items(self, cfg: IngestConfig) -> Iterator[Item]:
        root_s = str(self.root)
        for fn, entry in self.table.items():
            real, rel, reason = resolve_listed_path(fn, self.root, self.root, cfg)
            yield Item(root_s, rel, file=real, refused=reason, annotation=Annotation(**entry))


def merge_coco(sources: list[Any]) -> list[Any]:
    """COCO sources with the same image root become one, in the position of the first."""
    out: list[Any] = []
    by_root: dict[Path, CocoSource] = {}
    for src in sources:
        if isinstance(src, CocoSource):
            if src.root in by_root:
                by_root[src.root].merge(src)
                continue
            by_root[src.root] = src
        out.append(src)
    return out
