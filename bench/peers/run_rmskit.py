"""rmskit as a peer client. Job a: one perceive-style call per image through the `openai:` backend
(load_backend + asyncio). Job b: `run_build` (its own streaming call graph, one scenario per image,
no controls) with the benchmark's photos as its images."""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from common import STAGES, cpu_now, image_paths, report  # noqa: E402

from rmskit.config import BackendConfig, BuildConfig  # noqa: E402
from rmskit.models import GenParams, ImageInput, Message, load_backend  # noqa: E402
from rmskit.pipeline.registry import STAGES as STAGES_BY_NAME  # noqa: E402
from rmskit.pipeline.runner import run_build  # noqa: E402
from rmskit.records import ImageRecord  # noqa: E402

# The backend's HTTP stack (httpx, aiohttp) is start-up, as the peers' imports are, not a cost per request.
importlib.import_module("rmskit.models.openai_compat")


def backend_cfg() -> BackendConfig:
    return BackendConfig(
        spec="openai:gpt-4o-mini",
        base_url=os.environ["PEER_BASE_URL"],
        concurrency=int(os.environ["PEER_CONCURRENCY"]),
        image_max_side=320,
    )


async def job_a(paths: list[str]) -> int:
    backend = load_backend(backend_cfg())
    _, schema, system = STAGES[0]

    async def one(i: int, p: str) -> None:
        sha = hashlib.sha256(f"{i}:{p}".encode()).hexdigest()
        msgs = [
            Message(role="system", content=system),
            Message(
                role="user", content="Describe this photo.", images=[ImageInput(sha256=sha, path=Path(p))]
            ),
        ]
        await backend.generate(msgs, schema=schema, params=GenParams(max_tokens=256))

    await asyncio.gather(*(one(i, p) for i, p in enumerate(paths)))
    await backend.aclose()
    return len(paths)


def image_records(paths: list[str], tag: str = "") -> Iterator[ImageRecord]:
    """The bench photos as ingested images, each its own (`tag`: another set of the same photos)."""
    for i, p in enumerate(paths):
        yield ImageRecord(
            sha256=hashlib.sha256(f"peer-{tag}{i}".encode()).hexdigest(),
            phash=hashlib.sha256(f"phash-{tag}{i}".encode()).hexdigest()[:16],  # distinct photos: far apart
            source_root="/bench",
            source_path=Path(p).name,
            path=p,
            width=320,
            height=240,
        )


# The calls each of a sample's rounds waits for, as (phase, step): its writer, then its checks side by side.
ROUND_STEP = {
    s.name: (s.unit, 1 if s.check else 0)
    for s in STAGES_BY_NAME.values()
    if s.check or s.role in ("compose", "respond")
}


def deepest_chain(run_dir: Path) -> int:
    """The most calls one after another that a sample of the run waited for: perceive and discover, then
    a writer and its checks per round (the build's records, keyed `<sample>/r<round>`), as the peers
    count theirs (common.chain_levels). A check answered from the request cache counts too; in job (b)
    each round's check_combined, which reads the photo, is a request of its own."""
    from rmskit.ledger import Ledger

    with Ledger(run_dir, readonly=True) as led:
        rows = led.query("SELECT stage, key FROM records")
    steps: dict[str, set[tuple[str, int, str]]] = {}
    for stage, key in rows:
        if stage in ROUND_STEP and "/r" in key:
            sid, rnd = key.rsplit("/r", 1)
            steps.setdefault(sid, set()).add((*ROUND_STEP[stage], rnd))
    return 2 + max((len(s) for s in steps.values()), default=0)


def job_b(paths: list[str]) -> tuple[int, float, str | None, int]:
    """(images, when the build returned, the build's log line on where its finish's time went, printed
    per run by --timeline, the deepest chain of dependent calls). The bench's own reads after the build
    (its log, every record for the chain: ~10-60 ms) are not the client's finish."""
    cfg = BuildConfig(
        sources=["/bench"],
        out=Path(tempfile.mkdtemp(prefix="rmskit-peer-")),
        embedder="hashing",
        perceive="model",
        scenarios_per_image=1,
        controls=False,
        model=backend_cfg(),
    )
    asyncio.run(run_build(cfg, quiet=True, items=image_records(paths), export=True))
    built = time.time()
    log = (cfg.out / "build.log").read_text().splitlines()
    lines = [x for x in log if " finish: " in x]
    note = lines[-1].split(" finish: ", 1)[1] if lines else None
    # what went wrong, if anything (e.g. why the dataset was not written as samples came), with it
    warned = [x.split(" ", 2)[-1] for x in log if " WARNING " in x or " ERROR " in x]
    if warned:
        note = "; ".join([note or "no finish line", *warned])
    return len(paths), built, note, deepest_chain(cfg.out)


def main() -> None:
    job = sys.argv[1]
    paths = image_paths()
    setup = cpu_now()
    t0 = time.time()
    extra: dict[str, Any] = {"t_job_start": t0}
    if job == "a":
        extra["items"] = asyncio.run(job_a(paths))
    else:
        extra["items"], extra["t_end"], finish_log, extra["chain_levels"] = job_b(paths)
        if finish_log:
            extra["finish_log"] = finish_log
    report("rmskit", job, setup, extra)


if __name__ == "__main__":
    main()
