"""The build's finish in a worker process (pipeline/finish_worker.py, the default outside these tests):
the same probes and dataset as the finish in the build's own process, and no way for the worker to
lose the export or outlive the build."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_build_pipeline import STAGES, ScriptedBackend, _cfg

from rmskit.ledger import Ledger
from rmskit.pipeline import finish as finish_mod
from rmskit.pipeline import finish_worker
from rmskit.pipeline.runner import run_build


def _spawned(monkeypatch: pytest.MonkeyPatch) -> list[asyncio.subprocess.Process]:
    """Record the worker processes `Finish` starts."""
    procs: list[asyncio.subprocess.Process] = []
    real = asyncio.create_subprocess_exec

    async def spy(*args: Any, **kw: Any) -> asyncio.subprocess.Process:
        p = await real(*args, **kw)
        procs.append(p)
        return p

    monkeypatch.setattr(finish_mod.asyncio, "create_subprocess_exec", spy)
    return procs


def _build(tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch, photos: Path) -> Path:
    """The scripted build of real photos (ingested from `photos`), finished in `mode`."""
    monkeypatch.setenv("RMSKIT_FINISH", mode)
    cfg = _cfg(tmp_path / mode, perceive="model").model_copy(update={"sources": [str(photos)]})
    backends = dict.fromkeys(STAGES, ScriptedBackend())
    summary = asyncio.run(run_build(cfg, quiet=True, backends=backends))
    assert summary.export_error is None and summary.dataset_dir == str(cfg.out / "dataset")
    return cfg.out


def _without_seconds(probes: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in probes.items() if k != "seconds"}


def _finish_threads() -> list[str]:
    return [
        t.name for t in threading.enumerate() if t.name in ("rmskit-finish", "rmskit-follow", "rmskit-warm")
    ]


@pytest.mark.parametrize("mode", ["worker", "thread"])
@pytest.mark.parametrize("probes_here", [True, False])
def test_the_worker_finish_equals_the_inline_finish_and_the_worker_is_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, photo_dir: Path, probes_here: bool, mode: str
) -> None:
    """Both ways of the worker's finish: the build probes while the worker exports (a run of up to
    `PROBES_HERE` kept samples), or the worker probes from the handed-over embeddings beside its export;
    the worker a process of its own or a thread of the build's (the default): the same dataset."""
    from rmskit.curate import minhash
    from rmskit.export import memo

    if not probes_here:
        monkeypatch.setattr(finish_mod, "PROBES_HERE", 0)
    procs = _spawned(monkeypatch)
    inline = _build(tmp_path, "inline", monkeypatch, photo_dir)
    assert procs == []
    worker = _build(tmp_path, mode, monkeypatch, photo_dir)
    if mode == "worker":
        assert len(procs) == 1 and procs[0].returncode == 0  # it ended, and was reaped
    else:  # no process; its threads ended, and nothing of the run stays in the build's process
        assert procs == [] and _finish_threads() == []
        assert memo.MEMO is None and minhash.MEMO is None
    with Ledger(inline, readonly=True) as a, Ledger(worker, readonly=True) as b:
        pa, pb = a.get_meta("probes"), b.get_meta("probes")
    assert pa["n"] >= 6 and _without_seconds(pa) == _without_seconds(pb)
    # the same samples; each build's in the order it stored them, and each dataset the one its ledger
    # gives (the worker's written as samples came)
    jsonl = (worker / "dataset" / "samples.jsonl").read_text()
    lines = sorted((inline / "dataset" / "samples.jsonl").read_text().splitlines())
    assert len(jsonl.splitlines()) >= 6 and sorted(jsonl.splitlines()) == lines
    log = (worker / "build.log").read_text()
    assert "the dataset written as samples came" in log
    for run in (inline, worker):
        with Ledger(run, readonly=True) as led:
            stored = [sid for (sid,) in led.query("SELECT id FROM samples WHERE status='ok' ORDER BY rowid")]
        ids = [json.loads(x)["id"] for x in (run / "dataset" / "samples.jsonl").read_text().splitlines()]
        assert ids == [sid for sid in stored if sid in set(ids)]
    files = sorted(str(p.relative_to(worker)) for p in (worker / "dataset").rglob("*"))
    assert files == sorted(str(p.relative_to(inline)) for p in (inline / "dataset").rglob("*"))
    card = (worker / "dataset" / "README.md").read_text(encoding="utf-8")
    assert "CPU probes measured" in card
    for run in (inline, worker):  # the run's end is in the card it exports (set after it, it was unknown)
        text = (run / "dataset" / "README.md").read_text(encoding="utf-8")
        assert re.search(r"finished \d{4}-\d\d-\d\d", text) and "finished unknown" not in text
    assert "finish worker" not in (worker / "build.log").read_text()  # nothing went wrong
    # where the finish's time went, in the build's log: the build's part, then the worker's wall and CPU
    if probes_here:
        phases = r"finish: last queries embedded in [\d.]+ s, probed in [\d.]+ s, checkpointed in [\d.]+ s, "
        worker_part = r"worker's export [\d.]+ s wall / [\d.]+ s CPU"
    else:
        phases = r"finish: last queries embedded in [\d.]+ s, handed over in [\d.]+ s, embedder released in [\d.]+ s, "
        worker_part = (
            r"worker's probes [\d.]+ s wall / [\d.]+ s CPU, worker's export [\d.]+ s wall / [\d.]+ s CPU"
        )
    # a scripted build may end before the worker reads any sample
    ahead = r"(, probes computed ahead \(\d+ runs?\))?, the dataset written as samples came \(\d+ during the run\)"
    assert re.search(phases + worker_part + ahead + "$", (worker / "build.log").read_text(), re.M)


def test_a_malformed_timing_from_the_worker_is_left_out_of_the_log_line() -> None:
    from rmskit.pipeline.finish import _timing_line

    build = {"handed_over": 0.0021}
    assert _timing_line(build, {"export": [0.2, 0.19]}) == (
        "handed over in 0.002 s, worker's export 0.200 s wall / 0.190 s CPU"
    )
    for bad in (None, [1, 2], {"export": 0.2}, {"export": [0.2]}, {"export": ["a", "b"]}):
        assert _timing_line(build, bad) == "handed over in 0.002 s"


def _probed_and_exported(run: Path) -> None:
    with Ledger(run, readonly=True) as led:
        ok = led.sample_counts()["ok"]
        assert ok >= 6 and led.get_meta("probes")["n"] == ok
    assert len((run / "dataset" / "samples.jsonl").read_text().splitlines()) >= 6


@pytest.mark.parametrize(
    "script",
    [
        "import sys; sys.exit(3)",  # dies at once: the build's queries go to a closed pipe
        "import sys; print('not json'); sys.stdin.read()",  # a result that is not one
        "import sys; sys.stdin.read(); print('boom', file=sys.stderr); sys.exit(1)",  # fails at the finish
    ],
)
def test_a_failed_worker_leaves_the_finish_to_the_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, photo_dir: Path, script: str
) -> None:
    monkeypatch.setattr(finish_worker, "command", lambda: [sys.executable, "-c", script])
    run = _build(tmp_path, "worker", monkeypatch, photo_dir)
    _probed_and_exported(run)
    log = (run / "build.log").read_text()
    assert "finish worker failed: the finish runs in this process" in log
    if "boom" in script:
        assert "finish worker: boom" in log  # its stderr is in the build's log


def test_a_worker_that_cannot_start_leaves_the_finish_to_the_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, photo_dir: Path
) -> None:
    monkeypatch.setattr(finish_worker, "command", lambda: [str(tmp_path / "no-such-python")])
    run = _build(tmp_path, "worker", monkeypatch, photo_dir)
    _probed_and_exported(run)
    assert "finish worker did not start" in (run / "build.log").read_text()


def _nice(pid: int, tid: int | None = None) -> int:
    stat = Path(f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat")
    return int(stat.read_text().rsplit(")", 1)[1].split()[16])


def _thread_nices(pid: int) -> dict[int, int]:
    """Each thread's nice value (Linux keeps one per thread)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a thread that just ended
            out[int(task.name)] = _nice(pid, int(task.name))
    return out


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_a_cancelled_build_kills_its_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RMSKIT_FINISH", "worker")

    async def go() -> asyncio.subprocess.Process:
        f = finish_mod.Finish()
        await f.start()
        proc = f._proc
        assert proc is not None and proc.returncode is None
        # README: the warm-up at a lower CPU priority (nice 10) in a thread of its own, the main thread
        # (which runs the finish) at the build's; and its own session (a terminal's Ctrl-C is the build's)
        assert os.getsid(proc.pid) == proc.pid != os.getsid(0)
        for _ in range(600):  # the thread renices itself first thing; wait for that, not a fixed time
            if finish_worker.NICE + os.nice(0) in _thread_nices(proc.pid).values():
                break
            await asyncio.sleep(0.01)
        nices = _thread_nices(proc.pid)
        assert finish_worker.NICE + os.nice(0) in nices.values()
        assert nices[proc.pid] == os.nice(0)
        f.kept({"query": "how do I clean this shelf"})
        await f.cancel()
        await f.cancel()  # twice is fine
        return proc

    proc = asyncio.run(go())
    assert proc.returncode is not None


def test_an_unknown_finish_mode_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RMSKIT_FINISH", "process")
    with pytest.raises(ValueError, match="RMSKIT_FINISH"):
        finish_mod.Finish()


def test_the_worker_ends_when_its_build_is_gone(tmp_path: Path) -> None:
    """End of stdin without a request (the build's process was killed): the worker exits, says nothing
    on stdout and writes nothing."""
    proc = subprocess.Popen(
        finish_worker.command(),
        env=finish_worker.environment(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    )
    out, err = proc.communicate(b"", timeout=120)
    assert proc.returncode == 0, err.decode()
    assert out == b"" and list(tmp_path.iterdir()) == []


def test_an_installed_rmskit_puts_no_site_directory_on_pythonpath(monkeypatch: pytest.MonkeyPatch) -> None:
    import site

    import rmskit

    root = str(Path(rmskit.__file__).resolve().parent.parent)
    monkeypatch.setattr(site, "getsitepackages", lambda: [root])
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    assert finish_worker.environment()["PYTHONPATH"] == "/elsewhere"


def test_the_workers_own_environment_yields_to_the_users(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ARROW_DEFAULT_MEMORY_POOL", raising=False)
    assert finish_worker.environment()["ARROW_DEFAULT_MEMORY_POOL"] == "system"
    monkeypatch.setenv("ARROW_DEFAULT_MEMORY_POOL", "jemalloc")
    assert finish_worker.environment()["ARROW_DEFAULT_MEMORY_POOL"] == "jemalloc"


def test_the_worker_finds_this_rmskit_when_it_is_not_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import site

    monkeypatch.setattr(site, "getsitepackages", lambda: [])  # as if run from a source tree
    monkeypatch.setattr(site, "getusersitepackages", lambda: str(tmp_path / "user-site"))
    monkeypatch.delenv("PYTHONPATH", raising=False)
    env = finish_worker.environment()
    root = env["PYTHONPATH"].split(os.pathsep)[0]
    assert (Path(root) / "rmskit" / "pipeline" / "finish_worker.py").is_file()
    code = "import rmskit, sys; print(rmskit.__file__)"
    clean = {k: v for k, v in env.items() if k != "VIRTUAL_ENV"}
    out = subprocess.check_output([sys.executable, "-c", code], env=clean, cwd=tmp_path, text=True)
    assert Path(out.strip()).resolve().parent.parent == Path(root)


def _workers_marked(mark: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                environ = (d / "environ").read_bytes()
                cmd = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if mark.encode() in environ and b"finish_worker" in cmd:
                pids.append(int(d.name))
    return pids


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc")
def test_a_killed_build_leaves_no_worker_behind(tmp_path: Path, photo_dir: Path) -> None:
    """kill -9 of a build (a CLI process, the worker's parent) mid-run: its worker sees the end of its
    stdin and exits on its own."""
    from rmskit.testing.openai_server import OpenAITestServer
    from rmskit.testing.rms_script import responder

    mark = f"rmskit-test-{os.getpid()}-{time.time_ns()}"
    env = {**os.environ, "RMSKIT_FINISH": "worker", "OPENAI_API_KEY": "sk-test", "RMSKIT_TEST_MARK": mark}
    with OpenAITestServer(responder=responder, latency=0.5) as srv:
        cmd = [
            sys.executable, "-m", "rmskit.cli", "build", str(photo_dir), "--out", str(tmp_path / "run"),
            "--model", "openai:test-model", "--base-url", srv.base_url, "--embedder", "hashing", "--quiet",
        ]  # fmt: skip
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while not _workers_marked(mark) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _workers_marked(mark), "the build started no worker"
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 60  # the worker may still be importing (~1.5 s CPU)
        while _workers_marked(mark) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert _workers_marked(mark) == []


def test_query_embeddings_cross_to_the_worker_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rows the build embedded reach the worker unchanged (unicode, empty set too), so its probes
    embed nothing again."""
    import numpy as np

    from rmskit.scoring import probes
    from rmskit.scoring.probes import QueryEmbeddings, run_probes

    q = QueryEmbeddings()
    texts = [
        "how warm is this room?",
        "¿puedo subir a esta escalera? 梯子",
        "x" * 6000,
        "nul at the end\x00",
        "",
    ]
    rows = np.random.default_rng(0).normal(size=(len(texts), 384)).astype(np.float32)
    q._put(texts, rows)
    q.save(tmp_path / "q.npz")
    back = QueryEmbeddings.load(tmp_path / "q.npz")
    assert list(back._slot) == texts and np.array_equal(back.rows(texts), rows)
    assert (tmp_path / "q.npz").stat().st_size < 20_000 + rows.nbytes  # the long text widens no row
    QueryEmbeddings().save(tmp_path / "empty.npz")
    assert QueryEmbeddings.load(tmp_path / "empty.npz")._slot == {}

    monkeypatch.setattr(probes, "embed", lambda t: pytest.fail(f"embedded again: {t}"))
    samples = [{"query": t, "kind": k, "category": "c"} for t in texts for k in ("risky", "control")]
    assert run_probes(samples, embeddings=back, n_resamples=20).n == 10
    # a text pushed out of the sample leaves a free slot: saved as it is, reused after loading
    q._free.append(q._slot.pop(texts[1]))
    q.save(tmp_path / "q2.npz")
    back = QueryEmbeddings.load(tmp_path / "q2.npz")
    rest = [t for t in texts if t != texts[1]]
    assert list(back._slot) == rest and np.array_equal(back.rows(rest), np.delete(rows, 1, axis=0))
    back._put(["a late query"], np.full((1, 384), 0.25, np.float32))
    assert back._slot["a late query"] == 1 and back._x is not None and len(back._x) == len(texts)
    # a text the build did not embed is embedded at the end, past the loaded matrix's rows
    back = QueryEmbeddings.load(tmp_path / "q.npz")
    monkeypatch.setattr(probes, "embed", lambda t: np.full((len(t), 384), 0.5, np.float32))
    out = back.embed([texts[1], "a late query", texts[4]])
    assert np.array_equal(out[0], rows[1]) and (out[1] == 0.5).all() and np.array_equal(out[2], rows[4])


@pytest.fixture
def handed_over(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker probes from the embeddings the build hands it (a run past `PROBES_HERE` samples)."""
    monkeypatch.setattr(finish_mod, "PROBES_HERE", 0)


@pytest.fixture
def own_tempdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty folder as `tempfile`'s default, so a test sees every temporary file the build leaves."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(tmp))
    return tmp


def test_the_handed_over_embeddings_file_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, photo_dir: Path, own_tempdir: Path, handed_over: None
) -> None:
    saved: list[Path] = []
    real = finish_mod.QueryEmbeddings.save

    def spy(self: Any, path: Path) -> None:
        saved.append(path)
        real(self, path)

    monkeypatch.setattr(finish_mod.QueryEmbeddings, "save", spy)
    _probed_and_exported(_build(tmp_path, "worker", monkeypatch, photo_dir))
    assert len(saved) == 1 and saved[0].parent == own_tempdir and list(own_tempdir.iterdir()) == []


def test_the_warm_worker_has_every_blas_at_one_thread_and_arrow_on_the_system_heap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker limits BLAS once after its imports (all BLAS libraries loaded by then), and the
    probes' own limiter then costs nothing. Arrow allocates from glibc's heap, which curation's freed
    memory is in, not from a second heap of its own (mimalloc by default)."""
    code = (
        "import json, pyarrow; from threadpoolctl import threadpool_info; "
        "from rmskit.pipeline import finish_worker, finish; finish_worker._warm(); "
        "print(json.dumps([finish.blas_limited, "
        "[i['num_threads'] for i in threadpool_info() if i['user_api'] == 'blas'], "
        "pyarrow.default_memory_pool().backend_name]))"
    )
    monkeypatch.delenv("ARROW_DEFAULT_MEMORY_POOL", raising=False)  # not the user's: the worker's own
    env = {**finish_worker.environment(), "OPENBLAS_NUM_THREADS": "2"}
    out = subprocess.check_output([sys.executable, "-c", code], env=env, text=True)
    limited, threads, pool = json.loads(out.strip().splitlines()[-1])
    assert limited is True and threads and set(threads) == {1}
    assert pool == "system"


@pytest.mark.parametrize("user_pool", [None, "mimalloc"])
def test_a_finish_thread_leaves_the_builds_process_as_it_was_but_arrows_pool(
    monkeypatch: pytest.MonkeyPatch, user_pool: str | None
) -> None:
    """In the build's process (the default finish), the warm-up limits no BLAS for good, freezes no
    objects and sets no environment its subprocesses would inherit; Arrow's default pool is the system
    heap, unless the user chose one."""
    code = (
        "import gc, json, os; from threadpoolctl import threadpool_info; "
        "from rmskit.pipeline import finish_worker, finish; finish_worker._warm(own_process=False); "
        "import pyarrow; "
        "print(json.dumps([finish.blas_limited, "
        "[i['num_threads'] for i in threadpool_info() if i['user_api'] == 'blas'], "
        "pyarrow.default_memory_pool().backend_name, gc.get_freeze_count(), "
        "os.environ.get('ARROW_DEFAULT_MEMORY_POOL')]))"
    )
    env = {k: v for k, v in finish_worker.environment().items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    env["OPENBLAS_NUM_THREADS"] = "2"
    if user_pool:
        env["ARROW_DEFAULT_MEMORY_POOL"] = user_pool
    out = subprocess.check_output([sys.executable, "-c", code], env=env, text=True)
    limited, threads, pool, frozen, env_pool = json.loads(out.strip().splitlines()[-1])
    assert limited is False and threads and set(threads) == {2} and frozen == 0
    assert pool == (user_pool or "system") and env_pool == user_pool


def test_the_workers_finish_imports_nothing_and_never_scipy_or_datasketch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, photo_dir: Path
) -> None:
    """Everything the finish needs is imported during the run: after the warm-up, a whole finish
    (probes with the leakage probe, curation, export) from handed-over embeddings imports no module
    (numpy.random and numpy.ma, once pulled in by scipy, cost ~18 ms of the finish when they went).
    And never scipy or datasketch: scipy.special + scipy.optimize + datasketch were ~55 MB and ~0.6 s
    of CPU held beside the build through the whole run (scipy.stats another ~21 MB before; issue 13)."""
    import numpy as np

    from rmskit.scoring import probes as probes_mod

    run = _build(tmp_path, "inline", monkeypatch, photo_dir)
    with Ledger(run, readonly=True) as led:
        queries = [r["query"] for r in led.probe_rows("ok") if isinstance(r.get("query"), str)]
    rng = np.random.default_rng(0)
    monkeypatch.setattr(probes_mod, "embed", lambda t: rng.normal(size=(len(t), 384)).astype(np.float32))
    q = probes_mod.QueryEmbeddings()
    for t in queries:
        q.add(t)
    q.embed(list(dict.fromkeys(queries)))
    npz = tmp_path / "queries.npz"
    q.save(npz)
    code = (
        "import json, sys; from rmskit.pipeline import finish_worker; finish_worker._warm(); "
        "heavy = lambda: sorted({m.split('.')[0] for m in sys.modules} & {'scipy', 'datasketch', 'sklearn'}); "
        "warm, before = heavy(), set(sys.modules); "
        f"r = finish_worker.serve({{'finish': {str(run)!r}, 'embeddings': {str(npz)!r}}}); "
        "print(json.dumps([warm, heavy(), sorted(set(sys.modules) - before), r['embeddings_read'], "
        "r['probes'], sorted(r['result'])]))"
    )
    env = {**finish_worker.environment(), "HF_HUB_OFFLINE": "1"}
    out = subprocess.check_output([sys.executable, "-c", code], env=env, text=True)
    warm, after, new, read, probes, result = json.loads(out.strip().splitlines()[-1])
    assert (warm, after) == ([], [])
    assert new == [] and read is True
    assert probes["n"] >= 6 and result == ["dataset_dir"]
    assert probes["leakage"]["folds"] >= 2  # the leakage probe's solver ran


def test_letting_no_embedder_go_costs_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    import gc

    from rmskit import embedding
    from rmskit.scoring import probes

    probes._embedder.cache_clear()
    monkeypatch.setattr(embedding, "_SHARED", None)
    monkeypatch.setattr(gc, "collect", lambda *a: pytest.fail("collected with nothing to let go"))
    probes.release_embedder()


def test_letting_the_embedder_go_collects_only_when_a_cycle_holds_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dropping the last reference frees a session at once; the collection (26-70 ms of a build's
    finish) runs only when something still holds it."""
    import gc
    import weakref

    from rmskit import embedding
    from rmskit.scoring import probes

    class Session:
        pass

    collected: list[int] = []
    real = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: collected.append(1) or real(*a))
    probes._embedder.cache_clear()
    free = Session()
    gone = weakref.ref(free)
    monkeypatch.setattr(embedding, "_SHARED", free)
    del free
    probes.release_embedder()
    assert gone() is None and collected == []
    cyclic = Session()
    cyclic.me = cyclic  # type: ignore[attr-defined]
    gone = weakref.ref(cyclic)
    monkeypatch.setattr(embedding, "_SHARED", cyclic)
    del cyclic
    probes.release_embedder()
    assert gone() is None and collected == [1]


def _not_npz(self: Any, path: Path) -> None:
    path.write_bytes(b"not npz")


def _npz_without_slots(self: Any, path: Path) -> None:  # an .npz of another layout (KeyError on read)
    np.savez(path, blob=np.zeros(0, np.uint8), ends=np.zeros(0, np.int64), x=np.zeros((0, 384), np.float32))


@pytest.mark.parametrize("damaged", [_not_npz, _npz_without_slots])
def test_unreadable_embeddings_are_made_again_and_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, photo_dir: Path, damaged: Any, handed_over: None
) -> None:
    """A damaged hand-over file: the worker embeds the queries itself (same probes), and the build's
    log says so."""
    monkeypatch.setattr(finish_mod.QueryEmbeddings, "save", damaged)
    run = _build(tmp_path, "worker", monkeypatch, photo_dir)
    _probed_and_exported(run)
    assert "could not read the query embeddings" in (run / "build.log").read_text()


def test_a_full_disk_at_the_hand_over_leaves_the_embedding_to_the_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, photo_dir: Path, own_tempdir: Path, handed_over: None
) -> None:
    import errno

    def full(self: Any, path: Path) -> None:
        path.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(finish_mod.QueryEmbeddings, "save", full)
    run = _build(tmp_path, "worker", monkeypatch, photo_dir)
    _probed_and_exported(run)  # by the worker, which embedded the queries itself
    log = (run / "build.log").read_text()
    assert "not handed to the finish worker" in log and "finish worker failed" not in log
    assert list(own_tempdir.iterdir()) == []  # the half-written file is gone


def test_the_build_lets_its_query_rows_go_while_the_worker_runs_and_a_fallback_reads_them_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, photo_dir: Path, own_tempdir: Path, handed_over: None
) -> None:
    """Once the rows are in the hand-over file the build holds none of them (they were ~35 MB of a long
    run's finish); a worker that then fails leaves the build its rows from that file, so its own
    finish embeds nothing again."""
    from rmskit.scoring import probes
    from rmskit.scoring.probes import QueryEmbeddings

    seen: dict[str, Any] = {}
    real_worker_finish = finish_mod.Finish._worker_finish

    async def worker_finish(self: Any, message: dict[str, Any]) -> Any:
        npz = message["embeddings"]
        assert npz is not None
        seen["handed"] = QueryEmbeddings.load(Path(npz))._slot
        seen["held"] = (self.queries._x, len(self.queries._slot), len(self.queries._kept))
        return await real_worker_finish(self, message)

    real_finish_dataset = finish_mod.finish_dataset
    late: list[str] = []

    def finish_dataset(run_dir: Path, ledger: Ledger, queries: Any) -> Any:
        seen["fallback"] = dict(queries._slot)  # the probes clear it once its rows are copied out
        monkeypatch.setattr(
            probes, "embed", lambda texts: late.extend(texts) or pytest.fail("embedded again")
        )
        return real_finish_dataset(run_dir, ledger, queries)

    monkeypatch.setattr(finish_mod.Finish, "_worker_finish", worker_finish)
    monkeypatch.setattr(finish_mod, "finish_dataset", finish_dataset)
    script = "import sys; sys.stdin.read(); sys.exit(1)"  # takes the request, then fails
    monkeypatch.setattr(finish_worker, "command", lambda: [sys.executable, "-c", script])
    run = _build(tmp_path, "worker", monkeypatch, photo_dir)
    _probed_and_exported(run)
    assert len(seen["handed"]) >= 6 and seen["held"] == (None, 0, 0)
    assert seen["fallback"] == seen["handed"] and late == []
    assert list(own_tempdir.iterdir()) == []  # the file is gone once the fallback has read it


@pytest.mark.parametrize(
    "line", ['{"probes": {"n": 7, "vendi": 2.5}}\n', "not json\n", '{"probes": [1]}\n', ""]
)
def test_a_worker_told_the_probes_follow_writes_the_card_with_what_comes(run: Any, line: str) -> None:
    """The build probes while the worker exports and sends the numbers last; whatever that line is (the
    numbers, garbage, nothing: the build died), the export is written, with the numbers when they came."""
    asked: list[str] = []

    def next_line() -> str:
        asked.append(line)
        return line

    answer = finish_worker.serve({"finish": str(run.run_dir), "probes": "follow"}, next_line)
    assert answer["result"] == {"dataset_dir": str(run.run_dir / "dataset")} and answer["probes"] is None
    assert asked == [line] and set(answer["seconds"]) == {"export"}
    card = (run.run_dir / "dataset" / "README.md").read_text(encoding="utf-8")
    assert ("| vendi | 2.5 |" in card) == line.startswith('{"probes": {')


def test_a_failed_checkpoint_before_the_close_only_leaves_it_to_the_close(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import sqlite3

    from rmskit.pipeline.finish import _checkpoint

    class Full:
        def checkpoint(self, truncate: bool = False) -> bool:
            raise sqlite3.OperationalError("database or disk is full")

    with caplog.at_level("WARNING", logger="rmskit.build"):
        _checkpoint(Full())  # type: ignore[arg-type]
    assert "WAL checkpoint before the close failed" in caplog.text


def test_a_failed_summary_read_beside_the_export_ends_the_worker_and_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, photo_dir: Path
) -> None:
    """The build reads its summary's counts while the worker exports; if a read fails (e.g. a damaged
    ledger), the error reaches the caller and the worker is not left running."""
    procs = _spawned(monkeypatch)

    def broken(self: Ledger) -> dict[str, Any]:
        raise RuntimeError("the summary's read failed")

    monkeypatch.setattr(Ledger, "usage_by_stage", broken)
    with pytest.raises(RuntimeError, match="summary's read failed"):
        _build(tmp_path, "worker", monkeypatch, photo_dir)
    assert len(procs) == 1 and procs[0].returncode is not None  # ended and reaped


def test_the_build_probes_the_rows_it_saw_stored_without_reading_them_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, photo_dir: Path
) -> None:
    """The build hands its probes each kept sample's row as it stored it, which are the rows
    `Ledger.probe_rows` reads (the same values, in stored order), and computes them in the run's tail
    once it knows those rows (`Ahead`): the finish then only reads the result, and it is the result
    the probes give from the ledger's rows."""
    asked: list[Any] = []
    real_result = finish_mod.Ahead.result

    async def result(self: Any, rows: list[dict[str, Any]]) -> Any:
        got = await real_result(self, rows)
        asked.append((list(rows), got, self.runs))
        return got

    probed: list[Any] = []
    real_probe = finish_mod.probe_run

    def probe(ledger: Ledger, *a: Any, **k: Any) -> Any:
        probed.append(k.get("rows"))
        return real_probe(ledger, *a, **k)

    monkeypatch.setattr(finish_mod.Ahead, "result", result)
    monkeypatch.setattr(finish_mod, "probe_run", probe)
    run = _build(tmp_path, "worker", monkeypatch, photo_dir)
    with Ledger(run, readonly=True) as led:
        stored_rows, stored = led.probe_rows("ok"), led.get_meta("probes")
    assert len(asked) == 1 and len(stored_rows) >= 6
    rows, ahead, runs = asked[0]
    assert rows == stored_rows
    assert ahead is not None and runs >= 1 and probed == []  # computed ahead, not at the finish
    monkeypatch.setattr(finish_mod, "probe_run", real_probe)
    with Ledger(run, readonly=True) as led:
        fresh = finish_mod.probe_run(led, release=False)
    assert fresh is not None and _without_seconds(fresh) == _without_seconds(stored)


def test_a_cancelled_build_ends_its_finish_thread_and_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, photo_dir: Path
) -> None:
    """The default finish is a thread of the build's process: a cancel ends it (and its follower), removes
    the dataset it was writing, and lets the memos go; a later build in the process starts clean."""
    from rmskit.curate import minhash
    from rmskit.export import memo

    monkeypatch.setenv("RMSKIT_FINISH", "thread")
    cfg = _cfg(tmp_path / "run", perceive="model").model_copy(update={"sources": [str(photo_dir)]})
    asyncio.run(run_build(cfg, quiet=True, backends=dict.fromkeys(STAGES, ScriptedBackend()), export=False))
    run = cfg.out
    with Ledger(run, readonly=True) as led:
        assert led.sample_counts()["ok"] >= 6

    async def go() -> None:
        f = finish_mod.Finish()
        assert f.thread and f.worker
        await f.start(run)
        for _ in range(1000):  # the follower writes the stored samples into a staged dataset
            if list(run.glob(".dataset.tmp-*/samples.jsonl")) and memo.MEMO is not None:
                break
            await asyncio.sleep(0.01)
        assert list(run.glob(".dataset.tmp-*")) and "rmskit-follow" in _finish_threads()
        await f.cancel()
        await f.cancel()  # twice is fine

    asyncio.run(go())
    assert _finish_threads() == [] and list(run.glob(".dataset*")) == []
    assert memo.MEMO is None and minhash.MEMO is None


def test_a_failed_finish_thread_leaves_the_finish_to_the_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, photo_dir: Path
) -> None:
    def boom(*args: Any, **kw: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(finish_worker, "serve", boom)
    run = _build(tmp_path, "thread", monkeypatch, photo_dir)
    _probed_and_exported(run)
    log = (run / "build.log").read_text()
    assert "finish thread failed" in log and "RuntimeError: boom" in log
    assert "finish worker failed: the finish runs in this process" in log
    assert _finish_threads() == []


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="counts /proc/self/fd")
def test_a_finish_thread_that_cannot_start_leaves_the_finish_to_the_build_and_no_pipe_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, photo_dir: Path
) -> None:
    async def no_pipes(*args: Any, **kw: Any) -> Any:
        raise NotImplementedError  # as an event loop without pipe support says

    monkeypatch.setattr(asyncio.BaseEventLoop, "connect_write_pipe", no_pipes)
    before = len(os.listdir("/proc/self/fd"))
    run = _build(tmp_path, "thread", monkeypatch, photo_dir)
    _probed_and_exported(run)
    assert "finish worker did not start (NotImplementedError: )" in (run / "build.log").read_text()
    assert _finish_threads() == [] and len(os.listdir("/proc/self/fd")) == before
