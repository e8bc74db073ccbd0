"""Grammar-constrained JSON decoding for in-process transformers models, with xgrammar.

Why xgrammar (over outlines and lm-format-enforcer): it compiles a JSON schema once per (tokenizer,
schema) into a pushdown automaton with precomputed token masks, so the per-token cost is a bitmask
fill of microseconds instead of a Python walk over the vocabulary; it is the engine vLLM, SGLang and
TensorRT-LLM use by default, so a schema behaves the same in-process and behind a vLLM server; it
supports `$ref/$defs`, enums, `minItems/maxItems`, `minLength/maxLength` and integer bounds, which
the stage schemas use; and its matchers are independent objects, so every row of a batch can follow
its own schema (or none). outlines brings a large dependency tree and re-indexes the vocabulary per
regex; lm-format-enforcer walks a character trie in Python on every step, which dominates decoding
time for a small model on CPU.

`GrammarSet` compiles and caches grammars per schema; `BatchGrammarProcessor` is the transformers
`LogitsProcessor` for one `generate` call, with one matcher per constrained row.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import torch
import xgrammar as xgr
from pydantic import BaseModel
from transformers import LogitsProcessor


def schema_json(schema: type[BaseModel]) -> str:
    return json.dumps(schema.model_json_schema())  # property order is the order the model writes


class GrammarSet:
    """Compiled JSON-schema grammars for one tokenizer, cached per schema class.

    `vocab_size` must be the model's logits width (often larger than the tokenizer's vocabulary);
    `stop_token_ids` are the tokens that end a turn (the grammar only allows them once the JSON
    value is complete)."""

    def __init__(self, tokenizer: Any, *, vocab_size: int, stop_token_ids: list[int]) -> None:
        self.info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids
        )
        self.vocab_size = vocab_size
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=2)
        self._cache: dict[str, xgr.CompiledGrammar] = {}
        self._lock = threading.Lock()

    def compile(self, schema: type[BaseModel]) -> xgr.CompiledGrammar:
        key = schema_json(schema)
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None:
            return hit
        # Compact JSON (no free whitespace): a weak model cannot burn its token budget on spaces.
        compiled = self._compiler.compile_json_schema(key, any_whitespace=False, strict_mode=True)
        with self._lock:
            self._cache[key] = compiled
        return compiled


class BatchGrammarProcessor(LogitsProcessor):
    """Masks each constrained row's logits to the tokens its grammar allows next.

    `grammars[i]` is None for an unconstrained row. `budgets[i]` is row i's max new tokens: once a row
    has used its budget (or its matcher terminated on a stop token) transformers pads it, and the
    padding must not be fed to its matcher. Use one instance per `generate` call."""

    def __init__(
        self,
        grammars: list[xgr.CompiledGrammar | None],
        *,
        prompt_len: int,
        budgets: list[int],
        vocab_size: int,
    ) -> None:
        self.matchers = [xgr.GrammarMatcher(g) if g is not None else None for g in grammars]
        self.rows = [i for i, m in enumerate(self.matchers) if m is not None]
        self.prompt_len = prompt_len
        self.budgets = budgets
        self.bitmask = xgr.allocate_token_bitmask(len(grammars), vocab_size)
        self.rejected: set[int] = set()  # rows whose sampled token the grammar refused (should not happen)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_len
        active: list[int] = []
        for i in self.rows:
            m = self.matchers[i]
            assert m is not None
            if i in self.rejected or m.is_terminated():
                continue
            if 0 < step <= self.budgets[i] and not m.accept_token(int(input_ids[i, -1])):
                self.rejected.add(i)
                continue
            if step >= self.budgets[i] or m.is_terminated():
                continue
            m.fill_next_token_bitmask(self.bitmask, i)
            active.append(i)
        if active:
            mask = self.bitmask if scores.device.type == "cpu" else self.bitmask.to(scores.device)
            xgr.apply_token_bitmask_inplace(scores, mask, vocab_size=scores.shape[-1], indices=active)
        return scores
