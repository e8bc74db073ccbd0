"""rmskit vs bespokelabs-curator vs distilabel, side by side against one fake OpenAI-compatible
endpoint (rmskit.testing.openai_server in its own process: latency L, capacity C), with the same
real-photo JPEGs (skimage / sklearn), image parts and JSON-schema outputs (not a test).

Each peer is installed by this script into its own virtualenv under bench/.venvs/ (never an rmskit
dependency). Jobs: (a) one call per image; (b) the chained call graph (see common.py).

  python bench/peers/bench.py --quick          # small run (~2 min on 2 cores)
  python bench/peers/bench.py                  # ~2k requests per job at L=0.3 s, C=64
  python bench/peers/bench.py --latency 0.02 --images 2000
  python bench/peers/bench.py --repeat 3       # each peer 3 times, interleaved; medians (wall: min-max)
  python bench/peers/bench.py --jobs b --timeline   # + requests in service per 0.5 s (where slots idle)
Columns: utilisation = server busy / (span x C); requests/s = requests / the client process's whole
wall time (start-up and finish included); marginal CPU = client CPU (with its child processes) after
set-up / requests; peak RSS = the client's largest process (ru_maxrss); peak RSS, all processes = the
client's process tree summed (sampled from /proc every 0.1 s, and at least the largest process's peak:
a client may start worker processes); peak PSS = the same tree's proportional set size summed (shared
library pages divided among the processes mapping them: what the tree really holds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import CHAIN_LEVELS  # noqa: E402

ROOT = HERE.parent.parent
VENVS = HERE.parent / ".venvs"
PEERS: dict[str, list[str]] = {
    "curator": ["bespokelabs-curator==0.1.31"],
    "distilabel": ["distilabel[openai]==1.5.3", "requests"],  # 1.5.3 imports requests without declaring it,
}


def ensure_venv(name: str) -> Path:
    """The peer's own venv (created once; later runs reuse it)."""
    py = VENVS / name / "bin" / "python"
    marker = VENVS / name / ".installed"
    if not marker.exists():
        print(f"installing {name} into {VENVS / name} (once; takes minutes)...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENVS / name)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *PEERS[name]], check=True)
        marker.touch()
    return py


def make_photos(n: int, dest: Path | None = None) -> list[str]:
    """n distinct JPEGs (max side 320) cycling through real photos from skimage and sklearn: each copy
    is its own crop with a mark of its own, as distinct photos are (identical files would let the
    peers' and rmskit's requests, and the exported parquet's encoding and compression, repeat 7 images)."""
    from PIL import Image
    from skimage import data
    from sklearn.datasets import load_sample_image

    d = dest or Path(tempfile.mkdtemp(prefix="peers-img-"))  # the caller removes it
    arrays = [
        getattr(data, k)() for k in ("coffee", "chelsea", "astronaut", "rocket", "immunohistochemistry")
    ]
    arrays += [load_sample_image(k) for k in ("china.jpg", "flower.jpg")]
    base = []
    for a in arrays:
        im = Image.fromarray(a).convert("RGB")
        im.thumbnail((336, 336))
        base.append(im)
    paths = []
    for i in range(n):
        b = base[i % len(base)]
        # a window shifted by i (every JPEG block sees other pixels: no byte runs shared with another
        # copy, as between real photos) and a 12x12 mark whose colour and place encode i
        dx, dy = (i // 7) % 16, (i // 112) % 16
        im = b.crop((dx, dy, dx + b.width - 16, dy + b.height - 16))
        x, y = (i * 37) % (im.width - 12), (i * 53) % (im.height - 12)
        im.paste((i % 251, (i // 251) % 251, (i * 7) % 251), (x, y, x + 12, y + 12))
        p = d / f"img{i:06d}.jpg"
        im.save(p, quality=90)
        paths.append(str(p))
    return paths


def in_service(spans: list[list[float]], step: float = 0.5) -> list[float]:
    """Mean requests in service per `step` seconds, from the server's (start, end) of each request."""
    if not spans:
        return []
    first, last = min(s for s, _ in spans), max(e for _, e in spans)
    out, t = [], first
    while t < last:
        out.append(sum(max(0.0, min(e, t + step) - max(s, t)) for s, e in spans) / step)
        t += step
    return out


def run_one(
    peer: str, job: str, photos: list[str], latency: float, capacity: int, timeline: bool = False
) -> dict[str, Any]:
    # the photo list, and the peer's own temporary files (its TMPDIR: rmskit's run directory,
    # distilabel's pipeline cache), removed after the run
    work = tempfile.TemporaryDirectory(prefix="peers-run-")
    images_file = Path(work.name) / "images.json"
    images_file.write_text(json.dumps(photos))
    server = subprocess.Popen(
        [sys.executable, str(HERE / "server.py"), "--latency", str(latency), "--capacity", str(capacity)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    try:
        base_url = (server.stdout.readline() if server.stdout else "").split()[-1]
        py = sys.executable if peer == "rmskit" else str(ensure_venv(peer))
        env = {
            **os.environ,
            "PEER_BASE_URL": base_url,
            "PEER_CONCURRENCY": str(capacity),
            "PEER_IMAGES_FILE": str(images_file),
            "TMPDIR": work.name,
            "OPENAI_API_KEY": "sk-bench",
            "CURATOR_DISABLE_CACHE": "1",
            "CURATOR_VIEWER": "0",
            "CURATOR_DISABLE_RICH_DISPLAY": "1",
            "TELEMETRY_ENABLED": "false",
            "BESPOKE_CURATOR_TRACKER_DISABLED": "1",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
        }
        if peer != "rmskit":
            env.pop("PYTHONPATH", None)
        t0 = time.time()
        proc = subprocess.Popen(
            [py, str(HERE / f"run_{peer}.py"), job],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        tree = TreeRSS(proc.pid)
        tree.start()
        stdout, stderr = proc.communicate(timeout=1800)
        wall = time.time() - t0
        tree.stop.set()
        tree.join()
        lines = [x for x in stdout.splitlines() if x.startswith("PEER-RESULT ")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"{peer} job {job} failed ({proc.returncode}):\n{stderr[-4000:]}")
        res = json.loads(lines[-1].removeprefix("PEER-RESULT "))
        st = httpx.get(base_url.removesuffix("/v1") + "/stats").json()
        spans = httpx.get(base_url.removesuffix("/v1") + "/timeline").json() if timeline else []
    finally:
        server.terminate()
        server.wait()
        work.cleanup()
    span = (st["last_end"] or 0) - (st["first_start"] or 0) or 1e-9
    req = st["requests"]
    levels = 1 if job == "a" else int(res.get("chain_levels", CHAIN_LEVELS))
    return {
        **res,
        "requests": req,
        "delivered": st["delivered"],
        "utilisation": st["busy_s"] / (span * capacity),
        "rps": req / wall,
        # sampled sums miss short peaks; the tree held at least its largest process's peak
        "tree_rss_mb": max(tree.peak_kb / 1024, res["peak_rss_mb"]),
        "tree_pss_mb": tree.peak_pss_kb / 1024,
        # when the summed PSS peaked, from the last response (negative: during the run), and its parts
        "pss_peak_after_last_s": tree.peak_pss_at - st["last_end_unix"],
        "pss_peak_parts_mb": [round(k / 1024) for k in tree.peak_pss_parts],
        "wall_s": wall,
        "job_wall_s": res["t_end"] - res["t_job_start"],
        "marginal_cpu_ms": 1000 * (res["cpu_total_s"] - res["cpu_setup_s"]) / max(req, 1),
        "max_in_service": st["max_in_service"],
        # issue 13 §6: from the endpoint's last response to the client's exit (curate, export, probes)
        "finish_s": res["t_end"] - st["last_end_unix"],
        # from the client's start (its process started) to the endpoint's first request: imports and
        # set-up. From the job's start instead, curator came out negative: its LLMs send requests when
        # they are made, before its job starts.
        "first_request_s": st["last_end_unix"] - span - t0,
        # The physical limit of a chained job as issue 13 states it: all requests through C slots, plus
        # one chain's latency (six levels in job (b)). The deepest chain a client's rows went through is
        # reported beside it (a row composed three times waits for ten answers in turn), not added: with
        # ten levels rmskit's job came out below that "limit" (20.7 vs 21.4 s, 2026-12-04 04:09), since
        # a streaming client overlaps its deep chains with the rest of the work.
        "chain_levels": levels,
        "limit_s": req * latency / capacity + (1 if job == "a" else CHAIN_LEVELS) * latency,
        "in_service": in_service(spans),
    }


def proc_kb(pid: int, field: str, file: str = "status") -> int:
    """A kB field (VmRSS, VmHWM, Pss...) of /proc/<pid>/<file>; 0 when the process is gone (or not Linux)."""
    try:
        for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeRSS(threading.Thread):
    """The peak memory of a process and all its descendants together, sampled from /proc (Linux;
    elsewhere it stays 0); ru_maxrss gives only the largest single process. Two sums: RSS (a library
    page that two of them map counts twice) and PSS (each shared page divided among the processes
    that map it: the memory the tree really holds, as smem reports it)."""

    def __init__(self, pid: int, every: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pid, self.every, self.peak_kb, self.peak_pss_kb = pid, every, 0, 0
        # where the PSS peak was: its time (unix) and each process's share, largest first
        self.peak_pss_at, self.peak_pss_parts = 0.0, []
        self.stop = threading.Event()

    @staticmethod
    def _tree(pid: int) -> list[int]:
        out, todo = [], [pid]
        while todo:
            p = todo.pop()
            out.append(p)
            for kids in Path(f"/proc/{p}/task").glob("*/children"):
                try:
                    todo += [int(k) for k in kids.read_text().split()]
                except OSError:
                    pass
        return out

    @staticmethod
    def _rss_kb(pid: int) -> int:
        return proc_kb(pid, "VmRSS")

    @staticmethod
    def _pss_kb(pid: int) -> int:
        return proc_kb(pid, "Pss", "smaps_rollup")

    def run(self) -> None:
        while not self.stop.wait(self.every):
            tree = self._tree(self.pid)
            self.peak_kb = max(self.peak_kb, sum(self._rss_kb(p) for p in tree))
            parts = sorted((self._pss_kb(p) for p in tree), reverse=True)
            if sum(parts) > self.peak_pss_kb:
                self.peak_pss_kb, self.peak_pss_at, self.peak_pss_parts = sum(parts), time.time(), parts


def median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One peer's repeated runs of one job: the median of every number, and each number's runs."""
    out = dict(runs[0])
    for k, v in runs[0].items():
        if isinstance(v, int | float) and not isinstance(v, bool):
            vals = [r[k] for r in runs]
            med = statistics.median(vals)
            out[k] = type(v)(med) if isinstance(v, int) else med
            out[k + "_runs"] = vals
    out["repeats"] = len(runs)
    return out


def table(rows: list[dict[str, Any]], peers: list[str], latency: float, capacity: int) -> str:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["peer"], r["job"]), []).append(r)
    by = {k: median_row(v) for k, v in groups.items()}
    reps = max(len(v) for v in groups.values())
    note = f"; median of {reps} interleaved runs (wall: median [min-max])" if reps > 1 else ""
    out = [f"latency {latency} s, capacity {capacity}; values: {' / '.join(peers)}{note}"]

    def line(label: str, job: str, fmt: str, key: str) -> None:
        vals = []
        for p in peers:
            r = by.get((p, job))
            if r is None:
                vals.append("-")
                continue
            v = format(r[key], fmt)
            if reps > 1 and key in ("wall_s", "job_wall_s"):
                runs = r[key + "_runs"]
                v += f" [{format(min(runs), fmt)}-{format(max(runs), fmt)}]"
            vals.append(v)
        out.append(f"| {label:<44} | {' / '.join(vals)} |")

    for job in ("a", "b"):
        if not any(k[1] == job for k in by):
            continue
        out.append(f"job ({job}) {'one call per image' if job == 'a' else 'chained call graph'}:")
        line("requests (delivered)", job, "d", "requests")
        line("endpoint utilisation", job, ".2f", "utilisation")
        line("requests/s over the client's whole run", job, ".0f", "rps")
        line("marginal CPU ms per request", job, ".2f", "marginal_cpu_ms")
        line("peak RSS (MB)", job, ".0f", "peak_rss_mb")
        line("peak RSS, all client processes (MB)", job, ".0f", "tree_rss_mb")
        line("peak PSS, all client processes (MB)", job, ".0f", "tree_pss_mb")
        line("most requests in service at once", job, "d", "max_in_service")
        line("start: client start to first request (s)", job, ".2f", "first_request_s")
        line("finish: last response to client's end (s)", job, ".2f", "finish_s")
        if job == "b":
            line("wall time, whole client run (s)", job, ".1f", "wall_s")
            line("wall time, job only (after imports/set-up) (s)", job, ".1f", "job_wall_s")
            line("deepest chain: dependent calls in turn", job, "d", "chain_levels")
            line("physical limit: req x L / C + 6 x L (s)", job, ".1f", "limit_s")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="200 images for job a, 40 for job b")
    ap.add_argument("--latency", type=float, default=0.3)
    ap.add_argument("--capacity", type=int, default=64)
    ap.add_argument("--images", type=int, default=2000, help="job a images; job b uses a fifth")
    ap.add_argument("--peers", default="rmskit,curator,distilabel")
    ap.add_argument("--jobs", default="a,b")
    ap.add_argument("--repeat", type=int, default=1, help="runs per peer and job, interleaved; medians")
    ap.add_argument("--timeline", action="store_true", help="print requests in service per 0.5 s per run")
    ap.add_argument("--out", type=Path, help="also append the table here")
    args = ap.parse_args()
    n_a = 200 if args.quick else args.images
    n_b = max(1, n_a // 5)
    peers = args.peers.split(",")
    for p in peers:
        if p != "rmskit":
            ensure_venv(p)
    rows = []
    for job in args.jobs.split(","):
        photos = make_photos(n_a if job == "a" else n_b)
        try:
            # interleaved (a b c a b c ...), so a slow spell of the machine hits every peer alike
            for _ in range(args.repeat):
                for p in peers:
                    r = run_one(p, job, photos, args.latency, args.capacity, args.timeline)
                    print(
                        f"  {p} job {job}: {r['requests']} requests in {r['wall_s']:.1f} s",
                        file=sys.stderr,
                        flush=True,
                    )
                    if args.timeline:
                        print(
                            f"  in service per 0.5 s: {' '.join(f'{x:.0f}' for x in r['in_service'])}\n"
                            f"  PSS peak {r['tree_pss_mb']:.0f} MB at {r['pss_peak_after_last_s']:+.2f} s from the "
                            f"last response, per process {r['pss_peak_parts_mb']} MB; finish {r['finish_s']:.2f} s"
                            + (f" ({r['finish_log']})" if r.get("finish_log") else ""),
                            file=sys.stderr,
                            flush=True,
                        )
                    rows.append(r)
        finally:  # the photos are this run's own
            shutil.rmtree(Path(photos[0]).parent, ignore_errors=True)
    head = (
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} | {platform.node()} | {os.cpu_count()} CPUs | "
        f"{platform.python_version()} | images: job a {n_a}, job b {n_b}"
    )
    text = head + "\n" + table(rows, peers, args.latency, args.capacity)
    print(text)
    if args.out:
        with args.out.open("a") as f:
            f.write(text + "\n\n")


if __name__ == "__main__":
    main()
