"""`make demo`: materialise the bundled real photos, then build a small RMS dataset offline.

Runs `rmskit build` on examples/annotations.json (COCO captions + instances for the photos) with
the embedded SmolLM2-135M-Instruct model, then prints where to look."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent


def main() -> int:
    from rmskit.ingest.bundled import materialize_real_photos

    photos = ROOT / "photos"
    got = materialize_real_photos(photos)
    print(f"materialised {len(got)} real photos into {photos.relative_to(REPO)} (licences in LICENSES.md)")
    t0 = time.monotonic()
    cmd = [
        sys.executable,
        "-m",
        "rmskit.cli",
        "build",
        str(ROOT / "annotations.json"),
        "--config",
        str(ROOT / "demo.yaml"),
        "--out",
        str(REPO / "runs" / "demo"),
    ]
    print("$ rmskit build examples/annotations.json --config examples/demo.yaml --out runs/demo")
    rc = subprocess.call(cmd, cwd=REPO)
    if rc != 0:
        return rc
    status = json.loads(
        subprocess.check_output(
            [sys.executable, "-m", "rmskit.cli", "status", str(REPO / "runs" / "demo"), "--json"], cwd=REPO
        )
    )
    print(
        f"\ndemo finished in {time.monotonic() - t0:.0f}s: {status['images']['accepted']} images, "
        f"{status['samples']} samples kept ({status['samples_by_kind']}), {status['samples_failed']} failed checks"
    )
    print(
        "look at: runs/demo/dataset/samples.jsonl, runs/demo/dataset/README.md, `rmskit status runs/demo`,"
        " `rmskit review runs/demo`, `rmskit report runs/demo`"
    )
    print("note: the embedded 135M model is for offline smoke runs; use --model openai:... for real data.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
