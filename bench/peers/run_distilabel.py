"""distilabel 1.5.3 as a peer client (runs inside its own venv). The chain is a Pipeline of Tasks,
one per stage, connected `>>`; each Task formats its chat input (image part + the previous
column) and asks OpenAILLM for the stage's JSON schema. distilabel does not validate the answer
against the schema here (its structured_output goes through instructor's tool/JSON modes instead)."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from common import PREV, STAGES, cpu_now, data_url, image_paths, report, user_text  # noqa: E402
from distilabel.models import OpenAILLM  # noqa: E402
from distilabel.pipeline import Pipeline  # noqa: E402
from distilabel.steps import LoadDataFromDicts  # noqa: E402
from distilabel.steps.tasks import Task  # noqa: E402


class StageTask(Task):
    stage: str
    system: str

    @property
    def inputs(self) -> list[str]:
        return ["image"] if self.stage == "perceive" else ["image", PREV.get(self.stage, "compose")]

    @property
    def outputs(self) -> list[str]:
        return [self.stage, "model_name"]

    def format_input(self, input: dict[str, Any]) -> Any:
        content = [
            {"type": "text", "text": user_text(self.stage, input)},
            {"type": "image_url", "image_url": {"url": data_url(input["image"])}},
        ]
        # System content as parts too: distilabel stores raw inputs in an Arrow column, and Arrow
        # cannot mix str and list contents in one column.
        system = [{"type": "text", "text": self.system}]
        return [{"role": "system", "content": system}, {"role": "user", "content": content}]

    def format_output(self, output: str | None, input: dict[str, Any] | None = None) -> dict[str, Any]:
        return {self.stage: output}


def build(job: str, rows: list[dict[str, Any]]) -> Pipeline:
    cap = int(os.environ["PEER_CONCURRENCY"])
    stages = STAGES[:1] if job == "a" else STAGES
    with Pipeline(name=f"peer-{job}", cache_dir=tempfile.mkdtemp(prefix="distilabel-")) as pipe:
        prev: Any = LoadDataFromDicts(data=rows, batch_size=cap)
        for name, schema, system in stages:
            rf = {"type": "json_schema", "json_schema": {"name": name, "schema": schema.model_json_schema()}}
            llm = OpenAILLM(
                model="gpt-4o-mini",
                base_url=os.environ["PEER_BASE_URL"],
                api_key="sk-bench",
                # OpenAILLM's own response_format only takes {"type": "json_object"}; the JSON-schema
                # format the other peers send goes through extra_body (same request on the wire).
                generation_kwargs={"max_new_tokens": 256, "extra_body": {"response_format": rf}},
            )
            task = StageTask(name=name, stage=name, system=system, llm=llm, input_batch_size=cap)
            prev = prev >> task
    return pipe


def main() -> None:
    job = sys.argv[1]
    rows = [{"image": p} for p in image_paths()]
    pipe = build(job, rows)
    setup = cpu_now()
    t0 = time.time()
    ds = pipe.run(use_cache=False)
    n = len(ds["default"]["train"]) if ds else 0
    report("distilabel", job, setup, {"items": n, "t_job_start": t0})


if __name__ == "__main__":
    main()
