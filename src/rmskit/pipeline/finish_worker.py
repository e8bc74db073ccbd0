"""The build's finish in its own process: `python -m rmskit.pipeline.finish_worker` (started by `Finish`).

While the run goes on it imports the modules the probes and the export need (numpy, pyarrow, the
export: ~0.6 s of CPU; no scipy, no datasketch), in a thread at a lower CPU priority
(nice 10), and never holds the build's GIL. The finish itself runs in the main thread at the build's own
priority: at nice 10, with two nice-0 busy loops on the machine, its probes and export took 2-3 s of wall
for ~0.25 s of CPU (0.4-0.6 s at nice 0). Linux's nice is a thread's; elsewhere the whole worker runs at
nice 10. Where the kernel's autogroup is on, the worker (a session of its own) is a scheduling group of
its own, and nice only orders its own threads. After the last response the build sends the
run directory (and the kept queries' embeddings, which it computed in the background with the MiniLM it
may already hold for its taxonomy); the worker runs the probes and the export on a read-only ledger and
answers with the probes, which the build stores (it holds the run's write lock). Issue 13 §6: in the build's own process
the same imports took ~1 s of the finish, and importing them in a thread during the run's tail slowed
the tail as much as it saved (the GIL).

Protocol: stdin, one JSON line {"finish": run_dir, "embeddings": npz path or null}; stdout, one JSON
line {"probes": {...} | null, "result": {...}, "embeddings_read": bool, "seconds": {phase: [wall, cpu]}}.
Anything else the libraries print goes to stderr, which the build forwards to its log. End of stdin without a request (the build was cancelled, or its process
died) ends the worker at once."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from rmskit import childproc, heap

NICE = 10
# Arrow allocates from glibc's heap, not from mimalloc's own (its default): the Parquet write then reuses
# what curation freed instead of growing a second heap (the finish's peak at 96k samples: 401 -> 375 MB;
# at 1k: 200 -> 181 MB, the write's wall the same). Only read when Arrow loads, so it is set for the
# worker's process; a user's own setting wins.
WORKER_ENV = {"ARROW_DEFAULT_MEMORY_POOL": "system"}


def command() -> list[str]:
    return [sys.executable, "-m", "rmskit.pipeline.finish_worker"]


def environment() -> dict[str, str]:
    """The parent's environment over `WORKER_ENV`, with this rmskit findable (`childproc.environment`)."""
    return childproc.environment(WORKER_ENV)


def _warm() -> None:
    """Import what the probes and the export use before the run needs them."""
    heap.fix_mmap_threshold()  # curation's large arrays go back to the system before the Parquet write
    # No scipy: the leakage probe's solver, the normal quantile and the LSH split are numpy and the
    # standard library (scipy.special + scipy.optimize + datasketch were ~55 MB and ~0.6 s of CPU here).
    import encodings.cp437  # noqa: F401  (np.load reads the hand-over .npz through zipfile)

    import numpy.ma  # noqa: F401  (numpy imports these lazily; scipy used to import them here)
    import numpy.random  # noqa: F401  (the bootstraps, the MinHash permutations)
    import pyarrow.parquet  # noqa: F401
    from threadpoolctl import threadpool_limits

    import rmskit.embedding  # noqa: F401  (the finish lets the embedder go)
    import rmskit.export  # noqa: F401
    from rmskit.config import BuildConfig
    from rmskit.curate.dedup import NUM_PERM
    from rmskit.curate.minhash import lsh_params
    from rmskit.pipeline import finish
    from rmskit.scoring.probes import PROBE_DUP_THRESHOLD, PROBE_NUM_PERM

    threadpool_limits(limits=1, user_api="blas")  # for good (after the imports that load BLAS)
    finish.blas_limited = True
    # The finish's two LSH indexes at their default thresholds (curation's is a build setting).
    lsh_params(BuildConfig.model_fields["query_dup_threshold"].default, NUM_PERM)
    lsh_params(PROBE_DUP_THRESHOLD, PROBE_NUM_PERM)

    # These modules live as long as the worker: keep their objects out of the collections the
    # finish runs (letting an embedder go collects; ~60 ms each over scipy's objects, when it had them).
    gc.freeze()


def _warm_niced() -> None:
    childproc.lower_priority(NICE)  # this thread only, on Linux (and the threads it starts: BLAS's)
    _warm()


def serve(request: dict[str, Any]) -> dict[str, Any]:
    from rmskit.ledger import Ledger
    from rmskit.pipeline.finish import probe_run, write_export
    from rmskit.scoring.probes import QueryEmbeddings

    run_dir = Path(request["finish"])
    queries = None
    clock = _Clock()
    if request.get("embeddings"):
        with contextlib.suppress(OSError, ValueError, KeyError):  # unreadable: the probes embed the queries
            queries = QueryEmbeddings.load(Path(request["embeddings"]))
    with Ledger(run_dir, readonly=True) as ledger:
        probes = probe_run(ledger, queries)
    clock.lap("probes")
    result = write_export(run_dir, probes)
    clock.lap("export")
    return {
        "probes": probes,
        "result": result,
        "embeddings_read": queries is not None,
        "seconds": clock.laps,
    }


class _Clock:
    """Wall and CPU seconds per phase: a phase whose wall far exceeds its CPU waited for a core, which
    the build's log then shows."""

    def __init__(self) -> None:
        self.laps: dict[str, list[float]] = {}
        self._at = (time.perf_counter(), time.process_time())

    def lap(self, name: str) -> None:
        now = (time.perf_counter(), time.process_time())
        self.laps[name] = [round(now[0] - self._at[0], 4), round(now[1] - self._at[1], 4)]
        self._at = now


def main() -> None:
    # The protocol owns the real stdout; anything printed (Python or C) goes to stderr instead.
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warming = threading.Thread(target=_warm_niced, name="rmskit-warm", daemon=True)
    warming.start()
    line = sys.stdin.readline()
    if line.strip():  # else: cancelled, or the build's process is gone
        warming.join()  # the finish needs its imports (a wait only when the run was shorter than them)
        out.write(json.dumps(serve(json.loads(line))) + "\n")
        out.flush()
    # Everything is written and flushed: skip the interpreter's teardown of its modules
    # (~0.3 s that the build would wait for, when the worker held scipy too).
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
