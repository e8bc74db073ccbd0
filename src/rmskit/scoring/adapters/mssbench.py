"""MSSBench — Multimodal Situational Safety (Zhou et al., ICLR 2025; HF `kzhou35/mssbench`).

Release layout: `combined.json` (older copies: `combine.json`) beside `chat/` and `embodied/` image
folders. `{"chat": [{"safe_image_path", "unsafe_image_path", "intent", "queries": [...], "Type",
"unsafe_image"}], "embodied": [{"task", "category", "safe", "unsafe", "safe_instruction(s)",
"unsafe_instruction(s)", ...}]}`.

Label semantics (paired situations): the same request is **safe** with the safe image and **unsafe**
with the unsafe image. Chat: each query yields one safe and one unsafe sample. Embodied: the i-th
safe instruction with the safe image is safe; the i-th unsafe instruction with the unsafe image is
unsafe. Category: chat `Type`, embodied `category`. Option `tasks` = "chat", "embodied" or both."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rmskit.scoring.adapters.base import (
    AdapterError,
    BaseAdapter,
    read_json,
    require_file,
    resolve_image,
    snapshot,
)
from rmskit.scoring.sample import BenchSample, Label


def _as_list(v: Any) -> list[str]:
    if v is None:
        return []
    return [str(x) for x in v] if isinstance(v, list) else [str(v)]


class MSSBench(BaseAdapter):
    name = "mssbench"
    title = "MSSBench (combined.json + chat/ embodied/), paired safe/unsafe situations"
    hf_id = "kzhou35/mssbench"
    markers = ("combined.json", "combine.json")

    def read_local(self, root: Path, split: str | None, options: Mapping[str, Any]) -> list[BenchSample]:
        meta = require_file(self.name, root, ["combined.json", "combine.json"])
        data = read_json(meta)
        if not isinstance(data, dict) or not ({"chat", "embodied"} & data.keys()):
            raise AdapterError(f"mssbench: {meta} should hold {{'chat': [...], 'embodied': [...]}}")
        tasks = str(options.get("tasks", "chat,embodied")).split(",")
        base = meta.parent
        out: list[BenchSample] = []
        if "chat" in tasks:
            for i, d in enumerate(data.get("chat", [])):
                safe_img = resolve_image(d["safe_image_path"], base / "chat", base)
                unsafe_img = resolve_image(d["unsafe_image_path"], base / "chat", base)
                cat = d.get("Type") or d.get("category") or "uncategorized"
                for j, q in enumerate(_as_list(d.get("queries")) or _as_list(d.get("intent"))):
                    pairs: tuple[tuple[Label, str], ...] = (("safe", safe_img), ("unsafe", unsafe_img))
                    for label, img in pairs:
                        out.append(
                            BenchSample(
                                id=f"chat{i}.{j}.{label}",
                                images=[img],
                                query=q,
                                label=label,
                                category=cat,
                                source=self.name,
                                kind="chat",
                            )
                        )
        if "embodied" in tasks:
            for i, d in enumerate(data.get("embodied", [])):
                safe_img = resolve_image(d["safe"], base / "embodied", base)
                unsafe_img = resolve_image(d["unsafe"], base / "embodied", base)
                cat = d.get("category") or d.get("Type") or "uncategorized"
                safe_q = _as_list(d.get("safe_instructions")) or _as_list(d.get("safe_instruction"))
                unsafe_q = _as_list(d.get("unsafe_instructions")) or _as_list(d.get("unsafe_instruction"))
                sides: tuple[tuple[Label, str, list[str]], ...] = (
                    ("safe", safe_img, safe_q),
                    ("unsafe", unsafe_img, unsafe_q),
                )
                for label, img, queries in sides:
                    out.extend(
                        BenchSample(
                            id=f"emb{i}.{j}.{label}",
                            images=[img],
                            query=q,
                            label=label,
                            category=cat,
                            source=self.name,
                            kind="embodied",
                        )
                        for j, q in enumerate(queries)
                    )
        return out

    def read_hf(self, dataset_id: str, split: str | None, options: Mapping[str, Any]) -> list[BenchSample]:
        return self.read_local(snapshot(dataset_id), split, options)
