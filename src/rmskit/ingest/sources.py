"""Image sources: folders, JSONL/CSV/JSON manifests, COCO annotation files, HF datasets / parquet.

`iter_sources` resolves every source argument first (an unusable one raises ValueError before any
image is read), then streams `ImageRecord | Rejection` one at a time: listings and manifests are read
lazily, only one image is decoded at a time, and the only state kept across items is the set of
sha256 digests already seen (identical bytes collapse to one image; later copies are recorded as
rejections "duplicate of ...").

Source kinds are sniffed by content, never by extension:
- a directory: an HF `save_to_disk` dataset (dataset_info.json + state.json, or dataset_dict.json),
  a folder of parquet files, or else a folder of images walked recursively in sorted order;
- a file: parquet (PAR1 magic), an image, a COCO json (object with an "images" list), a JSONL
  manifest (first line a JSON object), a JSON array manifest, or a CSV/TSV manifest whose header
  names a path column (path, image, file_name, filename, file, image_path);
- `hf://ORG/NAME[:SPLIT]`: a hub dataset via `datasets.load_dataset(..., streaming=True)`.

Manifests and COCO files resolve image paths against their own folder (COCO also tries the usual
layouts: `images/`, `../<split>`, `../images/<split>`, then any folder beside the json). Append
`::DIR` to a manifest or COCO source to name its image root explicitly
(`annotations/captions_val2017.json::/data/coco/val2017`).
Every path must stay inside its root: `..` escapes, absolute paths elsewhere, symlinks whose target
leaves the root and dangling symlinks are refused with a reason."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from rmskit.config import IngestConfig
from rmskit.ingest.decode import (
    ImageRefused,
    decode_bytes,
    looks_like_text,
    read_file_capped,
    safe_formats,
    sha256_hex,
)
from rmskit.records import Annotation, ImageRecord, Rejection

log = logging.getLogger(__name__)

PATH_KEYS = ("path", "image", "file_name", "filename", "file", "image_path", "img")
CAPTION_KEYS = ("captions", "caption")
URL_KEYS = ("source_url", "url", "coco_url", "flickr_url")
ATTRIBUTION_KEYS = ("attribution", "author", "credit")
IMAGE_COLUMN_NAMES = ("image", "img", "picture", "photo", "image_bytes", "jpg", "png")
_HEAD = 65536


# ----------------------------------------------------------------------------------------------
# internal item: what a source proposes before it is read, hashed and decoded


@dataclass
class _Item:
    root: str  # ImageRecord.source_root
    rel: str  # ImageRecord.source_path / Rejection.path
    file: Path | None = None  # a file to read, already checked to be inside its root
    data: bytes | None = None  # or the bytes themselves (datasets / parquet)
    refused: str | None = None  # or a refusal decided before reading
    annotation: Annotation | None = None


@dataclass
class _Source:
    # folder | file | manifest_jsonl | manifest_csv | manifest_json | coco | hf_disk | parquet | hf_hub
    kind: str
    spec: str
    path: Path | None = None
    root: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# path safety


def _is_within(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def _name_ok(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes in a file name (surrogate escapes)
        return False
    return True


def _printable(name: str) -> str:
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _check_inside(candidate: Path, root: Path, follow_symlinks: bool) -> tuple[Path | None, str | None]:
    """Resolve `candidate` (absolute, lexically normalised, inside the resolved `root`) through any
    symlinks and check the target stays inside `root`. Returns (real path, None) or (None, reason)."""
    try:
        real = candidate.resolve(strict=False)
    except (OSError, RuntimeError):
        return None, "symlink loop"
    via_link = real != candidate  # root is resolved, so any difference comes from a symlink on the way
    if via_link and not _is_within(real, root):
        return None, f"symlink leaves the source root (-> {real})"
    if not real.exists():
        if via_link or os.path.lexists(candidate):
            return None, f"dangling symlink (target {real} does not exist)"
        return None, "file not found"
    if via_link and not follow_symlinks:
        return None, "symlink not followed (follow_symlinks_inside_root is off)"
    return real, None


def _resolve_listed_path(
    value: str, base: Path, root: Path, cfg: IngestConfig
) -> tuple[Path | None, str, str | None]:
    """A path written in a manifest / COCO file / dataset row -> (real path, display rel, reason)."""
    value = value.strip()
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", value):
        return None, value, "remote URLs are not fetched; download the image and list its local path"
    if "\x00" in value or not _name_ok(value):
        return None, _printable(value.replace("\x00", "\\0")), "path contains a NUL byte or invalid UTF-8"
    p = Path(value)
    candidate = Path(os.path.normpath(p if p.is_absolute() else base / p))
    if not _is_within(candidate, root):
        return None, value, f"path {value!r} leaves the source root {root}"
    real, reason = _check_inside(candidate, root, cfg.follow_symlinks_inside_root)
    return real, candidate.relative_to(root).as_posix(), reason


# ----------------------------------------------------------------------------------------------
# sniffing


def _read_head(path: Path, n: int = _HEAD) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(n)


def _looks_like_image(path: Path) -> bool:
    try:
        with Image.open(path, formats=safe_formats()):
            return True
    except Image.DecompressionBombError:
        return True  # an image; the decoder refuses it with a reason
    except Exception:
        return False


def _header_columns(first_line: str) -> tuple[list[str], str]:
    delim = max((",", "\t", ";", "|"), key=first_line.count)
    cols = next(csv.reader([first_line], delimiter=delim), [])
    return [c.strip().strip("\ufeff").lower() for c in cols], delim


def _sniff_file(path: Path) -> tuple[str, dict[str, Any]]:
    try:
        head = _read_head(path)
    except OSError as exc:
        raise ValueError(f"source {path}: cannot read ({exc.strerror or exc})") from None
    if not head:
        raise ValueError(f"source {path}: empty file")
    if head.startswith(b"PAR1"):
        return "parquet", {}
    if _looks_like_image(path):
        return "file", {}
    text_head = head.decode("utf-8", "ignore").lstrip("\ufeff \t\r\n")
    if text_head.startswith("{"):
        first_line = text_head.split("\n", 1)[0].strip()
        try:
            obj = json.loads(first_line)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            if isinstance(obj.get("images"), list):  # a one-line COCO file
                return "coco", {"doc": obj}
            return "manifest_jsonl", {}
        try:
            doc = _load_json(path)
        except ValueError:
            with open(
                path, encoding="utf-8-sig", errors="replace"
            ) as fh:  # a JSONL line longer than the head
                line = fh.readline()
            try:
                if isinstance(json.loads(line), dict):
                    return "manifest_jsonl", {}
            except ValueError:
                pass
            raise
        if isinstance(doc, dict) and isinstance(doc.get("images"), list):
            return "coco", {"doc": doc}
        if isinstance(doc, dict) and any(k in {str(x).lower() for x in doc} for k in PATH_KEYS):
            return "manifest_jsonl", {}  # one record, longer than the sniffed head
        raise ValueError(f"source {path}: a JSON object without an 'images' list (not COCO, not JSONL)")
    if text_head.startswith("["):
        doc = _load_json(path)
        if isinstance(doc, list):
            return "manifest_json", {"doc": doc}
        raise ValueError(f"source {path}: not a JSON array of records")
    first_line = text_head.split("\n", 1)[0]
    if looks_like_text(head) and first_line.strip():
        cols, delim = _header_columns(first_line)
        if any(k in cols for k in PATH_KEYS):
            return "manifest_csv", {"delimiter": delim}
        raise ValueError(
            f"source {path}: looks like a text/CSV file but its header has no path column "
            f"(one of: {', '.join(PATH_KEYS)}); header was {first_line[:200]!r}"
        )
    raise ValueError(f"source {path}: unknown format (not an image, manifest, COCO file, dataset or parquet)")


def _load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8-sig") as fh:
            return json.load(fh)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"source {path}: invalid JSON ({exc})") from None


def _is_parquet_folder(root: Path) -> bool:
    found = False
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or name.lower().endswith((".md", ".json", ".txt", ".gitattributes")):
                continue
            try:
                magic = _read_head(Path(dirpath) / name, 4)
            except OSError:
                return False
            if magic != b"PAR1":
                return False  # the first non-parquet file decides: an image folder
            found = True
    return found


def resolve_source(spec: str) -> _Source:
    """Classify one source argument; raises ValueError when it is unusable."""
    if spec.startswith("hf://"):
        name = spec[len("hf://") :]
        repo, _, split = name.partition(":")
        if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", repo):
            raise ValueError(f"source {spec}: expected hf://ORG/NAME[:SPLIT]")
        return _Source("hf_hub", spec, extra={"repo": repo, "split": split or None})
    root_override: Path | None = None
    target = spec
    if not os.path.lexists(spec) and "::" in spec:
        target, _, root_arg = spec.rpartition("::")
        root_override = Path(root_arg).expanduser().resolve()
        if not root_override.is_dir():
            raise ValueError(f"source {spec}: image root {root_arg} is not a directory")
    path = Path(target).expanduser()
    if not path.exists():
        raise ValueError(f"source {target}: does not exist")
    path = path.resolve()
    if path.is_dir():
        if root_override is not None:
            raise ValueError(f"source {spec}: '::ROOT' applies to manifest and COCO files, not folders")
        if (path / "dataset_dict.json").is_file() or (
            (path / "dataset_info.json").is_file() and (path / "state.json").is_file()
        ):
            return _Source("hf_disk", spec, path, path)
        if _is_parquet_folder(path):
            return _Source("parquet", spec, path, path)
        return _Source("folder", spec, path, path)
    if not path.is_file():
        raise ValueError(f"source {target}: not a regular file or directory")
    kind, extra = _sniff_file(path)
    if root_override is not None and kind not in ("manifest_jsonl", "manifest_csv", "manifest_json", "coco"):
        raise ValueError(f"source {spec}: '::ROOT' applies to manifest and COCO files only")
    if kind == "coco":
        root = root_override or _coco_image_root(path, extra["doc"])
        return _Source(kind, spec, path, root, extra)
    if kind == "file":
        return _Source(kind, spec, path, path.parent)
    if root_override is not None:
        extra["base"] = root_override
    return _Source(kind, spec, path, root_override or path.parent, extra)


# ----------------------------------------------------------------------------------------------
# folders


def _walk_folder(root: Path, cfg: IngestConfig) -> Iterator[_Item]:
    """Depth-first, names sorted at every level; every regular file is an item."""
    root_s = str(root)
    visited = {root}

    def listing(d: Path) -> tuple[Iterator[os.DirEntry] | None, str | None]:
        try:
            with os.scandir(d) as it:
                return iter(sorted(it, key=lambda e: e.name)), None
        except OSError as exc:
            return None, f"cannot list directory: {exc.strerror or exc}"

    first, err = listing(root)
    if first is None:
        yield _Item(root_s, ".", refused=err)
        return
    stack: list[tuple[str, Iterator[os.DirEntry]]] = [("", first)]
    while stack:
        prefix, entries = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            continue
        rel = prefix + entry.name
        if not _name_ok(entry.name):
            yield _Item(root_s, _printable(rel), refused="file name is not valid UTF-8")
            continue
        path = Path(entry.path)
        try:
            is_link = entry.is_symlink()
            if is_link:
                real, reason = _check_inside(path, root, cfg.follow_symlinks_inside_root)
                if reason:
                    yield _Item(root_s, rel, refused=reason)
                    continue
                assert real is not None
                if real.is_dir():
                    if real in visited:
                        yield _Item(
                            root_s,
                            rel + "/",
                            refused=f"directory symlink to an already visited folder "
                            f"({real.relative_to(root).as_posix() or '.'})",
                        )
                        continue
                    visited.add(real)
                    sub, err = listing(real)
                    if sub is None:
                        yield _Item(root_s, rel + "/", refused=err)
                    else:
                        stack.append((rel + "/", sub))
                    continue
                yield _Item(root_s, rel, file=real)
                continue
            if entry.is_dir(follow_symlinks=False):
                visited.add(path)
                sub, err = listing(path)
                if sub is None:
                    yield _Item(root_s, rel + "/", refused=err)
                else:
                    stack.append((rel + "/", sub))
                continue
            if entry.is_file(follow_symlinks=False):
                yield _Item(root_s, rel, file=path)
            else:
                yield _Item(root_s, rel, refused="not a regular file (fifo, socket or device)")
        except OSError as exc:
            yield _Item(root_s, rel, refused=f"cannot access: {exc.strerror or exc}")


# ----------------------------------------------------------------------------------------------
# manifests


def _first(row: dict[str, Any], keys: Iterable[str]) -> Any:
    for k in keys:
        v = row.get(k)
        if v not in (None, ""):
            return v
    return None


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        s = value.strip()
        if s.startswith("["):
            try:
                parsed = json.loads(s)
            except ValueError:
                return [s]
            return [str(x) for x in parsed if str(x).strip()] if isinstance(parsed, list) else [s]
        return [s] if s else []
    if isinstance(value, (list, tuple)):
        out: list[str] = []
        for x in value:
            if isinstance(x, dict):  # e.g. [{"caption": ...}] or [{"name": ...}]
                x = _first(x, ("caption", "text", "name", "category"))
            if x is not None and str(x).strip():
                out.append(str(x).strip())
        return out
    return [str(value)]


def _row_annotation(row: dict[str, Any]) -> Annotation:
    lower = {str(k).strip().lower(): v for k, v in row.items()}
    captions: list[str] = []
    for k in CAPTION_KEYS:
        captions += _as_list(lower.get(k))
    lic = lower.get("license")
    if isinstance(lic, dict):
        lic = lic.get("name") or lic.get("url")
    return Annotation(
        captions=captions,
        objects=_as_list(lower.get("objects")),
        license=str(lic) if lic not in (None, "") else None,
        source_url=_opt_str(_first(lower, URL_KEYS)),
        attribution=_opt_str(_first(lower, ATTRIBUTION_KEYS)),
    )


def _opt_str(v: Any) -> str | None:
    return None if v in (None, "") else str(v)


def _manifest_rows(src: _Source) -> Iterator[tuple[str, dict[str, Any] | None, str | None]]:
    """(location, row or None, reason when the row is unreadable)."""
    assert src.path is not None
    name = src.path.name
    if src.kind == "manifest_json":
        for i, row in enumerate(src.extra["doc"]):
            yield (
                f"{name}[{i}]",
                row if isinstance(row, dict) else None,
                None if isinstance(row, dict) else ("manifest entry is not an object"),
            )
        return
    with open(src.path, encoding="utf-8-sig", errors="replace", newline="") as fh:
        if src.kind == "manifest_jsonl":
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as exc:
                    yield f"{name}:{n}", None, f"invalid JSON on line {n}: {exc.msg}"
                    continue
                if not isinstance(row, dict):
                    yield f"{name}:{n}", None, f"line {n} is not a JSON object"
                    continue
                yield f"{name}:{n}", row, None
        else:
            reader = csv.DictReader(fh, delimiter=src.extra["delimiter"])
            for n, row in enumerate(reader, 2):
                clean = {str(k).strip().lower(): v for k, v in row.items() if k is not None}
                yield f"{name}:{n}", clean, None


def _manifest_items(src: _Source, cfg: IngestConfig) -> Iterator[_Item]:
    assert src.path is not None and src.root is not None
    # paths are relative to the manifest's folder, or to the image root named with "::DIR"
    root, base, root_s = src.root, src.extra.get("base", src.path.parent), str(src.root)
    for loc, row, reason in _manifest_rows(src):
        if row is None:
            yield _Item(root_s, loc, refused=reason)
            continue
        lower = {str(k).strip().lower(): v for k, v in row.items()}
        value = _first(lower, PATH_KEYS)
        if not isinstance(value, str) or not value.strip():
            yield _Item(
                root_s, loc, refused=f"no image path (expected a column named one of {', '.join(PATH_KEYS)})"
            )
            continue
        real, rel, reason = _resolve_listed_path(value, base, root, cfg)
        yield _Item(root_s, rel, file=real, refused=reason, annotation=_row_annotation(lower))


# ----------------------------------------------------------------------------------------------
# COCO


def _coco_image_root(path: Path, doc: dict[str, Any]) -> Path:
    """Find the folder the COCO file's `file_name`s are relative to (common layouts), else raise."""
    names = [im.get("file_name") for im in doc.get("images", [])[:20] if isinstance(im, dict)]
    names = [n for n in names if isinstance(n, str) and n and not os.path.isabs(n)]
    here, parent = path.parent, path.parent.parent
    split = None
    m = re.search(r"(train|val|test|minival|valminusminival)(20\d\d)?", path.stem)
    if m:
        split = m.group(0)
    candidates = [here, here / "images", parent, parent / "images"]
    if split:
        candidates += [here / split, parent / split, here / "images" / split, parent / "images" / split]
    if not names:
        return here
    for cand in candidates:
        if any((cand / n).is_file() for n in names):
            return cand.resolve()
    for d in (here, parent):  # then any folder beside the json (e.g. examples/photos/)
        try:
            subdirs = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            continue
        for cand in subdirs:
            if any((cand / n).is_file() for n in names):
                return cand.resolve()
    tried = ", ".join(str(c) for c in candidates)
    raise ValueError(
        f"source {path}: cannot find the COCO images (looked for {names[0]!r} in {tried}); "
        f"name the image folder with '{path}::IMAGE_DIR'"
    )


def _coco_table(src: _Source) -> dict[str, dict[str, Any]]:
    """file_name -> {"captions", "objects", "license", "source_url", "attribution"} in images order."""
    doc = src.extra["doc"]
    licenses = {lic.get("id"): lic for lic in doc.get("licenses", []) or [] if isinstance(lic, dict)}
    categories = {
        c.get("id"): str(c.get("name")) for c in doc.get("categories", []) or [] if isinstance(c, dict)
    }
    by_id: dict[Any, str] = {}
    table: dict[str, dict[str, Any]] = {}
    for im in doc.get("images", []):
        if not isinstance(im, dict) or not isinstance(im.get("file_name"), str):
            continue
        fn = im["file_name"]
        by_id[im.get("id")] = fn
        lic = licenses.get(im.get("license"), {})
        entry = table.setdefault(
            fn, {"captions": [], "objects": [], "license": None, "source_url": None, "attribution": None}
        )
        entry["license"] = entry["license"] or _opt_str(lic.get("name") or lic.get("url"))
        entry["source_url"] = entry["source_url"] or _opt_str(
            _first(im, ("flickr_url", "coco_url", "url", "source_url"))
        )
        entry["attribution"] = entry["attribution"] or _opt_str(_first(im, ATTRIBUTION_KEYS))
    for ann in doc.get("annotations", []) or []:
        if not isinstance(ann, dict) or ann.get("image_id") not in by_id:
            continue
        entry = table[by_id[ann["image_id"]]]
        cap = ann.get("caption")
        if isinstance(cap, str) and cap.strip() and cap.strip() not in entry["captions"]:
            entry["captions"].append(cap.strip())
        if "category_id" in ann and ann["category_id"] in categories:
            entry["objects"].append(categories[ann["category_id"]])
    return table


def _merge_coco(sources: list[_Source]) -> list[_Source]:
    """COCO ships captions and instances in separate files over the same images: sources with the
    same image root are merged so each image is ingested once with both kinds of annotation."""
    out: list[_Source] = []
    by_root: dict[Path, _Source] = {}
    for src in sources:
        if src.kind != "coco":
            out.append(src)
            continue
        assert src.root is not None
        table = _coco_table(src)
        src.extra.pop("doc", None)  # the parsed json can be large; keep only the table
        if src.root in by_root:
            merged = by_root[src.root].extra["table"]
            for fn, entry in table.items():
                if fn not in merged:
                    merged[fn] = entry
                    continue
                m = merged[fn]
                m["captions"] += [c for c in entry["captions"] if c not in m["captions"]]
                m["objects"] += entry["objects"]
                for k in ("license", "source_url", "attribution"):
                    m[k] = m[k] or entry[k]
            continue
        src.extra["table"] = table
        by_root[src.root] = src
        out.append(src)
    return out


def _coco_items(src: _Source, cfg: IngestConfig) -> Iterator[_Item]:
    assert src.root is not None
    root, root_s = src.root, str(src.root)
    for fn, entry in src.extra["table"].items():
        real, rel, reason = _resolve_listed_path(fn, root, root, cfg)
        yield _Item(root_s, rel, file=real, refused=reason, annotation=Annotation(**entry))


# ----------------------------------------------------------------------------------------------
# HF datasets and parquet


def _image_column_from_features(features: Any) -> str | None:
    import datasets

    for name, feat in features.items():
        if isinstance(feat, datasets.Image):
            return name
    return _image_column_by_name(list(features))


def _image_column_by_name(columns: list[str]) -> str | None:
    lower = {c.lower(): c for c in columns}
    for cand in (*IMAGE_COLUMN_NAMES, *PATH_KEYS):
        if cand in lower:
            return lower[cand]
    return None


def _row_item(
    row: dict[str, Any], col: str, root_s: str, rel: str, root: Path | None, cfg: IngestConfig
) -> _Item:
    value = row.get(col)
    ann = _row_annotation({k: v for k, v in row.items() if k != col})
    if isinstance(value, dict):
        data = value.get("bytes")
        if data:
            return _Item(root_s, rel, data=bytes(data), annotation=ann)
        value = value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _Item(root_s, rel, data=bytes(value), annotation=ann)
    if isinstance(value, Image.Image):
        buf = io.BytesIO()
        value.save(buf, format="PNG")  # an already decoded image (custom datasets): re-encode losslessly
        return _Item(root_s, rel, data=buf.getvalue(), annotation=ann)
    if isinstance(value, str) and value:
        if root is None:  # hub datasets: paths point into the datasets cache
            p = Path(value)
            return (
                _Item(root_s, rel, file=p, annotation=ann)
                if p.is_file()
                else _Item(root_s, rel, refused=f"image path {value!r} not found", annotation=ann)
            )
        real, _, reason = _resolve_listed_path(value, root, root, cfg)
        return _Item(root_s, rel, file=real, refused=reason, annotation=ann)
    return _Item(root_s, rel, refused=f"no image in column {col!r}", annotation=ann)


def _undecoded(ds: Any, col: str) -> Any:
    """Ask `datasets` for the raw {bytes, path} instead of decoded PIL images: our decoder applies the
    safety checks, and decoding twice would waste time."""
    import datasets

    if isinstance(ds.features.get(col) if ds.features else None, datasets.Image):
        return ds.cast_column(col, datasets.Image(decode=False))
    return ds


def _hf_disk_items(src: _Source, cfg: IngestConfig) -> Iterator[_Item]:
    import datasets

    assert src.path is not None
    obj = src.extra["dataset"]
    if isinstance(obj, datasets.DatasetDict):
        splits = [(name, obj[name]) for name in sorted(obj)]
    else:
        splits = [("data", obj)]
    root_s = str(src.path)
    for split, ds in splits:
        col = _image_column_from_features(ds.features)
        if col is None:
            yield _Item(root_s, f"{split}", refused=f"split {split!r} has no image column")
            continue
        for i, row in enumerate(_undecoded(ds, col)):
            yield _row_item(row, col, root_s, f"{split}#{i}", src.path, cfg)


def _parquet_files(src: _Source) -> list[Path]:
    assert src.path is not None
    if src.path.is_file():
        return [src.path]
    files = []
    for dirpath, dirnames, filenames in os.walk(src.path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if not name.startswith(".") and _read_head(p, 4) == b"PAR1":
                files.append(p)
    return files


def _parquet_image_column(schema: Any) -> str | None:
    import pyarrow as pa

    meta = schema.metadata or {}
    if b"huggingface" in meta:
        try:
            feats = json.loads(meta[b"huggingface"]).get("info", {}).get("features", {})
            for name, f in feats.items():
                if isinstance(f, dict) and f.get("_type") == "Image":
                    return name
        except ValueError:
            pass
    for fld in schema:
        if pa.types.is_struct(fld.type) and fld.type.get_field_index("bytes") >= 0:
            return fld.name
    return _image_column_by_name(schema.names)


def _parquet_items(src: _Source, cfg: IngestConfig) -> Iterator[_Item]:
    import pyarrow.parquet as pq

    assert src.path is not None and src.root is not None
    root = src.root if src.path.is_dir() else src.path.parent
    root_s = str(root)
    for f in _parquet_files(src):
        rel_file = f.relative_to(root).as_posix()
        try:
            pf = pq.ParquetFile(f)
        except Exception as exc:  # a corrupt shard is one refusal, not the end of the run
            yield _Item(root_s, rel_file, refused=f"unreadable parquet file: {exc}")
            continue
        col = _parquet_image_column(pf.schema_arrow)
        if col is None:
            yield _Item(root_s, rel_file, refused="parquet file has no image column")
            continue
        i = 0
        try:
            for batch in pf.iter_batches(batch_size=16):  # small batches: rows carry image bytes
                for row in batch.to_pylist():
                    yield _row_item(row, col, root_s, f"{rel_file}#{i}", root, cfg)
                    i += 1
        except Exception as exc:
            yield _Item(root_s, f"{rel_file}#{i}", refused=f"unreadable parquet data: {exc}")


def _hf_hub_items(src: _Source, cfg: IngestConfig) -> Iterator[_Item]:
    import datasets

    obj = src.extra["dataset"]
    root_s = f"hf://{src.extra['repo']}"
    if isinstance(obj, (datasets.IterableDatasetDict, datasets.DatasetDict)):
        streams = [(name, obj[name]) for name in sorted(obj)]
    else:
        streams = [(src.extra["split"], obj)]
    for split, ds in streams:
        col = _image_column_from_features(ds.features) if ds.features else None
        if col is None:
            col = "image"
        for i, row in enumerate(_undecoded(ds, col)):
            yield _row_item(row, col, root_s, f"{split}#{i}", None, cfg)


def _open_datasets(src: _Source) -> None:
    """Load HF datasets eagerly so that an unusable one fails before anything is ingested."""
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a core dependency
        raise ValueError(f"source {src.spec}: the 'datasets' package is needed ({exc})") from None
    try:
        if src.kind == "hf_disk":
            src.extra["dataset"] = datasets.load_from_disk(str(src.path))
        else:
            src.extra["dataset"] = datasets.load_dataset(
                src.extra["repo"], split=src.extra["split"], streaming=True
            )
    except Exception as exc:
        raise ValueError(f"source {src.spec}: cannot load dataset ({type(exc).__name__}: {exc})") from None


# ----------------------------------------------------------------------------------------------
# the public iterator


def _items(src: _Source, cfg: IngestConfig) -> Iterator[_Item]:
    if src.kind == "folder":
        assert src.root is not None
        yield from _walk_folder(src.root, cfg)
    elif src.kind == "file":
        assert src.path is not None
        yield _Item(str(src.path.parent), src.path.name, file=src.path)
    elif src.kind in ("manifest_jsonl", "manifest_csv", "manifest_json"):
        yield from _manifest_items(src, cfg)
    elif src.kind == "coco":
        yield from _coco_items(src, cfg)
    elif src.kind == "hf_disk":
        yield from _hf_disk_items(src, cfg)
    elif src.kind == "parquet":
        yield from _parquet_items(src, cfg)
    elif src.kind == "hf_hub":
        yield from _hf_hub_items(src, cfg)
    else:  # pragma: no cover - resolve_source only makes the kinds above
        raise ValueError(f"unknown source kind {src.kind}")


def _generate(
    resolved: list[_Source], cfg: IngestConfig, cache_dir: Path
) -> Iterator[ImageRecord | Rejection]:
    seen: dict[str, tuple[str, str]] = {}  # sha256 -> (source_root, source_path) of the first copy
    for src in resolved:
        for item in _items(src, cfg):
            yield _process(item, cfg, cache_dir, seen)


def _process(
    item: _Item, cfg: IngestConfig, cache_dir: Path, seen: dict[str, tuple[str, str]]
) -> ImageRecord | Rejection:
    if item.refused is not None:
        return Rejection(source_root=item.root, path=item.rel, reason=item.refused)
    try:
        if item.data is not None:
            data = item.data
            name = None
        else:
            assert item.file is not None
            data = read_file_capped(item.file, cfg)
            name = item.file.name
        sha = sha256_hex(data)
        if sha in seen:  # before decoding: an identical copy costs one read and one hash
            first_root, first_path = seen[sha]
            where = first_path if first_root == item.root else f"{first_path} in {first_root}"
            return Rejection(
                source_root=item.root, path=item.rel, reason=f"duplicate of {where} (identical bytes)"
            )
        dec = decode_bytes(data, cfg, cache_dir, sha256=sha, name=name)
    except ImageRefused as exc:
        return Rejection(source_root=item.root, path=item.rel, reason=exc.reason)
    except Exception as exc:  # never let one item end the run
        log.exception("unexpected error ingesting %s", item.rel)
        return Rejection(
            source_root=item.root, path=item.rel, reason=f"internal error: {type(exc).__name__}: {exc}"
        )
    seen[sha] = (item.root, item.rel)
    return ImageRecord(
        sha256=dec.sha256,
        phash=dec.phash,
        source_root=item.root,
        source_path=item.rel,
        path=dec.path,
        width=dec.width,
        height=dec.height,
        orig_format=dec.orig_format,
        orig_mode=dec.orig_mode,
        annotation=item.annotation or Annotation(),
    )


def iter_sources(sources: list[str], cfg: IngestConfig, cache_dir: Path) -> Iterator[ImageRecord | Rejection]:
    """Stream accepted images and refusals from every source, in order. Raises ValueError at call
    time (before anything is read) when a source argument is unusable; never raises for a bad item."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [str(sources)]
    resolved = [resolve_source(str(s)) for s in sources]
    for src in resolved:
        if src.kind in ("hf_disk", "hf_hub"):
            _open_datasets(src)
    resolved = _merge_coco(resolved)
    return _generate(resolved, cfg, Path(cache_dir))
