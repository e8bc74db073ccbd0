"""The build's end: text probes and the dataset export (issue 13 §6: finish soon after the last response).

`Finish` starts with the run. It embeds each kept sample's query in the background (with the MiniLM
the taxonomy may already hold), so after the last response only the last few queries are embedded.
By default it also starts a worker process (finish_worker.py) that imports the probes' and the
export's modules (numpy, pyarrow, the export: ~0.6 s of CPU, ~62 MB PSS) while the build waits on the
endpoint, at a lower CPU priority, and follows the run's ledger, doing each kept sample's share of the
export as it is stored (export/memo.py). At the last response the worker starts curating and exporting,
while the build embeds its last queries and runs the probes (up to `PROBES_HERE` kept samples; past
that it hands the embeddings over and the worker probes, then exports); the card, written last,
waits for the numbers, which the build stores. If the worker cannot start or fails, the same finish
runs here.

`RMSKIT_FINISH=inline` keeps the finish in the build's process: its modules are imported after the
last response (~1 s; a job (b) finish of 1.07-1.14 s instead of 0.24-0.55, bench/peers) and the build
holds ~80 MB less (PSS of the two processes together: 230 vs 314 MB). Importing them in a thread during
the run's tail instead cost as much as it saved: the imports held the GIL while the last chains waited
for the event loop (the tail grew by ~0.8 s)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rmskit.ledger import Ledger
from rmskit.scoring.probes import QueryEmbeddings, release_embedder

if TYPE_CHECKING:
    from rmskit.export.writer import Probes  # not at run time: the build does not import the export

log = logging.getLogger("rmskit.build")

MODES = ("worker", "inline")

# Up to this many kept samples in the run, the build probes them itself while its worker exports (two
# processes on two cores: the probes in a thread of the worker contended with the export for its GIL);
# past it the worker probes from handed-over embeddings and exports after them, so a long run's finish
# never holds the probes' rows beside the export's curation (at 10k samples the build's peak was 225 MB
# PSS with them, 191 without; at 100k, probes beside the export in the worker: 376 MB for both processes).
PROBES_HERE = 2_000


def mode() -> str:
    m = os.environ.get("RMSKIT_FINISH", "worker")
    if m not in MODES:
        raise ValueError(f"RMSKIT_FINISH={m!r}: choose one of {', '.join(MODES)}")
    return m


class Finish:
    def __init__(self, worker: bool | None = None) -> None:
        self.worker = mode() == "worker" if worker is None else worker
        self.queries = QueryEmbeddings()
        self._embedding: asyncio.Task[None] | None = None
        self._finding_blas: asyncio.Task[None] | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._stderr: asyncio.Task[None] | None = None
        self._timing: dict[str, float] = {}

    async def start(self, run_dir: Path | None = None) -> None:
        """Call from the running event loop when the run starts. With `run_dir`, the worker follows its
        ledger and does each kept sample's share of the export as it comes (export/memo.py)."""
        self._embedding = asyncio.create_task(self.queries.run())
        # The probes run here (inline, or up to PROBES_HERE samples): find the BLAS libraries now, off
        # the event loop, not after the last response (threadpool_limits scanned them for 11.8 ms of a
        # job (b) finish, bench/peers).
        self._finding_blas = asyncio.create_task(asyncio.to_thread(find_blas))
        if not self.worker:
            return
        # What the probes import beyond what the build has, now rather than after the last response
        # (~30 ms of CPU: the near-duplicate probe's MinHash, the bootstraps' numpy.random).
        import numpy.random  # noqa: F401

        import rmskit.curate.minhash  # noqa: F401
        from rmskit.pipeline import finish_worker

        try:
            self._proc = await asyncio.create_subprocess_exec(
                *finish_worker.command(),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=finish_worker.environment(),
                limit=1 << 24,  # the answer line holds the probes' report
                start_new_session=True,  # the terminal's Ctrl-C is the build's to handle, not the worker's
            )
        except OSError as exc:
            log.warning("finish worker did not start (%r): the finish runs in this process", exc)
        else:
            self._stderr = asyncio.create_task(_forward(self._proc.stderr))
            if run_dir is not None:
                await self._send({"follow": str(run_dir)})

    def query_ready(self, query: str) -> None:
        """A query passed its checks: embed it now, while its response is written and checked (two more
        answers, ~0.6 s in bench/peers job (b)), so the last samples' queries are not embedded after the
        last response (7-33 ms of a job (b) finish). A sample whose response then fails leaves an
        unused row (and a slot of the bottom-k sample, past `EMBED_LIMIT` texts)."""
        self.queries.add(query)

    def kept(self, sample: dict[str, Any]) -> None:
        if isinstance(q := sample.get("query"), str):
            self.queries.add(q)  # embedded already when `query_ready` saw it: a no-op then

    async def cancel(self) -> None:
        """The run failed or was interrupted: drop the worker and the background embedding (the
        worker first: it is a process of its own, which nothing else would end)."""
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            await self._proc.wait()
            await self._close_stderr()
            self._proc = None
        if self._embedding is not None:
            self._embedding.cancel()
            await asyncio.gather(self._embedding, return_exceptions=True)
            self._embedding = None
        await self._blas_found()

    async def _blas_found(self) -> None:
        if self._finding_blas is not None:
            await asyncio.gather(self._finding_blas, return_exceptions=True)  # failed: the probes scan
            self._finding_blas = None

    async def _close_stderr(self) -> None:
        if self._stderr is not None:
            await asyncio.gather(self._stderr, return_exceptions=True)
            self._stderr = None

    async def finish(self, run_dir: Path, ledger: Ledger) -> dict[str, Any]:
        """The run is over: the queries still queued are embedded here (a batch already running is not
        wasted) and the probes run here while the worker curates and exports at once, when the run is
        small enough (`PROBES_HERE`: two processes, two cores); else the worker probes from the
        embeddings handed over, then exports; without a worker, probes and export run here."""
        t0 = time.perf_counter()
        await self._blas_found()  # long since found (a thread at the run's start)
        here = False
        if self._proc is not None:
            here = ledger.sample_counts().get("ok", 0) <= PROBES_HERE  # what the probes read
            await self._send(
                {"finish": str(run_dir), "probes": "follow"} if here else {"finish": str(run_dir)}
            )
        if self._embedding is not None:
            self.queries.close()
            await asyncio.gather(self._embedding, return_exceptions=True)  # a failure: finish reports it
            self._embedding = None
        if self._proc is None:
            return await asyncio.to_thread(finish_dataset, run_dir, ledger, self.queries)
        if here:
            return await self._finish_with_probes_here(run_dir, ledger, t0)
        t1 = time.perf_counter()
        npz = await self._hand_over()
        self._timing = {"last_queries_embedded": t1 - t0, "handed_over": time.perf_counter() - t1}
        try:
            if npz is not None:
                # The rows are in the file now: the build lets its copy go while the worker runs
                # (at most 20k x 384 float32, 31 MB, plus their texts).
                self.queries = QueryEmbeddings()
            done = await self._worker_finish({"embeddings": npz})
            if done is not None:
                probes, result = done
                if probes is not None:
                    ledger.set_meta("probes", probes)
                return result
            log.warning("finish worker failed: the finish runs in this process")
            if npz is not None:
                with contextlib.suppress(OSError, ValueError, KeyError):  # else the probes embed again
                    self.queries = QueryEmbeddings.load(Path(npz))
            return await asyncio.to_thread(finish_dataset, run_dir, ledger, self.queries)
        finally:
            if npz:
                with contextlib.suppress(OSError):
                    os.unlink(npz)

    async def _finish_with_probes_here(self, run_dir: Path, ledger: Ledger, t0: float) -> dict[str, Any]:
        """The probes in this process while the worker exports (it writes the card once they come)."""
        t1 = time.perf_counter()
        # The model let go as soon as the probes have their rows (~10 ms before their work; ~55 MB of the
        # build's RSS): the two processes' peak came at the finish with it held (summed RSS 293 MB in the
        # peer table at 06:51, curator's 293), and during the run without (289, rmskit alone, 06:55).
        probes = await asyncio.to_thread(probe_run, ledger, self.queries, release=True)
        self._timing = {"last_queries_embedded": t1 - t0, "probed": time.perf_counter() - t1}
        if probes is not None:
            ledger.set_meta("probes", probes)
        self.queries = QueryEmbeddings()  # the probes copied out what they read
        # The run's last writes into the database file, and the WAL emptied, while the worker exports
        # (this core is idle then): the ledger's close has nothing left to copy, sync or free (it took
        # 17-28 ms, the finish's last step, bench/peers job (b)).
        copied = asyncio.create_task(
            asyncio.to_thread(self._timed, "checkpointed", lambda: _checkpoint(ledger))
        )
        try:
            done = await self._worker_finish({"probes": probes})
        finally:
            await copied
        if done is not None:
            return done[1]
        log.warning("finish worker failed: the finish runs in this process")
        return await asyncio.to_thread(write_export, run_dir, probes)

    async def _send(self, message: dict[str, Any]) -> None:
        """One line to the worker; a worker that died meanwhile is found when its answer is read."""
        proc = self._proc
        assert proc is not None and proc.stdin is not None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            proc.stdin.write(json.dumps(message).encode() + b"\n")
            await proc.stdin.drain()

    async def _hand_over(self) -> str | None:
        """The embedded queries in a temporary .npz for the worker; None when it could not be written
        (e.g. a full disk: the worker embeds the queries again)."""
        npz = None
        try:
            fd, npz = tempfile.mkstemp(prefix="rmskit-queries-", suffix=".npz")
            os.close(fd)
            await asyncio.to_thread(self.queries.save, Path(npz))
            return npz
        except OSError as exc:
            log.warning("query embeddings not handed to the finish worker: %r", exc)
            if npz is not None:
                with contextlib.suppress(OSError):
                    os.unlink(npz)
            return None

    def _timed(self, name: str, step: Callable[[], object]) -> None:
        t = time.perf_counter()
        step()
        self._timing[name] = time.perf_counter() - t

    async def _worker_finish(
        self, message: dict[str, Any]
    ) -> tuple[dict[str, Any] | None, dict[str, Any]] | None:
        """Send the worker its last line (the embeddings, or the probes), let the embedder go while it
        works, and read its answer: (probes, result), or None when it failed."""
        await self._send(message)
        proc, self._proc = self._proc, None
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        line = b""
        try:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # it died: the answer is empty
                proc.stdin.close()
            # The worker has the rows now (or never will): let the model go while it works (a no-op when
            # the probes here let it go already).
            freed = asyncio.create_task(asyncio.to_thread(self._timed, "embedder_released", release_embedder))
            line = await proc.stdout.readline()
            await freed
        finally:
            if proc.returncode is None and not line:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            await proc.wait()
            await self._close_stderr()
        try:
            msg = json.loads(line)
            probes, result = msg["probes"], msg["result"]
        except (ValueError, KeyError, TypeError):
            log.warning("finish worker ended (exit %s) without a result", proc.returncode)
            return None
        ahead = msg.get("ahead")
        timing = _timing_line(self._timing, msg.get("seconds"))
        log.info("finish: %s", timing + (f", {ahead} samples prepared during the run" if ahead else ""))
        if message.get("embeddings") and not msg.get("embeddings_read"):
            log.warning("finish worker could not read the query embeddings: it embedded the queries again")
        return probes, result


def _checkpoint(ledger: Ledger) -> None:
    """`Ledger.checkpoint` ahead of the close; a failure (a full disk, a reader past the busy timeout)
    only leaves the work to the close, as before."""
    try:
        ledger.checkpoint(truncate=True)
    except Exception as exc:  # noqa: BLE001 - the close checkpoints anyway
        log.warning("WAL checkpoint before the close failed: %r", exc)


PHASES = ("last_queries_embedded", "handed_over", "probed", "checkpointed", "embedder_released")


def _timing_line(build: dict[str, float], worker: Any) -> str:
    """The finish's phases after the last response, for the build's log: where its time went."""
    # in the phases' order, not their ends' (the checkpoint and the embedder's release run side by side)
    ordered = sorted(build.items(), key=lambda kv: PHASES.index(kv[0]) if kv[0] in PHASES else len(PHASES))
    parts = [f"{k.replace('_', ' ')} in {v:.3f} s" for k, v in ordered]
    with contextlib.suppress(AttributeError, TypeError, ValueError):  # only ever a log line
        parts += [f"worker's {k} {wall:.3f} s wall / {cpu:.3f} s CPU" for k, (wall, cpu) in worker.items()]
    return ", ".join(parts)


async def _forward(stream: asyncio.StreamReader | None) -> None:
    """The worker's stderr (warnings, tracebacks) into the build's log, line by line."""
    if stream is None:
        return
    while line := await stream.readline():
        log.warning("finish worker: %s", line.decode("utf-8", "replace").rstrip())


def probe_run(
    ledger: Ledger, queries: QueryEmbeddings | None = None, release: bool = True
) -> dict[str, Any] | None:
    """The CPU probes of the run's kept samples (None when there are none, or they failed: the probes
    are a nice-to-have in the card). `release`: let the embedder go once the queries are embedded."""
    with one_blas_thread():
        try:
            from rmskit.scoring.probes import run_probes

            samples = ledger.probe_rows("ok")
            if samples:
                return run_probes(samples, embeddings=queries, release=release).model_dump(mode="json")
        except Exception as exc:
            log.warning("probes skipped: %r", exc)
    return None


# The finish worker limits BLAS to one thread once, for its whole life (finding the libraries takes
# ~13 ms each time).
blas_limited = False
# A build finds them while it runs (`find_blas`) and limits them through this controller at its finish.
_blas: Any = None


def find_blas() -> None:
    """The loaded BLAS libraries, for `one_blas_thread` (numpy's is loaded with numpy, before any run)."""
    global _blas
    from threadpoolctl import ThreadpoolController

    _blas = ThreadpoolController()


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """One BLAS thread: the probes' linear algebra is small and many threads only spin against each other."""
    if blas_limited:
        yield
        return
    if _blas is not None:
        with _blas.limit(limits=1, user_api="blas"):
            yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def write_export(run_dir: Path, probes: Probes) -> dict[str, Any]:
    """The dataset export (`probes`: the card's numbers, or a call that waits for them). A failure is
    reported, never loses the ledger's work."""
    try:
        from rmskit.export import write_dataset

        write_dataset(run_dir, probes=probes)
        return {"dataset_dir": str(run_dir / "dataset")}
    except Exception as exc:
        log.exception("export failed")
        return {"export_error": f"{type(exc).__name__}: {exc}"}


def finish_dataset(run_dir: Path, ledger: Ledger, queries: QueryEmbeddings | None = None) -> dict[str, Any]:
    """Probes + dataset export in this process."""
    probes = probe_run(ledger, queries)
    if probes is not None:
        ledger.set_meta("probes", probes)
    return write_export(run_dir, probes)
