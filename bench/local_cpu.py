"""Embedded model on CPU (issue 13 §7; not a test): requests/s of the `embedded` backend
(SmolLM2-135M) on rmskit's real stage prompts, without and with the shared-prefix KV cache.

The prompts are captured from a real build: `run_build` against the scripted test server
(keep_bodies) on real photos, text parts only (the embedded model has no vision), each with its
stage's schema and token budget. Both modes then replay the same requests, all submitted at once as
the pipeline's workers would, through one EmbeddedBackend:
  before = prefix cache off, batches drawn by sampling settings only, `model.generate` (the code
           before issue 13 §7)
  after  = each row's stage system prompt from the prefix KV cache (LRU) and the rest of its prompt
           prefilled at batch 1 without padding; batches mix stages (head's stage first); a decode
           loop that drops rows as they finish (models/prefix_kv.py, models/decode.py); bf16 weights
           where the CPU has native bf16 (before: fp32, as the original code)
Both modes run with the same torch intra-op threads (--threads, default 1 as the embedded backend
now uses); with 2 threads on a loaded 2-core machine every op waits at an OpenMP barrier.

  python bench/local_backend.py --device cpu            # 2 photos, ~20 requests, both modes
  python bench/local_cpu.py --photos 1 --max-tokens 48  # shorter
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pydantic import BaseModel  # noqa: E402

from rmskit.config import BackendConfig, BuildConfig  # noqa: E402
from rmskit.models.base import GenParams, Message  # noqa: E402
from rmskit.pipeline import schemas  # noqa: E402
from rmskit.pipeline.runner import run_build  # noqa: E402
from rmskit.records import ImageRecord  # noqa: E402
from rmskit.testing.openai_server import OpenAITestServer  # noqa: E402
from rmskit.testing.rms_script import _texts, responder, stage_of  # noqa: E402

SCHEMAS: dict[str, type[BaseModel]] = {
    "perceive": schemas.Perception,
    "discover": schemas.discovery_schema(2),  # the build's default scenarios_per_image
    "compose": schemas.ComposedQuery,
    "control": schemas.ControlQuery,
    "check_text_only": schemas.TextOnlyVerdict,
    "check_combined": schemas.CombinedVerdict,
    "check_leakage": schemas.LeakageVerdict,
    "respond": schemas.GuidanceResponse,
    "respond_control": schemas.GuidanceResponse,
    "check_response": schemas.ResponseVerdict,
}


def capture(n_photos: int) -> list[tuple[str, list[Message], int]]:
    """(stage, text-only messages, max_tokens) of every request a real build sends."""
    from PIL import Image
    from skimage import data

    d = Path(tempfile.mkdtemp(prefix="rmskit-cpu-img-"))
    items = []
    for i, name in enumerate(["coffee", "chelsea", "astronaut", "rocket"][:n_photos]):
        p = d / f"{name}.jpg"
        Image.fromarray(getattr(data, name)()).convert("RGB").save(p)
        sha = hashlib.sha256(p.read_bytes()).hexdigest()
        items.append(ImageRecord(sha256=sha, phash=f"{i:016x}", source_root=str(d), source_path=p.name,
                                 path=str(p), width=400, height=300))  # fmt: skip
    with OpenAITestServer(responder=responder, keep_bodies=True) as srv:
        cfg = BuildConfig(
            sources=[str(d)],
            out=Path(tempfile.mkdtemp(prefix="rmskit-cpu-")),
            embedder="hashing",
            perceive="model",
            model=BackendConfig(spec="openai:test-model", base_url=srv.base_url),
        )
        os.environ.setdefault("OPENAI_API_KEY", "sk-bench")
        asyncio.run(run_build(cfg, quiet=True, items=items, export=False))
        bodies = [r.body for r in srv.records if r.body]
    out = []
    for b in bodies:
        stage = stage_of(_texts(b)[0])
        msgs = []
        for m in b["messages"]:
            c = m["content"]
            text = c if isinstance(c, str) else "\n".join(p["text"] for p in c if p.get("type") == "text")
            msgs.append(Message(role=m["role"], content=text))
        out.append((stage, msgs, int(b.get("max_tokens") or b.get("max_completion_tokens") or 256)))
    return [r for r in out if r[0] in SCHEMAS]


def replay(
    reqs: list[tuple[str, list[Message], int]], after: bool, max_tokens: int, batch: int, threads: int = 1
) -> dict[str, Any]:
    from rmskit.models.batching import take_same_sampling
    from rmskit.models.embedded import EmbeddedBackend

    # before = the original dtype (fp32 on CPU); after = the embedded default (bf16 where the CPU has it)
    dtype = None if after else "fp32"
    backend = EmbeddedBackend(BackendConfig(max_batch=batch, cpu_threads=threads, dtype=dtype))
    backend.prefix_cache = after
    if not after:
        backend._batcher.select = take_same_sampling

    async def run() -> float:
        await backend.load()
        t0 = time.perf_counter()
        params = [GenParams(temperature=0.0, max_tokens=min(n, max_tokens)) for _, _, n in reqs]
        await asyncio.gather(
            *(
                backend.generate(m, schema=SCHEMAS[s], params=p)
                for (s, m, _), p in zip(reqs, params, strict=True)
            )
        )
        dt = time.perf_counter() - t0
        await backend.aclose()
        return dt

    c0 = time.process_time()
    dt = asyncio.run(run())
    st = backend.stats
    return {
        "mode": "after" if after else "before",
        "requests": st.requests,
        "seconds": dt,
        "rps": st.requests / dt,
        "batches": st.batches,
        "mean_batch": st.requests / max(st.batches, 1),
        "prompt_tokens": st.prompt_tokens,
        "completion_tokens": st.completion_tokens,
        "cached_tokens": getattr(st, "cached_prompt_tokens", 0),
        "cpu_s": time.process_time() - c0,
        "load": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64, help="cap on each request's token budget")
    ap.add_argument("--batch", type=int, default=8, help="max_batch of the backend")
    ap.add_argument("--modes", default="before,after")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (both modes)")
    args = ap.parse_args(argv)

    reqs = capture(args.photos)
    stages = sorted({s for s, _, _ in reqs})
    print(
        f"{len(reqs)} requests captured from a real build of {args.photos} photo(s); stages: {', '.join(stages)}"
    )
    print(
        f"torch threads {args.threads}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
        f"tokens capped at {args.max_tokens}"
    )
    rows = [
        replay(reqs, m == "after", args.max_tokens, args.batch, args.threads) for m in args.modes.split(",")
    ]
    for r in rows:
        print(
            f"{r['mode']:<6} | {r['requests']} requests in {r['seconds']:.1f} s | {r['rps']:.3f} requests/s | "
            f"{r['batches']} batches (mean {r['mean_batch']:.1f}) | prompt tokens {r['prompt_tokens']} "
            f"({r['cached_tokens']} from the prefix cache) | "
            f"new tokens {r['completion_tokens']} | CPU {r['cpu_s']:.0f} s "
            f"({r['requests'] / r['cpu_s']:.3f} requests per CPU-second) | load average {r['load']:.1f}",
            flush=True,
        )
    if len(rows) == 2:
        b, a = rows
        print(
            f"speed-up after/before: {a['rps'] / b['rps']:.2f}x requests/s (goal >= 3x); "
            f"{(a['requests'] / a['cpu_s']) / (b['requests'] / b['cpu_s']):.2f}x requests per CPU-second"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
