"""`hf:` backend: any Hugging Face model in-process through transformers, with request batching and
grammar-constrained JSON (see grammar.py for why xgrammar).

- VLMs (config type registered for image-text-to-text, or cfg.vision=True) load with
  AutoModelForImageTextToText + AutoProcessor and their chat template; text LLMs with
  AutoModelForCausalLM + AutoTokenizer; a GGUF file through `gguf_file=` (dequantised by transformers).
- Concurrent `generate` calls are queued; one worker task drains the queue into batches of up to
  `cfg.max_batch` requests sharing sampling settings (schemas and token budgets may differ per row)
  and runs them in a worker thread so the event loop stays free. VLMs: left-padded `model.generate`.
  Text models: prompts prefilled from a per-stage prefix KV cache (prefix_kv.py), then a decode loop
  that drops finished rows (decode.py).
- Weights load lazily on the first request (or `await backend.load()`), once.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import json
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field, ValidationError
from transformers import StoppingCriteria

from rmskit.models.base import (
    BackendError,
    Capabilities,
    ErrorKind,
    GenParams,
    Message,
    Result,
    Usage,
)
from rmskit.models.batching import Batcher, Pending, take_same_sampling
from rmskit.models.decode import decode_rows
from rmskit.models.prefix_kv import PrefixCacheMixin, cache_kwarg, preallocated, take_stage_first

if TYPE_CHECKING:
    from rmskit.config import BackendConfig

_DTYPES = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "half": "float16",
    "fp32": "float32",
    "float32": "float32",
    "float": "float32",
}


class BatchStats(BaseModel):
    """What the batcher did (tests and benchmarks read it)."""

    batches: int = 0
    requests: int = 0
    max_batch: int = 0
    sizes: list[int] = Field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens whose prefill a shared-prefix KV cache skipped


# ---------------------------------------------------------------- device / dtype / capabilities


def pick_device(requested: str | None = None) -> str:
    """`requested` if given, else cuda > mps > cpu."""
    import torch

    if requested:
        return requested
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(requested: str | None, device: str) -> Any:
    """`requested` if given; bf16 on a CUDA GPU that supports it (else fp16), fp16 on mps, fp32 on cpu."""
    import torch

    if requested and requested != "auto":
        name = _DTYPES.get(requested.lower())
        if name is None:
            raise ValueError(f"unknown dtype {requested!r}; use bf16, fp16 or fp32")
        return getattr(torch, name)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.startswith("mps"):
        return torch.float16
    return torch.float32


def config_has_vision(config: Any) -> bool:
    """True when the model type is registered for image-text-to-text or has a vision tower config."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    if getattr(config, "model_type", None) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return True
    return getattr(config, "vision_config", None) is not None


def read_config(source: str, gguf_file: str | None = None) -> Any:
    """The model's config without loading weights (local folder, hub cache, or GGUF metadata)."""
    from transformers import AutoConfig

    kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoConfig.from_pretrained(source, **kwargs)


# ---------------------------------------------------------------- processors without torchvision


def image_only_processor_class(proc_cls: type) -> type:
    """`proc_cls` minus its video processor.

    transformers 5 processors of VLMs such as Qwen2-VL declare a video processor that needs torchvision;
    on a CPU-only install without torchvision they cannot be built at all. This subclass (same name, so
    it saves as the original) drops the video attribute; images work as before."""
    attrs = [a for a in proc_cls.get_attributes() if "video" not in a]
    return type(
        proc_cls.__name__,
        (proc_cls,),
        {"get_attributes": classmethod(lambda cls: list(attrs)), "__module__": proc_cls.__module__},
    )


def load_processor(source: str) -> Any:
    """AutoProcessor, or (when the video processor cannot be built without torchvision) the same
    processor class built from its image processor and tokenizer."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        return AutoProcessor.from_pretrained(source)
    except (OSError, ValueError, TypeError, AttributeError, ImportError) as first:
        import transformers

        path = Path(source)
        proc_name = None
        cfg_file = path / "processor_config.json"
        if cfg_file.is_file():
            proc_name = json.loads(cfg_file.read_text()).get("processor_class")
        if proc_name is None:
            from transformers.models.auto.processing_auto import (
                PROCESSOR_MAPPING_NAMES,  # pyright: ignore[reportPrivateImportUsage]
            )

            proc_name = PROCESSOR_MAPPING_NAMES.get(read_config(source).model_type)
        proc_cls = getattr(transformers, proc_name, None) if proc_name else None
        if proc_cls is None:
            raise first
        image_processor = AutoImageProcessor.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
        template = None
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        template = template or getattr(tokenizer, "chat_template", None)
        sub = image_only_processor_class(proc_cls)
        params = inspect.signature(proc_cls.__init__).parameters
        kwargs: dict[str, Any] = {"image_processor": image_processor, "tokenizer": tokenizer}
        if "chat_template" in params:
            kwargs["chat_template"] = template
        return sub(**kwargs)


# ---------------------------------------------------------------- batching


class HFBackend(PrefixCacheMixin):
    """transformers in-process backend (`hf:ORG/NAME` or a local path)."""

    # Subclasses for small models set this: a weak model under greedy decoding loops inside strings.
    repetition_penalty: float | None = None

    def __init__(
        self,
        cfg: BackendConfig,
        *,
        source: str | Path | None = None,
        model_id: str | None = None,
        capabilities: Capabilities | None = None,
    ) -> None:
        self.cfg = cfg
        self.source = str(source) if source is not None else cfg.name
        self.model_id = model_id or (f"hf:{self.source}" + (f"#{cfg.gguf_file}" if cfg.gguf_file else ""))
        self.capability_note: str | None = None
        self.capabilities = capabilities or self._probe_capabilities()
        self.stats = BatchStats()
        self.model: Any = None
        self.processor: Any = None
        self.tokenizer: Any = None
        self.device: str | None = None
        self.dtype: Any = None
        self._eos_ids: list[int] = []
        self._vocab_size = 0
        self._grammars: Any = None
        self._prefixes: OrderedDict[tuple[int, ...], Any] = OrderedDict()
        self._load_lock = threading.Lock()
        self._gen_lock = threading.Lock()
        self._batcher = Batcher(
            self._run_batch,
            max_batch=cfg.max_batch,
            # Text models take the head's stage first (shared prefix KV), then any other stage.
            select=take_same_sampling if self.capabilities.vision else take_stage_first,
            name=f"rmskit-hf:{self.model_id}",
        )

    # -- capabilities

    def _probe_capabilities(self) -> Capabilities:
        vision = self.cfg.vision
        if vision is None:
            try:
                vision = config_has_vision(read_config(self.source, self.cfg.gguf_file))
            except Exception as e:  # unreadable offline / bad path: decided again when loading
                self.capability_note = f"config not readable ({type(e).__name__}); vision unknown"
                vision = False
        return Capabilities(
            vision=bool(vision), structured="grammar", max_images=8 if vision else 0, local=True
        )

    # -- loading

    async def load(self) -> None:
        """Load weights now (otherwise the first request does)."""
        await asyncio.to_thread(self._ensure_loaded)

    def _ensure_loaded(self) -> None:
        if self.model is not None:
            return
        with self._load_lock:
            if self.model is not None:
                return
            try:
                self._load()
            except BackendError:
                raise
            except Exception as e:
                raise BackendError(
                    ErrorKind.other, f"cannot load {self.model_id}: {type(e).__name__}: {e}"
                ) from e

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

        device = pick_device(self.cfg.device)
        dtype = pick_dtype(self.cfg.dtype, device)
        kwargs: dict[str, Any] = {"dtype": dtype}
        if self.cfg.gguf_file:
            kwargs["gguf_file"] = self.cfg.gguf_file
        if device != "cpu":
            kwargs["device_map"] = device  # load straight onto the accelerator
        if self.capabilities.vision:
            model = AutoModelForImageTextToText.from_pretrained(self.source, **kwargs)
            self.processor = load_processor(self.source)
            self.tokenizer = self.processor.tokenizer
        else:
            model = AutoModelForCausalLM.from_pretrained(self.source, **kwargs)
            tok_kwargs = {"gguf_file": self.cfg.gguf_file} if self.cfg.gguf_file else {}
            self.tokenizer = AutoTokenizer.from_pretrained(self.source, **tok_kwargs)
        if device == "cpu":
            model = model.to(device)  # pyright: ignore[reportArgumentType]
        model.eval()
        tok = self.tokenizer
        tok.padding_side = "left"  # decoder-only batching: new tokens must line up on the right
        eos: list[int] = []
        gen_eos = model.generation_config.eos_token_id
        for e in [*(gen_eos if isinstance(gen_eos, list) else [gen_eos]), tok.eos_token_id]:
            if e is not None and int(e) not in eos:
                eos.append(int(e))
        if not eos:
            raise BackendError(ErrorKind.other, f"{self.model_id}: no end-of-sequence token known")
        if tok.pad_token_id is None:
            tok.pad_token = tok.convert_ids_to_tokens(eos[0])
        out_emb = model.get_output_embeddings()
        self._vocab_size = int(out_emb.weight.shape[0]) if out_emb is not None else len(tok)
        self._eos_ids = eos
        model.requires_grad_(False)  # inference only; generation runs under inference_mode (thread-local)
        self.device, self.dtype, self.model = device, dtype, model

    def _grammar_set(self) -> Any:
        if self._grammars is None:
            from rmskit.models.grammar import GrammarSet

            self._grammars = GrammarSet(
                self.tokenizer, vocab_size=self._vocab_size, stop_token_ids=self._eos_ids
            )
        return self._grammars

    # -- public API

    async def generate(
        self,
        messages: list[Message],
        *,
        schema: type[BaseModel] | None = None,
        params: GenParams | None = None,
    ) -> Result:
        params = params or self.cfg.params
        if not self.capabilities.vision and any(m.images for m in messages):
            raise BackendError(
                ErrorKind.bad_request,
                f"{self.model_id} has no vision; send the perception record as text instead of pixels",
            )
        return await self._batcher.submit(messages, schema, params)

    async def aclose(self) -> None:
        """Stop the batcher and free the weights (and the GPU memory they held)."""
        await self._batcher.close()
        with self._load_lock:
            self.model = self.processor = self.tokenizer = None
            self._grammars = None
            self._prefixes.clear()
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass

    # -- one batch (worker thread)

    def _load_image(self, path: Path) -> Any:
        from PIL import Image, ImageOps

        try:
            with Image.open(path) as im:
                im = ImageOps.exif_transpose(im)
                im = im.convert("RGB")
                im.thumbnail((self.cfg.image_max_side, self.cfg.image_max_side))
                return im.copy()
        except Exception as e:
            raise BackendError(ErrorKind.image, f"cannot read image {path}: {type(e).__name__}: {e}") from e

    def _render(self, p: Pending) -> str:
        from rmskit.models.structured import with_json_instruction

        msgs = p.messages
        if p.schema is not None:
            # The grammar fixes the shape; a compact field list tells the model what the fields mean
            # (the full JSON schema would cost hundreds of prompt tokens per request).
            grammar = self.cfg.structured != "prompt"
            msgs = with_json_instruction(msgs, p.schema, brief=grammar)
        if self.capabilities.vision:
            conv = []
            for m in msgs:
                parts: list[dict[str, Any]] = [{"type": "image"} for _ in m.images]
                parts.append({"type": "text", "text": m.content})
                conv.append({"role": m.role, "content": parts})
                p.images.extend(self._load_image(img.path) for img in m.images)
            return self.processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        conv = [{"role": m.role, "content": m.content} for m in msgs]
        return self.tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)

    def _run_batch(self, batch: list[Pending]) -> list[Result | BaseException]:
        self._ensure_loaded()
        out: list[Result | BaseException] = [BackendError(ErrorKind.other, "not run")] * len(batch)
        rows: list[int] = []
        texts: list[str] = []
        for i, p in enumerate(batch):
            try:
                texts.append(self._render(p))
                rows.append(i)
            except BackendError as e:
                out[i] = e
            except Exception as e:
                out[i] = BackendError(ErrorKind.bad_request, f"cannot render prompt: {type(e).__name__}: {e}")
        if not rows:
            return out
        live = [batch[i] for i in rows]
        import torch

        threads = self.cfg.cpu_threads if self.device == "cpu" else None
        if threads:  # every batch, here: OpenMP keeps the count per thread, and this one generates
            torch.set_num_threads(threads)
        # inference_mode, not a global set_grad_enabled(False): grad mode is per thread, and turning
        # it off for the caller's thread would break training in the same process (e.g. the judge).
        with self._gen_lock, torch.inference_mode():  # one generate at a time per model
            results = self._generate_rows(live, texts)
        for i, r in zip(rows, results, strict=True):
            out[i] = r
        return out

    def _generate_rows(self, rows: list[Pending], texts: list[str]) -> list[Result]:
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        tok = self.tokenizer
        if self.capabilities.vision:
            images = [im for p in rows for im in p.images]
            enc = self.processor(
                text=texts,
                images=images or None,
                padding=True,
                return_tensors="pt",
                add_special_tokens=False,
            )
            past = None
        else:
            reserve = max(p.params.max_tokens for p in rows) + 1
            enc, past = self._encode_text(texts, [self._head_text(p) for p in rows], reserve)
        enc = enc.to(self.model.device)
        if "pixel_values" in enc:
            enc["pixel_values"] = enc["pixel_values"].to(self.model.dtype)
        prompt_len = int(enc["input_ids"].shape[1])
        budgets = [p.params.max_tokens for p in rows]
        params = rows[0].params
        gen_kwargs: dict[str, Any] = {
            "max_new_tokens": max(budgets),
            "eos_token_id": self._eos_ids,
            "pad_token_id": tok.pad_token_id,
        }
        if params.temperature > 0:
            gen_kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
        else:
            gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if self.repetition_penalty:
            gen_kwargs["repetition_penalty"] = self.repetition_penalty
        if past is not None:
            gen_kwargs[cache_kwarg()] = past
        procs = LogitsProcessorList()
        schemas = [p.schema for p in rows]
        grammars = None
        if any(s is not None for s in schemas) and self.cfg.structured != "prompt":
            from rmskit.models.grammar import BatchGrammarProcessor

            gs = self._grammar_set()
            grammars = [gs.compile(s) if s is not None else None for s in schemas]
            grammar_proc = BatchGrammarProcessor(
                grammars, prompt_len=prompt_len, budgets=budgets, vocab_size=self._vocab_size
            )
            procs.append(grammar_proc)
        stops = StoppingCriteriaList()
        if len(set(budgets)) > 1:
            stops.append(_RowBudget(prompt_len, budgets))
        if params.seed is not None:
            torch.manual_seed(params.seed)
        try:
            if past is not None and preallocated(past):  # finished rows leave the batch (decode.py)
                new = decode_rows(
                    self.model,
                    enc,
                    past,
                    budgets=budgets,
                    eos_ids=self._eos_ids,
                    params=params,
                    repetition_penalty=self.repetition_penalty,
                    grammars=grammars,
                    vocab_size=self._vocab_size,
                )
            else:
                seqs = self.model.generate(
                    **enc, logits_processor=procs, stopping_criteria=stops, **gen_kwargs
                )
                new = seqs[:, prompt_len:].tolist()
        except torch.cuda.OutOfMemoryError as e:
            raise BackendError(
                ErrorKind.server, f"out of GPU memory at batch {len(rows)}", retriable=True
            ) from e
        mask = enc["attention_mask"]
        self.stats.batches += 1
        self.stats.requests += len(rows)
        self.stats.max_batch = max(self.stats.max_batch, len(rows))
        self.stats.sizes.append(len(rows))
        eos = set(self._eos_ids)
        results: list[Result] = []
        for i, p in enumerate(rows):
            toks = new[i][: budgets[i]]
            stop_at = next((j for j, t in enumerate(toks) if t in eos), None)
            n = stop_at + 1 if stop_at is not None else len(toks)
            finish = "stop" if stop_at is not None else "length"
            text = tok.decode(toks[: stop_at if stop_at is not None else n], skip_special_tokens=True)
            usage = Usage(prompt_tokens=int(mask[i].sum()), completion_tokens=n)
            self.stats.prompt_tokens += usage.prompt_tokens
            self.stats.completion_tokens += usage.completion_tokens
            parsed = _parse(text, p.schema) if p.schema is not None else None
            results.append(
                Result(text=text, parsed=parsed, usage=usage, finish_reason=finish, model=self.model_id)
            )
        return results


class _RowBudget(StoppingCriteria):
    """Per-row max_new_tokens: a row is done once it has generated its own budget."""

    def __init__(self, prompt_len: int, budgets: list[int]) -> None:
        self.prompt_len = prompt_len
        self.budgets = budgets

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        step = input_ids.shape[1] - self.prompt_len
        return torch.tensor([step >= b for b in self.budgets], device=input_ids.device, dtype=torch.bool)


def _parse(text: str, schema: type[BaseModel]) -> dict[str, Any] | None:
    """The validated object, or None (cut off by the token budget, or a constraint the grammar cannot
    express, such as a custom validator)."""
    try:
        obj = json.loads(text)
        return schema.model_validate(obj).model_dump(mode="json")
    except (ValueError, ValidationError):
        return None
