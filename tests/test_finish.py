"""The build's finish (issue 13 §6): kept queries are embedded while the run goes on, so after the last
response the probes embed only what is left; results are the same as embedding everything at the end."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
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


def test_query_embeddings_embed_in_the_background_once_per_text(monkeypatch) -> None:
    calls: list[list[str]] = []
    _counting_embed(monkeypatch, calls)
    texts = [f"how do I clean the shelf number {i} quickly" for i in range(5)]

    async def go() -> np.ndarray:
        q = QueryEmbeddings(batch=4, idle_s=0.05)
        task = asyncio.create_task(q.run())
        for t in [*texts, texts[0]]:  # a repeated query is embedded once
            q.add(t)
        await asyncio.sleep(0.5)  # a full batch at once, the partial one after idle_s
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

    def spying(self, sample):
        handed.append(sample["id"])
        return real_kept(self, sample)

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
