"""What the review page shows: ledger samples (status ok) folded with the review log, filters, search,
and the detail record of one sample (rounds, perception, scenario, stage records)."""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from rmskit.ledger.store import LEDGER_NAME, Ledger

EDITABLE = ("query", "response", "category")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})
# file names the image route will ever serve: one path component, no leading dot
SAFE_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$")


class Filters(BaseModel):
    """Grid / API filters. Empty strings from an HTML form are dropped before validation."""

    model_config = ConfigDict(extra="ignore")

    category: str | None = Field(None, max_length=200)
    kind: Literal["risky", "control"] | None = None
    label: Literal["safe", "unsafe"] | None = None
    verdict: Literal["pass", "fail"] | None = None
    decision: Literal["accepted", "rejected", "undecided"] | None = None
    q: str | None = Field(None, max_length=500)

    def query_string(self) -> dict[str, str]:
        return {k: v for k, v in self.model_dump().items() if v}


def flatten_checks(checks: Any, prefix: str = "") -> list[dict[str, Any]]:
    """[{name, pass, reason}] from {name: {"pass": bool, "reason": str}} (nested per phase or plain bools
    also accepted, since the check dict is free-form in the sample contract)."""
    out: list[dict[str, Any]] = []
    if not isinstance(checks, dict):
        return out
    for name, val in checks.items():
        full = f"{prefix}{name}"
        if isinstance(val, bool):
            out.append({"name": full, "pass": val, "reason": ""})
        elif isinstance(val, dict) and "pass" in val:
            out.append({"name": full, "pass": bool(val["pass"]), "reason": str(val.get("reason") or "")})
        elif isinstance(val, dict):
            out.extend(flatten_checks(val, prefix=f"{full}."))
    return out


class Snapshot(NamedTuple):
    samples: list[dict[str, Any]]
    state: dict[str, dict[str, Any]]


class ReviewStore:
    """Reads the run for the review app and writes decisions. Sample rows are cached and re-read when
    the samples table changes (the build may still be running); the review log is folded per request."""

    def __init__(self, run_dir: Path, *, read_only: bool = False) -> None:
        self.run_dir = Path(run_dir)
        if not (self.run_dir / LEDGER_NAME).exists():
            raise FileNotFoundError(
                f"no ledger at {self.run_dir / LEDGER_NAME}: is {self.run_dir} a run directory?"
            )
        # write mode holds the run's lock (one writer per run); read-only browsing works beside a build
        self.ledger = Ledger(self.run_dir, readonly=read_only, lock=not read_only)
        self.dataset_dir = self.run_dir / "dataset"
        self.images_dir = self.dataset_dir / "images"
        self._lock = threading.Lock()
        self._key: tuple | None = None
        self._samples: list[dict[str, Any]] = []
        self._by_id: dict[str, dict[str, Any]] = {}
        self._pre: dict[str, tuple[list[dict[str, Any]], str, str]] = {}
        self._img_key: tuple | None = None
        self._img_names: set[str] = set()
        self._img_by_id: dict[str, str] = {}
        self._exported: set[str] | None = None  # ids in dataset/samples.jsonl; None: no export yet

    def close(self) -> None:
        self.ledger.close()

    # -- loading ----------------------------------------------------------------------------------
    def _base_samples(self) -> list[dict[str, Any]]:
        key = self.ledger.samples_stamp("ok")
        with self._lock:
            if key != self._key:
                self._samples = list(self.ledger.iter_samples("ok"))
                self._by_id = {s["id"]: s for s in self._samples}
                # per-sample work that review decisions cannot change, done once per reload
                self._pre = {}
                for smp in self._samples:
                    checks = flatten_checks(smp.get("checks"))
                    verdict = (
                        "pass"
                        if checks and all(c["pass"] for c in checks)
                        else ("fail" if checks else "none")
                    )
                    scenario = smp.get("scenario")
                    sc: dict[str, Any] = scenario if isinstance(scenario, dict) else {}
                    hay = f"{smp['id']} {sc.get('hazard', '')} {sc.get('benign_intent', '')}".casefold()
                    self._pre[smp["id"]] = (checks, verdict, hay)
                self._key = key
            return self._samples

    def _refresh_images(self) -> None:
        """Which image files exist in dataset/images, and the id -> file map from samples.jsonl."""

        def stamp(p: Path) -> float | None:
            try:
                return p.stat().st_mtime_ns
            except OSError:
                return None

        jsonl = self.dataset_dir / "samples.jsonl"
        key = (stamp(self.images_dir), stamp(jsonl))
        if key == self._img_key:
            return
        names: set[str] = set()
        if self.images_dir.is_dir():
            names = {n for n in os.listdir(self.images_dir) if SAFE_NAME.match(n)}
        by_id: dict[str, str] = {}
        exported: set[str] | None = None
        if jsonl.is_file():
            exported = set()
            with jsonl.open(encoding="utf-8") as fh:
                for line in fh:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    exported.add(str(row.get("id")))
                    img = str(row.get("image") or "")
                    head, _, name = img.partition("/")
                    if head == "images" and name in names:
                        by_id[str(row.get("id"))] = name
        with self._lock:
            self._img_names, self._img_by_id, self._img_key = names, by_id, key
            self._exported = exported

    def image_name(self, sample: dict[str, Any]) -> str | None:
        """The file in dataset/images showing this sample, if the export wrote one."""
        name = self._img_by_id.get(sample["id"])
        if name:
            return name
        sha = str(sample.get("image_sha256") or "")
        for suffix in (".jpg", ".jpeg", ".png", ".webp"):
            if f"{sha}{suffix}" in self._img_names:
                return f"{sha}{suffix}"
        return None

    def view(self, sample: dict[str, Any], state: dict[str, Any] | None) -> dict[str, Any]:
        """The sample as the page shows it: edits applied, originals and decision kept beside."""
        state = state or {}
        edits = {k: v for k, v in (state.get("edits") or {}).items() if k in EDITABLE}
        checks, verdict, _ = self._pre[sample["id"]]
        return {
            "id": sample["id"],
            "image_sha256": sample.get("image_sha256"),
            "image": self.image_name(sample),
            "exported": None if self._exported is None else sample["id"] in self._exported,
            "query": edits.get("query", sample.get("query") or ""),
            "response": edits.get("response", sample.get("response") or ""),
            "category": edits.get("category", sample.get("category") or ""),
            "label": sample.get("label") or "",
            "kind": sample.get("kind") or "",
            "checks": checks,
            "verdict": verdict,
            "rounds": sample.get("rounds") or 1,
            "decision": state.get("decision"),
            "edited": sorted(edits),
            "edited_at": state.get("edited_at"),
            "original": {k: sample.get(k) for k in edits},
            "scenario": sample.get("scenario"),
            "models": sample.get("models") or {},
            "prompt_versions": sample.get("prompt_versions") or {},
            "license": sample.get("license"),
            "source_path": sample.get("source_path"),
            "source_url": sample.get("source_url"),
        }

    def snapshot(self) -> Snapshot:
        """The ok samples and the folded review log, read once per request."""
        samples = self._base_samples()
        self._refresh_images()
        return Snapshot(samples, self.ledger.review_state())

    def views(self, samples: list[dict[str, Any]], snap: Snapshot) -> list[dict[str, Any]]:
        return [self.view(s, snap.state.get(s["id"])) for s in samples]

    # -- queries ----------------------------------------------------------------------------------
    def search(self, f: Filters, snap: Snapshot | None = None) -> list[dict[str, Any]]:
        """The raw samples matching `f`, in ledger order; fields a review edit changed are matched on
        their edited value. Views are built only for what a page shows (runs have 10^4-10^5 samples)."""
        snap = snap or self.snapshot()
        words = [w.casefold() for w in (f.q or "").split()]
        want_decision = (
            {"accepted": "accept", "rejected": "reject", "undecided": None}[f.decision] if f.decision else ""
        )
        out = []
        for smp in snap.samples:
            st = snap.state.get(smp["id"]) or {}
            edits = st.get("edits") or {}
            if f.category is not None and edits.get("category", smp.get("category") or "") != f.category:
                continue
            if f.kind and smp.get("kind") != f.kind:
                continue
            if f.label and smp.get("label") != f.label:
                continue
            _, verdict, hay = self._pre[smp["id"]]
            if f.verdict and verdict != f.verdict:
                continue
            if f.decision and st.get("decision") != want_decision:
                continue
            if words:
                text = " ".join(
                    str(edits.get(k, smp.get(k) or "")) for k in ("query", "response", "category")
                ).casefold()
                if not all(w in text or w in hay for w in words):
                    continue
            out.append(smp)
        return out

    def counts(self, snap: Snapshot) -> dict[str, int]:
        decisions = [snap.state.get(s["id"], {}).get("decision") for s in snap.samples]
        return {
            "total": len(snap.samples),
            "accepted": decisions.count("accept"),
            "rejected": decisions.count("reject"),
        }

    def exists(self, sample_id: str) -> bool:
        self._base_samples()
        return sample_id in self._by_id

    def get(self, sample_id: str) -> dict[str, Any] | None:
        self._base_samples()
        self._refresh_images()
        s = self._by_id.get(sample_id)
        if s is None:
            return None
        return self.view(s, self.ledger.review_state().get(sample_id))

    def categories(self, snap: Snapshot | None = None) -> list[str]:
        """Taxonomy names in creation order, then any other category a (possibly edited) sample uses."""
        snap = snap or self.snapshot()
        names = self.ledger.category_names()
        seen = set(names)
        for smp in snap.samples:
            cat = (
                (snap.state.get(smp["id"]) or {}).get("edits", {}).get("category", smp.get("category") or "")
            )
            if cat and cat not in seen:
                seen.add(cat)
                names.append(cat)
        return names

    def detail(self, sample_id: str) -> dict[str, Any] | None:
        """Everything the detail page shows: the sample, every refine round, the image's perception and
        discover records, and the stage records written for this sample (compose/verify/respond...)."""
        v = self.get(sample_id)
        if v is None:
            return None
        sha = v["image_sha256"] or ""
        records = self.ledger.records_for(sha)
        by_stage = {r["stage"]: r for r in records if r["key"] == ""}
        own = [r for r in records if r["key"].startswith(f"{sample_id}/")]
        rounds = self.ledger.rounds(sample_id)
        for r in rounds:
            r["checks"] = flatten_checks((r["data"] or {}).get("checks"))
            r["text"] = (r["data"] or {}).get(r["phase"], "")
            r["feedback"] = (r["data"] or {}).get("feedback", "")
        history = self.ledger.decisions(sample_id)
        for h in history:
            h["payload_json"] = json.dumps(h["payload"], ensure_ascii=False, indent=1)
        for r in own:
            r["data_json"] = json.dumps(r["data"], ensure_ascii=False, indent=1)
        img = self.ledger.get_image(sha)
        return {
            "sample": v,
            "rounds": rounds,
            "perception": by_stage.get("perceive"),
            "discover": by_stage.get("discover"),
            "stage_records": own,
            "history": history,
            "image_record": img.model_dump() if img else None,
        }

    # -- writes (append-only) -----------------------------------------------------------------------
    def decide(self, sample_id: str, decision: str) -> int:
        return self.ledger.add_decision(sample_id, decision, {})

    def edit(self, sample_id: str, fields: dict[str, str]) -> tuple[int | None, dict[str, str]]:
        """Append an edit of the fields that actually change; (decision id or None, changed fields)."""
        current = self.get(sample_id)
        assert current is not None
        changed = {k: v for k, v in fields.items() if k in EDITABLE and current[k] != v}
        if not changed:
            return None, {}
        return self.ledger.add_decision(sample_id, "edit", {"fields": changed}), changed
