"""The build's finish (issue 13 §6): kept queries are embedded while the run goes on, so after the last
response the probes embed only what is left; results are the same as embedding everything at the end."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_build_pipeline import STAGES, ScriptedBackend, _cfg, _images

from rmskit.ledger import Ledger
from rmskit.pipeline import finish as finish_mod
from rmskit.pipeline.runner import run_build
from rmskit.scoring import probes
from rmskit.scoring.probes import QueryEmbeddings, run_probes


def _counting_embed(monkeypatch, calls: list[list[str]]) -> None:
    real = probes.embed

    def counting(texts: list[str]):
        calls.append(list(texts))
        return real(texts)

    monkeypatch.setattr(probes, "embed", counting)


def _embedded_in_background(texts: list[str], **options: Any) -> QueryEmbeddings:
    """`texts` added one per event-loop turn to a running `QueryEmbeddings(**options)`, then closed."""

    async def go() -> QueryEmbeddings:
        q = QueryEmbeddings(**options)
        task = asyncio.create_task(q.run())
        for t in texts:
            q.add(t)
            await asyncio.sleep(0)
        q.close()
        await task
        return q

    return asyncio.run(go())


def test_query_embeddings_embed_in_the_background_once_per_text(monkeypatch) -> None:
    calls: list[list[str]] = []
    _counting_embed(monkeypatch, calls)
    texts = [f"how do I clean the shelf number {i} quickly" for i in range(5)]

    async def go() -> np.ndarray:
        q = QueryEmbeddings(batch=4, idle_s=0.05)
        task = asyncio.create_task(q.run())
        for t in [*texts, texts[0]]:  # a repeated query is embedded once
            q.add(t)
        # A full batch at once, the partial one after idle_s (never closed: only the idle timer sends
        # the fifth). Wait for the results themselves, not a fixed time: a loaded machine is slow.
        for _ in range(6000):
            if all(t in q._slot for t in texts):
                break
            await asyncio.sleep(0.01)
        task.cancel()
        done_in_background = [t for c in calls for t in c]
        assert sorted(done_in_background) == sorted(texts)
        calls.clear()
        out = q.embed([texts[3], "a question nobody asked yet", texts[0]])
        assert calls == [["a question nobody asked yet"]]  # only the new one at the end
        return out

    out = asyncio.run(go())
    direct = probes.embed([texts[3], "a question nobody asked yet", texts[0]])
    assert out.shape == (3, 384) and np.allclose(out, direct, atol=1e-5)


def test_by_default_each_query_is_embedded_as_soon_as_the_embedder_is_free(monkeypatch) -> None:
    """README: a kept query does not wait for others to fill a batch (the last response would leave
    them all to embed); the queries kept while the embedder works go together in its next call. The
    idle timer is not what sends them."""
    import threading

    calls: list[list[str]] = []
    started, release = threading.Event(), threading.Event()

    def slow_embed(texts: list[str]) -> np.ndarray:
        calls.append(list(texts))
        started.set()
        release.wait(60)
        return np.zeros((len(texts), 384), dtype=np.float32)

    monkeypatch.setattr(probes, "embed", slow_embed)

    async def wait_for(cond) -> None:
        for _ in range(6000):
            if cond():
                return
            await asyncio.sleep(0.01)

    async def go() -> None:
        q = QueryEmbeddings(idle_s=3600)  # the idle timer never fires in this test
        task = asyncio.create_task(q.run())
        q.add("may I light a candle in here")
        await wait_for(started.is_set)  # alone: it did not wait for a batch to fill
        q.add("where can I dry my towels")
        q.add("how do I keep the cat warm")
        release.set()
        await wait_for(lambda: len(calls) >= 2)
        task.cancel()

    asyncio.run(go())
    assert calls == [
        ["may I light a candle in here"],
        ["where can I dry my towels", "how do I keep the cat warm"],
    ]


def test_a_cancel_that_arrives_with_a_query_ends_the_embedder(monkeypatch) -> None:
    """A query kept just before the build is cancelled (the wake set, the task not yet run): the
    cancel ends the task. On Python 3.11 asyncio.wait_for swallowed it, the task went on waiting for
    queries and Finish.cancel never returned (it left the finish worker alive)."""
    calls: list[list[str]] = []
    monkeypatch.setattr(probes, "embed", lambda texts: calls.append(texts) or np.zeros((len(texts), 384)))

    async def go() -> asyncio.Task[None]:
        q = QueryEmbeddings(idle_s=3600)
        task = asyncio.create_task(q.run())
        await asyncio.sleep(0)  # the task now waits for its wake
        q.add("may I light a candle in here")
        task.cancel()  # same tick: the wake is set and the cancel is pending
        await asyncio.wait({task}, timeout=10)
        return task

    task = asyncio.run(go())
    assert task.cancelled() and calls == []


def test_a_build_embeds_each_kept_query_once_and_its_probes_are_unchanged(
    tmp_path: Path, monkeypatch
) -> None:
    """The scripted build keeps 18 samples: each is handed to the background embedder as it is kept,
    each distinct query is embedded exactly once over the whole build (the finish embeds nothing
    again), and the probes stored in the ledger equal probes computed from scratch."""
    calls: list[list[str]] = []
    _counting_embed(monkeypatch, calls)
    handed: list[str] = []
    real_kept = finish_mod.Finish.kept

    def spying(self, sample, *stored):
        handed.append(sample["id"])
        return real_kept(self, sample, *stored)

    monkeypatch.setattr(finish_mod.Finish, "kept", spying)
    backend = ScriptedBackend()
    cfg = _cfg(tmp_path, perceive="model")
    summary = asyncio.run(
        run_build(cfg, quiet=True, items=_images(6), backends=dict.fromkeys(STAGES, backend), export=True)
    )
    assert summary.samples_ok == 18 and summary.dataset_dir
    led = Ledger(tmp_path / "run")
    samples = list(led.iter_samples("ok"))
    assert sorted(handed) == sorted(s["id"] for s in samples)
    embedded = [t for c in calls for t in c]
    assert sorted(embedded) == sorted({s["query"] for s in samples})  # each distinct query once
    stored = led.get_meta("probes")
    fresh = json.loads(run_probes(samples).model_dump_json())
    for key in ("n", "vendi", "leakage", "near_duplicates", "category_entropy_normalized"):
        assert stored[key] == fresh[key]


def test_a_build_hands_each_query_to_the_embedder_before_its_response_is_written(
    tmp_path: Path, monkeypatch
) -> None:
    """A query that passed its checks is embedded while its response is written and checked, not after
    the sample's last response: the last samples' queries are not left to the finish."""
    from rmskit.pipeline.sample import SampleLoop

    handed: list[str] = []
    real_ready = finish_mod.Finish.query_ready

    def ready(self, query: str, *sample: str) -> None:
        handed.append(query)
        real_ready(self, query, *sample)

    late: list[str] = []
    responded: list[str] = []
    real_rounds = SampleLoop._rounds

    async def rounds(self, unit, query=""):
        if unit == "response":
            responded.append(query)
            if query not in handed:
                late.append(query)
        return await real_rounds(self, unit, query)

    monkeypatch.setattr(finish_mod.Finish, "query_ready", ready)
    monkeypatch.setattr(SampleLoop, "_rounds", rounds)
    backend = ScriptedBackend()
    summary = asyncio.run(
        run_build(
            _cfg(tmp_path, perceive="model"),
            quiet=True,
            items=_images(6),
            backends=dict.fromkeys(STAGES, backend),
            export=True,
        )
    )
    assert summary.samples_ok == 18 and len(responded) == 18 and late == []
    assert sorted(set(handed)) == sorted({s["query"] for s in Ledger(tmp_path / "run").iter_samples("ok")})


def test_a_build_embeds_with_one_thread_and_leaves_the_setting_as_it_was(tmp_path: Path, monkeypatch) -> None:
    """README: the build's background MiniLM runs one intra-op thread (less CPU per query beside the
    event loop); a session made after the build, e.g. a standalone probe's, gets two again."""
    from rmskit import embedding

    made: list[int] = []

    class Spy(embedding.OnnxMiniLM):
        def __init__(self, path: Path | None = None, threads: int = 2) -> None:
            made.append(threads)
            super().__init__(path, threads)

    monkeypatch.setattr(embedding, "OnnxMiniLM", Spy)
    probes.release_embedder()  # a session an earlier test made would be reused
    backend = ScriptedBackend()
    summary = asyncio.run(
        run_build(
            _cfg(tmp_path, perceive="model"),
            quiet=True,
            items=_images(2),
            backends=dict.fromkeys(STAGES, backend),
            export=True,
        )
    )
    assert summary.samples_ok > 0 and made == [1]
    probes.release_embedder()
    embedding.shared()
    assert made == [1, 2]
    probes.release_embedder()


def test_embedding_probes_read_a_bounded_order_free_sample(monkeypatch) -> None:
    """Past EMBED_LIMIT distinct queries the embedding probes read a bottom-k sample by text hash: the
    same texts whatever order they arrive in, the background embedder holds only those (memory stays
    flat on long runs), and the finish reuses them without embedding again."""
    import random

    from rmskit.scoring.probes import embedded_rows, text_key

    monkeypatch.setattr(probes, "embed", lambda texts: np.ones((len(texts), 384), np.float32) / 384**0.5)
    texts = [f"query number {i} about the ladder by the pool" for i in range(200)]
    picked = {texts[i] for i in embedded_rows(texts, 50)}
    assert len(picked) == 50 and picked == set(sorted(texts, key=text_key)[:50])
    shuffled = random.Random(1).sample(texts, len(texts))
    assert {shuffled[i] for i in embedded_rows(shuffled, 50)} == picked  # order does not matter
    assert embedded_rows(texts, 500) == list(range(200))
    repeated = [texts[i % 7] for i in range(300)]  # few distinct texts, many rows: rows are capped too
    rows = embedded_rows(repeated, 50)
    assert len(rows) == 50 and rows == sorted(rows) and len({repeated[i] for i in rows}) <= 7

    q = _embedded_in_background(shuffled, batch=16, idle_s=0.01, limit=50)
    assert set(q._slot) == picked  # nothing outside the sample is kept
    # in one matrix of `limit` rows, slots of pushed-out texts reused: no model batch kept alive
    assert q._x is not None and q._x.shape == (50, 384) and q._x.base is None
    assert sorted(q._slot.values()) == list(range(50))
    calls: list[int] = []
    monkeypatch.setattr(probes, "embed", lambda texts: calls.append(len(texts)) or np.ones((len(texts), 384)))
    rows = [
        {"query": t, "kind": "risky" if i % 2 else "control", "category": "c"} for i, t in enumerate(texts)
    ]
    rep = run_probes(rows, embeddings=q, embed_limit=50, n_resamples=20)
    assert (rep.n, rep.n_embedded, rep.leakage.n) == (200, 50, 50) and calls == []


def test_every_kept_query_is_sketched_during_the_run_and_the_probe_reads_those_sketches(monkeypatch) -> None:
    """The near-duplicate probe reads every row, not the embedded sample: each kept query is sketched in
    the embedder's thread as it comes (outside the bottom-k and repeated ones too), so at the finish the
    probe sketches nothing, and its rate is the rate computed from scratch."""
    from rmskit.curate import minhash

    monkeypatch.setattr(probes, "embed", lambda texts: np.ones((len(texts), 384), dtype=np.float32))
    rng = np.random.default_rng(3)
    words = [f"w{i}" for i in range(30)]
    base = [" ".join(rng.choice(words, size=int(rng.integers(2, 12)))) for _ in range(120)]
    texts = base + base[:20] + [t + " again" for t in base[20:50]]  # repeats and near repeats

    q = _embedded_in_background(texts, idle_s=0.01, limit=40)
    assert q.sketches is not None and q.sketches.size == len(set(texts)) > 40  # not only the embedded 40
    sketched: list[int] = []
    real = minhash.sketch

    def counting(sets, *a, **k):
        sets = list(sets)
        sketched.append(len(sets))
        return real(sets, *a, **k)

    monkeypatch.setattr(minhash, "sketch", counting)
    bucketed: list[int] = []
    real_buckets = minhash.Buckets

    def buckets(keys: Any) -> Any:
        bucketed.append(len(keys))
        return real_buckets(keys)

    monkeypatch.setattr(minhash, "Buckets", buckets)
    rows = [{"query": t, "kind": "risky", "category": "c"} for t in texts]
    rep = run_probes(rows, embeddings=q, embed_limit=40, n_resamples=20)
    assert sum(sketched) == 0  # every text's sketch came from the run
    assert bucketed == []  # and its near-duplicate pairs: the probe only counted
    assert q.sketches is None  # let go with the rows
    n = len(texts)
    expected = round(probes.near_duplicate_rate(texts) * n)
    assert sum(sketched) > 0  # the reference sketched them itself
    assert rep.near_duplicates.value == pytest.approx(expected / n) and expected > 20


def test_an_image_is_encoded_once_and_its_encoding_dropped_when_its_stages_are_done(
    tmp_path: Path, photo_dir: Path, monkeypatch
) -> None:
    """Over real HTTP: every request of an image reuses one encoding, and when the image is done its
    data URL leaves the cache (memory holds the images in flight, not every image of the run)."""
    import hashlib

    from rmskit.config import BackendConfig, BuildConfig
    from rmskit.models import images
    from rmskit.records import ImageRecord
    from rmskit.testing.openai_server import OpenAITestServer
    from rmskit.testing.rms_script import responder

    encoded: list[str] = []
    real = images._cache_put

    def counting(key: tuple[str, int], url: str) -> None:
        encoded.append(key[0])
        real(key, url)

    monkeypatch.setattr(images, "_cache_put", counting)
    paths = sorted(photo_dir.glob("*.jpg"))[:3]
    recs = [
        ImageRecord(
            sha256=hashlib.sha256(p.read_bytes()).hexdigest(),
            phash="0" * 16,
            source_root=str(photo_dir),
            source_path=p.name,
            path=str(p),
            width=512,
            height=512,
        )
        for p in paths
    ]
    with OpenAITestServer(responder=responder, latency=0.01, keep_bodies=True) as srv:
        cfg = BuildConfig(
            sources=[str(photo_dir)],
            out=tmp_path / "run",
            embedder="hashing",
            perceive="model",
            model=BackendConfig(
                spec="openai:test-model", base_url=srv.base_url, concurrency=8, image_max_side=4096
            ),
        )
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
        summary = asyncio.run(run_build(cfg, quiet=True, items=recs, export=False))
        with_image = [r for r in srv.chat_records() if "image_url" in json.dumps(r.body)]
    assert summary.images_done == 3 and len(with_image) > 6  # several requests per image carried it
    assert sorted(encoded) == sorted(r.sha256 for r in recs)  # ...from one encoding each
    assert not any(k[0] == r.sha256 for k in images._IMAGE_CACHE for r in recs)


def test_finish_drains_the_background_embedder_and_cancel_drops_it(tmp_path: Path, monkeypatch) -> None:
    calls: list[list[str]] = []
    _counting_embed(monkeypatch, calls)
    got: dict[str, object] = {}

    def fake_finish(run_dir, ledger, queries):
        got["queries"], got["done"] = queries, dict(queries._slot)
        return {"dataset_dir": str(run_dir)}

    monkeypatch.setattr(finish_mod, "finish_dataset", fake_finish)

    async def go() -> tuple[dict, finish_mod.Finish]:
        f = finish_mod.Finish(worker=False)
        await f.start()
        for i in range(3):
            f.kept({"query": f"may I stack these boxes number {i}", "kind": "risky"})
        f.kept({"query": None})  # a sample without a query is ignored
        out = await f.finish(tmp_path, None)  # type: ignore[arg-type]
        assert f._embedding is None
        g = finish_mod.Finish(worker=False)
        await g.start()
        task = g._embedding
        await g.cancel()
        assert task is not None and task.cancelled() and g._embedding is None
        await g.cancel()  # twice is fine
        return out, f

    out, f = asyncio.run(go())
    assert out == {"dataset_dir": str(tmp_path)}
    assert got["queries"] is f.queries
    assert sorted(got["done"]) == [f"may I stack these boxes number {i}" for i in range(3)]  # type: ignore[arg-type]
    assert [len(c) for c in calls] == [3]  # one background batch, drained by finish


def test_the_probes_limit_blas_through_the_libraries_found_during_the_run(monkeypatch) -> None:
    """A build finds the BLAS libraries when its run starts (`find_blas`, a thread); its finish limits
    them to one thread without scanning again (threadpool_limits scanned for 11.8 ms of a job (b)
    finish)."""
    import threadpoolctl

    monkeypatch.setattr(finish_mod, "blas_limited", False)
    monkeypatch.setattr(finish_mod, "_blas", None)
    finish_mod.find_blas()

    def scan(*a, **k):
        raise AssertionError("scanned the libraries again")

    monkeypatch.setattr(threadpoolctl, "threadpool_limits", scan)
    with finish_mod.one_blas_thread():
        inside = [i["num_threads"] for i in finish_mod._blas.info() if i["user_api"] == "blas"]
    assert inside and set(inside) == {1}

    async def go() -> None:
        monkeypatch.setattr(finish_mod, "_blas", None)
        f = finish_mod.Finish(worker=False)
        await f.start()
        await f.cancel()
        assert f._finding_blas is None  # found, and its task awaited

    asyncio.run(go())
    assert finish_mod._blas is not None


def test_the_probes_ahead_are_used_only_for_exactly_their_rows(monkeypatch) -> None:
    """`Ahead`: no candidate rows until no image will start, none is before its samples and every sample
    in flight has its query; then the kept rows and those in flight are probed once, and the result
    is given for exactly those rows (in any order), not when a sample failed since."""
    from rmskit.pipeline.finish import Ahead

    monkeypatch.setattr(probes, "release_embedder", lambda: None)
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(30)]
    texts = [" ".join(rng.choice(words, size=8)) for _ in range(30)]
    q = probes.QueryEmbeddings()
    x = rng.normal(size=(len(texts), 384)).astype(np.float32)
    q._put(texts, x / np.linalg.norm(x, axis=1, keepdims=True))
    kept = [{"query": t, "kind": "risky", "label": "unsafe", "category": "c"} for t in texts[:25]]
    flying = {(t, "risky", "c"): 1 for t in texts[25:]}

    async def go() -> tuple[Any, ...]:
        a = Ahead()
        a.pending.update(flying)
        a.in_flight = len(flying)
        assert a.candidates(kept) is None  # the feed may still start images
        a.feed_done, a.planning = True, 1
        assert a.candidates(kept) is None  # an image is before its samples
        a.planning, a.in_flight = 0, len(flying) + 1
        assert a.candidates(kept) is None  # a sample in flight has no query yet
        a.in_flight = len(flying)
        rows = a.candidates(kept)
        assert rows is not None and len(rows) == 30
        a.start(rows, q)
        a.start(list(reversed(rows)), q)  # the same rows: not again
        final = [
            *kept,
            *({"query": t, "kind": "risky", "label": "unsafe", "category": "c"} for t in texts[25:]),
        ]
        same = await a.result(list(reversed(final)))
        failed = await a.result(final[:-1])  # one of those in flight failed
        return same, failed, a.runs

    same, failed, runs = asyncio.run(go())
    assert runs == 1 and failed is None and same is not None
    fresh = run_probes(
        [*kept, *({"query": t, "kind": "risky", "category": "c"} for t in texts[25:])], embeddings=q
    )
    assert {k: v for k, v in same.items() if k != "seconds"} == {
        k: v for k, v in json.loads(fresh.model_dump_json()).items() if k != "seconds"
    }


def test_past_probes_here_the_build_holds_no_probe_rows(monkeypatch) -> None:
    """The rows handed to the probes are held only up to `PROBES_HERE` kept samples (past it the worker
    probes from the ledger): a long build's memory stays flat."""
    monkeypatch.setattr(finish_mod, "PROBES_HERE", 3)
    f = finish_mod.Finish(worker=False)
    for i in range(3):
        f.kept({"query": f"q{i}", "label": "unsafe"}, "risky", "c")
    assert len(f._rows) == 3 and f._rows_seen
    f.kept({"query": "q3", "label": "unsafe"}, "risky", "c")
    assert f._rows == [] and not f._rows_seen
    assert f.queries.sketches is None and f.queries._to_sketch == []  # nor its sketches
    f.kept({"query": "q4", "label": "unsafe"}, "risky", "c")
    assert f._rows == [] and f.queries._to_sketch == []
