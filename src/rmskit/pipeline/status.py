"""`rmskit status`: what a run directory holds, from its ledger alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rmskit.ledger import Ledger
from rmskit.pipeline.quality import pass_rates_by_category


def run_status(run_dir: Path) -> dict[str, Any]:
    ledger = Ledger(run_dir, readonly=True)
    try:
        counts = ledger.image_counts()
        accepted = sum(counts.values())
        rejections = ledger.rejections()
        usage = ledger.usage_by_stage()
        stages: dict[str, dict[str, Any]] = {}
        for stage, by_status in ledger.stage_counts().items():
            if stage in ("plan", "select"):
                continue
            stages[stage] = {"ok": by_status.get("ok", 0), "failed": by_status.get("failed", 0)}
        for stage, u in usage.items():
            stages.setdefault(stage, {"ok": 0, "failed": 0}).update(u)
        samples = ledger.sample_counts()
        kinds = ledger.kind_counts("ok")
        failures = ledger.failures(limit=20)
        return {
            "images": {
                "total": accepted + len(rejections),
                "accepted": accepted,
                "rejected": len(rejections),
                "done": counts.get("done", 0),
                "failed": counts.get("failed", 0),
                "pending": counts.get("pending", 0),
            },
            "rejected": [{"path": r.path, "reason": r.reason} for r in rejections],
            "failed_images": [
                {"sha256": sha, "path": _path(ledger, sha), "reason": err}
                for sha, err in ledger.failed_images()
            ],
            "stages": stages,
            "samples": samples.get("ok", 0),
            "samples_by_kind": kinds,
            "samples_failed": samples.get("failed", 0),
            "categories": ledger.category_counts(),
            # which hazards the model encodes without leakage (kept / finished, Wilson interval)
            "pass_rates": [r.model_dump(mode="json") for r in pass_rates_by_category(ledger)],
            "agreement": ledger.get_meta("agreement"),  # verifier agreement (--agreement N)
            # per-endpoint request counts when --base-url was repeated (rmskit.models.pool)
            "endpoints": ledger.meta_with_prefix("endpoints:"),
            "dataset": _dataset_counts(Path(run_dir)),
            "recent_errors": [{k: f[k] for k in ("stage", "kind", "message")} for f in failures],
            "started_at": ledger.get_meta("started_at"),
            "finished_at": ledger.get_meta("finished_at"),
        }
    finally:
        ledger.close()


def _path(ledger: Ledger, sha: str) -> str | None:
    rec = ledger.get_image(sha)
    return rec.source_path if rec else None


def _dataset_counts(run_dir: Path) -> dict[str, Any] | None:
    """What the exported dataset holds (after curation and review), when it has been written."""
    path = run_dir / "dataset" / "samples.jsonl"
    if not path.is_file():
        return None
    splits: dict[str, int] = {}
    n = 0
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                n += 1
                split = json.loads(line).get("split") or "none"
                splits[split] = splits.get(split, 0) + 1
    return {"samples": n, "splits": splits}
