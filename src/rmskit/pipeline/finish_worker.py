"""The build's finish in its own process: `python -m rmskit.pipeline.finish_worker` (started by `Finish`).

While the run goes on it imports the finish's modules (scipy, datasketch, pyarrow, the export: ~1.5 s of
CPU) and embeds the kept queries, at a lower CPU priority (nice 10), so it takes the cores' idle time
and never the build's GIL. After the last response the parent sends the run directory and the worker
runs the probes and the export on a read-only ledger; the parent stores the probes (it holds the
run's write lock). Issue 13 §6: in the build's own thread the same imports took ~1 s of the finish,
and importing them during the run's tail slowed the tail as much as it saved (the GIL).

Protocol, one JSON object per line: stdin {"q": query}..., then {"finish": run_dir}; stdout, once,
{"probes": {...} | null, "result": {...}}. Anything else the libraries print goes to stderr, which the
parent forwards to its log. End of stdin without "finish" (the build was cancelled, or its process
died) ends the worker at once."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, TextIO

NICE = 10


def _warm() -> None:
    """Import what the probes and the export use, and load MiniLM, before the run needs them."""
    import datasketch  # noqa: F401  (MinHash LSH imports scipy.integrate: ~0.7 s)
    import pyarrow.parquet  # noqa: F401
    import scipy.optimize  # noqa: F401
    import scipy.stats  # noqa: F401  (~0.7 s: scipy 1.17 rewrites docstrings at import)

    import rmskit.export  # noqa: F401
    from rmskit.scoring import probes

    with contextlib.suppress(Exception):  # no MiniLM here: the probes report it at the finish
        probes._embedder()
    # The modules' objects live as long as the worker: keep them out of the collections that letting
    # the embedder go runs at the finish (~60 ms each over scipy's objects).
    gc.freeze()


def command() -> list[str]:
    return [sys.executable, "-m", "rmskit.pipeline.finish_worker"]


def environment() -> dict[str, Any]:
    """The parent's environment, with this rmskit first on the path (it may not be installed)."""
    import rmskit

    root = str(Path(rmskit.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


async def _serve(out: TextIO) -> int:
    from rmskit.ledger import Ledger
    from rmskit.pipeline.finish import probe_run, write_export
    from rmskit.scoring.probes import QueryEmbeddings

    queries = QueryEmbeddings()
    embedding = asyncio.create_task(queries.run())
    reader = asyncio.StreamReader(limit=1 << 24)
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    run_dir: str | None = None
    while line := await reader.readline():
        msg = json.loads(line)
        if "q" in msg:
            queries.add(msg["q"])
        elif "finish" in msg:
            run_dir = msg["finish"]
            break
    if run_dir is None:  # cancelled, or the build's process is gone
        embedding.cancel()
        return 0
    queries.close()
    await asyncio.gather(embedding, return_exceptions=True)  # a failure: the probes embed what is left
    with Ledger(Path(run_dir), readonly=True) as ledger:
        probes = await asyncio.to_thread(probe_run, ledger, queries)
    result = await asyncio.to_thread(write_export, Path(run_dir), probes)
    out.write(json.dumps({"probes": probes, "result": result}) + "\n")
    out.flush()
    return 0


def main() -> int:
    # The protocol owns the real stdout; anything printed (Python or C) goes to stderr instead.
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with contextlib.suppress(OSError, AttributeError):  # not on Windows
        os.nice(NICE)
    _warm()
    code = asyncio.run(_serve(out))
    # Everything is written and flushed: skip the interpreter's teardown of scipy, onnxruntime and
    # the rest (~0.3 s that the build would wait for).
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    raise SystemExit(main())
