"""Prefix KV cache of text models (rmskit.models.prefix_kv): batches that mix stages, in-place decode
cache, one LRU entry per stage. The tiny random SmolLM2 (a real Llama architecture) runs on CPU."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from pydantic import BaseModel, Field

from rmskit.config import BackendConfig
from rmskit.models.base import GenParams, Message

torch = pytest.importorskip("torch")
pytest.importorskip("xgrammar")


class _Note(BaseModel):
    risk: str = Field(max_length=40)
    ok: bool


_SYSTEMS = [
    "You review photos of homes for safety risks. Answer in JSON. Keep every field short. Think about "
    "children, heat, electricity, water, sharp objects and heights before you answer anything.",
    "You check whether a question is harmful on its own, without the photo. Answer in JSON with a short "
    "reason. Questions about everyday objects are usually fine; weapons and poisons are not.",
]
_USERS = [
    "A kitchen; a child reaches for a knife on the counter near a hot pan.",
    "A bathroom with a hair dryer plugged in next to a full bathtub, and a towel on the floor.",
    "Stairs.",
    "How do I clean a kettle?",
    "A balcony with a low railing, a stool next to it and a toddler playing with a ball nearby.",
]


def _requests() -> list[list[Message]]:
    """Five requests of two stages (different system prompts), interleaved as a pipeline sends them."""
    return [
        [Message(role="system", content=_SYSTEMS[i % 2]), Message(role="user", content=u)]
        for i, u in enumerate(_USERS)
    ]


def _run(backend: object, cached: bool, schema: type[BaseModel] | None) -> list[str]:
    from rmskit.models.transformers_local import HFBackend

    assert isinstance(backend, HFBackend)
    backend.prefix_cache = cached
    # Budgets differ per row, as they do per stage.
    params = [GenParams(temperature=0.0, max_tokens=12 + 4 * (i % 2)) for i in range(len(_USERS))]

    async def go() -> list[str]:
        rs = await asyncio.gather(
            *[backend.generate(m, schema=schema, params=p) for m, p in zip(_requests(), params, strict=True)]
        )
        return [r.text for r in rs]

    return asyncio.run(go())


@pytest.fixture(scope="module")
def tiny_smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rmskit.models.tiny import make_tiny

    return make_tiny("smollm2", tmp_path_factory.mktemp("tiny") / "smollm2")


@pytest.mark.parametrize("schema", [None, _Note])
def test_one_batch_mixes_stages_with_their_own_cached_prefix(tiny_smollm2: Path, schema) -> None:
    from rmskit.models.transformers_local import HFBackend

    backend = HFBackend(BackendConfig(spec=f"hf:{tiny_smollm2}", device="cpu", max_batch=8))
    plain = _run(backend, False, schema)
    cached = _run(backend, True, schema)
    entries = list(backend._prefixes)
    sizes = list(backend.stats.sizes)
    asyncio.run(backend.aclose())
    # All five requests (two stages) decode in one batch each time, not one batch per stage.
    assert sizes == [5, 5]
    # One stored entry per stage: each row got its own stage's system prompt from the cache.
    assert len(entries) == 2 and all(len(e) >= backend.prefix_min_tokens for e in entries)
    assert backend.stats.cached_prompt_tokens >= sum(len(e) for e in entries) + len(entries[0])
    assert cached == plain  # greedy: the stacked, left-padded caches change nothing


def test_stage_first_order_and_oldest_first() -> None:
    from rmskit.models.batching import Pending
    from rmskit.models.prefix_kv import take_stage_first

    loop = asyncio.new_event_loop()
    a, b = (Message(role="system", content=s) for s in ("stage a", "stage b"))
    u = Message(role="user", content="x")
    greedy, sampled = GenParams(temperature=0.0), GenParams(temperature=0.7)
    backlog = [
        Pending([b, u], None, greedy, loop.create_future()),  # oldest
        Pending([a, u], None, greedy, loop.create_future()),
        Pending([b, u], None, sampled, loop.create_future()),  # other sampling settings: never mixed
        Pending([b, u], None, greedy, loop.create_future()),
        Pending([a, u], None, greedy, loop.create_future()),
    ]
    loop.close()
    got = take_stage_first(backlog, 8)
    assert [backlog.index(p) for p in got] == [0, 3, 1, 4]  # the head's stage first, then the rest
    assert [backlog.index(p) for p in take_stage_first(backlog, 2)] == [0, 3]


def test_decode_cache_is_preallocated_not_concatenated() -> None:
    from rmskit.models.prefix_kv import _dynamic_cache

    pytest.importorskip("transformers.cache_utils").DynamicLayer  # noqa: B018  (transformers 5)
    from transformers import LlamaConfig

    cfg = LlamaConfig(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, hidden_size=16)
    prefix = [(torch.randn(3, 1, 5, 8), torch.randn(3, 1, 5, 8)) for _ in range(2)]
    bufs = [
        (torch.cat([k, torch.zeros(3, 1, 4, 8)], 2), torch.cat([v, torch.zeros(3, 1, 4, 8)], 2))
        for k, v in prefix
    ]
    cache = _dynamic_cache(bufs, 5, cfg)
    assert cache.get_seq_length() == 5
    ptr = cache.layers[0].keys.data_ptr()
    for step in range(4):  # one decode step: one new token per row
        k, v = torch.full((3, 1, 1, 8), float(step)), torch.full((3, 1, 1, 8), -float(step))
        keys, values = cache.update(k, v, 0)
        assert keys.data_ptr() == ptr  # written in place: no copy of the whole cache per step
    assert cache.layers[0].get_seq_length() == 9
    assert torch.equal(keys[:, :, :5], prefix[0][0])
    assert torch.equal(values[:, :, 5:, 0], -torch.arange(4.0).expand(3, 1, 4))
    keys, _ = cache.update(torch.ones(3, 1, 2, 8), torch.ones(3, 1, 2, 8), 0)  # past the room: grows
    assert keys.shape[-2] == 11 and torch.equal(keys[:, :, :5], prefix[0][0])
    cache.batch_select_indices(torch.tensor([2, 0]))  # rows that finished leave
    assert cache.layers[0].keys.shape[0] == 2 and torch.equal(cache.layers[0].keys[1, :, :5], prefix[0][0][0])


def test_lru_holds_one_entry_per_prompt_stage() -> None:
    from rmskit.models.prefix_kv import PrefixCacheMixin
    from rmskit.pipeline.registry import default_max_tokens

    # A mixed batch touches every stage; an LRU smaller than the stage count would evict and recompute.
    assert PrefixCacheMixin.prefix_entries >= len(default_max_tokens())


def test_finished_rows_leave_the_decode_batch(tiny_smollm2: Path) -> None:
    from rmskit.models.transformers_local import HFBackend

    backend = HFBackend(BackendConfig(spec=f"hf:{tiny_smollm2}", device="cpu", max_batch=8))
    backend._ensure_loaded()
    widths: list[int] = []
    backend.model.register_forward_pre_hook(
        lambda _m, args, kwargs: widths.append(int(kwargs["input_ids"].shape[0])), with_kwargs=True
    )
    reqs = _requests()[:3]
    budgets = [2, 9, 5]  # the short rows are done long before the longest

    async def go() -> list[int]:
        rs = await asyncio.gather(
            *[
                backend.generate(m, params=GenParams(temperature=0.0, max_tokens=b))
                for m, b in zip(reqs, budgets, strict=True)
            ]
        )
        return [r.usage.completion_tokens for r in rs]

    used = asyncio.run(go())
    asyncio.run(backend.aclose())
    assert backend.stats.sizes == [3]
    decode = widths[-max(used) :]  # the batch's decode steps (prefill passes are batch 1, before)
    # Each step runs only the rows still generating: 3 rows while all run, then fewer.
    assert decode == [sum(u > step for u in used) for step in range(max(used))], (decode, used)
    assert decode[-1] == 1 and sum(decode) == sum(used)


def test_cpu_threads_applied_and_embedded_uses_one(
    tiny_smollm2: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rmskit.models.embedded import EmbeddedBackend
    from rmskit.models.transformers_local import HFBackend

    assert EmbeddedBackend(BackendConfig()).cfg.cpu_threads == 1
    assert EmbeddedBackend(BackendConfig(cpu_threads=2)).cfg.cpu_threads == 2  # the user's choice stays
    from rmskit.models.embedded import cpu_has_bf16

    # bf16 only where the CPU computes it natively; an explicit dtype always wins.
    assert EmbeddedBackend(BackendConfig()).cfg.dtype == ("bf16" if cpu_has_bf16() else None)
    assert EmbeddedBackend(BackendConfig(dtype="fp32")).cfg.dtype == "fp32"
    calls: list[int] = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), real(n)))
    before = torch.get_num_threads()
    backend = HFBackend(BackendConfig(spec=f"hf:{tiny_smollm2}", device="cpu", cpu_threads=1))
    try:
        _run(backend, True, None)
    finally:
        asyncio.run(backend.aclose())
        real(before)
    assert calls and set(calls) == {1}  # set in the thread that generates
