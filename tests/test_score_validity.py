"""The score cannot be gamed by a constant judge, and `score` fails before loading a model.

The whole `score()` pipeline runs (preflight, benign pools, metrics, headline, comparisons) with the
judge replaced by scripted judges: always unsafe, always safe, random. Each scores 0.5 (+- noise)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from rmskit.scoring.judge import TrainStats


class ScriptedJudge:
    """Stands in for rmskit.scoring.judge.Judge; `mode` says what P(unsafe) it gives."""

    mode = "unsafe"
    loaded = 0

    def __init__(self, *_a: Any, **_k: Any) -> None:
        ScriptedJudge.loaded += 1
        self.device = "cpu"
        self.rng = random.Random(7)

    def score(self, samples: list[Any], batch_size: int = 4) -> list[float]:
        if self.mode == "random":
            return [self.rng.random() for _ in samples]
        return [1.0 if self.mode == "unsafe" else 0.0 for _ in samples]

    def add_lora(self, r: int) -> int:
        return 1

    def train(self, samples: list[Any], **_k: Any) -> TrainStats:
        return TrainStats(steps=1, samples=len(samples), losses=[0.1])

    def save_adapter(self, out: Path, card: str) -> Path:
        out.mkdir(parents=True, exist_ok=True)
        (out / "README.md").write_text(card)
        return out


def _table(path: Path, image: str, labels: list[str], tag: str) -> Path:
    rows = [
        {"id": f"{tag}{i}", "image": image, "query": f"{tag} question {i}", "label": lab}
        for i, lab in enumerate(labels)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.fixture()
def sets(tmp_path: Path, real_photos: dict[str, np.ndarray]) -> dict[str, Path]:
    Image.fromarray(real_photos["coffee"]).resize((32, 24)).save(tmp_path / "p.jpg")
    return {
        "train": _table(tmp_path / "train.jsonl", "p.jpg", ["unsafe", "safe"] * 20, "t"),
        "unsafe_only": _table(tmp_path / "u.jsonl", "p.jpg", ["unsafe"] * 60, "u"),
        "mixed": _table(tmp_path / "m.jsonl", "p.jpg", ["unsafe"] * 50 + ["safe"] * 70, "m"),
    }


@pytest.mark.parametrize("mode", ["unsafe", "safe", "random"])
def test_constant_and_random_judges_score_one_half(
    mode: str, sets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import rmskit.scoring.judge as judge_mod
    from rmskit.scoring import DatasetSpec, ScoreConfig, score

    monkeypatch.setattr(judge_mod, "Judge", ScriptedJudge)
    monkeypatch.setattr(ScriptedJudge, "mode", mode)
    cfg = ScoreConfig(
        train=[DatasetSpec(name="train", path=str(sets["train"]), format="generic")],
        benchmarks=[
            DatasetSpec(name="unsafe_only", path=str(sets["unsafe_only"]), format="generic"),
            DatasetSpec(name="mixed", path=str(sets["mixed"]), format="generic"),
        ],
        judge="scripted",
        out=tmp_path / "out",
        n_resamples=200,
    )
    rep = score(cfg)
    for name, res in rep.benchmarks.items():
        m = res.tuned
        ba = m.balanced_accuracy
        assert ba.value is not None and ba.low is not None and ba.high is not None
        if mode == "random":
            assert abs(ba.value - 0.5) < 0.15, name  # one draw; interval coverage: test_stats
        else:
            assert ba.value == 0.5 and m.macro_f1.value is not None and m.macro_f1.value <= 0.5
            # a constant score cannot rank: AUROC is exactly chance, never above it
            assert m.auroc.value == 0.5
        assert m.false_refusal_rate.value is not None  # always reported (pool gives safe items)
    # the single-class benchmark is pooled with the mixed one's safe items (60 of 70, seeded)
    pool = rep.benchmarks["unsafe_only"].benign_pool
    assert pool is not None and pool.sources == {"mixed": 60} and pool.n == 60
    assert rep.benchmarks["unsafe_only"].n == 120
    assert rep.score_over == ["unsafe_only", "mixed"]
    assert rep.score is not None and abs(rep.score - 0.5) < (0.12 if mode == "random" else 1e-9)
    saved = json.loads((tmp_path / "out" / "score.json").read_text())
    assert saved["benchmarks"]["unsafe_only"]["benign_pool"]["ids_sha256"] == pool.ids_sha256


def test_auroc_undefined_without_a_pool(sets: dict[str, Path]) -> None:
    from rmskit.scoring.metrics import compute_metrics

    m = compute_metrics(["unsafe"] * 60, [1.0] * 60)
    assert m.auroc.value is None and m.auroc.reason is not None and "no safe" in m.auroc.reason
    assert m.balanced_accuracy.value is None and m.unsafe_recall.value == 1.0
    assert m.false_refusal_rate.value is None and m.false_refusal_rate.n == 0


def test_pool_draw_is_reproducible(sets: dict[str, Path]) -> None:
    from rmskit.scoring.plan import draw_pool
    from rmskit.scoring.sample import BenchSample

    cands = {
        "a": [BenchSample(id=str(i), query="q", label="safe", source="a") for i in range(30)],
        "b": [BenchSample(id=str(i), query="q", label="safe", source="b") for i in range(30)],
    }
    one, p1 = draw_pool("x", 20, cands, 0, "other benchmarks")
    two, p2 = draw_pool("x", 20, dict(reversed(list(cands.items()))), 0, "other benchmarks")
    three, p3 = draw_pool("x", 20, cands, 1, "other benchmarks")
    assert [s.id for s in one] == [s.id for s in two] and p1.ids_sha256 == p2.ids_sha256
    assert p1.ids_sha256 != p3.ids_sha256 and p1.n == 20 and sum(p1.sources.values()) == 20


def test_score_fails_fast_on_a_train_folder_without_its_split(
    tmp_path: Path, sets: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import rmskit.scoring.judge as judge_mod
    from rmskit.cli import app

    monkeypatch.setattr(ScriptedJudge, "loaded", 0)
    monkeypatch.setattr(judge_mod, "Judge", ScriptedJudge)
    vlg = tmp_path / "VLGuard"
    vlg.mkdir()
    (vlg / "test.json").write_text("[]")
    res = CliRunner().invoke(
        app,
        [
            "score",
            f"vlguard={vlg}",
            "--bench",
            f"mixed={sets['mixed']}",
            "--bench",
            f"gone={tmp_path / 'nope.jsonl'}",
            "--format",
            "mixed=generic",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert res.exit_code == 2
    text = " ".join(res.output.split())  # rich wraps long lines
    assert "train.json not found" in text and "--bench gone=" in text  # all problems at once
    assert ScriptedJudge.loaded == 0 and not (tmp_path / "o").exists()


def test_missing_images_fail_in_preflight(tmp_path: Path, sets: dict[str, Path]) -> None:
    from rmskit.scoring import DatasetSpec, ScoreConfig
    from rmskit.scoring.plan import PreflightError, preflight

    bad = _table(tmp_path / "bad.jsonl", "missing.jpg", ["unsafe", "safe"], "b")
    cfg = ScoreConfig(
        train=[DatasetSpec(name="train", path=str(sets["train"]), format="generic")],
        benchmarks=[DatasetSpec(name="bad", path=str(bad), format="generic")],
        judge="x",
        out=tmp_path / "o",
    )
    with pytest.raises(PreflightError, match="(?s)--bench bad=.*missing.jpg"):
        preflight(cfg)
    plan, _, items = preflight(cfg.model_copy(update={"benchmarks": [cfg.train[0]]}))
    assert plan.train_steps == {"train": 10} and plan.eval_items == 40 and plan.judge_passes == 80
    assert any("train" in line for line in plan.lines())


def test_score_cli_prints_plan_then_score_with_interval(
    tmp_path: Path, sets: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import rmskit.scoring.judge as judge_mod
    from rmskit.cli import app

    monkeypatch.setattr(judge_mod, "Judge", ScriptedJudge)
    monkeypatch.setattr(ScriptedJudge, "mode", "unsafe")
    res = CliRunner().invoke(
        app,
        [
            "score",
            f"train={sets['train']}",
            "--bench",
            f"only={sets['unsafe_only']}",
            "--benign",
            f"pool={sets['mixed']}",
            "--format",
            "train=generic",
            "--format",
            "only=generic",
            "--format",
            "pool=generic",
            "--out",
            str(tmp_path / "o"),
        ],
        env={"COLUMNS": "250"},
    )
    assert res.exit_code == 0, res.output
    text = res.output
    assert text.index("plan:") < text.index("training on train")
    assert "benign pool for only: 60 of 60 safe items (--benign: pool 60)" in text
    assert "score of train (mean balanced accuracy): 0.50 [0.50, 0.50], n=120" in text
