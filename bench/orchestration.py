"""Orchestration benchmark (not a test): how well the build runner keeps an endpoint busy.

A simulated endpoint with latency L and capacity C (at most C requests in service at once)
answers every stage with schema-valid scripted content. We report:
  utilisation  = server busy time / (span x C)
  requests per image, CPU ms per request (client process), peak RSS (1k vs 10k images).
Each configuration runs in a fresh subprocess so peak RSS is its own.

  python bench/orchestration.py                 # the issue's configurations
  python bench/orchestration.py --images 200    # one quick configuration
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydantic import BaseModel

from rmskit.config import BackendConfig, BuildConfig
from rmskit.models.base import Capabilities, GenParams, Message, Result, Usage
from rmskit.pipeline.runner import run_build
from rmskit.records import ImageRecord
from rmskit.testing.rms_script import answer


class SimEndpoint:
    """In-process endpoint: capacity C, fixed service time L; accounts busy time."""

    model_id = "sim-endpoint"
    capabilities = Capabilities(vision=True, structured="native")

    def __init__(self, latency: float, capacity: int) -> None:
        self.latency = latency
        self.sem = asyncio.Semaphore(capacity)
        self.busy = 0.0
        self.requests = 0
        self.first: float | None = None
        self.last = 0.0

    async def generate(
        self,
        messages: list[Message],
        *,
        schema: type[BaseModel] | None = None,
        params: GenParams | None = None,
    ) -> Result:
        async with self.sem:
            t0 = time.perf_counter()
            if self.first is None:
                self.first = t0
            await asyncio.sleep(self.latency)
            t1 = time.perf_counter()
            self.busy += t1 - t0
            self.last = t1
            self.requests += 1
        # The scripted model "sees" the image through its hash, so answers differ per image.
        request = {
            "messages": [
                {"role": m.role, "content": m.content + "".join(f" [{i.sha256}]" for i in m.images)}
                for m in messages
            ]
        }
        content = answer(request)
        text = json.dumps(content)
        return Result(
            text=text,
            parsed=schema.model_validate(content).model_dump() if schema else None,
            usage=Usage(
                prompt_tokens=sum(len(m.content) for m in messages) // 4, completion_tokens=len(text) // 4
            ),
            finish_reason="stop",
            model=self.model_id,
        )

    async def aclose(self) -> None:
        return None


def _images(n: int):
    for i in range(n):
        sha = hashlib.sha256(f"bench-{i}".encode()).hexdigest()
        yield ImageRecord(
            sha256=sha,
            phash="0" * 16,
            source_root="/bench",
            source_path=f"img{i:06d}.jpg",
            path=f"/bench/img{i:06d}.jpg",
            width=640,
            height=480,
        )


def run_http(images: int, latency: float, capacity: int) -> dict:
    """The same build through the real `openai:` backend against the HTTP test server running in
    another process (so client CPU is the build process's alone)."""
    import httpx
    from PIL import Image
    from skimage import data

    photo = Path(tempfile.mkdtemp(prefix="rmskit-bench-img-")) / "coffee.jpg"
    Image.fromarray(data.coffee()).resize((320, 213)).save(photo, quality=90)
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rmskit.testing.openai_server",
            "--latency",
            str(latency),
            "--capacity",
            str(capacity),
            "--script",
            "rms",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = server.stdout.readline().strip() if server.stdout else ""
        base_url = line.split()[-1]
        out = Path(tempfile.mkdtemp(prefix="rmskit-bench-"))
        cfg = BuildConfig(
            sources=["/bench"],
            out=out,
            embedder="hashing",
            perceive="model",
            model=BackendConfig(
                spec="openai:test-model", base_url=base_url, concurrency=capacity, image_max_side=320
            ),
        )
        items = (r.model_copy(update={"path": str(photo)}) for r in _images(images))
        c0 = time.process_time()
        asyncio.run(run_build(cfg, quiet=True, items=items, export=False))
        cpu = time.process_time() - c0
        st = httpx.get(base_url.removesuffix("/v1") + "/stats").json()
    finally:
        server.terminate()
        server.wait()
    span = (st["last_end"] or 0) - (st["first_start"] or 0) or 1e-9
    return {
        "mode": "http",
        "images": images,
        "latency_s": latency,
        "capacity": capacity,
        "requests": st["requests"],
        "requests_per_image": st["requests"] / images,
        "span_s": span,
        "utilisation": st["busy_s"] / (span * capacity),
        "cpu_ms_per_request": 1000 * cpu / max(st["requests"], 1),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_one(images: int, latency: float, capacity: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix="rmskit-bench-"))
    cfg = BuildConfig(
        sources=["/bench"],
        out=out,
        model=BackendConfig(spec="openai:sim", concurrency=capacity),
        embedder="hashing",
        perceive="model",
    )

    async def main() -> tuple[SimEndpoint, float, float]:
        endpoint = SimEndpoint(latency, capacity)
        backends = dict.fromkeys(("perceive", "discover", "compose", "verify", "respond"), endpoint)
        c0 = time.process_time()
        await run_build(cfg, quiet=True, items=_images(images), backends=backends, export=False)
        return endpoint, time.process_time() - c0, 0.0

    ep, cpu, _ = asyncio.run(main())
    span = (ep.last - (ep.first or ep.last)) or 1e-9
    return {
        "mode": "inproc",
        "images": images,
        "latency_s": latency,
        "capacity": capacity,
        "requests": ep.requests,
        "requests_per_image": ep.requests / images,
        "span_s": span,
        "utilisation": ep.busy / (span * capacity),
        "cpu_ms_per_request": 1000 * cpu / max(ep.requests, 1),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int)
    ap.add_argument("--latency", type=float, default=0.3)
    ap.add_argument("--capacity", type=int, default=64)
    ap.add_argument("--http", action="store_true", help="through the openai backend + HTTP test server")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        fn = run_http if args.http else run_one
        print(json.dumps(fn(args.images, args.latency, args.capacity)))
        return
    configs = (
        [(args.images, args.latency, args.capacity, args.http)]
        if args.images
        else [
            (1000, 0.3, 64, False),
            (1000, 0.3, 64, True),
            (1000, 0.02, 64, False),
            (10000, 0.02, 64, False),
        ]
    )
    rows = []
    for n, lat, cap, http in configs:
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                "--images",
                str(n),
                "--latency",
                str(lat),
                "--capacity",
                str(cap),
                *(["--http"] if http else []),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(
            f"{r['mode']:>6} images={r['images']:>6} L={r['latency_s']:.2f}s C={r['capacity']:>3} | "
            f"utilisation {r['utilisation']:.3f} | requests/image {r['requests_per_image']:.2f} | "
            f"CPU {r['cpu_ms_per_request']:.3f} ms/request | peak RSS {r['peak_rss_mb']:.0f} MB | "
            f"span {r['span_s']:.1f}s",
            flush=True,
        )
    by_n = {r["images"]: r for r in rows if r["latency_s"] == rows[-1]["latency_s"] and r["mode"] == "inproc"}
    if 1000 in by_n and 10000 in by_n:
        print(f"peak RSS ratio 10k/1k images: {by_n[10000]['peak_rss_mb'] / by_n[1000]['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()
