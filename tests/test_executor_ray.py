"""`--executor ray` on a local Ray (num_cpus=2) with the OpenAI test server: equivalence with the
local executor, a worker killed mid-run, a driver killed mid-run and resumed."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from rmskit.config import BackendConfig, BuildConfig
from rmskit.executors import ExecutorConfig, shard_of
from rmskit.executors.ray import run_build_ray
from rmskit.ledger import Ledger
from rmskit.ledger.sync import Outbox, RowBatch, apply_rows, seed_rows
from rmskit.pipeline.runner import run_build
from rmskit.records import ImageRecord
from rmskit.testing.openai_server import OpenAITestServer
from rmskit.testing.rms_script import answer, stage_of

ray = pytest.importorskip("ray")


# Near-synonyms are merged into whichever name the taxonomy saw first, which depends on timing in
# any concurrent executor; the equivalence test asks the same of both executors, so its scripted
# model proposes names that do not merge.
_CANON = {"Fire Hazards": "fire hazard", "electrocution risk": "electrical shock"}


def responder(body: dict) -> dict:
    out = answer(body)
    for sc in out.get("scenarios", []):
        sc["category"] = _CANON.get(sc["category"], sc["category"])
    return out


@pytest.fixture(scope="module")
def ray_cluster():
    os.environ.setdefault("OPENAI_API_KEY", "sk-test-ray")  # workers inherit the driver's environment
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture
def photos(tmp_path: Path, real_photos) -> Path:
    """18 distinct real photos: each of the 6 bundled ones, whole and as two crops."""
    d = tmp_path / "photos"
    d.mkdir()
    for name, arr in real_photos.items():
        h, w = arr.shape[:2]
        for i, (y, x) in enumerate(((0, 0), (h // 8, w // 8), (h // 5, 0))):
            Image.fromarray(arr[y : h - h // 10 * (i > 0), x:]).save(d / f"{name}-{i}.jpg", quality=90)
    return d


def _cfg(src: Path, out: Path, url: str, **kw) -> BuildConfig:
    model = BackendConfig(spec="openai:test-model", base_url=url, concurrency=4)
    return BuildConfig(sources=[str(src)], out=out, model=model, embedder="hashing", **kw)


def _samples(run: Path) -> dict[str, dict]:
    with Ledger(run, readonly=True) as led:
        return {s["id"]: s for s in led.iter_samples(None)}


def _stage_requests(server: OpenAITestServer) -> Counter:
    """Stage requests by content (capability probes excluded)."""
    return Counter(
        r.messages_hash
        for r in server.chat_records()
        if r.body and stage_of(r.body["messages"][0].get("content") or "") != "unknown"
    )


def test_shards_are_deterministic_and_spread() -> None:
    shas = [f"{i:064x}" for i in range(400)]
    assert [shard_of(s, 256) for s in shas] == [shard_of(s, 256) for s in shas]
    assert len(Counter(shard_of(s, 2) for s in shas)) == 2
    assert min(Counter(shard_of(s, 2) for s in shas).values()) > 150


def test_outbox_streams_new_rows_and_seeds_without_echo(tmp_path: Path) -> None:
    src, dst = Ledger(tmp_path / "a"), Ledger(tmp_path / "b")
    src.put_record("img1", "perceive", "", {"x": 1})
    src.cache_put(
        "k1",
        model="m",
        stage="perceive",
        text="t",
        finish_reason="stop",
        prompt_tokens=3,
        completion_tokens=2,
    )
    box = Outbox(src)  # rows before the outbox existed are not its business
    rec = ImageRecord(
        sha256="img1", phash="0", source_root="/s", source_path="a.jpg", path="/s/a.jpg", width=1, height=1
    )
    src.add_image(rec)
    dst.add_image(rec)
    src.put_record("img1", "discover", "", {"y": 2})
    src.put_sample("s1", "img1", "risky", "fire", "ok", {"id": "s1"})
    src.put_round("s1", "query", 1, True, {"q": "x"})
    src.add_failure("img1", "compose", "k", "server", "503")
    src.set_image_status("img1", "done")
    batch = box.drain()
    assert {t: batch.count(t) for t in ("records", "samples", "rounds", "failures", "cache")} == {
        "records": 1,
        "samples": 1,
        "rounds": 1,
        "failures": 1,
        "cache": 0,
    }
    assert batch.images == [("img1", "done", None)]
    assert len(box.drain()) == 0  # nothing new
    apply_rows(dst, batch)
    assert dst.get_record("img1", "discover")["data"] == {"y": 2} and dst.image_status("img1") == "done"
    assert dst.get_sample("s1")["id"] == "s1" and dst.rounds("s1")[0]["passed"]
    seed = seed_rows(dst, ["img1"])
    assert seed.count("records") == 1 and seed.count("samples") == 1 and seed.count("rounds") == 1
    worker = Ledger(tmp_path / "c")
    wbox = Outbox(worker)
    worker.put_record("img2", "perceive", "", {"z": 3})  # written by the pipeline before the seed
    wbox.seed(seed)
    assert worker.get_sample("s1") is not None
    out = wbox.drain()  # the pipeline's row goes out, the seeded rows do not come back
    assert out.count("records") == 1 and out.dicts("records")[0]["image_sha"] == "img2"
    assert out.count("samples") == 0 and isinstance(out, RowBatch)


def _scratch_dirs() -> set[Path]:
    """The actors' private temp dirs (executors/scratch.py) on this node."""
    tmp = Path(tempfile.gettempdir())
    return {*tmp.glob("rmskit-state-*"), *tmp.glob("rmskit-w[0-9]*-*")}


@pytest.mark.slow  # a local Ray cluster takes ~10 s to start on a small machine
def test_ray_matches_local_executor(
    tmp_path: Path, photos: Path, ray_cluster: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RMSKIT_FINISH", "thread")  # the users' default (the process: test_finish_worker.py)
    before = _scratch_dirs()
    with OpenAITestServer(responder=responder, latency=0.005) as srv:
        kw = {"scenarios_per_image": 3}
        local = asyncio.run(
            run_build(_cfg(photos, tmp_path / "local", srv.base_url, **kw), quiet=True, export=False)
        )
        ex = ExecutorConfig(kind="ray", workers=2)
        dist = asyncio.run(
            run_build_ray(_cfg(photos, tmp_path / "ray", srv.base_url, **kw), ex, quiet=True, export=True)
        )
    assert local.images_done == dist.images_done == 18
    assert _scratch_dirs() <= before  # the actors' private ledgers are gone with the run
    a, b = _samples(tmp_path / "local"), _samples(tmp_path / "ray")
    assert len(a) == 18 * 4 and set(a) == set(b)
    for sid in a:
        assert a[sid] == b[sid], sid
    with Ledger(tmp_path / "ray", readonly=True) as led:  # both workers did work
        assert {c["name"] for c in led.taxonomy()} >= {
            s["category"] for s in b.values() if s["kind"] == "risky"
        }
    # the ray build's own dataset card names when the run finished (stored after the export, it said
    # "finished unknown")
    card = (tmp_path / "ray" / "dataset" / "README.md").read_text()
    assert re.search(r"finished \d{4}-\d\d-\d\d", card) and "finished unknown" not in card
    # exported by the local executor's finish: a worker that followed the driver's ledger
    log = (tmp_path / "ray" / "build.log").read_text()
    assert re.search(r"finish: last queries embedded in .*worker's export", log), log[-2000:]
    assert "finish worker failed" not in log and "export failed" not in log
    # the same samples as an export of the finished run made afterwards
    from rmskit.export import export

    again = export(tmp_path / "ray", "jsonl")
    written = (tmp_path / "ray" / "dataset" / "samples.jsonl").read_text()
    assert written and written == (again / "samples.jsonl").read_text()


def _run_in_thread(coro_fn) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def go() -> None:
        try:
            box["summary"] = asyncio.run(coro_fn())
        except BaseException as exc:  # surfaced by the test
            box["error"] = exc

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t, box


def _committed(run: Path) -> int:
    try:
        with Ledger(run, readonly=True) as led:
            return led.image_counts().get("done", 0)
    except Exception:  # the driver may not have created it yet
        return 0


@pytest.mark.slow  # a local Ray cluster takes ~10 s to start on a small machine
def test_killed_worker_is_restarted_and_only_in_flight_work_is_redone(
    tmp_path: Path, photos: Path, ray_cluster: str
) -> None:
    out = tmp_path / "run"
    before = _scratch_dirs()
    with OpenAITestServer(responder=responder, latency=0.03, keep_bodies=True) as srv:
        cfg = _cfg(photos, out, srv.base_url, scenarios_per_image=3)
        ex = ExecutorConfig(kind="ray", workers=2, chunk=2)
        thread, box = _run_in_thread(lambda: run_build_ray(cfg, ex, quiet=True, export=False))
        deadline = time.monotonic() + 120
        while _committed(out) < 2 and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.2)
        # Kill the worker with the most images (shards are known in advance: sha256 of the bytes).
        load = Counter(
            shard_of(hashlib.sha256(p.read_bytes()).hexdigest(), ex.shards) % 2 for p in photos.iterdir()
        )
        busiest = f"-w{load.most_common(1)[0][0]}"
        names = [n for n in ray.util.list_named_actors() if n.startswith("rmskit-") and n.endswith(busiest)]
        assert len(names) == 1 and thread.is_alive()
        pid = ray.get(ray.get_actor(names[0]).ping.remote())  # the worker process's pid
        os.kill(pid, signal.SIGKILL)
        thread.join(timeout=240)
        assert "error" not in box, box.get("error")
        requests = _stage_requests(srv)
    summary = box["summary"]
    assert summary.images_done == 18 and summary.images_failed == 0
    samples = _samples(out)
    assert len(samples) == 18 * 4 and all(s["status"] == "ok" for s in samples.values())  # none lost
    with Ledger(out, readonly=True) as led:
        meta = led.get_meta("last_executor")
        unique_answers = led.usage_by_stage()
    assert sum(meta["restarts"].values()) == 1
    # The killed worker could not remove its temp ledger; its restart swept it (executors/scratch.py).
    assert _scratch_dirs() <= before
    # Re-sent requests are bounded by the killed worker's in-flight images (re-shipped after the
    # restart) times the requests one image can take (2 + 3 risky x 10 + control 5 = 37).
    resent = sum(n - 1 for n in requests.values())
    reshipped = meta["shipped"] - 18
    print(f"worker kill: {resent} request(s) re-sent, {reshipped} image(s) re-shipped")
    assert 0 <= resent <= 37 * reshipped
    assert sum(u["requests"] for u in unique_answers.values()) == len(requests)  # one cache row each


@pytest.mark.slow  # a local Ray cluster takes ~10 s to start on a small machine
def test_killed_driver_resumes_without_redoing_committed_work(
    tmp_path: Path, photos: Path, ray_cluster: str
) -> None:
    out = tmp_path / "run"
    before = _scratch_dirs()
    with OpenAITestServer(responder=responder, latency=0.03) as srv:
        cmd = [
            sys.executable,
            "-m",
            "rmskit.cli",
            "build",
            str(photos),
            "--out",
            str(out),
            "--model",
            "openai:test-model",
            "--base-url",
            srv.base_url,
            "--concurrency",
            "4",
            "--scenarios",
            "3",
            "--embedder",
            "hashing",
            "--quiet",
            "--executor",
            "ray",
            "--workers",
            "2",
            "--ray-address",
            ray_cluster,
        ]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while _committed(out) < 4 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with Ledger(out, readonly=True) as led:
            done_before = led.image_counts().get("done", 0)
            records = {
                (r[0], r[1], r[2]): r[3]
                for r in led.query("SELECT image_sha, stage, key, created FROM records WHERE status='ok'")
            }
            samples = dict(led.query("SELECT id, created FROM samples"))
        assert 4 <= done_before < 18, "the driver must be killed mid-run"
        rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
    with Ledger(out, readonly=True) as led:
        assert led.image_counts() == {"done": 18}
        after = {
            (r[0], r[1], r[2]): r[3]
            for r in led.query("SELECT image_sha, stage, key, created FROM records WHERE status='ok'")
        }
        samples_after = dict(led.query("SELECT id, created FROM samples"))
    # Committed records and samples were reused, not rewritten (same creation time).
    assert all(after[k] == t for k, t in records.items())
    assert all(samples_after[k] == t for k, t in samples.items())
    assert len(samples_after) == 18 * 4
    # The killed driver's actors died with it, their temp ledgers left behind; the re-run swept them.
    assert _scratch_dirs() <= before


@pytest.mark.slow  # a local Ray cluster takes ~10 s to start on a small machine
def test_target_is_global_across_workers(tmp_path: Path, photos: Path, ray_cluster: str) -> None:
    with OpenAITestServer(responder=responder, latency=0.02) as srv:
        cfg = _cfg(photos, tmp_path / "run", srv.base_url, scenarios_per_image=3, target=12)
        ex = ExecutorConfig(kind="ray", workers=2)
        summary = asyncio.run(run_build_ray(cfg, ex, quiet=True, export=False))
    # The driver stops every worker once the committed total (over all workers) reaches the target.
    assert summary.stopped_at_target
    assert 12 <= summary.samples_ok < 18 * 4
    assert summary.images_done < 18


def test_openai_workers_split_limits_and_in_process_models_do_not() -> None:
    from rmskit.executors.worker import split_backend

    remote = BackendConfig(spec="openai:m", concurrency=16, requests_per_minute=600)
    part = split_backend(remote, 3)
    assert part.concurrency == 6 and part.requests_per_minute == 200 and part.tokens_per_minute is None
    local = BackendConfig(spec="hf:org/model", concurrency=16)
    assert split_backend(local, 3) == local  # one replica per worker, each at full settings


@pytest.mark.slow  # needs the module's local Ray
def test_gpus_per_worker(ray_cluster: str) -> None:
    from rmskit.executors.ray import _gpus_per_worker

    hf = BuildConfig(sources=["/x"], model=BackendConfig(spec="hf:org/model"))
    remote = BuildConfig(sources=["/x"], model=BackendConfig(spec="openai:m"))
    assert _gpus_per_worker(hf, ExecutorConfig(kind="ray", num_gpus=0.5)) == 0.5
    assert _gpus_per_worker(remote, ExecutorConfig(kind="ray")) == 0.0
    assert _gpus_per_worker(hf, ExecutorConfig(kind="ray")) == (
        1.0 if ray.cluster_resources().get("GPU") else 0.0
    )


def test_progress_sums_workers_and_keeps_a_dead_workers_counts() -> None:
    from rmskit.executors.progress import ClusterStats
    from rmskit.executors.worker import stats_dict
    from rmskit.pipeline.progress import Stats

    def snap(done: int, requests: int) -> dict:
        st = Stats(images_done=done, samples_ok=2 * done)
        for _ in range(requests):
            st.start("perceive")
            st.finish("perceive", ok=True, tokens=10)
        return stats_dict(st)

    cs = ClusterStats()
    cs.absorb("w0", snap(3, 5))
    cs.absorb("w1", snap(2, 4))
    cs.retire("w0")  # died: its 3 images stay counted, the restarted incarnation starts at 0
    cs.absorb("w0", snap(1, 2))
    assert cs.images_done == 6 and cs.samples_ok == 12
    assert cs.stages["perceive"].done == 11 and cs.stages["perceive"].tokens == 110
    rows = {r["worker"]: r for r in cs.worker_rows()}
    assert rows["w0"]["images"] == 4 and rows["w0"]["restarts"] == 1 and rows["w1"]["requests"] == 4
    cs.table()  # renders
