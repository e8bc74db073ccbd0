"""distilabel 1.5.3 as a peer client (runs inside its own venv). The chain is a Pipeline of Tasks,
one per stage, connected `>>`; each Task formats its chat input (image part + the previous
column) and asks OpenAILLM for the stage's JSON schema. distilabel does not validate the answer
against the schema here (its structured_output goes through instructor's tool/JSON modes instead).
A pipeline is a DAG without loops or per-row branches, so the rewrite rounds are pipelines of their
own, run one after another in Python: perceive to the checks over every image; compose and the checks
again over the rows whose query failed, while any do (at most MAX_ROUNDS rounds); respond and the
response check over the rows that passed. (One pipeline with every round unrolled, its later rounds
passing the rows they are not for through, took 118 s instead of ~40: 19 step processes on 2 cores.)"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    MAX_ROUNDS,
    PREV,
    QUERY_STAGES,
    STAGES,
    chain_levels,
    cpu_now,
    data_url,
    image_paths,
    query_failed,
    report,
    user_text,
)
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


def build(name: str, stages: list[str], rows: list[dict[str, Any]]) -> Pipeline:
    """One pipeline: the rows through `stages`, in order."""
    cap = int(os.environ["PEER_CONCURRENCY"])
    by_name = {s[0]: s for s in STAGES}
    with Pipeline(name=name, cache_dir=tempfile.mkdtemp(prefix="distilabel-")) as pipe:
        prev: Any = LoadDataFromDicts(data=rows, batch_size=cap)
        for stage in stages:
            _, schema, system = by_name[stage]
            rf = {"type": "json_schema", "json_schema": {"name": stage, "schema": schema.model_json_schema()}}
            llm = OpenAILLM(
                model="gpt-4o-mini",
                base_url=os.environ["PEER_BASE_URL"],
                api_key="sk-bench",
                # OpenAILLM's own response_format only takes {"type": "json_object"}; the JSON-schema
                # format the other peers send goes through extra_body (same request on the wire).
                generation_kwargs={"max_new_tokens": 256, "extra_body": {"response_format": rf}},
            )
            task = StageTask(name=stage, stage=stage, system=system, llm=llm, input_batch_size=cap)
            prev = prev >> task
    return pipe


def run(name: str, stages: list[str], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows through one pipeline of `stages`, with the columns the next stages read."""
    ds = build(name, stages, rows).run(use_cache=False)
    keep = {"image", "failed", *(s[0] for s in STAGES)}
    return [{k: v for k, v in r.items() if k in keep} for r in ds["default"]["train"]] if ds else []


def chain(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """Job b: perceive to the query checks, rounds of compose + checks over the rows whose query failed,
    then respond and the response check over the rows that passed. Also the deepest chain of dependent
    calls a row went through (`chain_levels`)."""
    todo = run("peer-b", ["perceive", "discover", *QUERY_STAGES], rows)
    passed: list[dict[str, Any]] = []
    levels = 0
    for k in range(MAX_ROUNDS):
        if k:
            todo = run(f"peer-b-round-{k + 1}", list(QUERY_STAGES), todo)
        failed = []
        for row in todo:
            row["failed"] = query_failed(row)
            (failed if row["failed"] else passed).append(row)
        levels = chain_levels(k + 1, len(failed) < len(todo))  # a row that passed this round responds
        if not failed:
            break
        todo = failed
    return (run("peer-b-respond", ["respond", "check_response"], passed) if passed else []), levels


def main() -> None:
    job = sys.argv[1]
    rows: list[dict[str, Any]] = [{"image": p} for p in image_paths()]
    extra: dict[str, Any] = {}
    if job == "a":
        pipe = build("peer-a", ["perceive"], rows)
        setup = cpu_now()
        t0 = time.time()
        ds = pipe.run(use_cache=False)
        n = len(ds["default"]["train"]) if ds else 0
    else:
        setup = cpu_now()
        t0 = time.time()
        done, extra["chain_levels"] = chain([{**r, "failed": ""} for r in rows])
        n = len(done)
    report("distilabel", job, setup, {"items": n, "t_job_start": t0, **extra})


if __name__ == "__main__":
    main()
