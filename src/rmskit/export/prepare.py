"""Read a run directory once and curate it: everything the writers need, with the ledger closed again."""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from rmskit.config import BuildConfig
from rmskit.curate import CurateResult, PhashIndex, apply_review, curate
from rmskit.export import memo
from rmskit.ledger.store import LEDGER_NAME, Ledger
from rmskit.pipeline.pass_rates import pass_rates_by_category
from rmskit.records import Sample

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


class NotARunError(FileNotFoundError):
    """The directory has no ledger."""


# What curation reads of every sample; the rest (response, checks, scenario, ...) is read back from the
# ledger in chunks while writing, so an export never holds every full sample at once.
_LIGHT = ("image_sha256", "kind", "category", "query", "label")
_COLS = ("id", *_LIGHT)
_INTERNED = frozenset(("image_sha256", "kind", "category", "label"))
_CHUNK = 512


@dataclass
class SampleDigest:
    """The dataset card's per-sample counts, gathered in one pass."""

    licenses: Counter[str] = field(default_factory=Counter)
    models: dict[str, Counter[str]] = field(default_factory=dict)  # stage -> model -> n
    prompts: dict[str, Counter[str]] = field(default_factory=dict)  # stage -> prompt version -> n
    risky_categories: Counter[str] = field(default_factory=Counter)

    def add(self, s: Sample | HeldSample) -> None:
        self.licenses[s.license or "unknown"] += 1
        for stage, model in (s.models or {}).items():
            _count(self.models, stage, model)
        for stage, ver in (s.prompt_versions or {}).items():
            _count(self.prompts, stage, ver)
        if s.kind == "risky":
            self.risky_categories[s.category] += 1


def _count(by: dict[str, Counter[str]], key: str, value: str) -> None:
    # a Counter made for a new key only (`setdefault(key, Counter())` made one per stage and sample:
    # ~8 ms of a 400-sample export)
    c = by.get(key)
    if c is None:
        c = by[key] = Counter()
    c[value] += 1


@dataclass(frozen=True, slots=True)
class HeldSample:
    """A kept sample as the dataset pass reads it, made during the run by the finish worker's follower
    (export/memo.py): its samples.jsonl line, Parquet row and the card's counts, so the finish neither
    parses nor validates it again (~15 ms of a 384-sample finish). Used only when it was made from the
    sample now stored, without review edits, with the split and image name curation gives it."""

    id: str
    split: str
    image_sha256: str
    image: str
    license: str | None
    models: dict[str, str] | None
    prompt_versions: dict[str, str] | None
    kind: str
    category: str
    line: str  # the sample's samples.jsonl line
    row: dict[str, Any]  # its Parquet row but the image (the Parquet sink completes it)

    @classmethod
    def of(cls, s: Sample, row: dict[str, Any]) -> HeldSample:
        assert s.split is not None
        return cls(
            s.id,
            s.split,
            s.image_sha256,
            s.image,
            s.license,
            s.models,
            s.prompt_versions,
            s.kind,
            s.category,
            s.model_dump_json(),
            row,
        )

    def model_dump_json(self) -> str:
        return self.line


class KeptSamples:
    """The curated samples in stored order, as `Sample`s read back from the ledger on each pass (the review's
    edits applied again, the curated split set, `image` = "images/<sha><ext>")."""

    def __init__(
        self,
        run_dir: Path,
        split: dict[str, str],
        review: dict[str, dict[str, Any]],
        image_name: Callable[[str], str],
    ) -> None:
        self.run_dir = run_dir
        self._split = split  # id -> split, in stored order
        self._review = review
        self._image_name = image_name
        # sid -> the Parquet row (but its image) made ahead for the sample a pass just yielded from the
        # memo (export/memo.py); the Parquet sink takes it from here
        self.memo_rows: dict[str, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self._split)

    def __iter__(self) -> Iterator[Sample]:
        return self.of_split(None)

    @cached_property
    def digest(self) -> SampleDigest:
        d = SampleDigest()
        for s in self:
            d.add(s)
        return d

    def digesting(self) -> Iterator[Sample | HeldSample]:
        """Every sample once, in stored order, counting the digest on the way (a writer that reads every
        sample anyway saves the card its own pass over the ledger); a sample the finish worker made
        ahead comes as its `HeldSample`."""
        d = SampleDigest()
        for s in self._samples(None, held=True):
            d.add(s)
            yield s
        self.__dict__["digest"] = d  # what the cached property would have computed

    def of_split(self, split: str | None) -> Iterator[Sample]:
        for s in self._samples(split, held=False):
            assert isinstance(s, Sample)
            yield s

    def _samples(self, split: str | None, held: bool) -> Iterator[Sample | HeldSample]:
        ids = [i for i, sp in self._split.items() if split is None or sp == split]
        if not ids:
            return
        with Ledger(self.run_dir, readonly=True) as led:
            for start in range(0, len(ids), _CHUNK):
                chunk = ids[start : start + _CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = dict(led.query(f"SELECT id, data FROM samples WHERE id IN ({marks})", tuple(chunk)))
                for sid in chunk:
                    raw, review = rows[sid], self._review.get(sid)
                    entry = memo.MEMO.take(sid, raw) if memo.MEMO is not None else None
                    if entry is not None and not (review or {}).get("edits"):
                        # made from this very sample (apply_review reads only the edits)
                        h = entry.held
                        if (
                            held
                            and h is not None
                            and h.split == self._split[sid]
                            and h.image == f"images/{self._image_name(h.image_sha256)}"
                        ):
                            yield h
                            continue
                        self.memo_rows[sid] = entry.row
                    s = apply_review(json.loads(raw), review)
                    s["split"] = self._split[sid]
                    yield Sample.model_validate(
                        {**s, "image": f"images/{self._image_name(s['image_sha256'])}"}
                    )


@dataclass
class Prepared:
    run_dir: Path
    result: CurateResult  # `kept`: the curation's light records (id, split, the fields curation reads)
    samples: KeptSamples
    # sha -> normalised image file in the run, as a str: a Path is ~420 bytes more (40 MB at 96k images)
    image_files: dict[str, str]
    meta: dict[str, Any] = field(default_factory=dict)  # config, prompt_versions, dates, probes, ...
    taxonomy: list[dict[str, Any]] = field(default_factory=list)
    usage: dict[str, dict[str, int]] = field(default_factory=dict)
    ingest: dict[str, int] = field(default_factory=dict)  # accepted / refused / done / failed images
    ledger_samples: dict[str, int] = field(default_factory=dict)  # status -> n
    curate_params: dict[str, Any] = field(default_factory=dict)
    prepared_at: float = field(default_factory=time.time)

    def image_name(self, sha: str) -> str:
        return f"{sha}{image_suffix(self.image_files[sha])}"

    def by_split(self, split: str) -> Iterator[Sample]:
        return self.samples.of_split(split)


def image_suffix(path: str | Path) -> str:
    # os.path, not a Path: three calls per kept sample in an export
    suffix = os.path.splitext(path)[1].lower()
    return ".jpg" if suffix == ".jpeg" else (suffix if suffix in _IMAGE_SUFFIXES else ".jpg")


def is_run_dir(path: Path) -> bool:
    return (Path(path) / LEDGER_NAME).is_file()


class _ImageView:
    __slots__ = ("_sha", "_table", "phash")

    def __init__(self, sha: str, phash: str, table: ImageTable) -> None:
        self._sha, self.phash, self._table = sha, phash, table

    @property
    def source_path(self) -> str:
        return self._table.source_path(self._sha)


class ImageTable(Mapping[str, _ImageView]):
    """What curation reads of the available images: sha -> phash held, each view made when read. Its
    source path, which only the reason of a near-duplicate image drop names, is read from the ledger then. Held for every image with
    the record's path (both strs and a tuple), they were 25 MB more traced at the image pass's start at
    96k images, and the finish's peak 294 instead of 271 MB (bench/finish_profile.py)."""

    def __init__(self, phash: dict[str, str], source_path: Callable[[str], str]) -> None:
        self._phash = phash
        self.source_path = functools.lru_cache(maxsize=1024)(source_path)  # a kept image's drops ask again

    def __getitem__(self, sha: str) -> _ImageView:
        return _ImageView(sha, self._phash[sha], self)

    def __contains__(self, sha: object) -> bool:
        return sha in self._phash

    def __iter__(self) -> Iterator[str]:
        return iter(self._phash)

    def __len__(self) -> int:
        return len(self._phash)

    def clear(self) -> None:
        self._phash.clear()


def _available_images(led: Ledger, used: set[str], run_dir: Path) -> tuple[dict[str, str], dict[str, str]]:
    """The used images whose normalised file exists, as sha -> phash, and the files found
    elsewhere than recorded (a moved run directory) as sha -> path; the kept ones' recorded paths are
    read again after curation (`_image_files`), so no path is held for every image through it."""
    rows = led.stream(
        "SELECT sha256, json_extract(data, '$.phash'), json_extract(data, '$.path') FROM images ORDER BY seq"
    )
    phash: dict[str, str] = {}
    moved: dict[str, str] = {}
    for sha, ph, recorded in rows:
        if sha not in used:
            continue
        path = _locate_image(sha, recorded, run_dir)
        if path is None or not _readable_phash(ph):
            continue
        # the interned sha of `_light_samples` (one str per image, not two: 11 MB at 96k images)
        phash[sys.intern(sha)] = ph
        if path != recorded:
            moved[sha] = path
    return phash, moved


def _image_files(led: Ledger, kept: set[str], moved: dict[str, str]) -> dict[str, str]:
    """sha -> normalised image file of each kept image, sorted by sha. A table scan sorted here: reading in
    the primary key's order took 0.38 instead of 0.18 s over 100k images (a row lookup per index entry)."""
    rows = led.stream("SELECT sha256, json_extract(data, '$.path') FROM images")
    return dict(sorted((sha, moved.get(sha, str(recorded))) for sha, recorded in rows if sha in kept))


def _locate_image(sha: str, recorded: object, run_dir: Path) -> str | None:
    """The normalised copy: where the record says, else in this run's images/ (a moved run directory, or a
    record without a usable path: a hand-edited or foreign ledger)."""
    # not a str: os.path.isfile(42) would stat file descriptor 42
    path = recorded if isinstance(recorded, str) and recorded else None
    # os.path, not a Path, for the usual case: pathlib interns every path part, and the interpreter's
    # table of interned strings never shrinks (7.7 MB for 96k image names, held to the worker's end)
    if path is not None and os.path.isfile(path):
        return path
    images = run_dir / "images"
    names = (Path(path).name, f"{sha}.jpg") if path is not None else (f"{sha}.jpg",)
    for candidate in (images / name for name in names):
        if candidate.is_file():
            return str(candidate)
    return None


def _readable_phash(ph: object) -> bool:
    """A hash curation's index can read (`PhashIndex.parse`); an image whose record holds anything else is
    left out as unavailable (its samples dropped with that rule) rather than failing the whole curation."""
    if not isinstance(ph, str):
        return False
    try:
        PhashIndex.parse(ph)
    except ValueError:
        return False
    return True


def curate_params(stored: object) -> dict[str, Any]:
    """Curation's settings from a run's stored config (ledger meta "config"), defaults where unset."""
    config: dict[str, Any] = stored if isinstance(stored, dict) else {}
    fields = BuildConfig.model_fields
    params = {
        k: fields[k].default for k in ("seed", "test_fraction", "phash_distance", "query_dup_threshold")
    }
    params.update({k: config[k] for k in params if config.get(k) is not None})
    return params


@dataclass
class RunFacts:
    """What the dataset card reads of a run besides its samples."""

    meta: dict[str, Any]
    taxonomy: list[dict[str, Any]]
    usage: dict[str, dict[str, int]]
    ingest: dict[str, int]
    ledger_samples: dict[str, int]


def run_facts(led: Ledger) -> RunFacts:
    meta = {
        k: led.get_meta(k)
        for k in (
            "config",
            "prompt_versions",
            "rmskit_version",
            "started_at",
            "finished_at",
            "probes",
            "agreement",
            "prompt_regression",
        )
    }
    meta["pass_rates"] = [r.model_dump(mode="json") for r in pass_rates_by_category(led)]
    counts = led.image_counts()
    return RunFacts(
        meta=meta,
        taxonomy=[{k: v for k, v in t.items() if k != "embedding"} for t in led.taxonomy()],
        usage=led.usage_by_stage(),
        ingest={"accepted": sum(counts.values()), "refused": len(led.rejections()), **counts},
        ledger_samples=led.sample_counts(),
    )


def prepare(run_dir: Path, *, balance: int | None = None) -> Prepared:
    """Read the ledger of `run_dir` and curate it with the run's own config (seed, test fraction,
    dedup thresholds) and the review decisions."""
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise NotARunError(f"{run_dir} is not a run directory (no {LEDGER_NAME})")
    with Ledger(run_dir, readonly=True) as led:
        facts = run_facts(led)
        review = led.review_state()
        raw = _light_samples(led, review)
        # only images whose normalised file exists can be exported; curate drops the others' samples
        phash, moved = _available_images(led, {s["image_sha256"] for s in raw}, run_dir)
        params = curate_params(facts.meta.get("config"))

        def source_path(sha: str) -> str:
            row = led.query("SELECT json_extract(data, '$.source_path') FROM images WHERE sha256=?", (sha,))
            return str(row[0][0])

        images = ImageTable(phash, source_path)
        result = curate(raw, images, review=review, balance=balance, owned=True, **params)
        image_files = _image_files(led, {s["image_sha256"] for s in result.kept}, moved)
    prep = Prepared(
        run_dir=run_dir,
        result=result,
        samples=KeptSamples(run_dir, {}, review, lambda sha: sha),
        image_files=image_files,
        meta=facts.meta,
        taxonomy=facts.taxonomy,
        usage=facts.usage,
        ingest=facts.ingest,
        ledger_samples=facts.ledger_samples,
        curate_params={**params, "balance": balance},
    )
    prep.samples = KeptSamples(run_dir, {s["id"]: s["split"] for s in result.kept}, review, prep.image_name)
    return prep


def _light_samples(led: Ledger, review: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The kept samples' fields curation reads; a sample with review edits is read whole (few, and its
    edit provenance compares every edited field with the original)."""
    cols = ", ".join(f"json_extract(data, '$.{k}')" for k in _LIGHT)
    out: list[dict[str, Any]] = []
    edited = {sid for sid, st in review.items() if st.get("edits")}
    for row in led.stream(f"SELECT id, {cols} FROM samples WHERE status='ok' ORDER BY rowid"):
        # one str object per distinct sha, kind, category and label, not one per row (the worker's
        # curation peak at 96k samples: 419 -> 399 MB)
        light: dict[str, Any] = {
            k: sys.intern(v) if k in _INTERNED and isinstance(v, str) else v
            for k, v in zip(_COLS, row, strict=True)
        }
        if row[0] in edited:
            (data,) = led.query("SELECT data FROM samples WHERE id=?", (row[0],))[0]
            light = {**json.loads(data), "id": row[0]}
        out.append(light)
    return out
