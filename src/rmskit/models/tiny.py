"""Tiny RANDOMLY INITIALISED models of real architectures, for smoke runs, tests and GPU speed checks.

`make_tiny(arch, out)` writes a model folder that loads offline with
`AutoProcessor/AutoTokenizer/AutoModel*.from_pretrained(out)`: real model code, a real processor and a
real byte-level BPE tokenizer (trained here from scratch on text shipped with scikit-learn), random
weights. The output is gibberish by construction; the folder says so (README.md and
`"rmskit_random_init": true` in config.json). Random weights cost the same compute as trained ones, so
`bench_model(preset)` builds 3B-class configs in memory (never saved) for throughput measurements.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ARCHS = ("qwen2-vl", "qwen2.5-vl", "llava", "smollm2")
PRESETS = ("tiny", "3b")

# Qwen2-VL's special tokens, in the order the real tokenizer lists them.
_SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<image>",
]

# Qwen2-VL-style chat template: string or list content; {"type": "image"} parts become the vision block.
_QWEN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant."
    "<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# LLaVA uses a single <image> placeholder that its processor expands.
_LLAVA_TEMPLATE = _QWEN_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<image>\n")

_README = """# RANDOM WEIGHTS - NOT A TRAINED MODEL

This folder was written by `rmskit models make-tiny {arch}` (seed {seed}). It has the real `{cls}`
architecture at a tiny size, a real processor/tokenizer (a byte-level BPE trained on a few kB of
English text), and **randomly initialised weights**. Its output is gibberish by construction.

Use it for smoke runs, tests and speed checks only (random weights cost the same compute as trained
ones). For real work pass a real model, e.g. `--model hf:Qwen/Qwen2-VL-2B-Instruct`.
"""


def _corpus() -> list[str]:
    """English text that ships with scikit-learn (dataset descriptions) plus JSON-ish snippets, so the
    BPE learns words, punctuation and the braces/quotes structured output needs."""
    import sklearn.datasets

    descr = Path(sklearn.datasets.__file__).parent / "descr"
    texts = [p.read_text(encoding="utf-8") for p in sorted(descr.glob("*.rst"))]
    texts.append('{"name": "value", "items": ["a", "b"], "count": 12, "ok": true, "none": null}\n' * 20)
    return texts


def build_tokenizer(vocab_size: int = 2048) -> Any:
    """A byte-level BPE (GPT-2/Qwen style) trained offline, wrapped as a transformers fast tokenizer with
    Qwen2-VL's special tokens. Deterministic for a given corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=32768,
    )
    fast.chat_template = _QWEN_TEMPLATE
    return fast


def _text_kwargs(tok: Any, preset: str) -> dict[str, Any]:
    if preset == "3b":  # Qwen2.5-VL-3B's language model
        return {
            "vocab_size": 151936,
            "hidden_size": 2048,
            "intermediate_size": 11008,
            "num_hidden_layers": 36,
            "num_attention_heads": 16,
            "num_key_value_heads": 2,
            "max_position_embeddings": 32768,
            "tie_word_embeddings": True,
        }
    return {
        "vocab_size": len(tok),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
    }


def _qwen_config(arch: str, tok: Any, preset: str) -> Any:
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    text = _text_kwargs(tok, preset)
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    # mrope splits the rotary half-dim into (temporal, height, width) sections; Qwen uses 1:1.5:1.5.
    half = head_dim // 2
    t = half // 4
    hw = (half - t) // 2
    mrope = [t, hw, half - t - hw]
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": mrope}
    ids = tok.convert_tokens_to_ids if tok is not None else None
    special: dict[str, Any] = {
        "image_token_id": ids("<|image_pad|>") if ids else 151655,
        "video_token_id": ids("<|video_pad|>") if ids else 151656,
        "vision_start_token_id": ids("<|vision_start|>") if ids else 151652,
        "vision_end_token_id": ids("<|vision_end|>") if ids else 151653,
    }
    eos = ids("<|im_end|>") if ids else 151645
    pad = ids("<|endoftext|>") if ids else 151643
    text.update(eos_token_id=eos, bos_token_id=pad, pad_token_id=pad)
    if arch == "qwen2.5-vl":
        vision: dict[str, Any] = (
            {
                "depth": 32,
                "hidden_size": 1280,
                "intermediate_size": 3420,
                "num_heads": 16,
                "out_hidden_size": 2048,
            }
            if preset == "3b"
            else {
                "depth": 2,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_heads": 2,
                "out_hidden_size": 64,
            }
        )
        vision.update(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112)
        vision["fullatt_block_indexes"] = [7, 15, 23, 31] if preset == "3b" else [1]
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **special)
    vision = (
        {"depth": 32, "embed_dim": 1280, "num_heads": 16, "hidden_size": 2048}
        if preset == "3b"
        else {"depth": 2, "embed_dim": 32, "num_heads": 2, "hidden_size": 64}
    )
    vision.update(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, mlp_ratio=2)
    return Qwen2VLConfig(text_config=text, vision_config=vision, **special)


def _llava_config(tok: Any) -> Any:
    from transformers import LlavaConfig

    text = _text_kwargs(tok, "tiny")
    text.update(model_type="llama", eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    text["pad_token_id"] = tok.pad_token_id
    vision = {
        "model_type": "clip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 56,
        "patch_size": 14,
        "projection_dim": 32,
    }
    return LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )


def _label(out: Path, arch: str, seed: int, cls: str) -> None:
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["rmskit_random_init"] = True
    cfg["rmskit_arch"] = arch
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "README.md").write_text(_README.format(arch=arch, seed=seed, cls=cls))


def make_tiny(arch: str, out: Path, seed: int = 0) -> Path:
    """Write a tiny randomly initialised `arch` model (see ARCHS) with its processor/tokenizer to `out`."""
    import torch
    from transformers import GenerationConfig

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tok = build_tokenizer()
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    if arch in ("qwen2-vl", "qwen2.5-vl"):
        from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        from rmskit.models.transformers_local import image_only_processor_class

        if arch == "qwen2-vl":
            from transformers import Qwen2VLForConditionalGeneration as cls
        else:
            from transformers import Qwen2_5_VLForConditionalGeneration as cls
        model = cls(_qwen_config(arch, tok, "tiny"))
        # Small pixel budget: a tiny model does not need 1280 visual tokens per image.
        improc = Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64)
        # Without torchvision the video processor cannot be built; images need none (same saved files).
        proc_cls = Qwen2VLProcessor if arch == "qwen2-vl" else Qwen2_5_VLProcessor
        processor = image_only_processor_class(proc_cls)(
            image_processor=improc, tokenizer=tok, chat_template=_QWEN_TEMPLATE
        )
    elif arch == "llava":
        from transformers import CLIPImageProcessor, LlavaForConditionalGeneration, LlavaProcessor

        cls = LlavaForConditionalGeneration
        model = cls(_llava_config(tok))
        improc = CLIPImageProcessor(
            size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}, do_convert_rgb=True
        )
        tok.chat_template = _LLAVA_TEMPLATE
        processor = LlavaProcessor(
            image_processor=improc,
            tokenizer=tok,
            patch_size=14,
            vision_feature_select_strategy="default",
            image_token="<image>",
            num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
            chat_template=_LLAVA_TEMPLATE,
        )
    else:  # smollm2: the llama architecture of SmolLM2, text only
        from transformers import LlamaConfig, LlamaForCausalLM

        cls = LlamaForCausalLM
        text = _text_kwargs(tok, "tiny")
        model = cls(LlamaConfig(**text, eos_token_id=eos, pad_token_id=tok.pad_token_id))
        processor = tok
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=tok.pad_token_id)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    if processor is not tok:
        tok.save_pretrained(out)
    _label(out, arch, seed, cls.__name__)
    return out


def bench_model(
    preset: str = "3b", arch: str = "qwen2-vl", *, device: str = "cuda", dtype: Any = None
) -> Any:
    """A randomly initialised `arch` model of `preset` size built directly on `device` (not saved).

    `3b` matches Qwen2.5-VL-3B's language model (hidden 2048, 36 layers, GQA 16/2, vocab 151936) with
    a 32-block vision tower; `tiny` is make_tiny's size. Weights are small random normals; decode speed
    does not depend on their values."""
    import torch

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if arch not in ("qwen2-vl", "qwen2.5-vl"):
        raise ValueError("bench_model supports qwen2-vl and qwen2.5-vl")
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    tok = None if preset == "3b" else build_tokenizer()
    cfg = _qwen_config(arch, tok, preset)
    cls = Qwen2VLForConditionalGeneration if arch == "qwen2-vl" else Qwen2_5_VLForConditionalGeneration
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    cfg.rmskit_random_init = True
    with torch.device(device):
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = cls._from_config(cfg, dtype=dtype)
        finally:
            torch.set_default_dtype(prev)
    return model.eval()
