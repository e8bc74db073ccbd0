"""Read a run directory once and curate it: everything the writers need, with the ledger closed again."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rmskit.config import BuildConfig
from rmskit.curate import CurateResult, curate
from rmskit.ledger.store import LEDGER_NAME, Ledger
from rmskit.pipeline.quality import pass_rates_by_category
from rmskit.records import ImageRecord, Sample

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


class NotARunError(FileNotFoundError):
    """The directory has no ledger."""


@dataclass
class Prepared:
    run_dir: Path
    result: CurateResult
    samples: list[Sample]  # kept samples, `image` = "images/<sha><ext>" (relative to the export root)
    image_files: dict[str, Path]  # sha -> normalised image file in the run
    image_records: dict[str, ImageRecord]  # sha -> record, for kept samples' images
    meta: dict[str, Any] = field(default_factory=dict)  # config, prompt_versions, dates, probes, ...
    taxonomy: list[dict[str, Any]] = field(default_factory=list)
    usage: dict[str, dict[str, int]] = field(default_factory=dict)
    ingest: dict[str, int] = field(default_factory=dict)  # accepted / refused / done / failed images
    ledger_samples: dict[str, int] = field(default_factory=dict)  # status -> n
    curate_params: dict[str, Any] = field(default_factory=dict)
    prepared_at: float = field(default_factory=time.time)

    def image_name(self, sha: str) -> str:
        return f"{sha}{image_suffix(self.image_files[sha])}"

    def by_split(self, split: str) -> list[Sample]:
        return [s for s in self.samples if s.split == split]


def image_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    return ".jpg" if suffix == ".jpeg" else (suffix if suffix in _IMAGE_SUFFIXES else ".jpg")


def is_run_dir(path: Path) -> bool:
    return (Path(path) / LEDGER_NAME).is_file()


def _locate_image(rec: ImageRecord, run_dir: Path) -> Path | None:
    """The normalised copy: where the record says, else in this run's images/ (a moved run directory)."""
    recorded = Path(rec.path)
    if recorded.is_file():
        return recorded
    for candidate in (run_dir / "images" / recorded.name, run_dir / "images" / f"{rec.sha256}.jpg"):
        if candidate.is_file():
            return candidate
    return None


def _config_defaults() -> dict[str, Any]:
    fields = BuildConfig.model_fields
    return {k: fields[k].default for k in ("seed", "test_fraction", "phash_distance", "query_dup_threshold")}


def prepare(run_dir: Path, *, balance: int | None = None) -> Prepared:
    """Read the ledger of `run_dir` and curate it with the run's own config (seed, test fraction,
    dedup thresholds) and the review decisions."""
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise NotARunError(f"{run_dir} is not a run directory (no {LEDGER_NAME})")
    with Ledger(run_dir, readonly=True) as led:
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
        raw = list(led.iter_samples("ok"))
        records = {rec.sha256: rec for rec in led.iter_images()}
        review = led.review_state()
        taxonomy = [{k: v for k, v in t.items() if k != "embedding"} for t in led.taxonomy()]
        usage = led.usage_by_stage()
        counts = led.image_counts()
        ingest = {"accepted": sum(counts.values()), "refused": len(led.rejections()), **counts}
        ledger_samples = led.sample_counts()
    stored = meta.get("config")
    config: dict[str, Any] = stored if isinstance(stored, dict) else {}
    params = _config_defaults()
    params.update({k: config[k] for k in params if config.get(k) is not None})
    # only images whose normalised file exists can be exported; curate drops the others' samples
    files: dict[str, Path] = {}
    used = {s.get("image_sha256") for s in raw}
    available: dict[str, ImageRecord] = {}
    for sha, rec in records.items():
        if sha not in used:
            continue
        path = _locate_image(rec, run_dir)
        if path is not None:
            files[sha] = path
            available[sha] = rec
    result = curate(raw, available, review=review, balance=balance, **params)
    prep = Prepared(
        run_dir=run_dir,
        result=result,
        samples=[],
        image_files={},
        image_records={},
        meta=meta,
        taxonomy=taxonomy,
        usage=usage,
        ingest=ingest,
        ledger_samples=ledger_samples,
        curate_params={**params, "balance": balance},
    )
    kept_shas = {s["image_sha256"] for s in result.kept}
    prep.image_files = {sha: files[sha] for sha in sorted(kept_shas)}
    prep.image_records = {sha: available[sha] for sha in sorted(kept_shas)}
    prep.samples = [
        Sample.model_validate({**s, "image": f"images/{prep.image_name(s['image_sha256'])}"})
        for s in result.kept
    ]
    return prep
