"""Conversation formats for fine-tuning frameworks.

- llava: LLaVA conversation JSON, read by LLaVA, ms-swift and LLaMA-Factory (sharegpt formatting with
  the default from/value tags): [{"id", "image", "conversations": [{"from": "human", "value":
  "<image>\\n..."}, {"from": "gpt", "value": ...}]}]
- sharegpt: LLaMA-Factory's multimodal ShareGPT (as its mllm_demo.json): {"messages": [{"role": "user",
  "content": "<image>..."}, {"role": "assistant", ...}], "images": [...]}

Both write train.json / test.json, images/ beside them (paths are relative to the folder, which
LLaMA-Factory uses as its dataset_dir / media_dir) and a dataset_info.json registering both splits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from rmskit.records import Sample

ConvoFormat = Literal["llava", "sharegpt"]


def llava_record(s: Sample) -> dict[str, Any]:
    return {
        "id": s.id,
        "image": s.image,
        "conversations": [
            {"from": "human", "value": f"<image>\n{s.query}"},
            {"from": "gpt", "value": s.response},
        ],
    }


def sharegpt_record(s: Sample) -> dict[str, Any]:
    return {
        "id": s.id,
        "messages": [
            {"role": "user", "content": f"<image>{s.query}"},
            {"role": "assistant", "content": s.response},
        ],
        "images": [s.image],
    }


def dataset_info(fmt: ConvoFormat, files: dict[str, str], name: str = "rmskit") -> dict[str, Any]:
    """LLaMA-Factory dataset_info.json entries (`{name}_train`, `{name}_test`)."""
    if fmt == "llava":
        entry: dict[str, Any] = {
            "formatting": "sharegpt",
            "columns": {"messages": "conversations", "images": "image"},
            "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"},
        }
    else:
        entry = {
            "formatting": "sharegpt",
            "columns": {"messages": "messages", "images": "images"},
            "tags": {
                "role_tag": "role",
                "content_tag": "content",
                "user_tag": "user",
                "assistant_tag": "assistant",
            },
        }
    return {f"{name}_{split}": {"file_name": fname, **entry} for split, fname in files.items()}


def write_conversations(samples: list[Sample], fmt: ConvoFormat, out: Path) -> list[str]:
    """Write <out>/train.json, <out>/test.json and <out>/dataset_info.json; returns the file names."""
    make = llava_record if fmt == "llava" else sharegpt_record
    files: dict[str, str] = {}
    for split in ("train", "test"):
        recs = [make(s) for s in samples if s.split == split]
        fname = f"{split}.json"
        (out / fname).write_text(json.dumps(recs, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        files[split] = fname
    info = json.dumps(dataset_info(fmt, files), indent=2)
    (out / "dataset_info.json").write_text(info + "\n", encoding="utf-8")
    return [*files.values(), "dataset_info.json"]
