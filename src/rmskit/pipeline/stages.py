"""The build stages: perceive -> discover -> compose -> verify -> respond, for one image.

`run_stage(name, inputs, caller)` is every stage as a plain async function: it renders the stage's
versioned prompt (from the registry), attaches the image when the stage sees it and the model has
vision (a text-only model gets the perception record instead), and returns the parsed output. It
needs no ledger: `DirectCaller(backend)` runs it in a notebook.

`StageContext` is the ledger-reuse wrapper the runner uses: a stored record is returned without
asking, a new output is stored with its prompt version and model, and requests go through the
ledger-backed request cache."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel

from rmskit.ledger import Ledger
from rmskit.models.base import ImageInput, Message
from rmskit.models.limits import request_priority
from rmskit.pipeline import schemas
from rmskit.pipeline.caller import Caller, StageFailed
from rmskit.pipeline.prompting import render
from rmskit.pipeline.registry import STAGE_RANK, stage
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


class StageCaller(Protocol):
    """What a stage function needs from a model: `Caller.bind(...)` (ledger cache) or `DirectCaller`."""

    model_id: str
    vision: bool

    async def ask(
        self, stage: str, messages: list[Message], schema: type[BaseModel], max_tokens: int | None = None
    ) -> dict[str, Any]: ...


@dataclass
class StageInputs:
    """A stage's inputs: the image (attached only when the stage sees it and the model has vision),
    the perception record (rendered as `perception_json` where the stage uses it) and the other
    template variables. Variables a prompt does not use are ignored."""

    image: ImageInput | None = None
    perception: dict[str, Any] | None = None
    variables: dict[str, Any] = field(default_factory=dict)


def render_stage(name: str, inputs: StageInputs, vision: bool) -> tuple[list[Message], str, type[BaseModel]]:
    """(messages, prompt version, output schema) of stage `name` for these inputs."""
    spec = stage(name)
    images = [inputs.image] if spec.sees_image and vision and inputs.image is not None else []
    variables = dict(inputs.variables)
    if inputs.perception is not None and spec.perception != "never":
        shown = spec.perception == "always" or not images  # the photo itself replaces its description
        variables["perception_json"] = _pj(inputs.perception) if shown else ""
    messages, version = render(name, images=images, **variables)
    return messages, version, spec.output_schema(variables)


async def run_stage(
    name: str, inputs: StageInputs, caller: StageCaller, max_tokens: int | None = None
) -> dict[str, Any]:
    """Run one stage: render, ask, return the parsed output (raises StageFailed)."""
    messages, _, schema = render_stage(name, inputs, caller.vision)
    cap = max_tokens if max_tokens is not None else stage(name).max_tokens
    token = request_priority.set(STAGE_RANK[name])  # early stages first when requests queue
    try:
        return await caller.ask(name, messages, schema, max_tokens=cap)
    finally:
        request_priority.reset(token)


class StageContext:
    """The ledger-reuse wrapper for one image: stored records are reused, new ones stored."""

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
        self.callers = callers  # by model role
        self.perceive_mode = perceive_mode
        self.image = ImageInput(sha256=rec.sha256, path=Path(rec.path))

    def inputs(self, perception: dict[str, Any] | None = None, **variables: Any) -> StageInputs:
        return StageInputs(image=self.image, perception=perception, variables=variables)

    async def stage(
        self, name: str, key: str, inputs: StageInputs, *, distinct: set[str] | None = None
    ) -> dict[str, Any]:
        """Reuse the stored record or run the stage; store the output with its prompt version.
        A transient failure stores nothing (a re-run asks again); a final one is recorded."""
        stored = self.ledger.get_record(self.rec.sha256, name, key)
        if stored and stored["status"] == "ok":
            return stored["data"]
        caller = self.callers[stage(name).role]
        bound = caller.bind(self.rec.sha256, f"{name}:{key}", distinct)
        version = stage(name).prompt
        try:
            data = await run_stage(name, inputs, bound, self.max_tokens.get(name))
        except StageFailed as exc:
            if not exc.transient:
                self.ledger.put_record(
                    self.rec.sha256, name, key, None, status="failed", error=str(exc),
                    prompt_version=version, model=caller.model_id,
                )  # fmt: skip
            raise
        self.ledger.put_record(
            self.rec.sha256, name, key, data, prompt_version=version, model=caller.model_id
        )
        return data

    async def perceive(self) -> dict[str, Any]:
        """The scene record, from annotations when allowed and present, else from the perceive model.
        Stored once, with its source (provenance of every sample of this image)."""
        stored = self.ledger.get_record(self.rec.sha256, "perceive")
        if stored and stored["status"] == "ok":
            return stored["data"]
        mode = self.perceive_mode
        derived = perception_from_annotation(self.rec) if mode in ("auto", "annotations") else None
        if derived is not None:
            data = {"source": "annotations", **derived}
            self.ledger.put_record(
                self.rec.sha256, "perceive", "", data, prompt_version=None, model="annotations"
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
        bound = caller.bind(self.rec.sha256, "perceive:")
        out = await run_stage(
            "perceive", self.inputs(annotation_hint=hint), bound, self.max_tokens.get("perceive")
        )
        data = {"source": "model", **out}
        self.ledger.put_record(
            self.rec.sha256,
            "perceive",
            "",
            data,
            prompt_version=stage("perceive").prompt,
            model=caller.model_id,
        )
        return data

    async def discover(self, perception: dict[str, Any], plan: dict[str, Any], n: int) -> dict[str, Any]:
        inputs = self.inputs(
            perception,
            taxonomy=plan["taxonomy"],
            underfilled=plan["underfilled"],
            full=plan["full"],
            n_scenarios=n,
        )
        return await self.stage("discover", "", inputs)


def _pj(perception: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in perception.items() if k != "source"}, ensure_ascii=False)


def scenario_for_prompt(scenario: dict[str, Any]) -> dict[str, Any]:
    keys = ("hazard", "trigger_objects", "benign_intent", "harm_type", "severity", "category")
    return {k: scenario[k] for k in keys if k in scenario}
