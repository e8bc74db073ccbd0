"""The build's finish on a finished run, by phase (issue 13 §5/§6; not a test): the finish worker's
`serve()` (probes, curation, export) in this fresh process, its RSS sampled every 20 ms and tagged with
the phase running, so a long run's finish can be profiled without running the build again.

    python bench/rss_scale.py --images 100000      # leaves its run directory in $TMPDIR/rmskit-rss-*
    python bench/finish_profile.py RUN_DIR          # peak RSS and wall per phase, nested

The build hands the worker the kept queries' embeddings; here they are random unit rows for the same
texts the build would have embedded (the probes' bottom-k sample, `embedded_rows`), written to a
temporary .npz, so the memory and the work are the build's but MiniLM is not needed. `--no-embeddings`
makes the probes embed the queries themselves. The run directory's dataset/ is rewritten."""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Phases:
    """Peak RSS per phase path ("serve/probe_run/leakage"), sampled by a daemon thread."""

    def __init__(self, interval: float = 0.02) -> None:
        self.stack = ["import"]
        self.peaks: dict[str, float] = {}
        self.walls: dict[str, float] = {}
        self.order: list[str] = []
        self.interval = interval
        self._lock = threading.Lock()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            self.note()
            time.sleep(self.interval)

    def note(self) -> None:
        with self._lock:  # the sampler thread and the phases' edges both note
            path = "/".join(self.stack) or "idle"
            if path not in self.peaks:
                self.order.append(path)
            self.peaks[path] = max(self.peaks.get(path, 0.0), rss_mb())

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.stack.append(name)
        path = "/".join(self.stack)
        self.note()
        t = time.perf_counter()
        try:
            yield
        finally:
            self.walls[path] = self.walls.get(path, 0.0) + time.perf_counter() - t
            self.note()
            self.stack.pop()

    def wrap(self, module: ModuleType, name: str) -> None:
        f: Callable[..., Any] = getattr(module, name)

        @functools.wraps(f)
        def timed(*a: Any, **k: Any) -> Any:
            with self.phase(name):
                return f(*a, **k)

        setattr(module, name, timed)


def fake_embeddings(run_dir: Path, npz: Path) -> int:
    """Random unit rows for the queries the build would have embedded, saved as the build saves them."""
    import numpy as np

    from rmskit.ledger import Ledger
    from rmskit.scoring.probes import QueryEmbeddings, embedded_rows

    with Ledger(run_dir, readonly=True) as led:
        texts = [r["query"] for r in led.probe_rows("ok")]
    sample = list(dict.fromkeys(texts[i] for i in embedded_rows(texts)))
    x = np.random.default_rng(0).standard_normal((len(sample), 384)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = QueryEmbeddings()
    q._put(sample, x)
    q.save(npz)
    return len(sample)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--no-embeddings", action="store_true", help="the probes embed the queries (MiniLM)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rmskit.pipeline.finish_worker import WORKER_ENV

    for k, v in WORKER_ENV.items():  # what the build sets for its worker (read when Arrow loads)
        os.environ.setdefault(k, v)
    npz: Path | None = None
    if not args.no_embeddings:
        fd, name = tempfile.mkstemp(prefix="rmskit-queries-", suffix=".npz")
        os.close(fd)
        npz = Path(name)
        # in a child, so the rows and the ledger's read leave nothing in this process's heap
        import subprocess

        subprocess.run(
            [sys.executable, __file__, "--make-npz", str(args.run_dir), str(npz)],
            check=True,
            env={**os.environ, "PYTHONPATH": str(HERE.parent / "src")},
        )
    ph = Phases()
    from rmskit.pipeline import finish_worker

    finish_worker._warm()  # what the worker does while the run goes on
    ph.stack[:] = ["warm"]
    time.sleep(0.1)
    ph.note()
    ph.stack.clear()
    import rmskit.curate.core as core
    import rmskit.export.writer  # noqa: F401
    import rmskit.pipeline.finish as fin
    import rmskit.scoring.probes as probes

    prep = sys.modules["rmskit.export.prepare"]  # rmskit.export re-exports a function of that name
    writer = sys.modules["rmskit.export.writer"]
    for mod, names in (
        (fin, ("probe_run", "write_export")),
        (probes, ("near_duplicate_rate", "leakage", "mean_distance")),
        (prep, ("prepare", "_light_samples", "_available_images", "curate", "_image_files")),
        (core, ("near_duplicate_queries", "near_duplicate_images")),
        # the writer holds its own reference to prepare
        (writer, ("prepare", *(n for n in dir(writer) if n.startswith(("write_", "_write_"))))),
    ):
        for n in names:
            if hasattr(mod, n):
                ph.wrap(mod, n)
    t = time.perf_counter()
    try:
        with ph.phase("serve"):
            out = finish_worker.serve({"finish": str(args.run_dir), "embeddings": str(npz) if npz else None})
    finally:
        if npz is not None:
            npz.unlink(missing_ok=True)
    wall = time.perf_counter() - t
    print(f"finish of {args.run_dir}: {wall:.1f} s, peak {max(ph.peaks.values()):.0f} MB RSS")
    print(f"export: {out['result']}; embeddings read: {out['embeddings_read']}")
    print("| phase | peak RSS (MB) | wall (s) |\n|---|---|---|")
    for path in ph.order:
        wall_s = ph.walls.get(path)
        print(f"| {path} | {ph.peaks[path]:.0f} | {'' if wall_s is None else f'{wall_s:.2f}'} |")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--make-npz":
        print(
            f"{fake_embeddings(Path(sys.argv[2]), Path(sys.argv[3]))} query rows handed over", file=sys.stderr
        )
    else:
        main()
