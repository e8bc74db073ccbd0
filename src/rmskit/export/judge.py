"""The `judge` export: safety-judge training data, the same items `rmskit score` trains on.

Each record is one (image, query) pair in the multimodal ShareGPT layout LLaMA-Factory and ms-swift
read (`messages` + `images`): the user turn is `<image>` then the versioned guard prompt
(rmskit/scoring/prompts/judge.vN.md) with the query filled in; the assistant turn is the target
verdict, `safe` or `unsafe\\ncategory: <category>`. The response, verdict, category and prompt version
ride along as plain fields for filtering (both frameworks ignore columns they are not told about).

Writes train.json, test.json, images/ and dataset_info.json (entries `rmskit_judge_train/_test`)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rmskit.export.convo import dataset_info, write_split_arrays
from rmskit.records import Sample
from rmskit.scoring.prompts import DEFAULT_PROMPT, judge_turns


def judge_record(s: Sample, version: str = DEFAULT_PROMPT) -> dict[str, Any]:
    user, answer = judge_turns(s.query, s.label, s.category, version)
    return {
        "id": s.id,
        "messages": [
            {"role": "user", "content": f"<image>{user}"},
            {"role": "assistant", "content": answer},
        ],
        "images": [s.image],
        "query": s.query,
        "response": s.response or None,
        "verdict": s.label,
        "category": s.category,
        "kind": s.kind,
        "prompt_version": version,
    }


def write_judge(samples: Iterable[Sample], out: Path, version: str = DEFAULT_PROMPT) -> list[str]:
    """Write <out>/train.json, <out>/test.json and <out>/dataset_info.json; returns the file names."""
    files = write_split_arrays(samples, lambda s: judge_record(s, version), out)
    info = dataset_info("sharegpt", files, name="rmskit_judge")
    (out / "dataset_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return [*files.values(), "dataset_info.json"]
