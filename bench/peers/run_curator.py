"""bespokelabs-curator as a peer client (runs inside its own venv). Job a: one `LLM` over the
images. Job b: the chain as chained `LLM` calls over the dataset, each stage's output dataset the
next stage's input (curator's idiom; each stage finishes before the next starts); the rows whose query
failed a check go through compose and the checks again, as a smaller dataset, before the rows that
passed get their responses."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import tiktoken  # noqa: E402
from common import (  # noqa: E402
    MAX_ROUNDS,
    QUERY_STAGES,
    STAGES,
    chain_levels,
    cpu_now,
    image_paths,
    query_failed,
    report,
    user_text,
)


class _ApproxEncoding:
    """tiktoken's cl100k file is downloaded at first use, and this machine is offline: curator only
    uses it to estimate tokens for its rate limiter, so ~4 characters per token stands in."""

    def encode(self, text: str, **_: Any) -> list[int]:
        return [0] * (len(text) // 4 + 1)


tiktoken.get_encoding = lambda *_a, **_k: _ApproxEncoding()  # type: ignore[assignment]
tiktoken.encoding_for_model = lambda *_a, **_k: _ApproxEncoding()  # type: ignore[assignment]

from bespokelabs import curator  # noqa: E402


def stage_llm(name: str, schema: Any, system: str) -> curator.LLM:
    class Stage(curator.LLM):
        response_format = schema

        def prompt(self, row: dict[str, Any]) -> Any:
            # curator 0.1.31 cannot mix system_prompt with a multimodal prompt (it tries to unpack
            # the system message as multimodal), so the stage instruction leads the user text.
            return (f"{system}\n\n{user_text(name, row)}", curator.types.Image(url=row["image"]))

        def parse(self, row: dict[str, Any], response: Any) -> dict[str, Any]:
            return {**row, name: json.dumps(response.model_dump())}

    cap = int(os.environ["PEER_CONCURRENCY"])
    return Stage(
        model_name="gpt-4o-mini",
        backend="openai",
        generation_params={"max_tokens": 256},
        backend_params={
            "base_url": os.environ["PEER_BASE_URL"],
            "api_key": "sk-bench",
            "max_concurrent_requests": cap,
            "max_requests_per_minute": 1_000_000,
            "max_tokens_per_minute": 1_000_000_000,
            "require_all_responses": False,
        },
    )


def chain(llms: dict[str, curator.LLM], rows: list[dict[str, Any]]) -> tuple[Any, int]:
    """Job b: perceive and discover, rounds of compose + checks over the rows still failing, then
    respond and the response check over the rows that passed. Also the deepest chain of dependent
    calls a row went through (`chain_levels`)."""
    data: Any = rows
    for name in ("perceive", "discover"):
        data = llms[name](data).dataset
    passed: list[dict[str, Any]] = []
    levels = 0
    for k in range(MAX_ROUNDS):
        for name in QUERY_STAGES:
            data = llms[name](data).dataset
        todo = []
        for row in data:
            why = query_failed(row)
            (todo if why else passed).append({**row, "failed": why})
        levels = chain_levels(k + 1, len(todo) < len(data))  # a row that passed this round responds
        if not todo:
            break
        data = todo
    data = passed
    for name in ("respond", "check_response"):
        if data:
            data = llms[name](data).dataset
    return data, levels


def main() -> None:
    job = sys.argv[1]
    rows: list[dict[str, Any]] = [{"image": p} for p in image_paths()]
    if job == "b":
        rows = [{**r, "failed": ""} for r in rows]
    stages = STAGES[:1] if job == "a" else STAGES
    llms = {s[0]: stage_llm(*s) for s in stages}
    setup = cpu_now()
    t0 = time.time()
    extra: dict[str, Any] = {"t_job_start": t0}
    if job == "a":
        data = llms["perceive"](rows).dataset
    else:
        data, extra["chain_levels"] = chain(llms, rows)
    report("curator", job, setup, {"items": len(data), **extra})


if __name__ == "__main__":
    main()
