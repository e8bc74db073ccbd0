"""Adapter protocol and the helpers adapters share (file lookup, label parsing, HF image caching)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from rmskit.scoring.sample import BenchSample, Label

HF_ID = re.compile(r"^(hf:)?[A-Za-z0-9][\w.-]*/[\w.-]+$")


class AdapterError(ValueError):
    """A benchmark could not be read: wrong layout, unknown split, unreadable labels."""


class MissingImagesError(AdapterError):
    def __init__(self, name: str, missing: list[str]) -> None:
        self.missing = missing
        shown = "\n  ".join(missing[:5])
        super().__init__(
            f"{name}: {len(missing)} sample(s) point at image files that do not exist, e.g.\n  {shown}\n"
            "Unzip the benchmark's image archive beside its metadata, or pass --skip-missing-images "
            "to drop (and count) those samples."
        )


@runtime_checkable
class Adapter(Protocol):
    """One benchmark format. `read_local` reads the official release layout from a folder (or file);
    `read_hf` reads the same benchmark through `datasets.load_dataset`. Both return unified samples
    whose image paths may not exist yet: the caller checks them."""

    name: ClassVar[str]
    title: ClassVar[str]
    hf_id: ClassVar[str | None]

    def detect(self, root: Path) -> bool: ...

    def read_local(self, root: Path, split: str | None, options: Mapping[str, Any]) -> list[BenchSample]: ...

    def read_hf(
        self, dataset_id: str, split: str | None, options: Mapping[str, Any]
    ) -> list[BenchSample]: ...


class BaseAdapter:
    """Defaults for adapters: no HF loader, detection by marker files."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    hf_id: ClassVar[str | None] = None
    markers: ClassVar[tuple[str, ...]] = ()

    def detect(self, root: Path) -> bool:
        return root.is_dir() and any(find_file(root, m) is not None for m in self.markers)

    def read_local(self, root: Path, split: str | None, options: Mapping[str, Any]) -> list[BenchSample]:
        raise NotImplementedError

    def read_hf(self, dataset_id: str, split: str | None, options: Mapping[str, Any]) -> list[BenchSample]:
        raise AdapterError(f"{self.name}: no Hugging Face loader; download the release and pass its folder")


# --- files -----------------------------------------------------------------------------------------


def find_file(root: Path, name: str, subdirs: Iterable[str] = ("", "data")) -> Path | None:
    """`name` directly in `root` or in one of the usual sub-folders of a release."""
    if root.is_file():
        return root if root.name == name else None
    for sub in subdirs:
        p = root / sub / name if sub else root / name
        if p.is_file():
            return p
    return None


def require_file(
    adapter: str, root: Path, names: Iterable[str], subdirs: Iterable[str] = ("", "data")
) -> Path:
    names = list(names)
    for n in names:
        p = find_file(root, n, subdirs)
        if p is not None:
            return p
    raise AdapterError(f"{adapter}: none of {', '.join(names)} found in {root} (or its data/ folder)")


def read_json(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise AdapterError(f"{path}:{n}: not JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise AdapterError(f"{path}:{n}: expected a JSON object per line")
            yield row


def read_table(path: Path) -> list[dict[str, Any]]:
    """JSON (list, or dict of records), JSONL, CSV/TSV or parquet rows as dicts."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return list(read_jsonl(path))
    if suffix == ".json":
        data = read_json(path)
        if isinstance(data, dict):
            # {"id": {...}} (MM-SafetyBench style) or {"data": [...]}
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(data) == 1 and lists:
                return list(lists[0])
            return [
                dict(v, _key=k) if isinstance(v, dict) else {"_key": k, "value": v} for k, v in data.items()
            ]
        if not isinstance(data, list):
            raise AdapterError(f"{path}: expected a JSON list of records")
        return list(data)
    if suffix in (".csv", ".tsv"):
        with path.open(encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise AdapterError(f"{path}: unsupported file type {suffix!r} (json, jsonl, csv, tsv, parquet)")


def resolve_image(rel: str, *bases: Path) -> str:
    """Absolute path of an image named relative to one of `bases` (first that exists, else the first)."""
    p = Path(rel)
    if p.is_absolute():
        return str(p)
    candidates = [b / rel for b in bases]
    for c in candidates:
        if c.is_file():
            return str(c.resolve())
    return str(candidates[0].absolute())


# --- labels ----------------------------------------------------------------------------------------

_UNSAFE = {"unsafe", "harmful", "risky", "toxic", "1", "true", "yes", "y", "u", "unsafe_input", "dangerous"}
_SAFE = {"safe", "benign", "harmless", "control", "0", "false", "no", "n", "s", "safe_input"}


def parse_label(value: Any, *, invert: bool = False) -> Label:
    """Flexible label parsing: strings (unsafe/harmful/1/true... vs safe/benign/0/false...), bools and
    0/1 numbers mean *unsafe is truthy*; `invert=True` for columns that say whether a row is safe."""
    if isinstance(value, bool):
        unsafe = value
    elif isinstance(value, (int, float)):
        unsafe = value >= 0.5
    else:
        s = str(value).strip().lower()
        if s in _UNSAFE:
            unsafe = True
        elif s in _SAFE:
            unsafe = False
        else:
            raise AdapterError(f"cannot read a safety label from {value!r}")
    if invert:
        unsafe = not unsafe
    return "unsafe" if unsafe else "safe"


def first_key(row: Mapping[str, Any], keys: Iterable[str]) -> str | None:
    """The first of `keys` present (case-insensitive) with a non-empty value."""
    lower = {k.lower(): k for k in row}
    for k in keys:
        real = lower.get(k.lower())
        if real is not None and row[real] not in (None, ""):
            return real
    return None


# --- Hugging Face ----------------------------------------------------------------------------------


def is_hf_id(spec: str) -> bool:
    return bool(HF_ID.match(spec)) and not Path(spec).exists()


def strip_hf(spec: str) -> str:
    return spec[3:] if spec.startswith("hf:") else spec


def cache_root() -> Path:
    return Path(os.environ.get("RMSKIT_CACHE", Path.home() / ".cache" / "rmskit")) / "benchmarks"


def load_hf(dataset_id: str, config: str | None = None, split: str | None = None) -> Any:
    """`datasets.load_dataset` (honours HF_HUB_OFFLINE and the local HF cache)."""
    from datasets import load_dataset

    return load_dataset(dataset_id, config, split=split)


def materialize_image(image: Any, dataset_id: str, key: str) -> str:
    """Save an HF `Image` feature value (PIL image or {"bytes","path"} dict) under the rmskit cache and
    return its path, so that HF rows and local releases look the same to the judge."""
    from PIL import Image

    d = cache_root() / re.sub(r"[^\w.-]+", "_", dataset_id)
    d.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha1(key.encode()).hexdigest()[:16]
    if isinstance(image, dict):
        if image.get("bytes"):
            out = d / f"{name}.bin"
            if not out.exists():
                out.write_bytes(image["bytes"])
            return str(out)
        if image.get("path"):
            return str(image["path"])
        raise AdapterError(f"{dataset_id}: row {key} has an empty image")
    if isinstance(image, Image.Image):
        out = d / f"{name}.png"
        if not out.exists():
            image.convert("RGB").save(out)
        return str(out)
    if isinstance(image, str):
        return image
    raise AdapterError(f"{dataset_id}: row {key}: unsupported image value {type(image).__name__}")


def snapshot(dataset_id: str) -> Path:
    """Fetch a release-style HF dataset repo (metadata JSON + image archives) and unpack its archives
    into a writable folder under the rmskit cache; returns that folder, laid out like the release."""
    import shutil
    import tarfile
    import zipfile

    from huggingface_hub import snapshot_download

    src = Path(snapshot_download(repo_id=dataset_id, repo_type="dataset"))
    dst = cache_root() / re.sub(r"[^\w.-]+", "_", dataset_id) / "release"
    marker = dst / ".unpacked"
    if marker.exists():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.rglob("*"):
        if not f.is_file():
            continue
        rel = f.relative_to(src)
        if f.suffix == ".zip":
            with zipfile.ZipFile(f) as z:
                z.extractall(dst / rel.parent)
        elif f.name.endswith((".tar", ".tar.gz", ".tgz")):
            with tarfile.open(f) as t:
                t.extractall(dst / rel.parent, filter="data")
        else:
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            if not (dst / rel).exists():
                try:
                    os.symlink(f.resolve(), dst / rel)
                except OSError:
                    shutil.copy2(f, dst / rel)
    marker.write_text("ok")
    return dst


# --- flexible column mapping (RMS2, generic) ------------------------------------------------------

COLUMN_GUESSES: dict[str, tuple[str, ...]] = {
    "id": ("id", "sample_id", "uid", "question_id", "idx", "_key"),
    "image": (
        "image",
        "image_path",
        "img",
        "img_path",
        "image_file",
        "file_name",
        "filename",
        "images",
        "image_name",
    ),
    "query": ("query", "question", "instruction", "prompt", "text", "user_query", "request"),
    "response": ("response", "answer", "output", "reference_answer", "chosen", "guidance"),
    "label": (
        "label",
        "safety_label",
        "is_unsafe",
        "unsafe",
        "harmful",
        "is_harmful",
        "risky",
        "risk_label",
        "final_label",
    ),
    "safe": ("safe", "is_safe"),
    "category": (
        "category",
        "harm_category",
        "risk_category",
        "hazard_category",
        "type",
        "class1",
        "scenario",
    ),
}


def rows_to_samples(
    rows: list[dict[str, Any]],
    *,
    source: str,
    base: Path,
    columns: Mapping[str, str] | None = None,
    label_default: Label | None = None,
    embedded_key: str | None = None,
) -> list[BenchSample]:
    """Map free-form rows to samples: `columns` names the column for each field (id, image, query,
    response, label, safe, category; `image` may list several columns joined by commas); fields not
    named are guessed from common column names. Embedded images (bytes / PIL) are cached to files."""
    if not rows:
        return []
    columns = dict(columns or {})
    keys = set().union(*(r.keys() for r in rows[:50]))
    probe = {k: next((r[k] for r in rows if r.get(k) not in (None, "")), None) for k in keys}

    def col(field: str) -> str | None:
        if field in columns:
            return columns[field]
        return first_key(probe, COLUMN_GUESSES[field])

    q_col, l_col, s_col = col("query"), col("label"), None if "label" in columns else col("safe")
    if q_col is None:
        raise AdapterError(
            f"{source}: no query column (looked for {', '.join(COLUMN_GUESSES['query'])}); "
            "name it with a column map, e.g. query=my_column"
        )
    if l_col is None and s_col is None and label_default is None:
        raise AdapterError(f"{source}: no label column; name it with a column map, e.g. label=my_column")
    img_cols = [c.strip() for c in (columns.get("image") or col("image") or "").split(",") if c.strip()]
    id_col, r_col, c_col = col("id"), col("response"), col("category")
    out: list[BenchSample] = []
    for i, row in enumerate(rows):
        sid = str(row[id_col]) if id_col and row.get(id_col) not in (None, "") else str(i)
        images: list[str] = []
        for c in img_cols:
            v = row.get(c)
            for item in v if isinstance(v, list) else [v]:
                if item in (None, ""):
                    continue
                if isinstance(item, str):
                    images.append(resolve_image(item, base))
                else:
                    images.append(materialize_image(item, embedded_key or source, f"{sid}:{c}:{len(images)}"))
        if l_col is not None and row.get(l_col) not in (None, ""):
            label = parse_label(row[l_col])
        elif s_col is not None and row.get(s_col) not in (None, ""):
            label = parse_label(row[s_col], invert=True)
        elif label_default is not None:
            label = label_default
        else:
            raise AdapterError(f"{source}: row {sid} has no label")
        out.append(
            BenchSample(
                id=sid,
                images=images,
                query=str(row[q_col]),
                response=str(row[r_col]) if r_col and row.get(r_col) not in (None, "") else None,
                label=label,
                category=str(row[c_col]) if c_col and row.get(c_col) not in (None, "") else "uncategorized",
                source=source,
                split=str(row["split"]) if row.get("split") else None,
            )
        )
    return out
