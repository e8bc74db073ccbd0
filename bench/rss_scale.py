"""Memory over a long build (issue 13 §5; not a test): peak RSS of `run_build` on the `openai:` path at
1k, 10k, 100k images against the HTTP test server at low latency, each size in a fresh process.

    python bench/rss_scale.py                    # 1000 10000 (100000 takes ~30 min on 2 cores)
    python bench/rss_scale.py --images 1000 10000 100000

The build is job (b) of bench/peers (one scenario per image, no controls, hashing taxonomy embedder,
export and probes included). The images are distinct 320 px JPEGs made from 7 real photos
(bench/peers' make_photos; cycled past 10k), under distinct hashes, so every image is new to the
pipeline and its caches, and the scripted endpoint varies its answers per call as a real model does.
The parent samples the child's VmRSS every 0.5 s and reads the server's request count, so RSS is
reported at each quarter of the run, at the last response, and at its peak (the finish included); the
last column sums the build process and its finish worker (pipeline/finish_worker.py), sampled every
0.1 s, as RSS and as PSS (shared library pages divided between the two)."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))


def child(n: int, base_url: str, base: list[str]) -> None:
    # only rmskit is imported here: the photo makers (skimage, sklearn) stay in the parent
    from rmskit.config import BackendConfig, BuildConfig
    from rmskit.pipeline.runner import run_build
    from rmskit.records import ImageRecord

    cfg = BuildConfig(
        sources=["/bench"],
        out=Path(tempfile.mkdtemp(prefix="rmskit-rss-")),
        embedder="hashing",
        perceive="model",
        scenarios_per_image=1,
        controls=False,
        model=BackendConfig(spec="openai:gpt-4o-mini", base_url=base_url, concurrency=64, image_max_side=320),
    )
    items = (
        ImageRecord(
            sha256=hashlib.sha256(f"rss-{i}".encode()).hexdigest(),
            phash=hashlib.sha256(f"phash-{i}".encode()).hexdigest()[:16],  # distinct photos: far apart
            source_root="/bench",
            source_path=f"img{i:06d}.jpg",
            path=base[i % len(base)],
            width=320,
            height=240,
        )
        for i in range(n)
    )
    s = asyncio.run(run_build(cfg, quiet=True, items=items, export=True))
    print("RSS-RESULT " + json.dumps({"samples_ok": s.samples_ok, "requests": s.requests}), flush=True)


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    from bench import proc_kb  # bench/peers/bench.py

    return proc_kb(pid, field) / 1024


def measure(n: int, latency: float, capacity: int, photos: list[str]) -> dict:
    from bench import TreeRSS  # bench/peers/bench.py

    env = {
        **os.environ,
        "PYTHONPATH": str(HERE.parent / "src"),
        "OPENAI_API_KEY": "sk-bench",
        "HF_HUB_OFFLINE": "1",
    }
    server = subprocess.Popen(
        [
            sys.executable,
            str(HERE / "peers" / "server.py"),
            "--latency",
            str(latency),
            "--capacity",
            str(capacity),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    listing: Path | None = None
    try:
        url = (server.stdout.readline() if server.stdout else "").split()[-1]
        stats_url = url.removesuffix("/v1") + "/stats"
        t0 = time.time()
        fd, name = tempfile.mkstemp(prefix="rmskit-rss-photos-", suffix=".json")
        os.close(fd)
        listing = Path(name)
        listing.write_text(json.dumps(photos))  # a file: 10k paths exceed the argument list's limit
        proc = subprocess.Popen(
            [sys.executable, __file__, "--child", str(n), url, str(listing)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        tree = TreeRSS(proc.pid)  # the build and its finish worker together, every 0.1 s
        tree.start()
        trace: list[tuple[float, int, float]] = []  # (time, requests so far, rss)
        while proc.poll() is None:
            reqs = httpx.get(stats_url).json()["requests"]
            hwm = rss_mb(proc.pid, "VmHWM")  # read before the process can exit
            trace.append((time.time() - t0, reqs, rss_mb(proc.pid)))
            peak = hwm or (trace[-1][2] if trace else 0.0)
            time.sleep(0.5)
        tree.stop.set()
        tree.join()
        out = proc.stdout.read() if proc.stdout else ""
        res = json.loads(next(x for x in out.splitlines() if x.startswith("RSS-RESULT ")).split(" ", 1)[1])
        st = httpx.get(stats_url).json()
    finally:
        server.terminate()
        server.wait()
        if listing is not None:
            listing.unlink(missing_ok=True)
    total = st["requests"]
    at = {}
    for q in (0.25, 0.5, 0.75):
        at[q] = next((r for _, k, r in trace if k >= q * total), 0.0)
    end_of_run = next((r for _, k, r in trace if k >= total), 0.0)
    return {
        "images": n,
        **res,
        "wall_s": time.time() - t0,
        "rss": at,
        "rss_last_response": end_of_run,
        "peak": max(peak, max(r for _, _, r in trace)),
        "tree_peak": tree.peak_kb / 1024,
        "tree_pss": tree.peak_pss_kb / 1024,
        "tree_pss_parts": [round(k / 1024) for k in tree.peak_pss_parts],  # each process at that peak
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(int(sys.argv[2]), sys.argv[3], json.loads(Path(sys.argv[4]).read_text()))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--latency", type=float, default=0.01)
    ap.add_argument("--capacity", type=int, default=64)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    lines = [
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} | {os.cpu_count()} CPUs | latency {args.latency} s, "
        f"capacity {args.capacity}",
        "| images | requests | samples | wall (s) | RSS at 25% / 50% / 75% of requests (MB) | at last response | peak incl. finish | peak, build + finish worker: RSS / PSS | PSS at that peak, each process |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    from bench import make_photos  # bench/peers/bench.py

    photos = make_photos(min(max(args.images), 10_000))  # distinct photos (cycled past 10k)
    for n in args.images:
        r = measure(n, args.latency, args.capacity, photos)
        q = r["rss"]
        lines.append(
            f"| {n} | {r['requests']} | {r['samples_ok']} | {r['wall_s']:.0f} | {q[0.25]:.0f} / {q[0.5]:.0f} / "
            f"{q[0.75]:.0f} | {r['rss_last_response']:.0f} | {r['peak']:.0f} | {r['tree_peak']:.0f} / {r['tree_pss']:.0f} | "
            f"{' + '.join(str(k) for k in r['tree_pss_parts'])} |"
        )
        print(lines[-1], file=sys.stderr, flush=True)
    text = "\n".join(lines)
    print(text)
    if args.out:
        with args.out.open("a") as f:
            f.write(text + "\n\n")


if __name__ == "__main__":
    main()
