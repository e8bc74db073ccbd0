"""Scale-out benchmark (not a test): the local executor vs `--executor ray` at 1 and 2 workers.

A CPU-heavy build: large JPEGs (real photos upscaled with grain, ~6 MP) that ingest decodes, hashes
and re-encodes on the driver, and that the `openai:` backend downsizes and base64-encodes for every
vision request on the workers. The endpoint is the HTTP test server (`--script rms`, latency L,
capacity C) in its own process. We report images/s over the build and endpoint utilisation
(server busy time / (span x C)); Ray's cluster start is timed apart (paid once per run).

  nice python bench/scale.py                      # local, ray x1, ray x2 on 24 images
  nice python bench/scale.py --images 12 --only local
Each configuration runs in a fresh subprocess (a fresh local Ray with num_cpus = this machine's).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from rmskit.config import BackendConfig, BuildConfig

PHOTOS = Path(tempfile.gettempdir()) / "rmskit-bench-scale-photos"


def make_photos(n: int, side: int = 3000) -> Path:
    """n distinct large JPEGs from the bundled real photos (cached between runs)."""
    from PIL import Image
    from skimage import data

    d = PHOTOS / f"{n}x{side}"
    if d.is_dir() and len(list(d.glob("*.jpg"))) == n:
        return d
    d.mkdir(parents=True, exist_ok=True)
    bases = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    rng = np.random.default_rng(0)
    for i in range(n):
        img = Image.fromarray(bases[i % len(bases)]).resize((side, side * 2 // 3), Image.Resampling.BICUBIC)
        arr = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, size=(side * 2 // 3, side, 3))
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(d / f"p{i:04d}.jpg", quality=92)
    return d


def start_server(latency: float, capacity: int) -> tuple[subprocess.Popen, str]:
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
    line = server.stdout.readline().strip() if server.stdout else ""
    return server, line.split()[-1]


def run_child(executor: str, workers: int, images: int, latency: float, capacity: int, side: int) -> dict:
    from rmskit.executors import ExecutorConfig
    from rmskit.executors.ray import run_build_ray
    from rmskit.pipeline.runner import run_build

    photos = make_photos(images, side)
    server, base_url = start_server(latency, capacity)
    os.environ.setdefault("OPENAI_API_KEY", "sk-bench")
    try:
        cfg = BuildConfig(
            sources=[str(photos)],
            out=Path(tempfile.mkdtemp(prefix="rmskit-bench-scale-")),
            embedder="hashing",
            perceive="model",
            model=BackendConfig(spec="openai:test-model", base_url=base_url, concurrency=capacity),
        )
        init_s = 0.0
        if executor == "ray":
            import ray

            t0 = time.monotonic()
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
            init_s = time.monotonic() - t0
            ex = ExecutorConfig(kind="ray", workers=workers)
            summary = asyncio.run(run_build_ray(cfg, ex, quiet=True, export=False))
        else:
            summary = asyncio.run(run_build(cfg, quiet=True, export=False))
        st = httpx.get(base_url.removesuffix("/v1") + "/stats").json()
    finally:
        server.terminate()
        server.wait()
    span = (st["last_end"] or 0) - (st["first_start"] or 0) or 1e-9
    return {
        "executor": executor,
        "workers": workers,
        "images": summary.images_done,
        "side": side,
        "elapsed_s": summary.elapsed_s,
        "ray_init_s": round(init_s, 2),
        "images_per_s": summary.images_done / summary.elapsed_s,
        "requests": st["requests"],
        "utilisation": st["busy_s"] / (span * capacity),
        "utilisation_over_build": st["busy_s"] / (summary.elapsed_s * capacity),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--latency", type=float, default=0.3)
    ap.add_argument("--capacity", type=int, default=32)
    ap.add_argument("--side", type=int, default=3000, help="photo width in pixels (640: light ingest)")
    ap.add_argument("--only", choices=["local", "ray1", "ray2"])
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        res = run_child(
            args.child[0], int(args.child[1]), args.images, args.latency, args.capacity, args.side
        )
        print(json.dumps(res))
        return
    make_photos(args.images, args.side)
    configs = {"local": ("local", 1), "ray1": ("ray", 1), "ray2": ("ray", 2)}
    rows = []
    for key, (ex, w) in configs.items():
        if args.only and key != args.only:
            continue
        cmd = [sys.executable, __file__, "--child", ex, str(w), "--images", str(args.images)]
        cmd += ["--latency", str(args.latency), "--capacity", str(args.capacity), "--side", str(args.side)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(
            f"{ex:>5} x{w} | {r['images']} images in {r['elapsed_s']:.1f}s = {r['images_per_s']:.3f} img/s"
            f" | utilisation {r['utilisation']:.3f} (over the build {r['utilisation_over_build']:.3f})"
            f" | ray init {r['ray_init_s']:.1f}s",
            flush=True,
        )
    local = next((r for r in rows if r["executor"] == "local"), None)
    for r in rows:
        if local and r is not local:
            print(f"ray x{r['workers']} / local images/s: {r['images_per_s'] / local['images_per_s']:.3f}")


if __name__ == "__main__":
    main()
