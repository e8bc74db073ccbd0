"""Shared-prefix KV cache for text models in `HFBackend` (issue 13 §7: a 135M model on CPU).

rmskit's prompts are long and shared: every request of a stage starts with the same system prompt
(hundreds of tokens), the user part is short. So the prefill of a batch is assembled row by row:

1. the stage's system prompt: its KV is computed once and kept in a small LRU (`_prefixes`);
2. rows of one stage whose user parts share a long start: that part is computed once for the group;
3. each row's own rest (all but its last token) on top of that, at batch 1: no padding is computed;
4. the rows' caches are left-padded to one length and stacked; `generate` gets the last token only.

So a batch may mix stages (and token budgets): the batcher takes every queued request with the same
sampling settings, which keeps decode batches as large as the pipeline allows (decode of a small
model on CPU costs nearly the same per step at batch 1 and 8). Positions follow the attention mask
in `generate`, and the left padding is masked, so greedy outputs match the uncached padded batch.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rmskit.models.batching import Pending


class PrefixCacheMixin:
    """Prefix KV reuse for `HFBackend` (text models). Needs `model`, `tokenizer` and `stats`."""

    # Benchmarks and tests switch it off to compare.
    prefix_cache: bool = True
    prefix_min_tokens = 16  # shorter shared prefixes are not worth a cache entry
    # LRU size: one entry per stage (10 prompt stages today), ~25 MB each for SmolLM2-135M in fp32.
    prefix_entries = 16

    model: Any
    tokenizer: Any
    stats: Any
    _prefixes: OrderedDict[tuple[int, ...], Any]

    def _head_text(self, p: Pending) -> str:
        """The rendered system message alone: the part of a prompt shared by every request of a stage."""
        m = p.messages[0] if p.messages else None
        if m is None or m.role != "system":
            return ""
        return self.tokenizer.apply_chat_template([{"role": "system", "content": m.content}], tokenize=False)

    def _encode_text(self, texts: list[str], heads: list[str], reserve: int = 0) -> tuple[Any, Any]:
        """Token batch + (prefix cache on) a KV cache of every row's prompt but its last token.

        Rows are laid out [pad...][prompt without last token][last token]; the cache holds the first
        part, so generate prefills one token per row. Without the cache: the plain left-padded batch.
        `reserve`: tokens the batch will add (its largest budget), preallocated in the cache."""
        tok = self.tokenizer
        if not self.prefix_cache:
            return tok(texts, padding=True, return_tensors="pt", add_special_tokens=False), None
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        if min(len(r) for r in ids) < 2:  # generate needs one uncached token per row
            return tok(texts, padding=True, return_tensors="pt", add_special_tokens=False), None
        head_ids = {h: tok(h, add_special_tokens=False)["input_ids"] for h in set(heads)}
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (r, h) in enumerate(zip(ids, heads, strict=True)):
            base = _common_prefix([r, head_ids[h]], len(r) - 1)
            key = tuple(r[:base]) if base >= self.prefix_min_tokens else ()
            groups.setdefault(key, []).append(i)
        caches: list[Any] = [None] * len(ids)
        for key, members in groups.items():
            shared, n = self._group_kv(key, [ids[i] for i in members])
            for i in members:
                rest = ids[i][n:-1]
                kv = copy.deepcopy(shared) if shared is not None and rest else shared
                caches[i] = self._forward_kv(rest, kv, len(ids[i]) - 1) if rest else kv
        return self._stack(ids, caches, reserve)

    def _group_kv(self, key: tuple[int, ...], rows: list[list[int]]) -> tuple[Any, int]:
        """KV of the prefix a group of same-stage rows shares (stage entry + shared user part), and
        its length. Never extends past any row's second-to-last token."""
        base = len(key)
        shared = self._stage_kv(key) if base else None
        n = _common_prefix(rows, min(len(r) for r in rows) - 1) if len(rows) > 1 else base
        if n - base < self.prefix_min_tokens:
            n = base  # no shared user part worth a pass of its own
        if n > base:
            shared = self._forward_kv(rows[0][base:n], copy.deepcopy(shared), n)
        # Rows x prefix, less the one pass the group's own shared part still cost.
        self.stats.cached_prompt_tokens += n * len(rows) - (n - base)
        return shared, n

    def _stack(self, ids: list[list[int]], caches: list[Any], reserve: int) -> tuple[Any, Any]:
        """Left-pad each row's cache (length len(row) - 1) to the longest and stack them into one,
        written straight into the batch cache's buffers (zeros on the left; the mask hides them)."""
        import torch
        from transformers import BatchEncoding

        pad_id = self.tokenizer.pad_token_id
        lens = [len(r) - 1 for r in ids]
        width = max(lens)
        rows = [[pad_id] * (width - n) + r for r, n in zip(ids, lens, strict=True)]
        mask = [[0] * (width - n) + [1] * (n + 1) for n in lens]
        per_row = [list(c) if c is not None else None for c in caches]
        ref = next(c for c in per_row if c is not None)
        room = min(reserve, GROW_STEP) if _growing_layer() is not None else 0
        layers = []
        for li, (k0, v0, *_) in enumerate(ref):
            shape = (len(ids), k0.shape[1], width + room, k0.shape[3])
            k, v = k0.new_zeros(shape), v0.new_zeros(shape)
            for i, (c, n) in enumerate(zip(per_row, lens, strict=True)):
                if c is not None and n:
                    k[i, :, width - n : width].copy_(c[li][0][0])
                    v[i, :, width - n : width].copy_(c[li][1][0])
            layers.append((k, v))
        enc = BatchEncoding({"input_ids": torch.tensor(rows), "attention_mask": torch.tensor(mask)})
        return enc, _dynamic_cache(layers, width, self.model.config)

    def _stage_kv(self, prefix: tuple[int, ...]) -> Any:
        """KV cache of a stage's system prompt (one forward pass the first time; LRU)."""
        if prefix in self._prefixes:
            self._prefixes.move_to_end(prefix)
            return self._prefixes[prefix]
        kv = self._forward_kv(list(prefix), None, len(prefix))
        self._prefixes[prefix] = kv
        while len(self._prefixes) > self.prefix_entries:
            self._prefixes.popitem(last=False)
        return kv

    def _forward_kv(self, tokens: list[int], cache: Any, total: int) -> Any:
        """`cache` (or a new one) extended by `tokens`; `total` = cached + new length."""
        import torch

        dev = self.model.device
        ids = torch.tensor([tokens], device=dev)
        kwargs = {cache_kwarg(): cache} if cache is not None else {}
        out = self.model(
            input_ids=ids,
            attention_mask=torch.ones((1, total), dtype=torch.long, device=dev),
            use_cache=True,
            logits_to_keep=1,  # only the cache is wanted: skip the LM head over the prompt
            **kwargs,
        )
        return getattr(out, "cache", None) or out.past_key_values


GROW_STEP = 64  # decode tokens preallocated at a time (more as the cache grows: see GrowingLayer)


def _dynamic_cache(layers: list[tuple[Any, Any]], filled: int, config: Any) -> Any:
    """A DynamicCache of `filled` tokens whose layers adopt the given buffers (batch, heads, >= filled,
    dim). With transformers 5 decoding then writes into the spare room in place instead of
    concatenating the whole cache at every step (that copy was ~20% of CPU time in a mixed batch)."""
    from transformers import DynamicCache

    try:
        cache = DynamicCache(config=config)
    except TypeError:  # transformers < 4.56: no config argument
        cache = DynamicCache()
    grow = _growing_layer()
    cache_layers = getattr(cache, "layers", None)
    if grow is not None and cache_layers is not None and len(cache_layers) == len(layers):
        if all(type(layer).__name__ == "DynamicLayer" for layer in cache_layers):  # not sliding etc.
            cache.layers = [grow(k, v, filled) for k, v in layers]
            return cache
    for li, (k, v) in enumerate(layers):
        cache.update(k[..., :filled, :], v[..., :filled, :], li)
    return cache


_GROW: list[Any] = []


def _growing_layer() -> Any:
    """transformers 5's DynamicLayer over a preallocated buffer (None where the class is missing)."""
    if _GROW:
        return _GROW[0]
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        _GROW.append(None)
        return None

    class GrowingLayer(DynamicLayer):
        def __init__(self, keys: Any, values: Any, filled: int) -> None:
            super().__init__()
            self.lazy_initialization(keys, values)
            self._buf, self._n = (keys, values), filled
            self.keys, self.values = keys[..., :filled, :], values[..., :filled, :]

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> Any:
            n, add = self._n, key_states.shape[-2]
            if n + add > self._buf[0].shape[-2]:  # out of room: a bigger buffer, a quarter to spare
                cap = n + add + max(GROW_STEP, n // 4)
                shape = (*key_states.shape[:-2], cap, key_states.shape[-1])
                k, v = key_states.new_zeros(shape), value_states.new_zeros(shape)
                k[..., :n, :].copy_(self._buf[0][..., :n, :])
                v[..., :n, :].copy_(self._buf[1][..., :n, :])
                self._buf = (k, v)
            self._buf[0][..., n : n + add, :].copy_(key_states)
            self._buf[1][..., n : n + add, :].copy_(value_states)
            self._n = n + add
            self.keys, self.values = self._buf[0][..., : self._n, :], self._buf[1][..., : self._n, :]
            return self.keys, self.values

        def batch_select_indices(self, indices: Any) -> None:
            # Rows that finished leave the buffer too.
            self._buf = (self._buf[0][indices], self._buf[1][indices])
            self.keys, self.values = self._buf[0][..., : self._n, :], self._buf[1][..., : self._n, :]

    _GROW.append(GrowingLayer)
    return GrowingLayer


def _common_prefix(seqs: list[list[int]], limit: int) -> int:
    n = 0
    while n < limit and all(len(r) > n and r[n] == seqs[0][n] for r in seqs):
        n += 1
    return n


def take_stage_first(backlog: list[Pending], max_batch: int) -> list[Pending]:
    """The oldest request, then queued requests of its stage (same system prompt: they share the
    cached prefix), then any others with its sampling settings, in arrival order. The oldest always
    goes first, so nothing starves."""
    head = backlog[0]
    same = [p for p in backlog if p.group == head.group]
    stage = [p for p in same if p.messages[:1] == head.messages[:1]]
    ids = {id(p) for p in stage}
    return (stage + [p for p in same if id(p) not in ids])[:max_batch]


def cache_kwarg() -> str:
    """generate()'s name for a ready KV cache: `cache` from transformers 5.x on, `past_key_values`
    before (still accepted there, with a deprecation warning)."""
    from transformers.generation import utils

    return "cache" if "cache" in getattr(utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


def preallocated(cache: Any) -> bool:
    """True when every layer of `cache` is a preallocated one (decode.py can drop rows from it)."""
    grow = _growing_layer()
    layers = getattr(cache, "layers", None)
    return grow is not None and bool(layers) and all(isinstance(layer, grow) for layer in layers)
