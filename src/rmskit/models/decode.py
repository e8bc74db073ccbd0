"""Decode loop for text batches whose prompts are already in a KV cache (see prefix_kv.py).

`model.generate` keeps computing every row until the longest one ends: in a batch that mixes stages
(a 400-token discovery next to 30-token verdicts) most row-steps are spent on rows that are done.
This loop drops a row from the batch, and from its KV cache, as soon as it ends (end-of-sequence,
its own token budget, or its grammar complete), so each decode step costs what is still running.

It applies the same logits processors as `generate` (transformers' repetition penalty, temperature
and top-p classes; the xgrammar mask per row), in the same order, so greedy outputs are those of
`generate` on the same inputs.
"""

from __future__ import annotations

from typing import Any

from rmskit.models.base import GenParams


def decode_rows(
    model: Any,
    enc: Any,
    cache: Any,
    *,
    budgets: list[int],
    eos_ids: list[int],
    params: GenParams,
    repetition_penalty: float | None,
    grammars: list[Any] | None,
    vocab_size: int,
) -> list[list[int]]:
    """New tokens per row (ending with its end-of-sequence token when it stopped on one).

    `enc`: input_ids/attention_mask laid out [pad...][cached prompt][last prompt token]; `cache` holds
    the cached part and must support `batch_select_indices` (rows are removed as they finish)."""
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopPLogitsWarper

    from rmskit.models.prefix_kv import cache_kwarg

    seqs, mask = enc["input_ids"], enc["attention_mask"]
    dev = seqs.device
    live = list(range(seqs.shape[0]))  # original row index of each batch position
    out: list[list[int]] = [[] for _ in live]
    procs: list[Any] = [RepetitionPenaltyLogitsProcessor(repetition_penalty)] if repetition_penalty else []
    warpers: list[Any] = []
    if params.temperature > 0:
        warpers = [TemperatureLogitsWarper(params.temperature)]
        if params.top_p < 1.0:
            warpers.append(TopPLogitsWarper(params.top_p))
    grammar = _Grammar(grammars, vocab_size) if grammars and any(g is not None for g in grammars) else None
    eos = set(eos_ids)
    cur, pos = seqs[:, -1:], (mask.sum(-1, keepdim=True) - 1)
    kw = cache_kwarg()
    while live:
        logits = (
            model(
                input_ids=cur,
                attention_mask=mask,
                position_ids=pos,
                use_cache=True,
                logits_to_keep=1,
                **{kw: cache},
            )
            .logits[:, -1, :]
            .to(dtype=torch.float32)
        )
        for p in procs:
            logits = p(seqs, logits)
        if grammar is not None:
            grammar.mask(live, logits)
        for w in warpers:
            logits = w(seqs, logits)
        if warpers:
            nxt = torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1)[:, 0]
        else:
            nxt = torch.argmax(logits, dim=-1)
        keep: list[int] = []
        for j, (r, t) in enumerate(zip(live, nxt.tolist(), strict=True)):
            out[r].append(t)
            ended = grammar.accept(r, t) if grammar is not None else False
            if not (t in eos or ended or len(out[r]) >= budgets[r]):
                keep.append(j)
        if len(keep) < len(live):
            if not keep:
                break
            idx = torch.tensor(keep, device=dev)
            cache.batch_select_indices(idx)
            seqs, mask, pos, nxt = seqs[idx], mask[idx], pos[idx], nxt[idx]
            live = [live[j] for j in keep]
        cur = nxt[:, None]
        seqs = torch.cat([seqs, cur], dim=1) if procs else seqs
        mask = torch.cat([mask, torch.ones_like(cur)], dim=1)
        pos = pos + 1
    return out


class _Grammar:
    """One xgrammar matcher per constrained row (indexed by original row), one shared bitmask."""

    def __init__(self, grammars: list[Any], vocab_size: int) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        self.matchers = [xgr.GrammarMatcher(g) if g is not None else None for g in grammars]
        self.bitmask = xgr.allocate_token_bitmask(len(grammars), vocab_size)
        self.rejected: set[int] = set()  # rows whose token the grammar refused (should not happen)

    def mask(self, live: list[int], logits: Any) -> None:
        active = []
        for j, r in enumerate(live):
            m = self.matchers[r]
            if m is not None and r not in self.rejected and not m.is_terminated():
                m.fill_next_token_bitmask(self.bitmask, j)
                active.append(j)
        if active:
            bm = self.bitmask if logits.device.type == "cpu" else self.bitmask.to(logits.device)
            self.xgr.apply_token_bitmask_inplace(logits, bm, vocab_size=logits.shape[-1], indices=active)

    def accept(self, r: int, token: int) -> bool:
        """Feed row r's token; True when its grammar is complete (it accepted a stop token)."""
        m = self.matchers[r]
        if m is None or r in self.rejected or m.is_terminated():
            return False
        if not m.accept_token(token):
            self.rejected.add(r)  # go on unconstrained, as the generate path does
            return False
        return m.is_terminated()
