"""The build's end: text probes and the dataset export (issue 13 §6: finish soon after the last response).

`Finish` starts with the run: it embeds each kept sample's query in the background, so after the last
response only the last few queries are embedded; then the embedder is let go and the probes' statistics
and the export run (their modules, scipy, datasketch and pyarrow, are imported then: ~1 s).

Importing them in a thread during the run's tail instead (as before) saved that second of finish but
cost as much: the imports held the GIL while the last chains waited for the event loop (the tail grew by
~0.8 s), and with the embedder still loaded the peak RSS rose from ~275 to ~348 MB (job b, 400 images,
bench/peers)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from rmskit.ledger import Ledger
from rmskit.scoring.probes import QueryEmbeddings

log = logging.getLogger("rmskit.build")


class Finish:
    def __init__(self) -> None:
        self.queries = QueryEmbeddings()
        self._embedding: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Call from the running event loop when the run starts."""
        self._embedding = asyncio.create_task(self.queries.run())

    def kept(self, sample: dict[str, Any]) -> None:
        if isinstance(q := sample.get("query"), str):
            self.queries.add(q)

    async def cancel(self) -> None:
        """The run failed or was interrupted: drop the background embedding."""
        if self._embedding is not None:
            self._embedding.cancel()
            await asyncio.gather(self._embedding, return_exceptions=True)
            self._embedding = None

    async def finish(self, run_dir: Path, ledger: Ledger) -> dict[str, Any]:
        """The run is over: embed what is still queued (a batch already running is not wasted), then
        probes and export."""
        if self._embedding is not None:
            self.queries.close()
            await asyncio.gather(self._embedding, return_exceptions=True)  # a failure: finish reports it
            self._embedding = None
        return await asyncio.to_thread(finish_dataset, run_dir, ledger, self.queries)


def finish_dataset(run_dir: Path, ledger: Ledger, queries: QueryEmbeddings | None = None) -> dict[str, Any]:
    """Probes + dataset export. Failures here are reported, never lose the ledger's work."""
    from threadpoolctl import threadpool_limits

    probes: dict[str, Any] | None = None
    # One BLAS thread: the probes' linear algebra is small and many threads only spin against each other.
    with threadpool_limits(limits=1, user_api="blas"):
        try:
            from rmskit.scoring.probes import run_probes

            samples = ledger.probe_rows("ok")
            if samples:
                probes = run_probes(samples, embeddings=queries, release=True).model_dump(mode="json")
                ledger.set_meta("probes", probes)
        except Exception as exc:  # probes are a nice-to-have in the card
            log.warning("probes skipped: %r", exc)
    try:
        from rmskit.export import write_dataset

        write_dataset(run_dir, probes=probes)
        return {"dataset_dir": str(run_dir / "dataset")}
    except Exception as exc:
        log.exception("export failed")
        return {"export_error": f"{type(exc).__name__}: {exc}"}
