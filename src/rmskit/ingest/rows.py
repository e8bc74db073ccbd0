"""Reading an annotation (captions, objects, licence, URL, attribution) out of one untrusted row:
a manifest line, a CSV row, a COCO image entry or a dataset/parquet row. Any value of any type may
appear; the result is always a valid `Annotation`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rmskit.ingest.base import loads_json
from rmskit.records import Annotation

PATH_KEYS = ("path", "image", "file_name", "filename", "file", "image_path", "img")
CAPTION_KEYS = ("captions", "caption")
URL_KEYS = ("source_url", "url", "coco_url", "flickr_url")
ATTRIBUTION_KEYS = ("attribution", "author", "credit")
_MAX_LIST = 1000  # captions/objects kept per image: a hostile row cannot blow up one record


def first(row: dict[str, Any], keys: Iterable[str]) -> Any:
    for k in keys:
        v = row.get(k)
        if v not in (None, ""):
            return v
    return None


def opt_str(v: Any) -> str | None:
    return None if v in (None, "") else str(v)


def as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        s = value.strip()
        if s.startswith("["):
            try:
                parsed = loads_json(s)
            except ValueError:
                return [s]
            return [str(x) for x in parsed if str(x).strip()][:_MAX_LIST] if isinstance(parsed, list) else [s]
        return [s] if s else []
    if isinstance(value, (list, tuple)):
        out: list[str] = []
        for x in value[:_MAX_LIST]:
            if isinstance(x, dict):  # e.g. [{"caption": ...}] or [{"name": ...}]
                x = first(x, ("caption", "text", "name", "category"))
            if x is not None and str(x).strip():
                out.append(str(x).strip())
        return out
    return [str(value)]


def row_annotation(row: dict[str, Any]) -> Annotation:
    lower = {str(k).strip().lower(): v for k, v in row.items()}
    captions: list[str] = []
    for k in CAPTION_KEYS:
        captions += as_list(lower.get(k))
    lic = lower.get("license")
    if isinstance(lic, dict):
        lic = lic.get("name") or lic.get("url")
    return Annotation(
        captions=captions,
        objects=as_list(lower.get("objects")),
        license=opt_str(lic),
        source_url=opt_str(first(lower, URL_KEYS)),
        attribution=opt_str(first(lower, ATTRIBUTION_KEYS)),
    )
