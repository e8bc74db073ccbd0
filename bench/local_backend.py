"""Decode throughput of a 3B-class VLM (Qwen2-VL / Qwen2.5-VL-3B-like, RANDOM weights, bf16) through
transformers' generate, next to the memory-bandwidth roofline.

Decoding is memory-bound: every step reads all language-model weights once, whatever the batch. So
roofline tokens/s = batch / (weight bytes per step / measured bandwidth), the bandwidth being measured
here with a device-to-device copy. Random weights cost exactly what trained ones cost.

    python bench/local_backend.py              # CUDA GPU: batches 1, 8, 32, 64; eager and static+compile
    python bench/local_backend.py --smoke      # tiny config on CPU, a few tokens: proves the script runs
    python bench/local_backend.py --device cpu # the embedded model on CPU, prefix KV cache off vs on
                                               # (bench/local_cpu.py; extra args go to it)

Modes: `eager` = generate with the default dynamic KV cache (Python/kernel-launch bound at small
batch); `static` = `cache_implementation="static"`, which makes transformers torch.compile the decode
step with CUDA graphs ("reduce-overhead"); compiling costs time per batch size, so static points are
run largest batch first and stop when `--budget-s` is spent. Exits 0 with a message without CUDA.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "src"))

from rmskit.models.tiny import bench_model  # noqa: E402


def measure_bandwidth(device: str, gib: float = 1.0, iters: int = 10) -> float:
    """Bytes/s of a device-to-device copy (each copy reads and writes the buffer: 2x its size)."""
    n = int(gib * (1 << 30)) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1000
    else:
        t = time.perf_counter()
        for _ in range(iters):
            dst.copy_(src)
        seconds = time.perf_counter() - t
    del src, dst
    return 2 * n * 2 * iters / seconds


def decode_weight_bytes(model: Any) -> int:
    """Bytes of weights read per decode step: the language model without its input embedding table
    (a decode step reads one row per token) plus the LM head (which, tied or not, is read in full)."""
    lm = model.model.language_model
    embed = lm.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in lm.parameters())
    total -= embed.numel() * embed.element_size()
    head = model.get_output_embeddings().weight
    return total + head.numel() * head.element_size()


def kv_bytes(model: Any, batch: int, seq: int) -> int:
    cfg = model.config.get_text_config()
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    per_tok = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * model.dtype.itemsize
    return per_tok * batch * seq


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_generate(model: Any, ids: torch.Tensor, new: int, mode: str, device: str) -> float:
    kwargs: dict[str, Any] = {
        "max_new_tokens": new,
        "min_new_tokens": new,  # no early stop: every row decodes exactly `new` tokens
        "do_sample": False,
        "pad_token_id": 0,
    }
    if mode == "static":
        kwargs["cache_implementation"] = "static"
    else:
        kwargs["disable_compile"] = True
    _sync(device)
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    _sync(device)
    assert out.shape[1] == ids.shape[1] + new, out.shape
    return time.perf_counter() - t


def run_point(model: Any, batch: int, prompt: int, new: int, mode: str, device: str, vocab: int) -> float:
    """Decode tokens/s: (time of `new` tokens - time of 1 token) isolates decoding from prefill."""
    gen = torch.Generator(device="cpu").manual_seed(batch)
    ids = torch.randint(10, vocab, (batch, prompt), generator=gen).to(device)
    timed_generate(model, ids, min(new, 8), mode, device)  # warmup (and compile, in static mode)
    timed_generate(model, ids, new, mode, device)
    t1 = timed_generate(model, ids, 1, mode, device)
    tn = timed_generate(model, ids, new, mode, device)
    return batch * (new - 1) / max(tn - t1, 1e-9)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["--device", "cpu"]:
        sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
        import local_cpu

        return local_cpu.main(argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny config on CPU, a few tokens")
    ap.add_argument("--arch", default="qwen2.5-vl", choices=["qwen2-vl", "qwen2.5-vl"])
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument(
        "--prompt", type=int, default=128, help="prompt tokens (text only: decode cost is the same)"
    )
    ap.add_argument("--new", type=int, default=64, help="new tokens per point")
    ap.add_argument("--modes", default="eager,static", help="comma list of eager, static")
    ap.add_argument("--budget-s", type=float, default=200.0, help="stop starting static points after this")
    args = ap.parse_args(argv)

    if args.smoke:
        device, preset, batches, new, prompt = "cpu", "tiny", [1, 2], 4, 16
        modes = ["eager"]
    else:
        if not torch.cuda.is_available():
            print("local_backend bench: no CUDA GPU here; skipping (use --smoke to check the script on CPU).")
            return 0
        device, preset, new, prompt = "cuda", "3b", args.new, args.prompt
        batches = [int(b) for b in args.batches.split(",")]
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = bench_model(preset, args.arch, device=device)
    vocab = model.config.get_text_config().vocab_size
    wbytes = decode_weight_bytes(model)
    bw = measure_bandwidth(device, gib=0.25 if args.smoke else 2.0)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"device: {name}; model: {args.arch} preset {preset} (RANDOM weights), {n_params / 1e9:.2f}B params, "
        f"{model.dtype}; built in {time.perf_counter() - t0:.1f}s"
    )
    print(
        f"weights read per decode step: {wbytes / 1e9:.2f} GB; measured copy bandwidth: {bw / 1e9:.0f} GB/s; "
        f"prompt {prompt} tokens, {new} new tokens per point"
    )
    header = (
        f"{'mode':<7} {'batch':>5} {'tok/s':>10} {'roofline':>10} {'%roof':>6} "
        f"{'roof+KV':>10} {'%roof+KV':>8}"
    )
    print(header)
    print("-" * len(header))
    rows: list[tuple[str, int, float, float]] = []
    for mode in modes:
        order = sorted(batches, reverse=(mode == "static"))  # the batches that matter most compile first
        for b in order:
            if mode == "static" and time.perf_counter() - t0 > args.budget_s:
                print(f"{mode:<7} {b:>5}  skipped (time budget --budget-s {args.budget_s:.0f} spent)")
                continue
            roof = b / (wbytes / bw)
            kv = kv_bytes(model, b, prompt + new // 2)  # mean KV length over the decode
            roof_kv = b / ((wbytes + kv) / bw)
            try:
                tps = run_point(model, b, prompt, new, mode, device, vocab)
            except Exception as e:  # e.g. compile unsupported for this model/torch: report, go on
                print(f"{mode:<7} {b:>5}  failed: {type(e).__name__}: {str(e)[:160]}")
                continue
            rows.append((mode, b, tps, roof))
            print(
                f"{mode:<7} {b:>5} {tps:>10.0f} {roof:>10.0f} {100 * tps / roof:>5.0f}% "
                f"{roof_kv:>10.0f} {100 * tps / roof_kv:>7.0f}%",
                flush=True,
            )
    big = [100 * t / r for m, b, t, r in rows if b >= 32]
    if big and not args.smoke:
        best = max(big)
        print(
            f"best % of roofline at batch >= 32: {best:.0f}% (goal 60%: {'met' if best >= 60 else 'NOT met'})"
        )
    print(f"total {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
