"""The build stages: perceive -> discover -> compose -> verify -> respond, for one image.

Each stage renders its versioned prompt, asks its model through the cached Caller, stores its
record in the ledger and returns the parsed output. Stored records are reused on resume, so a
finished stage is never asked again. Text-only models get the perception record instead of pixels."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from rmskit.ledger import Ledger
from rmskit.models.base import ImageInput
from rmskit.pipeline import schemas
from rmskit.pipeline.caller import Caller, StageFailed
from rmskit.pipeline.prompting import prompt_version, render
from rmskit.records import ImageRecord

# Words that name a hazard or harmful outcome outright; a query containing one leaks (cheap
# deterministic check that backs up the model-based leakage check).
HAZARD_WORDS = frozenset(
    """danger dangerous hazard hazardous risk risky unsafe harm harmful injury injure injured hurt
    flammable combustible ignite fire burn burns burning scald explode explosion explosive toxic poison
    poisonous lethal deadly fatal kill die death drown drowning electrocute electrocution shock choke
    choking suffocate fall falling collapse crush sharp cut bleed weapon overdose""".split()
)
_STOP = frozenset(
    """a an the this that these those here there in on at of to for with and or but is are be it its my me
    i you your we our can could would should how what when where which who why do does did get make
    from into near by up down out over under about as so if than then too very just some any all one
    quickly fast best way""".split()
)
_TOKEN = re.compile(r"[a-z]+")


def _words(text: str) -> set[str]:
    return {w[:-1] if len(w) > 3 and w.endswith("s") else w for w in _TOKEN.findall(text.lower())}


def lexical_leak(query: str, scenario: dict[str, Any]) -> dict[str, Any]:
    """Query words that give the hazard away: generic hazard words, or words of the scenario's
    hazard statement that the user's benign intent does not already use."""
    q = _words(query)
    intent = _words(scenario.get("benign_intent", ""))
    hazard_specific = _words(scenario.get("hazard", "")) - intent - _STOP
    hits = sorted(((q & HAZARD_WORDS) | (q & hazard_specific)) - intent)
    return {
        "pass": not hits,
        "leaked_terms": hits,
        "reason": "no hazard words" if not hits else f"query uses hazard words: {', '.join(hits)}",
    }


def sample_id(image_sha: str, kind: str, index: int) -> str:
    return hashlib.sha256(f"{image_sha}|{kind}|{index}".encode()).hexdigest()[:20]


def perception_from_annotation(rec: ImageRecord) -> dict[str, Any] | None:
    """Annotation-grounded perception (the method's 'inspiration dataset' start): captions and
    instance labels become the scene record without asking a model."""
    ann = rec.annotation
    if not ann.captions and not ann.objects:
        return None
    counts = Counter(o.strip().lower() for o in ann.objects if o.strip())
    objects = [
        {"name": name, "attributes": [f"{n} visible" if n > 1 else "one visible"], "affordances": []}
        for name, n in counts.most_common(20)
    ]
    if not objects:  # captions only: keep the record schema-valid, the captions carry the detail
        objects = [{"name": "scene", "attributes": [], "affordances": []}]
    people = [{"description": "person", "activity": "see captions"}] if "person" in counts else []
    captions = [c.strip() for c in ann.captions if c.strip()]
    return schemas.Perception.model_validate(
        {
            "setting": captions[0] if captions else ", ".join(counts),
            "summary": " ".join(captions) if captions else "Objects: " + ", ".join(counts),
            "objects": objects,
            "people": people,
            "visible_text": [],
            "conditions": [],
        }
    ).model_dump()


class StageContext:
    """What every stage of one image needs: the image, the ledger, and a Caller per stage."""

    def __init__(
        self,
        rec: ImageRecord,
        ledger: Ledger,
        callers: dict[str, Caller],
        perceive_mode: str,
        max_tokens: dict[str, int] | None = None,
    ) -> None:
        self.max_tokens = max_tokens or {}
        self.rec = rec
        self.ledger = ledger
        self.callers = callers
        self.perceive_mode = perceive_mode
        self.image = ImageInput(sha256=rec.sha256, path=Path(rec.path))

    def images_for(self, caller: Caller) -> list[ImageInput]:
        return [self.image] if caller.vision else []

    async def run_stage(
        self,
        stage: str,
        prompt: str,
        schema: type,
        key: str = "",
        *,
        record_stage: str | None = None,
        images: list[ImageInput] | None = None,
        max_tokens: int | None = None,
        **variables: Any,
    ) -> dict[str, Any]:
        """Reuse the stored record or ask the model; store the output with its prompt version."""
        rstage = record_stage or prompt
        stored = self.ledger.get_record(self.rec.sha256, rstage, key)
        if stored and stored["status"] == "ok":
            return stored["data"]
        caller = self.callers[stage]
        messages, version = render(prompt, images=images, **variables)
        cap = self.max_tokens.get(prompt)
        if max_tokens is None and cap is not None and cap < caller.params.max_tokens:
            max_tokens = cap
        try:
            data = await caller.ask(
                prompt,
                messages,
                schema,
                image_sha=self.rec.sha256,
                key=f"{rstage}:{key}",
                max_tokens=max_tokens,
            )
        except StageFailed as exc:
            self.ledger.put_record(
                self.rec.sha256,
                rstage,
                key,
                None,
                status="failed",
                error=str(exc),
                prompt_version=version,
                model=caller.model_id,
            )
            raise
        self.ledger.put_record(
            self.rec.sha256, rstage, key, data, prompt_version=version, model=caller.model_id
        )
        return data

    # -- stages ---------------------------------------------------------------------------------
    async def perceive(self) -> dict[str, Any]:
        stored = self.ledger.get_record(self.rec.sha256, "perceive")
        if stored and stored["status"] == "ok":
            return stored["data"]
        mode = self.perceive_mode
        derived = perception_from_annotation(self.rec) if mode in ("auto", "annotations") else None
        if derived is not None:
            data = {"source": "annotations", **derived}
            self.ledger.put_record(
                self.rec.sha256, "perceive", "", data, prompt_version="annotations", model="annotations"
            )
            return data
        if mode == "annotations":
            raise StageFailed("perceive: --perceive annotations, but this image has no captions or instances")
        caller = self.callers["perceive"]
        if not caller.vision:
            raise StageFailed(
                f"perceive: model {caller.model_id} has no vision and the image has no annotations "
                "(give a vision model for perceive, or a source with captions/instances)"
            )
        hint = "; ".join(self.rec.annotation.captions[:3]) if self.rec.annotation.captions else ""
        data = await self.run_stage(
            "perceive", "perceive", schemas.Perception, images=[self.image], annotation_hint=hint
        )
        data = {"source": "model", **data}
        self.ledger.put_record(
            self.rec.sha256,
            "perceive",
            "",
            data,
            prompt_version=prompt_version("perceive"),
            model=caller.model_id,
        )
        return data

    async def discover(self, perception: dict[str, Any], plan: dict[str, Any], n: int) -> dict[str, Any]:
        caller = self.callers["discover"]
        return await self.run_stage(
            "discover",
            "discover",
            schemas.discovery_schema(n),
            images=self.images_for(caller),
            perception_json=_pj(perception),
            taxonomy=plan["taxonomy"],
            underfilled=plan["underfilled"],
            full=plan["full"],
            n_scenarios=n,
        )

    async def compose(
        self, sid: str, rnd: int, perception: dict, scenario: dict, attempts: list[dict]
    ) -> str:
        data = await self.run_stage(
            "compose",
            "compose",
            schemas.ComposedQuery,
            key=f"{sid}/r{rnd}",
            perception_json=_pj(perception),
            scenario_json=json.dumps(_scenario_for_prompt(scenario)),
            attempts=attempts,
        )
        return data["query"].strip()

    async def control_query(self, sid: str, rnd: int, perception: dict, attempts: list[dict]) -> str:
        data = await self.run_stage(
            "compose",
            "control",
            schemas.ControlQuery,
            key=f"{sid}/r{rnd}",
            perception_json=_pj(perception),
            attempts=attempts,
        )
        return data["query"].strip()

    async def check(
        self, name: str, schema: type, sid: str, rnd: int, perception: dict[str, Any], **variables: Any
    ) -> dict[str, Any]:
        """An independent check by the verify model. Only the combined and response checks see the
        image (or, for a text-only verifier, the perception record); the text-only and leakage
        checks must judge the words alone."""
        caller = self.callers["verify"]
        sees_scene = name in ("check_combined", "check_response")
        images = self.images_for(caller) if sees_scene else []
        if sees_scene:
            variables["perception_json"] = "" if images else _pj(perception)
        return await self.run_stage("verify", name, schema, key=f"{sid}/r{rnd}", images=images, **variables)

    async def respond(
        self, sid: str, rnd: int, kind: str, query: str, perception: dict, attempts: list[dict]
    ) -> str:
        caller = self.callers["respond"]
        images = self.images_for(caller)
        prompt = "respond" if kind == "risky" else "respond_control"
        data = await self.run_stage(
            "respond",
            prompt,
            schemas.GuidanceResponse,
            key=f"{sid}/r{rnd}",
            images=images,
            query=query,
            perception_json="" if images else _pj(perception),
            attempts=attempts,
        )
        return data["response"].strip()


def _pj(perception: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in perception.items() if k != "source"}, ensure_ascii=False)


def _scenario_for_prompt(scenario: dict[str, Any]) -> dict[str, Any]:
    keys = ("hazard", "trigger_objects", "benign_intent", "harm_type", "severity", "category")
    return {k: scenario[k] for k in keys if k in scenario}
