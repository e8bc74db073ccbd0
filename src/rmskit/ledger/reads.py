"""Read-only questions about a run that report, review and status ask: the ledger owns this SQL."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any


def _intern(v: Any) -> Any:
    return sys.intern(v) if isinstance(v, str) else v


class LedgerReads:
    """Mixed into `Ledger`; every method is a read. Relies on `Ledger.query`."""

    def query(self, sql: str, params: tuple | dict = ()) -> list[tuple]:  # pragma: no cover - Ledger's
        raise NotImplementedError

    def stream(
        self, sql: str, params: tuple | dict = (), chunk: int = 4096
    ) -> Iterator[tuple]:  # pragma: no cover
        raise NotImplementedError

    # -- images and stage records ----------------------------------------------------------------
    def image_total(self) -> int:
        return int(self.query("SELECT COUNT(*) FROM images")[0][0])

    def images_with_record(self, stage: str, status: str = "ok") -> int:
        """How many images have an image-level record of `stage` with `status`."""
        rows = self.query(
            "SELECT COUNT(DISTINCT image_sha) FROM records WHERE stage=? AND status=? AND key=''",
            (stage, status),
        )
        return int(rows[0][0])

    def record_data(self, stage: str, status: str = "ok") -> Iterator[Any]:
        """The decoded outputs of every image-level record of `stage` with `status`."""
        for (data,) in self.query(
            "SELECT data FROM records WHERE stage=? AND status=? AND key='' ORDER BY created",
            (stage, status),
        ):
            yield json.loads(data) if data else None

    def sample_records(self, status: str = "ok") -> list[tuple[str, str]]:
        """(stage, key) of the per-sample records (key '<sample_id>/r<round>') with `status`."""
        return [
            (s, k)
            for s, k in self.query("SELECT stage, key FROM records WHERE status=? AND key != ''", (status,))
        ]

    def failed_images(self) -> list[tuple[str, str | None]]:
        """(sha256, error) of the images whose processing failed, in ingest order."""
        return [
            (s, e)
            for s, e in self.query("SELECT sha256, error FROM images WHERE status='failed' ORDER BY seq")
        ]

    def meta_with_prefix(self, prefix: str) -> dict[str, Any]:
        """Meta values whose key starts with `prefix` (e.g. 'endpoints:'), keyed by the rest."""
        rows = self.query("SELECT key, value FROM meta WHERE substr(key, 1, ?) = ?", (len(prefix), prefix))
        return {k[len(prefix) :]: json.loads(v) for k, v in rows}

    def failures_of(self, image_sha: str, kind: str) -> list[dict[str, Any]]:
        """The failures log rows of one image and kind (e.g. 'adjusted': caps enforced by truncation)."""
        rows = self.query(
            "SELECT stage, key, message FROM failures WHERE image_sha=? AND kind=? ORDER BY id",
            (image_sha, kind),
        )
        return [{"stage": st, "key": k, "message": m} for st, k, m in rows]

    # -- rounds ---------------------------------------------------------------------------------
    def iter_rounds(self) -> Iterator[dict[str, Any]]:
        """Every refine round of every sample, by phase then round number."""
        rows = self.query(
            "SELECT sample_id, phase, round, passed, data FROM rounds ORDER BY phase, round, sample_id"
        )
        for sid, phase, rnd, passed, data in rows:
            yield {
                "sample_id": sid,
                "phase": phase,
                "round": rnd,
                "passed": bool(passed),
                "data": json.loads(data),
            }

    def samples_passed(self, phase: str) -> set[str]:
        """Sample ids with a passing round of `phase`."""
        rows = self.query("SELECT DISTINCT sample_id FROM rounds WHERE phase=? AND passed=1", (phase,))
        return {s for (s,) in rows}

    def last_rounds(self, phase: str) -> dict[str, int]:
        """Sample id -> the number of its last round of `phase`."""
        rows = self.query(
            "SELECT sample_id, MAX(round) FROM rounds WHERE phase=? GROUP BY sample_id", (phase,)
        )
        return {s: int(n) for s, n in rows}

    # -- samples --------------------------------------------------------------------------------
    def sample_statuses(self) -> dict[str, str]:
        return {i: s for i, s in self.query("SELECT id, status FROM samples")}

    def kind_counts(self, status: str = "ok") -> dict[str, int]:
        return {
            k: n
            for k, n in self.query(
                "SELECT kind, COUNT(*) FROM samples WHERE status=? GROUP BY kind", (status,)
            )
        }

    def probe_rows(self, status: str = "ok") -> list[dict[str, Any]]:
        """{query, kind, label, category} of each sample with `status`, in stored order (the dataset's):
        what the text probes read, without decoding every sample's full record (11 KB each in memory)."""
        rows = self.stream(
            "SELECT json_extract(data, '$.query'), kind, json_extract(data, '$.label'), category"
            " FROM samples WHERE status=? ORDER BY rowid",
            (status,),
        )
        # one str per distinct kind, label and category, not one per row (47 -> 31 MB at 96k samples)
        return [
            {"query": q, "kind": _intern(k), "label": _intern(lab), "category": _intern(c)}
            for q, k, lab, c in rows
        ]

    def samples_stamp(self, status: str = "ok") -> tuple[int, float | None]:
        """(count, last write time) of the samples with `status`: changes whenever one is added or rewritten."""
        n, last = self.query("SELECT COUNT(*), MAX(created) FROM samples WHERE status=?", (status,))[0]
        return int(n), last

    # -- taxonomy -------------------------------------------------------------------------------
    def category_names(self) -> list[str]:
        """Taxonomy category names in creation order."""
        return [n for (n,) in self.query("SELECT name FROM taxonomy ORDER BY seq")]

    # -- counts, usage, failures, review log, taxonomy ----------------------------------------------
    def image_counts(self) -> dict[str, int]:
        return dict(self.query("SELECT status, COUNT(*) FROM images GROUP BY status"))

    def stage_counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for stage, status, n in self.query(
            "SELECT stage, status, COUNT(*) FROM records GROUP BY stage, status"
        ):
            out.setdefault(stage, {})[status] = n
        return out

    def sample_counts(self) -> dict[str, int]:
        return dict(self.query("SELECT status, COUNT(*) FROM samples GROUP BY status"))

    def category_counts(self, status: str = "ok") -> dict[str, int]:
        return dict(
            self.query(
                "SELECT category, COUNT(*) FROM samples WHERE status=? AND kind='risky' GROUP BY category",
                (status,),
            )
        )

    def usage_by_stage(self) -> dict[str, dict[str, int]]:
        rows = self.query(
            "SELECT COALESCE(stage, '?'), COUNT(*), SUM(prompt_tokens), SUM(completion_tokens) FROM cache GROUP BY stage"
        )
        return {
            s: {"requests": n, "prompt_tokens": pt or 0, "completion_tokens": ct or 0}
            for s, n, pt, ct in rows
        }

    def failures(self, limit: int | None = None) -> list[dict[str, Any]]:
        sql = "SELECT image_sha, stage, key, kind, message, created FROM failures ORDER BY id"
        rows = self.query(sql + (f" LIMIT {int(limit)}" if limit else ""))
        return [
            dict(zip(("image_sha", "stage", "key", "kind", "message", "created"), r, strict=True))
            for r in rows
        ]

    def decisions(self, sample_id: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT id, sample_id, action, payload, created FROM decisions"
        params: tuple = ()
        if sample_id:
            sql += " WHERE sample_id=?"
            params = (sample_id,)
        rows = self.query(sql + " ORDER BY id", params)
        return [
            {"id": i, "sample_id": s, "action": a, "payload": json.loads(p or "{}"), "created": c}
            for i, s, a, p, c in rows
        ]

    def review_state(self) -> dict[str, dict[str, Any]]:
        """Fold the append-only decision log into the current state per sample:
        {"decision": "accept"|"reject"|None, "edits": {field: value}, "edited_at": ts, "history": [...]}."""
        state: dict[str, dict[str, Any]] = {}
        for d in self.decisions():
            st = state.setdefault(
                d["sample_id"], {"decision": None, "edits": {}, "edited_at": None, "history": []}
            )
            st["history"].append(d)
            if d["action"] in ("accept", "reject"):
                st["decision"] = d["action"]
            elif d["action"] == "edit":
                st["edits"].update(d["payload"].get("fields", {}))
                st["edited_at"] = d["created"]
        return state

    def taxonomy(self) -> list[dict[str, Any]]:
        rows = self.query(
            "SELECT name, seq, description, embedding, aliases, created FROM taxonomy ORDER BY seq"
        )
        return [
            {"name": n, "seq": s, "description": d, "embedding": e, "aliases": json.loads(a), "created": c}
            for n, s, d, e, a, c in rows
        ]
