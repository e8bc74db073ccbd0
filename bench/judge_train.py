"""LoRA judge-training throughput and MFU for a 2B-class VLM (Qwen2-VL-2B shape, random bf16 weights).

    python bench/judge_train.py          # CUDA: samples/s, tokens/s, TFLOP/s, MFU (exit 0 without CUDA)
    python bench/judge_train.py --smoke      # tiny config on CPU: checks the script runs

Setup mirrors `rmskit score` training: LoRA (r=16) on the language model's q/k/v/o projections, frozen
base and vision tower, fixed-length sequences of --seq-len tokens that include the image tokens
(a --image-side^2 image -> (side/14)^2 patches -> /4 merged tokens), loss on the last --answer-tokens.

FLOP convention (stated, since LoRA training is not the usual 6N):
- language model, per token: forward 2*N_lm + backward *activation* gradients 2*N_lm = 4*N_lm
  (frozen weights need no weight gradients); N_lm = matmul parameters of the decoder layers plus the
  LM head (embedding lookups are not FLOPs). LoRA adapters: 6*N_lora (forward, dgrad and wgrad).
- attention scores, per token: 4*L*S*d forward (QK^T and PV over the full S x S square, PaLM-style)
  and twice that backward -> 12*L*S*d.
- vision tower: frozen and upstream of every trainable weight, so no backward runs through it:
  forward only, 2*N_vis per patch + 4*L_v*P*d_v attention per patch (P patches per image).
MFU = achieved FLOP/s / peak dense bf16 FLOP/s of the detected GPU (H100/H200 SXM: 989 TFLOP/s).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

PEAK_BF16 = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 80GB HBM3": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10": 125e12,
}


def peak_flops(name: str) -> float | None:
    for key, val in PEAK_BF16.items():
        if key in name:
            return val
    return None


def build(smoke: bool, device: str, dtype: Any, attn: str) -> Any:
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    if smoke:
        text = dict(
            vocab_size=2048,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        vision = dict(depth=2, embed_dim=32, num_heads=2, hidden_size=64, mlp_ratio=2)
        mrope = [2, 3, 3]
    else:  # Qwen2-VL-2B
        text = dict(
            vocab_size=151936,
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
        )
        vision = dict(depth=32, embed_dim=1280, num_heads=16, hidden_size=1536, mlp_ratio=4)
        mrope = [16, 24, 24]
    text.update(
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": mrope},
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=0,
    )
    vision.update(patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    v = text["vocab_size"]
    cfg = Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=v - 4,
        video_token_id=v - 3,
        vision_start_token_id=v - 2,
        vision_end_token_id=v - 1,
        tie_word_embeddings=True,
    )
    cfg._attn_implementation = attn
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration._from_config(cfg, dtype=dtype, attn_implementation=attn)
    return model


def count_params(model: Any) -> dict[str, int]:
    import torch

    out = {"lm": 0, "vision": 0, "lora": 0}
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        n = mod.weight.numel()
        if "lora_" in name:
            out["lora"] += n
        elif "visual" in name:
            out["vision"] += n
        else:
            out["lm"] += n
    return out


def batch_for(
    model: Any, bsz: int, seq: int, side: int, answer: int, device: str, dtype: Any
) -> dict[str, Any]:
    import torch

    cfg = model.config
    g = side // 14
    n_img = g * g // 4
    n_text = seq - n_img - 2
    if n_text <= answer:
        raise SystemExit(f"--seq-len {seq} leaves no room for text after {n_img} image tokens")
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(10, cfg.text_config.vocab_size - 10, (bsz, n_text), generator=gen)
    ids = torch.cat(
        [
            torch.full((bsz, 1), cfg.vision_start_token_id),
            torch.full((bsz, n_img), cfg.image_token_id),
            torch.full((bsz, 1), cfg.vision_end_token_id),
            text,
        ],
        dim=1,
    )
    labels = torch.full_like(ids, -100)
    labels[:, -answer:] = ids[:, -answer:]
    return {
        "input_ids": ids.to(device),
        "labels": labels.to(device),
        "mm_token_type_ids": (ids == cfg.image_token_id).int().to(device),
        "pixel_values": torch.randn(bsz * g * g, 3 * 2 * 14 * 14, generator=gen).to(device, dtype),
        "image_grid_thw": torch.tensor([[1, g, g]] * bsz, device=device),
    }


def flops_per_step(model: Any, p: dict[str, int], bsz: int, seq: int, side: int) -> float:
    t, v = model.config.text_config, model.config.vision_config
    tokens = bsz * seq
    lm = (
        4 * p["lm"] * tokens
        + 12 * t.num_hidden_layers * seq * t.hidden_size * tokens
        + 6 * p["lora"] * tokens
    )
    patches_per_img = (side // 14) ** 2
    patches = bsz * patches_per_img
    vis = 2 * p["vision"] * patches + 4 * v.depth * patches_per_img * v.embed_dim * patches
    return float(lm + vis)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny config on CPU (checks the script)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--image-side", type=int, default=448)
    ap.add_argument("--answer-tokens", type=int, default=32)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--attn", default="sdpa", help="sdpa | flash_attention_2 | eager")
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (off by default)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the language model")
    a = ap.parse_args()

    import torch

    if a.smoke:
        device, dtype = "cpu", torch.float32
        a.batch_size, a.seq_len, a.image_side, a.steps, a.warmup, a.answer_tokens = 2, 96, 56, 2, 1, 8
    else:
        if not torch.cuda.is_available():
            print("judge_train bench: no CUDA device; skipping (use --smoke for a CPU check)")
            return 0
        device, dtype = "cuda", torch.bfloat16
        torch.backends.cuda.matmul.allow_tf32 = True
    from peft import LoraConfig, get_peft_model

    t0 = time.perf_counter()
    model = build(a.smoke, device, dtype, a.attn)
    targets = [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
        and n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj")
        and "visual" not in n
    ]
    model = get_peft_model(model, LoraConfig(r=a.lora_r, lora_alpha=2 * a.lora_r, target_modules=targets))
    if a.grad_ckpt:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    if a.compile:
        lm = model.base_model.model.model.language_model
        model.base_model.model.model.language_model = torch.compile(lm)
    params = count_params(model)
    batch = batch_for(model, a.batch_size, a.seq_len, a.image_side, a.answer_tokens, device, dtype)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    build_s = time.perf_counter() - t0

    def step() -> float:
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(a.warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    if device == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t1) / a.steps
    flops = flops_per_step(model, params, a.batch_size, a.seq_len, a.image_side)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = peak_flops(name) if device == "cuda" else None
    print(
        f"device: {name}; config: {'tiny (smoke)' if a.smoke else 'Qwen2-VL-2B shape'}, "
        f"random weights, {dtype}"
    )
    print(
        f"params (matmul): lm {params['lm'] / 1e6:.1f}M, vision {params['vision'] / 1e6:.1f}M, "
        f"lora {params['lora'] / 1e6:.2f}M; build {build_s:.1f}s"
    )
    print(
        f"batch {a.batch_size} x {a.seq_len} tokens ({(a.image_side // 14) ** 2 // 4} image tokens each), "
        f"attn={a.attn}, grad_ckpt={a.grad_ckpt}, compile={a.compile}"
    )
    print(
        f"step {dt * 1000:.1f} ms; {a.batch_size / dt:.2f} samples/s; "
        f"{a.batch_size * a.seq_len / dt:.0f} tokens/s; "
        f"loss {loss:.3f}"
    )
    print(f"model FLOPs/step {flops / 1e12:.2f} TFLOP; achieved {flops / dt / 1e12:.1f} TFLOP/s")
    if peak:
        print(f"MFU {100 * flops / dt / peak:.1f}% of {peak / 1e12:.0f} TFLOP/s peak bf16 dense")
    elif device == "cuda":
        print("MFU: unknown peak for this GPU")
    if device == "cuda":
        print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
