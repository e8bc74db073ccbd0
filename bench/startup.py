"""Start-up cost of the `openai:` path (not a test): CPU seconds and peak RSS of a real
`rmskit build` process at the moment its first request reaches the endpoint.

The test server runs in this process; its responder snapshots the build process's /proc counters
(utime+stime, VmHWM) when the first request arrives, so nothing in the client is instrumented.

  python bench/startup.py                     # --embedder minilm (the default) and hashing
  python bench/startup.py --embedder minilm
Goal (issue 13 §5): <= 400 MB and <= 1.5 s CPU to the first request.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
from bench import TreeRSS, proc_kb  # noqa: E402  (bench/peers/bench.py)
from rmskit.testing.openai_server import OpenAITestServer
from rmskit.testing.rms_script import responder as rms_responder


def _proc(pid: int, field: str = "VmHWM") -> tuple[float, float]:
    """(CPU seconds, peak RSS MB; or `field`) of a live process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return cpu, proc_kb(pid, field) / 1024


def _photos(n: int) -> Path:
    from PIL import Image
    from skimage import data

    d = Path(tempfile.mkdtemp(prefix="rmskit-startup-img-"))
    for i, name in enumerate(["coffee", "chelsea", "astronaut", "rocket"][:n]):
        Image.fromarray(getattr(data, name)()).convert("RGB").save(d / f"{i}_{name}.jpg", quality=90)
    return d


def measure(embedder: str) -> dict[str, Any]:
    photos = _photos(4)
    seen: dict[str, Any] = {}
    lock = threading.Lock()
    child: dict[str, subprocess.Popen[str]] = {}

    def respond(body: dict[str, Any]) -> Any:
        with lock:
            if "cpu_s" not in seen and "p" in child:
                seen["cpu_s"], seen["rss_mb"] = _proc(child["p"].pid)
                # its children (the finish worker, importing at nice 10 meanwhile): CPU and RSS now
                kids = [_proc(k, "VmRSS") for k in TreeRSS._tree(child["p"].pid)[1:]]
                seen["kids_cpu_s"], seen["kids_rss_mb"] = sum(c for c, _ in kids), sum(r for _, r in kids)
        return rms_responder(body)

    with OpenAITestServer(responder=respond, latency=0.05) as srv:
        out = Path(tempfile.mkdtemp(prefix="rmskit-startup-"))
        cmd = [sys.executable, "-c", "from rmskit.cli import app; app()", "build", str(photos), "--out", str(out),
               "--model", "openai:test-model", "--base-url", srv.base_url, "--embedder", embedder,
               "--perceive", "model", "--scenarios", "1", "--quiet"]  # fmt: skip
        env = {**os.environ, "OPENAI_API_KEY": "sk-bench"}
        err = tempfile.TemporaryFile(mode="w+")
        with lock:
            child["p"] = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
        # wait4: this child's own peak RSS and CPU for the whole run, from the kernel.
        _, status, usage = os.wait4(child["p"].pid, 0)
        child["p"].returncode = os.waitstatus_to_exitcode(status)
    if child["p"].returncode != 0 or "cpu_s" not in seen:
        err.seek(0)
        raise SystemExit(f"build failed ({child['p'].returncode}):\n{err.read()[-3000:]}")
    total_rss, total_cpu = usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime
    mods = subprocess.run(
        [sys.executable, "-c", "import sys, rmskit.pipeline.runner, rmskit.models.openai_compat; "
         "print(int('torch' in sys.modules))"], capture_output=True, text=True, check=True
    ).stdout.strip()  # fmt: skip
    return {
        "embedder": embedder,
        **seen,
        "run_peak_rss_mb": total_rss,
        "run_cpu_s": total_cpu,
        "torch_on_import": mods == "1",
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--embedder", choices=["minilm", "hashing"], action="append")
    args = ap.parse_args()
    for emb in args.embedder or ["minilm", "hashing"]:
        r = measure(emb)
        print(
            f"openai: path, --embedder {r['embedder']:<7} | CPU to first request {r['cpu_s']:.2f} s | "
            f"peak RSS at first request {r['rss_mb']:.0f} MB | finish worker then: {r['kids_cpu_s']:.2f} s CPU, "
            f"{r['kids_rss_mb']:.0f} MB | peak RSS whole run (4 photos, build process) "
            f"{r['run_peak_rss_mb']:.0f} MB, CPU {r['run_cpu_s']:.1f} s | torch imported by runner+openai_compat: {r['torch_on_import']}",
            flush=True,
        )


if __name__ == "__main__":
    main()
