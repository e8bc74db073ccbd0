"""The build's end: text probes and the dataset export (issue 13 §6: finish soon after the last response).

`Finish` starts with the run. It embeds each query that passed its checks in the background (with the
MiniLM the taxonomy may already hold), so after the last response only the last few are embedded.
By default it also starts the finish worker (finish_worker.py) as a thread of the build's process
(`InProcess`, over two pipes): it imports the export's modules (pyarrow, the export) while the build
waits on the endpoint, at a lower CPU priority, and follows the run's ledger: it curates each kept
sample as it is stored and writes it into the staged dataset (export/online.py). Once the run's tail is
reached (no image will start, every sample in flight has its query) the build probes the rows it will
have in a thread (`Ahead`); at the last response the worker completes the dataset and the build hands
it the probe numbers computed ahead (or computes them then, when a sample failed meanwhile, up to
`PROBES_HERE` kept samples; past that it hands the embeddings over and the worker probes, then
exports); the card, written last, carries them. If the worker cannot start or fails, the same finish
runs here.

`RMSKIT_FINISH=worker` makes the worker a process of its own (the default until 2026-12-04): its own
GIL and core, but numpy, pyarrow and the export imported twice, so bench/peers job (b) summed 297 MB of
RSS (249 PSS) against the thread's 247 (218), for a finish of 0.07 s against 0.06 (13:36 and 13:31,
within the noise between runs). `RMSKIT_FINISH=inline`
keeps everything after the last response: its modules are imported then and the whole dataset written
(a job (b) finish of ~0.4 s). Importing them in a thread during the run's tail instead cost as much as
it saved: the imports held the GIL while the last chains waited for the event loop (the tail grew by
~0.8 s); the finish thread imports them at the run's start, where the build mostly waits."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rmskit.ledger import Ledger
from rmskit.scoring.probes import QueryEmbeddings, release_embedder

if TYPE_CHECKING:
    from rmskit.export.writer import Probes  # not at run time: the build does not import the export
    from rmskit.pipeline.finish_worker import InProcess

log = logging.getLogger("rmskit.build")

MODES = ("thread", "worker", "inline")

# Up to this many kept samples in the run, the build probes them itself while its worker exports (two
# processes on two cores: the probes in a thread of the worker contended with the export for its GIL);
# past it the worker probes from handed-over embeddings and exports after them, so a long run's finish
# never holds the probes' rows beside the export's curation (at 10k samples the build's peak was 225 MB
# PSS with them, 191 without; at 100k, probes beside the export in the worker: 376 MB for both processes).
PROBES_HERE = 2_000


def mode() -> str:
    m = os.environ.get("RMSKIT_FINISH", "thread")
    if m not in MODES:
        raise ValueError(f"RMSKIT_FINISH={m!r}: choose one of {', '.join(MODES)}")
    return m


class Finish:
    def __init__(self, worker: bool | None = None, thread: bool | None = None) -> None:
        self.worker = mode() in ("worker", "thread") if worker is None else worker
        self.thread = mode() == "thread" if thread is None else thread
        self.queries = QueryEmbeddings()
        self._embedding: asyncio.Task[None] | None = None
        self._finding_blas: asyncio.Task[None] | None = None
        self._proc: asyncio.subprocess.Process | InProcess | None = None
        self._stderr: asyncio.Task[None] | None = None
        self._timing: dict[str, float] = {}
        self._rows: list[dict[str, Any]] = []  # each kept sample's probe row, in stored order
        self._rows_seen = True  # `_rows` holds them as stored
        self.ahead = Ahead()
        self._ahead_note: str | None = None  # for the finish's log line
        self._answer: dict[str, Any] | None = None  # the worker's, for the finish's log line

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
            if self.thread:
                self._proc = await finish_worker.InProcess.start()
            else:
                self._proc = await asyncio.create_subprocess_exec(
                    *finish_worker.command(),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    env=finish_worker.environment(),
                    limit=1 << 24,  # the answer line holds the probes' report
                    start_new_session=True,  # the terminal's Ctrl-C is the build's, not the worker's
                )
        except (OSError, NotImplementedError) as exc:  # the latter: an event loop without pipes
            log.warning(
                "finish worker did not start (%s: %s): the finish runs in this process",
                type(exc).__name__,
                exc,
            )
        else:
            self._stderr = asyncio.create_task(_forward(self._proc.stderr))
            if run_dir is not None:
                await self._send({"follow": str(run_dir)})

    def query_ready(self, query: str, kind: str | None = None, category: str = "") -> None:
        """A query passed its checks: embed it now, while its response is written and checked (two more
        answers, ~0.6 s in bench/peers job (b)), so the last samples' queries are not embedded after the
        last response (7-33 ms of a job (b) finish). A sample whose response then fails leaves an
        unused row (and a slot of the bottom-k sample, past `EMBED_LIMIT` texts). With its sample's
        `kind` and `category` it also counts towards the probes computed ahead (`Ahead`)."""
        self.queries.add(query)
        if kind is not None:
            self.ahead.pending[(query, kind, category)] += 1
            self._look_ahead()

    # -- the run's progress, for the probes computed ahead (the local runner reports it) ---------------
    def image_planning(self, delta: int) -> None:
        """An image started (+1) or left (-1) the stages before its samples start."""
        self.ahead.planning += delta
        self._look_ahead()

    def samples_started(self, n: int) -> None:
        """An image's `n` samples start (each ends with `sample_ended`)."""
        self.ahead.in_flight += n

    def sample_ended(self, ready: list[tuple[str, str, str]]) -> None:
        """A sample ended (stored, failed, or left for a re-run); `ready`: its query as `query_ready` saw it."""
        self.ahead.in_flight -= 1
        for key in ready:
            self.ahead.pending[key] -= 1
            if self.ahead.pending[key] <= 0:
                del self.ahead.pending[key]
        self._look_ahead()

    def feed_done(self) -> None:
        """No image will start after this."""
        self.ahead.feed_done = True
        self._look_ahead()

    def _look_ahead(self) -> None:
        if self._proc is None or not self._rows_seen:
            return  # only a worker's finish reads what was computed ahead
        rows = self.ahead.candidates(self._rows)
        if rows is not None and len(rows) <= PROBES_HERE:  # past it the worker probes at the finish
            self.ahead.start(rows, self.queries)

    def kept(self, sample: dict[str, Any], kind: str | None = None, category: str | None = None) -> None:
        """A sample was stored as kept (`kind` and `category` as stored beside it)."""
        if isinstance(q := sample.get("query"), str):
            self.queries.add(q)  # embedded already when `query_ready` saw it: a no-op then
        # what the probes read of it (`Ledger.probe_rows`), so they need not read the ledger first; only
        # with the stored columns given (the local runner, which calls this as it stores each one)
        if len(self._rows) >= PROBES_HERE:
            # past PROBES_HERE the worker probes (from the ledger): none held, so memory stays flat
            self._rows_seen, self._rows = False, []
            self.queries.stop_sketching()
        if kind is None:
            self._rows_seen, self._rows = False, []
        if not self._rows_seen:
            return
        self._rows.append(
            {
                "query": q,
                "kind": sample.get("kind") if kind is None else kind,
                "label": sample.get("label"),
                "category": sample.get("category") if category is None else category,
            }
        )

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
        await self.ahead.cancel()

    async def _blas_found(self) -> None:
        if self._finding_blas is not None:
            await asyncio.gather(self._finding_blas, return_exceptions=True)  # failed: the probes scan
            self._finding_blas = None

    async def _close_stderr(self) -> None:
        if self._stderr is not None:
            await asyncio.gather(self._stderr, return_exceptions=True)
            self._stderr = None

    async def finish(
        self, run_dir: Path, ledger: Ledger, meanwhile: Callable[[], Awaitable[None]] | None = None
    ) -> dict[str, Any]:
        """The run is over: the queries still queued are embedded here (a batch already running is not
        wasted) and the probes run here while the worker curates and exports at once, when the run is
        small enough (`PROBES_HERE`: two processes, two cores); else the worker probes from the
        embeddings handed over, then exports; without a worker, probes and export run here.
        `meanwhile`: the caller's own work (closing its model clients), run while the worker writes
        the card: at the finish's start it held the event loop while the last queries were embedded."""
        t0 = time.perf_counter()
        await self._blas_found()  # long since found (a thread at the run's start)
        here, rows = False, None
        if self._proc is not None:
            kept = ledger.sample_counts().get("ok", 0)
            here = kept <= PROBES_HERE  # what the probes read
            # the rows seen stored are the probes' rows when they are all of them (not on a resumed run)
            if self._rows_seen and len(self._rows) == kept:
                rows = self._rows
            await self._send(
                {"finish": str(run_dir), "probes": "follow"} if here else {"finish": str(run_dir)}
            )
        self._rows = []
        if self._embedding is not None:
            self.queries.close()
            await asyncio.gather(self._embedding, return_exceptions=True)  # a failure: finish reports it
            self._embedding = None
        if here:
            return await self._finish_with_probes_here(run_dir, ledger, t0, meanwhile, rows)
        if meanwhile is not None:
            await meanwhile()
        if self._proc is None:
            return await asyncio.to_thread(finish_dataset, run_dir, ledger, self.queries)
        t1 = time.perf_counter()
        npz = await self._hand_over()
        self._timing = {"last_queries_embedded": t1 - t0, "handed_over": time.perf_counter() - t1}
        try:
            if npz is not None:
                # The rows are in the file now: the build lets its copy go while the worker runs
                # (at most 20k x 384 float32, 31 MB, plus their texts).
                self.queries = QueryEmbeddings()
            done = await self._worker_finish({"embeddings": npz})
            self._log_timing()
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

    async def _finish_with_probes_here(
        self,
        run_dir: Path,
        ledger: Ledger,
        t0: float,
        meanwhile: Callable[[], Awaitable[None]] | None,
        rows: list[dict[str, Any]] | None,
    ) -> dict[str, Any]:
        """The probes in this process while the worker exports (it writes the card once they come)."""
        t1 = time.perf_counter()
        self._timing = {}
        # The run's writes copied into the database file and the WAL emptied beside the probes, once they
        # have read their rows (the connection is theirs till then): the ledger's close has little left
        # to copy, sync or free (17-20 ms after a PASSIVE checkpoint, 21-28 ms after none, bench/peers job
        # (b)). TRUNCATE waits for the worker's last reads, beside the probes, not after them (where it
        # took ~20 ms of the finish's path).
        copying: list[threading.Thread] = []

        def copy() -> None:
            copying.append(
                threading.Thread(target=self._timed, args=("checkpointed", lambda: _checkpoint(ledger)))
            )
            copying[0].start()

        # The model is not let go here: its teardown was 7-20 ms of CPU (onnxruntime's, holding the GIL)
        # on the finish's path. The probes computed ahead let it go in the run's tail; otherwise a later
        # build in this process reuses it, and the CLI exits.
        try:
            probes = await self.ahead.result(rows) if rows is not None else None
            await self.ahead.cancel()  # a run on other rows is not waited for
            self._ahead_note = (
                f"probes computed ahead ({self.ahead.runs} run{'s' if self.ahead.runs != 1 else ''})"
                if probes is not None
                else None
            )
            if probes is not None:
                copy()  # the probes were computed in the run's tail, on these very rows
            else:
                probes = await asyncio.to_thread(
                    probe_run, ledger, self.queries, release=False, on_read=copy, rows=rows
                )
            self._timing.update(last_queries_embedded=t1 - t0, probed=time.perf_counter() - t1)
            # the numbers to the worker at once: it writes the card while they are stored here (the
            # checkpoint's thread shares the connection: SQLite serialises the two)
            await self._send({"probes": probes})
            self.queries = QueryEmbeddings()  # the probes copied out what they read
            if probes is not None:
                ledger.set_meta("probes", probes)
            if meanwhile is not None:
                await meanwhile()  # the caller's, while the worker writes the card
            done = await self._worker_finish(None, release=False)
        finally:
            if copying and copying[0].is_alive():
                await asyncio.to_thread(copying[0].join)
        self._log_timing()
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
        self, message: dict[str, Any] | None, release: bool = True
    ) -> tuple[dict[str, Any] | None, dict[str, Any]] | None:
        """Send the worker its last line (the embeddings, or the probes; None: sent already), let the
        embedder go while it works (`release`), and read its answer: (probes, result), or None when it
        failed."""
        if message is not None:
            await self._send(message)
        proc, self._proc = self._proc, None
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        line = b""
        try:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # it died: the answer is empty
                proc.stdin.close()
            # The worker has the rows now (or never will): let the model go while it works (a long run:
            # the worker probes and exports for seconds).
            freed = (
                asyncio.create_task(asyncio.to_thread(self._timed, "embedder_released", release_embedder))
                if release
                else None
            )
            line = await proc.stdout.readline()
            if freed is not None:
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
        self._answer = msg
        if message is not None and message.get("embeddings") and not msg.get("embeddings_read"):
            log.warning("finish worker could not read the query embeddings: it embedded the queries again")
        return probes, result

    def _log_timing(self) -> None:
        """Where the finish's time went, in the build's log (once the checkpoint's thread is done: its
        time is in the line)."""
        msg, self._answer = self._answer, None
        if msg is None:
            return
        ahead = msg.get("ahead")
        timing = _timing_line(self._timing, msg.get("seconds"))
        if self._ahead_note:
            timing += f", {self._ahead_note}"
        if msg.get("online"):
            timing += f", the dataset written as samples came ({ahead or 0} during the run)"
        elif ahead:
            timing += f", {ahead} samples prepared during the run"
        log.info("finish: %s", timing)


def probe_key(rows: list[dict[str, Any]]) -> tuple[tuple[str, bool, str], ...]:
    """What the probes' result depends on: the rows' (query, risky, category) as a multiset."""
    from rmskit.scoring.probes import probe_fields

    return tuple(sorted(probe_fields(r) for r in rows))


class _Rows:
    """What `run_probes` reads of a build's `QueryEmbeddings`, read only (the probes computed ahead must
    leave them to the finish): the embedded rows, the near-duplicate sketches and pairs."""

    def __init__(self, queries: QueryEmbeddings) -> None:
        self._queries = queries
        self.sketches, self.pairs = queries.sketches, queries.pairs

    def embed(self, texts: list[str]) -> Any:
        return self._queries.rows(texts)  # a KeyError when one is not embedded: nothing computed ahead

    def clear(self) -> None:
        pass


class Ahead:
    """The build's probes computed in the run's tail (issue 13 §6): once no image is still before its
    samples, no image will start and every sample in flight has its query (it then only writes and
    checks its response), the rows the probes will read are known but for the samples that fail from
    here: the kept ones and those in flight. They are probed then, in a thread (~50 ms of CPU at 384
    samples, while the run waits on the endpoint); the finish uses the result when its rows are
    exactly those (`probe_key`: the probes depend on the rows' multiset only), else probes as before.
    Computed again when the rows change (a sample failed), one run at a time."""

    WAIT_S = 2.0  # at most this long for the rows' queries to be embedded

    def __init__(self) -> None:
        self.pending: Counter[tuple[str, str, str]] = Counter()  # (query, kind, category) in flight
        self.in_flight = 0
        self.planning = 0
        self.feed_done = False
        self.runs = 0
        self._key: tuple[Any, ...] | None = None
        self._task: asyncio.Task[None] | None = None
        self._done: dict[tuple[Any, ...], dict[str, Any] | None] = {}

    def candidates(self, kept: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
        """The rows the probes will read if no sample fails from here; None while they are not known."""
        if not self.feed_done or self.planning > 0 or self.in_flight != sum(self.pending.values()):
            return None
        more = [
            {"query": q, "kind": k, "label": None, "category": c}
            for (q, k, c), n in self.pending.items()
            for _ in range(n)
        ]
        return kept + more

    def start(self, rows: list[dict[str, Any]], queries: QueryEmbeddings) -> None:
        key = probe_key(rows)
        if key == self._key:
            return
        self._key = key
        previous = self._task
        self._task = asyncio.ensure_future(self._run(key, list(rows), queries, previous))

    async def _run(
        self,
        key: tuple[Any, ...],
        rows: list[dict[str, Any]],
        queries: QueryEmbeddings,
        previous: asyncio.Task[None] | None,
    ) -> None:
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)  # one at a time
        if key != self._key:
            return  # the rows changed while it waited
        texts = {str(r["query"]) for r in rows}
        deadline = time.monotonic() + self.WAIT_S
        while not texts <= queries.embedded() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        self.runs += 1
        self._done[key] = await asyncio.to_thread(_probe_ahead, rows, _Rows(queries), self.runs == 1)

    async def result(self, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
        """The probes computed ahead on exactly `rows`, waiting for a run still going; else None."""
        key = probe_key(rows)
        if key != self._key or self._task is None:
            return None
        await asyncio.gather(self._task, return_exceptions=True)
        return self._done.get(key)

    async def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None


def _probe_ahead(rows: list[dict[str, Any]], queries: _Rows, release: bool) -> dict[str, Any] | None:
    """`release`: let the embedding model go first: every query the run will keep is embedded (no image
    will start, every sample in flight has its query), and the run's tail then holds ~55 MB less
    beside the probes' own arrays (the build's peak came there, bench/peers job (b))."""
    from rmskit import heap

    if release:
        release_embedder()
    with one_blas_thread():
        try:
            from rmskit.scoring.probes import run_probes

            return run_probes(rows, embeddings=queries).model_dump(mode="json")  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - the finish probes as before
            log.info("probes ahead skipped: %r", exc)
            return None
        finally:
            # what the probes freed goes back now: their threads' heaps are glibc arenas of their own,
            # which kept it through the run's tail (the build's peak, bench/peers job (b))
            heap.trim()


CHECKPOINT_POLL_S = 0.001
CHECKPOINT_WAIT_S = 1.0


def _checkpoint(ledger: Ledger) -> None:
    """`Ledger.checkpoint` (TRUNCATE) ahead of the close, polling every millisecond while a reader is in
    the way (the worker's last reads, beside the probes): SQLite's own busy wait sleeps in growing
    steps, and its wake-up came 10-30 ms after the reader had gone, on the finish's path. A failure (a
    full disk, a reader past `CHECKPOINT_WAIT_S`) only leaves the work to the close, as before."""
    try:
        deadline = time.monotonic() + CHECKPOINT_WAIT_S
        while not ledger.checkpoint(truncate=True, wait=False) and time.monotonic() < deadline:
            time.sleep(CHECKPOINT_POLL_S)
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
    ledger: Ledger,
    queries: QueryEmbeddings | None = None,
    release: bool = True,
    on_read: Callable[[], None] | None = None,
    rows: list[dict[str, Any]] | None = None,
) -> dict[str, Any] | None:
    """The CPU probes of the run's kept samples (None when there are none, or they failed: the probes
    are a nice-to-have in the card). `release`: let the embedder go once the queries are embedded.
    `on_read`: called once the rows are read (the ledger's connection is free again). `rows`: the
    kept samples' `Ledger.probe_rows`, as the build saw them stored (not read again)."""
    with one_blas_thread():
        try:
            from rmskit.scoring.probes import run_probes

            try:
                samples = ledger.probe_rows("ok") if rows is None else rows
            finally:
                if on_read is not None:
                    on_read()
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
