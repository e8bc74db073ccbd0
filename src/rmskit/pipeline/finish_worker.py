"""The build's finish worker: a thread of the build's process (`InProcess`, the default), or a process of
its own (`python -m rmskit.pipeline.finish_worker`, RMSKIT_FINISH=worker), both started by `Finish` and
speaking the protocol below.

While the run goes on it imports the modules the probes and the export need (pyarrow and the export;
numpy too, in a process of its own: ~0.6 s of CPU there; no scipy, no datasketch), in a thread at a
lower CPU priority (nice 10). The finish itself runs at the build's own priority: at nice 10, with two
nice-0 busy loops on the machine, its probes and export took 2-3 s of wall for ~0.25 s of CPU (0.4-0.6 s
at nice 0). Linux's nice is a thread's; elsewhere a worker process runs wholly at nice 10 and a finish
thread at the build's. Where the kernel's autogroup is on, a worker process (a session of its own) is a
scheduling group of its own, and nice only orders its own threads. As a thread it shares the build's
GIL: its per-sample work is ~1 ms and the finish's ~0.02 s of CPU, and the imports run at the run's
start, where the build mostly waits (in the run's tail they slowed it as much as they saved, issue 13 §6).

During the run the worker also follows the ledger (a thread at nice 10, export/memo.py): each kept
sample is curated and written into the staged dataset as it is stored (export/online.py), so the
finish takes only the samples kept last, checks the ledger, closes the files and writes the card; when
that cannot be vouched for, it writes the dataset from the ledger as before (the memos, filled from
then on, spare it part of the work). After the last response the build sends the request at once. Up to `finish.PROBES_HERE` kept samples the build runs the probes itself, on
the other core, and sends the numbers; past that (a long run, where memory matters more than the
finish's last 0.1 s) it hands the embeddings over, the probes run here and then the export, and the
worker answers with the numbers for the build to store (it holds the run's write lock). Either way the
card is written last, with the numbers.

Protocol, stdin, one JSON line each: {"follow": run_dir} (optional, at the start); after the last
response {"finish": run_dir, "probes": "follow"} then {"probes": {...} | null}, or {"finish": run_dir}
then {"embeddings": npz path | null}; a {"finish"} line holding "embeddings" itself needs no further
line. stdout, one JSON line {"probes": {...} | null, "result": {...},
"embeddings_read": bool, "ahead": samples prepared during the run, "online": whether the dataset was
written as samples came (export/online.py), "seconds": {phase: [wall, cpu]}}.
In a process, anything else the libraries print goes to stderr, which the build forwards to its log.
End of stdin before a finish request (the build was cancelled, or its process died) ends the worker at
once; a thread then also stops its follower and lets go of what it staged and held."""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rmskit import childproc, heap

if TYPE_CHECKING:
    from rmskit.export.memo import Follower
    from rmskit.export.online import Online

log = logging.getLogger("rmskit.finish")

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


def _warm(own_process: bool = True) -> None:
    """Import what the probes and the export use before the run needs them."""
    # In the build's process: Arrow's pool as the worker's, unless Arrow was in already (someone else's
    # choice) or the user chose one; set through Arrow, not the environment its subprocesses would inherit.
    system_pool = not own_process and "pyarrow" not in sys.modules and not _user_pool()
    heap.fix_mmap_threshold()  # curation's large arrays go back to the system before the Parquet write
    # No scipy: the leakage probe's solver, the normal quantile and the LSH split are numpy and the
    # standard library (scipy.special + scipy.optimize + datasketch were ~55 MB and ~0.6 s of CPU here).
    import encodings.cp437  # noqa: F401  (np.load reads the hand-over .npz through zipfile)

    import numpy.ma  # noqa: F401  (numpy imports these lazily; scipy used to import them here)
    import numpy.random  # noqa: F401  (the bootstraps, the MinHash permutations)
    import pyarrow.parquet  # noqa: F401

    if system_pool:
        import pyarrow

        pyarrow.set_memory_pool(pyarrow.system_memory_pool())
    from threadpoolctl import threadpool_limits

    import rmskit.embedding  # noqa: F401  (the finish lets the embedder go)
    import rmskit.export  # noqa: F401
    from rmskit.config import BuildConfig
    from rmskit.curate.dedup import NUM_PERM
    from rmskit.curate.minhash import lsh_params
    from rmskit.pipeline import finish
    from rmskit.scoring.probes import PROBE_DUP_THRESHOLD, PROBE_NUM_PERM

    if own_process:  # for good (after the imports that load BLAS); the build's is limited per finish
        threadpool_limits(limits=1, user_api="blas")
        finish.blas_limited = True
    # The finish's two LSH indexes at their default thresholds (curation's is a build setting).
    lsh_params(BuildConfig.model_fields["query_dup_threshold"].default, NUM_PERM)
    lsh_params(PROBE_DUP_THRESHOLD, PROBE_NUM_PERM)

    # These modules live as long as the worker: keep their objects out of the collections the
    # finish runs (letting an embedder go collects; ~60 ms each over scipy's objects, when it had them).
    # Not in the build's process, whose objects are not all for good.
    if own_process:
        gc.freeze()


def _user_pool() -> bool:
    return any(k in os.environ for k in WORKER_ENV)


def _warm_niced(own_process: bool = True) -> None:
    childproc.lower_priority(NICE)  # this thread only, on Linux (and the threads it starts: BLAS's)
    _warm(own_process)


def serve(
    request: dict[str, Any], next_line: Callable[[], str] | None = None, online: Online | None = None
) -> dict[str, Any]:
    """The finish of `request["finish"]`. With "probes": "follow" the build probes and sends the numbers
    as the next line, which the export waits for only to write the card, last. Otherwise (a long run)
    the probes run here first, from the embeddings in `request["embeddings"]` or, without that key,
    named by the next line, and the export after them. Beside the export, in a thread, they took a
    100k-image build and worker from 329 to 376 MB PSS (the probes' rows and model on top of the
    export's curation) to save 0-5 s of a 47-minute run's finish (two threads of one GIL: the probes
    took 18 s of wall for 6.6 s of CPU; bench/results/rss_scale.txt)."""
    from rmskit.export import memo
    from rmskit.ledger import Ledger
    from rmskit.pipeline.finish import probe_run
    from rmskit.scoring.probes import QueryEmbeddings

    run_dir = Path(request["finish"])
    read: list[bool] = []
    laps: dict[str, list[float]] = {}
    ahead = len(memo.MEMO.samples) if memo.MEMO is not None else 0
    if online is not None and online.usable:
        ahead = len(online.taken)
    if request.get("probes") == "follow":
        clock = _Clock()
        numbers = functools.cache(lambda: _line_field(next_line, "probes", dict))  # one line, read once
        result, written = _export(run_dir, online, numbers)
        clock.lap("export", laps)
        return {
            "probes": None,
            "result": result,
            "embeddings_read": False,
            "ahead": ahead,
            "online": written,
            "seconds": laps,
        }

    def probes() -> dict[str, Any] | None:
        clock = _Clock()
        npz = request["embeddings"] if "embeddings" in request else _line_field(next_line, "embeddings", str)
        queries = None
        if npz:
            with contextlib.suppress(OSError, ValueError, KeyError):  # unreadable: the probes embed them
                queries = QueryEmbeddings.load(Path(npz))
        read.append(queries is not None)
        with Ledger(run_dir, readonly=True) as ledger:
            out = probe_run(ledger, queries)
        clock.lap("probes", laps)
        return out

    found = probes()  # its rows and embeddings are gone when it returns; the model is released in it
    clock = _Clock()
    result, written = _export(run_dir, online, found)
    clock.lap("export", laps)
    return {
        "probes": found,
        "result": result,
        "embeddings_read": bool(read and read[0]),
        "ahead": ahead,
        "online": written,
        "seconds": {k: laps[k] for k in ("probes", "export") if k in laps},
    }


def _export(run_dir: Path, online: Online | None, probes: Any) -> tuple[dict[str, Any], bool]:
    """The dataset written during the run, completed (export/online.py), or else written from the
    ledger; and whether it was the former."""
    from rmskit.pipeline.finish import write_export

    if online is not None:
        result = online.finish(probes)
        if result is not None:
            return result, True
        log.warning(
            "the dataset was not written as samples came (%s): written from the ledger", online.broken
        )
    return write_export(run_dir, probes), False


class _Clock:
    """Wall and CPU seconds of a phase run by one thread: a phase whose wall far exceeds its CPU waited
    (for a core, or for the other thread), which the build's log then shows."""

    def __init__(self) -> None:
        self._at = (time.perf_counter(), time.thread_time())

    def lap(self, name: str, laps: dict[str, list[float]]) -> None:
        now = (time.perf_counter(), time.thread_time())
        laps[name] = [round(now[0] - self._at[0], 4), round(now[1] - self._at[1], 4)]
        self._at = now


def _follow(run_dir: str, warming: threading.Thread) -> Follower:
    """Start filling the export's memos from the run's ledger (export/memo.py), once the imports are in."""
    from rmskit.export import memo
    from rmskit.export.online import Online

    warming.join()
    follower = memo.Follower(Path(run_dir), memo.enable(), nice=NICE, online=Online(Path(run_dir)))
    follower.start()
    return follower


def serve_lines(readline: Callable[[], str], write: Callable[[str], None], own_process: bool = True) -> None:
    """The protocol: requests from `readline` until its end, the answer to `write`."""
    warming = threading.Thread(target=_warm_niced, args=(own_process,), name="rmskit-warm", daemon=True)
    warming.start()
    follower: Follower | None = None
    try:
        while line := readline():  # its end: cancelled, or the build's process is gone
            request: Any = None
            with contextlib.suppress(ValueError):
                request = json.loads(line)
            if not isinstance(request, dict):
                break
            if "follow" in request and follower is None:
                follower = _follow(request["follow"], warming)
                continue
            if "finish" in request:
                if follower is not None:
                    follower.stop.set()
                    follower.join()  # the memos are the finish's alone from here
                    if follower.error is not None:
                        log.warning("following the ledger stopped: %r", follower.error)
                warming.join()  # the finish needs its imports (a wait only when the run was shorter)
                answer = serve(request, readline, follower.online if follower is not None else None)
                write(json.dumps(answer) + "\n")
            break
    finally:
        if not own_process:  # the process goes on: nothing of this run stays in it
            _let_go(follower)


def _let_go(follower: Follower | None) -> None:
    from rmskit.export import memo

    if follower is not None:
        follower.stop.set()
        follower.join()
        if follower.online is not None:
            follower.online.abandon("the finish thread ended")  # a no-op on what it swapped in
    memo.disable()


def main() -> None:
    # The protocol owns the real stdout; anything printed (Python or C) goes to stderr instead.
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    serve_lines(sys.stdin.readline, write)
    # Everything is written and flushed: skip the interpreter's teardown of its modules
    # (~0.3 s that the build would wait for, when the worker held scipy too).
    sys.stderr.flush()
    os._exit(0)


class InProcess:
    """The worker's protocol served by a thread of the build's own process, over two pipes: the
    subprocess's interface as `Finish` uses it (stdin, stdout, kill, wait, returncode)."""

    stderr = None  # its warnings go to the build's log as they are

    def __init__(self, stdin: Any, stdout: Any, thread: threading.Thread, reading: Any) -> None:
        self.stdin, self.stdout, self._thread, self._reading = stdin, stdout, thread, reading
        self.returncode: int | None = None

    @classmethod
    async def start(cls) -> InProcess:
        import asyncio

        loop = asyncio.get_running_loop()
        to_r, to_w = os.pipe()  # the build's requests
        from_r, from_w = os.pipe()  # the answer

        def run() -> None:
            with open(to_r, encoding="utf-8") as fin, open(from_w, "w", encoding="utf-8") as fout:

                def write(text: str) -> None:
                    fout.write(text)
                    fout.flush()

                try:
                    serve_lines(fin.readline, write, own_process=False)
                except Exception:  # noqa: BLE001 - an empty answer: the build finishes itself
                    log.exception("finish thread failed")

        thread = threading.Thread(target=run, name="rmskit-finish", daemon=True)
        reader = asyncio.StreamReader(limit=1 << 24, loop=loop)
        answers, requests = open(from_r, "rb", 0), open(to_w, "wb", 0)
        reading = transport = None
        try:
            reading, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), answers)
            transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, requests)
        except BaseException:  # e.g. an event loop without pipes: the build finishes itself
            for pipe in (reading, transport):
                if pipe is not None:
                    pipe.close()
            answers.close()
            requests.close()
            os.close(to_r)
            os.close(from_w)
            raise
        writer = asyncio.StreamWriter(transport, protocol, None, loop)
        thread.start()
        return cls(writer, reader, thread, reading)

    def kill(self) -> None:
        """End of its input: the thread stops following and lets its state go."""
        self.stdin.close()

    async def wait(self) -> int:
        import asyncio

        self.stdin.close()
        await asyncio.to_thread(self._thread.join)
        self._reading.close()
        self.returncode = 0
        return 0


def _line_field(next_line: Callable[[], str] | None, key: str, kind: type) -> Any:
    """`key` of the build's next line (a JSON object) if it is a `kind`; else None."""
    try:
        value = json.loads(next_line() if next_line is not None else "")[key]
    except (ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, kind) else None


if __name__ == "__main__":
    main()
