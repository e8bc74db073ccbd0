"""The finish of a `--executor ray` build (not a test): from the endpoint's last response to
`run_build_ray` returning (the actors' teardown, the probes and the export included), with the build's
own `finish:` log line. A local Ray with 2 workers, the HTTP test server in this process with rmskit's
varied scripted answers (L = 0.05 s, C = 64), one scenario per image, the bench/peers photos.

    python bench/ray_finish.py --images 300 --repeat 2 [--out bench/results/ray_finish.txt]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", type=Path, help="also append the runs here, under a dated line")
    args = ap.parse_args()
    os.environ.setdefault("RMSKIT_FINISH", "worker")
    import ray
    from run_rmskit import image_records

    from bench import make_photos  # bench/peers/bench.py
    from rmskit.config import BackendConfig, BuildConfig
    from rmskit.executors import ExecutorConfig
    from rmskit.executors.ray import run_build_ray
    from rmskit.testing.openai_server import OpenAITestServer
    from rmskit.testing.rms_script import varied_responder

    photos = make_photos(args.images)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    lines_out = [
        f"\n# bench/ray_finish.py --images {args.images} --repeat {args.repeat} at "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs"
    ]
    for rep in range(args.repeat):
        out = Path(tempfile.mkdtemp(prefix="rmskit-ray-finish-")) / "run"
        with OpenAITestServer(responder=varied_responder(), latency=0.05, capacity=64) as srv:
            cfg = BuildConfig(
                sources=["/bench"],
                out=out,
                embedder="hashing",
                scenarios_per_image=1,
                controls=False,
                model=BackendConfig(spec="openai:m", base_url=srv.base_url, concurrency=64),
            )
            ex = ExecutorConfig(kind="ray", workers=2)
            summary = asyncio.run(
                run_build_ray(cfg, ex, quiet=True, items=image_records(photos, f"ray-{rep}-"), export=True)
            )
            t_end = time.time()
            last = srv.stats().last_end_unix or t_end
        lines = [x for x in (out / "build.log").read_text().splitlines() if " finish: " in x]
        detail = (
            lines[-1].split(" finish: ", 1)[1] if lines else "(no finish line: the finish ran in the driver)"
        )
        line = f"{summary.samples_ok} samples kept; finish {t_end - last:.2f} s; {detail}"
        print(line, flush=True)
        lines_out.append(line)
    if args.out is not None:
        with args.out.open("a", encoding="utf-8") as fh:
            fh.write("\n".join(lines_out) + "\n")


if __name__ == "__main__":
    main()
