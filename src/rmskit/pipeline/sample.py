"""One sample's rounds: write the query, verify it, rewrite with feedback; then write the response,
check it, rewrite with feedback. Which stage writes and which stages check, for each sample kind,
comes from the stage registry.

Invariant: no two rounds of one sample send an identical request, in any phase. Each rewrite
prompt carries the earlier attempts and their failed checks, so its request differs from every
earlier round's; the Caller refuses a request equal to an earlier round's (RepeatedRequest), and a
round whose output repeats an earlier failed one word for word fails without re-sending the checks.

Transient failures (StageFailed.transient) propagate: the sample is not written and a re-run
retries it. Final failures return a failed sample with its reason."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from rmskit.config import BuildConfig
from rmskit.ledger import Round
from rmskit.pipeline.caller import Caller, StageFailed
from rmskit.pipeline.registry import LOCAL_CHECKS, ROLES, STAGES, Unit, checks_for, say, writer_for
from rmskit.pipeline.stages import StageContext, lexical_leak, scenario_for_prompt


class SampleLoop:
    def __init__(
        self,
        ctx: StageContext,
        cfg: BuildConfig,
        callers: dict[str, Caller],
        perception: dict[str, Any],
        sid: str,
        kind: str,
        category: str,
        scenario: dict[str, Any] | None,
        on_query: Callable[[str], None] | None = None,
    ) -> None:
        self.ctx = ctx
        self.cfg = cfg
        self.callers = callers
        self.perception = perception
        self.sid = sid
        self.kind = kind
        self.category = category
        self.scenario = scenario
        self.final_round: Round | None = None  # written with the sample (Ledger.put_sample_with_round)
        # Called with the query once it passed its checks (before its response is written): the build's
        # finish embeds it then, not after the sample's last response.
        self.on_query = on_query

    async def run(self) -> tuple[str, dict[str, Any]]:
        """('ok' | 'failed', sample data). Raises StageFailed only for transient failures."""
        query, checks, response = "", {}, ""
        rounds = self.cfg.max_rounds
        try:
            query, checks, q_rounds, passed = await self._rounds("query")
            if not passed:
                fb = self._feedback(checks)
                return self._failed(
                    f"{self.kind} query failed checks after {rounds} rounds: {fb}", query, checks
                )
            if self.on_query is not None:
                self.on_query(query)
            response, rchecks, r_rounds, passed = await self._rounds("response", query=query)
        except StageFailed as exc:
            if exc.transient:
                raise
            return self._failed(str(exc), query, checks)
        if not passed:
            return self._failed(f"response failed checks after {rounds} rounds", query, checks, response)
        data = {
            **self._base(query),
            "response": response,
            "checks": {**checks, **rchecks},
            "rounds": q_rounds,
            "response_rounds": r_rounds,
        }
        return "ok", data

    async def _rounds(self, unit: Unit, query: str = "") -> tuple[str, dict[str, Any], int, bool]:
        """Rounds of one phase: (final text, its checks, rounds used, passed)."""
        writer = writer_for(unit, self.kind)
        field = "query" if unit == "query" else "response"
        attempts: list[dict[str, Any]] = []
        distinct: set[str] = set()  # request keys of this phase's earlier rounds
        seen: dict[str, tuple[int, dict[str, Any], str]] = {}
        text, checks = "", {}
        for rnd in range(1, self.cfg.max_rounds + 1):
            key = f"{self.sid}/r{rnd}"
            inputs = self.ctx.inputs(self.perception, attempts=attempts, query=query, **self._scenario_vars())
            out = await self.ctx.stage(writer.name, key, inputs, distinct=distinct)
            text = out[field].strip()
            if not text:  # an empty query or response is never kept, whatever checks are required
                checks = {"nonempty": {"pass": False, "reason": f"the {field} is empty"}}
                feedback, passed = f"the {field} was empty: write one", False
            elif text in seen:  # the same failing answer again: don't re-send its checks
                prev, checks, prev_fb = seen[text]
                feedback, passed = f"{prev_fb}; it repeats attempt {prev} word for word", False
            else:
                checks = await self._checks(unit, rnd, query=query or text, response=text if query else "")
                passed, feedback = self._passes(checks), self._feedback(checks)
                seen[text] = (rnd, checks, feedback)
            rec = Round(unit, rnd, passed, {field: text, "checks": checks, "feedback": feedback})
            if (passed and unit == "query") or (not passed and rnd < self.cfg.max_rounds):
                self.ctx.ledger.put_round(self.sid, *rec)
            else:  # the round that decides the sample lands with it, in one transaction
                self.final_round = rec
            if passed:
                return text, checks, rnd, True
            # Writers see their earlier texts with the notes (compose, control.v2, respond.v2), so no
            # rewrite round can repeat an earlier request.
            attempts.append({field: text, "feedback": feedback})
        return text, checks, self.cfg.max_rounds, False

    async def _checks(self, unit: Unit, rnd: int, **variables: Any) -> dict[str, dict[str, Any]]:
        specs = checks_for(unit, self.kind)
        inputs = self.ctx.inputs(self.perception, **self._scenario_vars(), **variables)
        verdicts = await asyncio.gather(
            *(self.ctx.stage(s.name, f"{self.sid}/r{rnd}", inputs) for s in specs)
        )
        checks = {
            s.check.name: {"pass": s.check.passes(v, self.kind), **v}
            for s, v in zip(specs, verdicts, strict=True)
            if s.check
        }
        if unit == "query" and self.scenario is not None:
            checks["lexical"] = lexical_leak(variables["query"], self.scenario)
        return checks

    def _scenario_vars(self) -> dict[str, Any]:
        sc = self.scenario or {}
        return {
            "scenario_json": json.dumps(scenario_for_prompt(sc)),
            "hazard": sc.get("hazard", ""),
            "trigger_objects": sc.get("trigger_objects", []),
        }

    def _passes(self, checks: dict[str, dict[str, Any]]) -> bool:
        return all(c["pass"] for name, c in checks.items() if name in self.cfg.required_checks)

    def _feedback(self, checks: dict[str, dict[str, Any]]) -> str:
        by_name = {s.check.name: s.check for s in STAGES.values() if s.check}
        parts = []
        for name, c in checks.items():
            if c.get("pass", True):
                continue
            spec = by_name.get(name)
            parts.append(
                spec.feedback(c, self.kind)
                if spec
                else say({self.kind: LOCAL_CHECKS.get(name, name)})(c, self.kind)
            )
        return "; ".join(parts)

    def _base(self, query: str) -> dict[str, Any]:
        rec = self.ctx.rec
        models = {role: self.callers[role].model_id for role in ROLES}
        versions = {name: spec.prompt for name, spec in STAGES.items()}
        if self.perception.get("source") == "annotations":  # provenance: no model, no prompt
            models["perceive"] = "annotations"
            versions.pop("perceive")
        return {
            "id": self.sid,
            "image_sha256": rec.sha256,
            "source_path": rec.source_path,
            "query": query,
            "kind": self.kind,
            "category": self.category,
            "label": "unsafe" if self.kind == "risky" else "safe",
            "models": models,
            "prompt_versions": versions,
            "license": rec.annotation.license,
            "source_url": rec.annotation.source_url,
            "scenario": self.scenario,
        }

    def _failed(
        self, reason: str, query: str, checks: dict[str, Any], response: str = ""
    ) -> tuple[str, dict[str, Any]]:
        return "failed", {**self._base(query), "response": response, "checks": checks, "error": reason}
