"""The safety judge: any HF vision-language model, asked a fixed prompt, tuned with LoRA.

Scores come from next-token probabilities of the two label tokens at the answer position:
score = P(unsafe) / (P(safe) + P(unsafe)), so AUROC is defined and predictions don't depend on
parsing generated text. Training puts the loss on the answer tokens only."""

from __future__ import annotations

import inspect
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rmskit.scoring.prompts import DEFAULT_PROMPT, judge_answer, judge_turns, load_prompt
from rmskit.scoring.sample import BenchSample, Label

IGNORE = -100
ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")


class JudgeError(RuntimeError):
    pass


def parse_verdict(text: str) -> Label | None:
    """First word of a generated answer -> label (None when it is neither)."""
    words = text.strip().lower().replace(":", " ").replace(".", " ").replace(",", " ").split()
    if not words:
        return None
    return words[0] if words[0] in ("safe", "unsafe") else None  # type: ignore[return-value]


def answer_text(sample: BenchSample) -> str:
    return judge_answer(sample.label, sample.category)


def pick_device(device: str | None = None) -> str:
    import torch

    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_io(path: str) -> Any:
    """The model's processor. rmskit's shared loader falls back to the processor class minus its
    video processor where transformers 5 cannot build that without torchvision (images only)."""
    from rmskit.models.transformers_local import load_processor

    try:
        return load_processor(path)
    except Exception as exc:  # noqa: BLE001 - surface one clear error
        raise JudgeError(f"cannot build a processor for {path}: {exc}") from exc


@dataclass
class TrainStats:
    steps: int = 0
    samples: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)


class Judge:
    """A VLM safety judge. `spec` is an HF id or local path (an `hf:` prefix is allowed)."""

    def __init__(
        self,
        spec: str,
        *,
        device: str | None = None,
        image_max_side: int = 448,
        prompt_version: str = DEFAULT_PROMPT,
        seed: int = 0,
    ) -> None:
        import torch
        from transformers import AutoModelForImageTextToText

        self.spec = spec
        self.path = spec[3:] if spec.startswith("hf:") else spec
        self.device = pick_device(device)
        self.dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self.image_max_side = image_max_side
        self.prompt_version = prompt_version
        self.template = load_prompt(prompt_version)
        self.seed = seed
        seed_everything(seed)
        self.io = load_io(self.path)
        self.tokenizer = getattr(self.io, "tokenizer", self.io)
        model: Any = AutoModelForImageTextToText.from_pretrained(self.path, dtype=self.dtype)
        self.model: Any = model.to(self.device)
        self.model.eval()
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id or 0
        self._fwd_params = set(inspect.signature(self.model.forward).parameters)
        self.safe_id, self.unsafe_id = self._label_ids()
        self.lora = False

    # --- prompt rendering --------------------------------------------------------------------------

    def _messages(self, sample: BenchSample, answer: str | None = None) -> list[dict[str, Any]]:
        content: list[dict[str, Any]] = [{"type": "image"} for _ in sample.images]
        user, _ = judge_turns(sample.query, sample.label, sample.category, self.prompt_version)
        content.append({"type": "text", "text": user})
        msgs: list[dict[str, Any]] = [{"role": "user", "content": content}]
        if answer is not None:
            msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return msgs

    def _render(self, msgs: list[dict[str, Any]], generation: bool) -> str:
        return self.io.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation)

    def _answer_ids(self, sample: BenchSample, answer: str) -> list[int]:
        """Token ids of the assistant turn after the generation prompt (answer + end-of-turn), taken
        from the chat template itself so any model's turn markup is respected."""
        prompt = self._render(self._messages(sample), True)
        full = self._render(self._messages(sample, answer), False)
        if not full.startswith(prompt):
            # Templates that render the assistant turn differently from the generation prompt.
            suffix = answer + (self.tokenizer.eos_token or "")
        else:
            suffix = full[len(prompt) :]
        return self.tokenizer(suffix, add_special_tokens=False)["input_ids"]

    def _label_ids(self) -> tuple[int, int]:
        probe = BenchSample(id="probe", query="x", label="safe", source="probe")
        safe = self._answer_ids(probe, "safe")[0]
        unsafe = self._answer_ids(probe, "unsafe")[0]
        if safe == unsafe:
            raise JudgeError("the first tokens of 'safe' and 'unsafe' coincide for this tokenizer")
        return safe, unsafe

    def _images(self, sample: BenchSample) -> list[Any]:
        from PIL import Image

        out = []
        for p in sample.images:
            with Image.open(p) as im:
                im = im.convert("RGB")
                im.thumbnail((self.image_max_side, self.image_max_side))
                out.append(im.copy())
        return out

    def _encode_one(self, sample: BenchSample) -> dict[str, Any]:
        text = self._render(self._messages(sample), True)
        images = self._images(sample)
        enc = self.io(text=[text], images=images or None, return_tensors="pt")
        item = {k: v for k, v in dict(enc).items() if hasattr(v, "shape")}
        if "mm_token_type_ids" not in item and "mm_token_type_ids" in self._fwd_params and images:
            image_id = getattr(self.io, "image_token_id", None)
            item["mm_token_type_ids"] = (item["input_ids"] == image_id).int()
        for k in ("input_ids", "attention_mask", "mm_token_type_ids"):
            if k in item:
                item[k] = item[k][0]
        return item

    def _collate(self, items: list[dict[str, Any]], left: bool) -> dict[str, Any]:
        import torch

        width = max(len(it["input_ids"]) for it in items)
        seq_keys = [
            k for k in ("input_ids", "attention_mask", "mm_token_type_ids", "labels") if k in items[0]
        ]
        fill = {"input_ids": self.pad_id, "attention_mask": 0, "mm_token_type_ids": 0, "labels": IGNORE}
        batch: dict[str, Any] = {}
        for k in seq_keys:
            rows = []
            for it in items:
                v = it[k]
                pad = torch.full((width - len(v),), fill[k], dtype=v.dtype)
                rows.append(torch.cat([pad, v]) if left else torch.cat([v, pad]))
            batch[k] = torch.stack(rows)
        for k in items[0]:
            if k not in seq_keys:
                vals = [it[k] for it in items if k in it]
                batch[k] = torch.cat(vals, dim=0)
        return {k: v.to(self.device) for k, v in batch.items() if k in self._fwd_params or k == "labels"}

    # --- scoring -----------------------------------------------------------------------------------

    def score(self, samples: Sequence[BenchSample], batch_size: int = 4) -> list[float]:
        """P(unsafe) / (P(safe) + P(unsafe)) at the first answer token, per sample."""
        import torch

        self.model.eval()
        scores: list[float] = []
        with torch.no_grad():
            for i in range(0, len(samples), batch_size):
                batch = self._collate([self._encode_one(s) for s in samples[i : i + batch_size]], left=True)
                kw = {"logits_to_keep": 1} if "logits_to_keep" in self._fwd_params else {}
                logits = self.model(**batch, **kw).logits[:, -1, :].float()
                pair = torch.stack([logits[:, self.safe_id], logits[:, self.unsafe_id]], dim=-1)
                scores.extend(torch.softmax(pair, dim=-1)[:, 1].tolist())
        return scores

    def generate_ids(self, sample: BenchSample, max_new_tokens: int = 8) -> list[int]:
        """Greedy continuation of the judge prompt (token ids), for checking scores against text."""
        import torch

        batch = self._collate([self._encode_one(sample)], left=True)
        with torch.no_grad():
            out = self.model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.pad_id
            )
        return out[0, batch["input_ids"].shape[1] :].tolist()

    def generate(self, sample: BenchSample, max_new_tokens: int = 8) -> str:
        return self.tokenizer.decode(self.generate_ids(sample, max_new_tokens), skip_special_tokens=True)

    # --- LoRA training -----------------------------------------------------------------------------

    def lora_targets(self) -> list[str]:
        """Attention projections of the language model (vision tower excluded)."""
        import torch

        names = [
            n
            for n, m in self.model.named_modules()
            if isinstance(m, torch.nn.Linear)
            and n.rsplit(".", 1)[-1] in ATTN_PROJ
            and not any(v in n for v in ("visual", "vision"))
        ]
        if not names:
            raise JudgeError("no q/k/v/o attention projections found in the language model")
        return names

    def add_lora(self, r: int = 8, alpha: int | None = None, dropout: float = 0.0) -> int:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(
            r=r,
            lora_alpha=alpha or 2 * r,
            lora_dropout=dropout,
            target_modules=self.lora_targets(),
            bias="none",
        )
        self.model = get_peft_model(self.model, cfg)
        self.lora = True
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def _encode_train(self, sample: BenchSample) -> dict[str, Any]:
        import torch

        item = self._encode_one(sample)
        ans = torch.tensor(self._answer_ids(sample, answer_text(sample)), dtype=item["input_ids"].dtype)
        n_prompt = len(item["input_ids"])
        item["input_ids"] = torch.cat([item["input_ids"], ans])
        item["attention_mask"] = torch.cat([item["attention_mask"], torch.ones_like(ans)])
        if "mm_token_type_ids" in item:
            item["mm_token_type_ids"] = torch.cat([item["mm_token_type_ids"], torch.zeros_like(ans).int()])
        # The model shifts labels itself: loss lands on predicting the answer tokens only.
        item["labels"] = torch.cat([torch.full((n_prompt,), IGNORE, dtype=ans.dtype), ans])
        return item

    def train(
        self,
        samples: Sequence[BenchSample],
        *,
        epochs: int = 1,
        lr: float = 2e-4,
        batch_size: int = 4,
        lora_r: int = 8,
        seed: int | None = None,
        log: Any = None,
    ) -> TrainStats:
        import torch

        seed = self.seed if seed is None else seed
        seed_everything(seed)
        if not self.lora:
            self.add_lora(lora_r)
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        gen = torch.Generator().manual_seed(seed)
        stats = TrainStats()
        t0 = time.perf_counter()
        self.model.train()
        for epoch in range(epochs):
            order = torch.randperm(len(samples), generator=gen).tolist()
            for i in range(0, len(order), batch_size):
                chunk = [samples[j] for j in order[i : i + batch_size]]
                batch = self._collate([self._encode_train(s) for s in chunk], left=False)
                loss = self.model(**batch).loss
                if not math.isfinite(loss.item()):
                    raise JudgeError(f"training loss became {loss.item()} at step {stats.steps}")
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                stats.steps += 1
                stats.samples += len(chunk)
                stats.losses.append(float(loss.item()))
                if log is not None:
                    log(f"epoch {epoch + 1} step {stats.steps} loss {loss.item():.4f}")
        self.model.eval()
        stats.seconds = time.perf_counter() - t0
        return stats

    def save_adapter(self, out: Path, card: str) -> Path:
        if not self.lora:
            raise JudgeError("no LoRA adapter to save (train first)")
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(out))
        (out / "README.md").write_text(card, encoding="utf-8")
        return out
