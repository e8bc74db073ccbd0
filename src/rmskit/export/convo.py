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
from collections.abc import Callable, Iterable
from contextlib import ExitStack
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


def write_split_arrays(
    samples: Iterable[Sample], make: Callable[[Sample], dict[str, Any]], out: Path
) -> dict[str, str]:
    """train.json and test.json in one pass, a record at a time (the text `json.dumps(records,
    indent=1)` gives, without holding the records); returns split -> file name."""
    files = {split: f"{split}.json" for split in ("train", "test")}
    with ExitStack() as stack:
        fhs = {sp: stack.enter_context((out / f).open("w", encoding="utf-8")) for sp, f in files.items()}
        started: set[str] = set()
        for s in samples:
            fh = fhs.get(s.split or "")
            if fh is None:
                continue
            text = json.dumps(make(s), ensure_ascii=False, indent=1).replace("\n", "\n ")
            fh.write((",\n " if s.split in started else "[\n ") + text)
            started.add(str(s.split))
        for sp, fh in fhs.items():
            fh.write("\n]\n" if sp in started else "[]\n")
    return files


def write_conversations(samples: Iterable[Sample], fmt: ConvoFormat, out: Path) -> list[str]:
    """Write <out>/train.json, <out>/test.json and <out>/dataset_info.json; returns the file names."""
    files = write_split_arrays(samples, llava_record if fmt == "llava" else sharegpt_record, out)
    info = json.dumps(dataset_info(fmt, files), indent=2)
    (out / "dataset_info.json").write_text(info + "\n", encoding="utf-8")
    return [*files.values(), "dataset_info.json"]
