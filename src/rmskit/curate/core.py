"""curate(): review state -> near-duplicate images -> near-duplicate queries -> optional balance -> split.

Samples are taken in the order given, the order the build stored them (the ledger's rowid), and of two
near-duplicates the earlier one is kept: an image ranks by its first sample. Every decision about a
sample then depends only on the samples stored before it, so a build's finish worker can curate and
write the dataset as samples are stored (export/online.py) and the last response leaves it only the
last few (issue 13 §6). Deterministic: the same ledger gives the same result."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

from pydantic import BaseModel, Field

from rmskit.curate.dedup import near_duplicate_images, near_duplicate_queries
from rmskit.curate.split import split_of, unit_hash
from rmskit.records import Sample

EDITABLE = ("query", "response", "category")

# rule names used in `dropped[*].rule` and in the dataset card
RULE_REJECTED = "rejected in review"
RULE_IMAGE_UNAVAILABLE = "image unavailable"
RULE_NEAR_DUP_IMAGE = "near-duplicate image"
RULE_NEAR_DUP_QUERY = "near-duplicate query"
RULE_BALANCE = "category cap"


@dataclass(frozen=True, slots=True)
class Dropped:
    """A sample curation dropped, and why. A slotted dataclass, not a model: a build's templated queries
    can drop most samples, and a pydantic model per drop (its __dict__ and fields-set) held ~40 MB per
    65k drops at the finish, ~9 MB this way; `CurateResult` still validates and dumps it as a model."""

    id: str
    reason: str  # human-readable, names what it duplicates
    rule: str  # one of the RULE_* names, for counting


def unavailable(sid: str, sha: object) -> Dropped:
    return Dropped(
        id=sid,
        rule=RULE_IMAGE_UNAVAILABLE,
        reason=f"image {sha} unavailable (not in the ledger, its record unreadable, or its file missing)",
    )


def near_duplicate_image(sid: str, kept_sha: str, kept_source: str, distance: int) -> Dropped:
    return Dropped(
        id=sid,
        rule=RULE_NEAR_DUP_IMAGE,
        reason=f"near-duplicate image of {kept_sha}/{kept_source} (distance {distance})",
    )


def near_duplicate_query(sid: str, of: str) -> Dropped:
    return Dropped(id=sid, rule=RULE_NEAR_DUP_QUERY, reason=f"near-duplicate query of {of}")


class CurateStats(BaseModel):
    input: int = 0
    kept: int = 0
    dropped_by_rule: dict[str, int] = Field(default_factory=dict)
    edited: int = 0
    images: dict[str, int] = Field(default_factory=dict)  # split -> distinct images
    samples: dict[str, int] = Field(default_factory=dict)  # split -> samples
    by_kind: dict[str, dict[str, int]] = Field(default_factory=dict)  # split -> kind -> n
    by_label: dict[str, dict[str, int]] = Field(default_factory=dict)
    by_category: dict[str, dict[str, int]] = Field(default_factory=dict)


class CurateResult(BaseModel):
    kept: list[dict[str, Any]]  # Sample fields except `image`, with `split` (and `edited`) set
    dropped: list[Dropped]
    stats: CurateStats


@lru_cache(maxsize=1)
def _sample_fields() -> frozenset[str]:
    """`Sample`'s field names but `image` (pydantic's `model_fields` costs ~1 µs per lookup: 20k of
    them per export pass of 400 samples)."""
    return frozenset(Sample.model_fields) - {"image"}


def apply_review(sample: dict[str, Any], state: dict[str, Any] | None) -> dict[str, Any]:
    """The sample with review edits applied and their provenance in `edited`."""
    fields = _sample_fields()
    out = {k: v for k, v in sample.items() if k in fields}
    edits = {k: v for k, v in ((state or {}).get("edits") or {}).items() if k in EDITABLE}
    changed = {k: v for k, v in edits.items() if sample.get(k) != v}
    if changed:
        out["edited"] = {
            "fields": sorted(changed),
            "at": (state or {}).get("edited_at"),
            "original": {k: sample.get(k) for k in sorted(changed)},
        }
        out.update(changed)
    return out


def _nested_counts(kept: list[dict[str, Any]], field: str) -> dict[str, dict[str, int]]:
    out: dict[str, Counter[str]] = {}
    for s in kept:
        out.setdefault(s["split"], Counter())[str(s.get(field))] += 1
    return {split: dict(sorted(c.items())) for split, c in sorted(out.items())}


class ImageInfo(Protocol):
    """What curation reads of an image (an `ImageRecord`, or a view of the export's `ImageTable`)."""

    @property
    def phash(self) -> str: ...
    @property
    def source_path(self) -> str: ...


def curate(
    samples: list[dict[str, Any]],
    images: Mapping[str, ImageInfo],
    *,
    review: dict[str, dict[str, Any]] | None = None,
    seed: int = 0,
    test_fraction: float = 0.1,
    phash_distance: int = 4,
    query_dup_threshold: float = 0.8,
    balance: int | None = None,
    owned: bool = False,
) -> CurateResult:
    """Curate ledger samples (status ok) into the exported set.

    `samples` are in priority order (a build's: the order it stored them). `images` maps sha256 ->
    ImageRecord; of two near-duplicate images the one with the earlier sample is kept and every sample
    of the other is dropped. `review` is
    `Ledger.review_state()`. `balance` caps risky samples per category (seeded choice; controls are not
    capped). Samples whose image is not in `images` are dropped as unavailable. `owned`: the caller
    hands the sample dicts over (the export's light records), so a kept one without review edits is
    used as it is and gets its `split` in place, instead of a copy (96k copies at the end of a 100k
    build), and hands `images` over too: a dict is emptied once the image pass has read it (24 MB fewer
    traced at the query pass on 96k images, ~5 MB of RSS); otherwise the inputs are never changed."""
    dropped: list[Dropped] = []
    review = review or {}

    # 1. review decisions and edits
    live: list[dict[str, Any]] = []
    seen_ids: set[str] = set()
    fields = _sample_fields()
    for raw in samples:
        if raw["id"] in seen_ids:
            raise ValueError(f"duplicate sample id {raw['id']!r}")
        seen_ids.add(raw["id"])
        state = review.get(raw["id"])
        if state and state.get("decision") == "reject":
            dropped.append(Dropped(id=raw["id"], reason="rejected in review", rule=RULE_REJECTED))
            continue
        if raw.get("image_sha256") not in images:
            dropped.append(unavailable(raw["id"], raw.get("image_sha256")))
            continue
        live.append(raw if owned and state is None and raw.keys() <= fields else apply_review(raw, state))
    del seen_ids

    # 2. perceptual near-duplicate images, among images that still have samples, in their first one's order
    ordered = [(sha, images[sha].phash) for sha in dict.fromkeys(s["image_sha256"] for s in live)]
    image_dups = near_duplicate_images(ordered, phash_distance)
    after_images: list[dict[str, Any]] = []
    for s in live:
        hit = image_dups.get(s["image_sha256"])
        if hit is None:
            after_images.append(s)
            continue
        kept_sha, distance = hit
        dropped.append(near_duplicate_image(s["id"], kept_sha, images[kept_sha].source_path, distance))
    # not held through the query pass, the finish's peak (~15 MB at 96k samples)
    del ordered, image_dups, live
    if owned and callable(clear := getattr(images, "clear", None)):
        clear()  # read for the last time: not held through the query pass

    # 3. near-duplicate queries, risky with risky and control with control
    query_dups: dict[str, str] = {}
    for kind in sorted({s.get("kind", "") for s in after_images}):
        group = [(s["id"], str(s.get("query") or "")) for s in after_images if s.get("kind", "") == kind]
        query_dups.update({k: v.of for k, v in near_duplicate_queries(group, query_dup_threshold).items()})
    after_queries: list[dict[str, Any]] = []
    for s in after_images:
        if s["id"] in query_dups:
            dropped.append(near_duplicate_query(s["id"], query_dups[s["id"]]))
        else:
            after_queries.append(s)

    # 4. optional cap per risky category; a seeded order picks which samples stay
    kept: list[dict[str, Any]] = after_queries
    if balance is not None:
        if balance < 1:
            raise ValueError("balance must be >= 1")
        taken: Counter[str] = Counter()
        keep_ids: set[str] = set()
        for s in sorted(after_queries, key=lambda s: (unit_hash(seed, "balance|" + s["id"]), s["id"])):
            if s.get("kind") != "risky":
                keep_ids.add(s["id"])
                continue
            cat = str(s.get("category"))
            if taken[cat] < balance:
                taken[cat] += 1
                keep_ids.add(s["id"])
            else:
                dropped.append(
                    Dropped(
                        id=s["id"],
                        rule=RULE_BALANCE,
                        reason=f"category cap {balance} reached for {cat!r} (balance)",
                    )
                )
        kept = [s for s in after_queries if s["id"] in keep_ids]

    # 5. split by image
    for s in kept:
        s["split"] = split_of(s["image_sha256"], seed=seed, test_fraction=test_fraction)

    return curated(len(samples), kept, dropped)


def curated(n_input: int, kept: list[dict[str, Any]], dropped: list[Dropped]) -> CurateResult:
    """The result of a curation of `n_input` samples (`dropped` sorted here), with its counts."""
    dropped.sort(key=lambda d: d.id)
    stats = CurateStats(input=n_input)
    stats.kept = len(kept)
    stats.dropped_by_rule = dict(sorted(Counter(d.rule for d in dropped).items()))
    stats.edited = sum(1 for s in kept if s.get("edited"))
    stats.samples = dict(sorted(Counter(s["split"] for s in kept).items()))
    stats.images = dict(
        sorted(Counter(split for split, _ in {(s["split"], s["image_sha256"]) for s in kept}).items())
    )
    stats.by_kind = _nested_counts(kept, "kind")
    stats.by_label = _nested_counts(kept, "label")
    stats.by_category = _nested_counts(kept, "category")
    # built as is: validating would copy every kept dict (18 MB at 55k samples), and they are
    # already checked records of this module
    return CurateResult.model_construct(kept=kept, dropped=dropped, stats=stats)
