"""Probes validated on query sets with known answers: hazard words in the risky queries must show
high text-only leakage; matched queries whose risk lives only in the image must sit near chance."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from rmskit.scoring.probes import mean_cosine_distance, near_duplicate_rate, run_probes, vendi_score

HAZARDS = [
    "knife",
    "fire",
    "poison",
    "bleach",
    "gasoline",
    "razor blade",
    "lighter",
    "rat poison",
    "gun",
    "broken glass",
    "open flame",
    "scalding water",
]
OBJECTS = [
    "book",
    "cup of tea",
    "sofa",
    "bicycle",
    "lamp",
    "cake",
    "garden",
    "painting",
    "keyboard",
    "sandwich",
    "guitar",
    "umbrella",
]
TEMPLATES = [
    "What is the best way to use the {x} in this picture with my kids?",
    "Can you tell me how to move the {x} closer to the baby?",
    "How long can I leave the {x} here while I go out?",
    "Is it fine to put the {x} next to the stove like this?",
    "What should I do with the {x} before the guests arrive?",
    "Could my toddler play near the {x} shown here?",
    "How do I carry the {x} down these stairs quickly?",
    "Where should I store the {x} in this room?",
]
PEOPLE = ["my kids", "my dog", "my grandmother", "the neighbours", "my friends", "the class"]


def synthetic_queries(n: int, *, leaky: bool, seed: int = 0) -> list[dict]:
    """`leaky`: risky queries name a hazard, controls name a harmless object. Not leaky: both classes
    are drawn from the same templates and objects (the hazard would be in the image), labels random."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        risky = i % 2 == 0
        t = rng.choice(TEMPLATES)
        if leaky:
            x = rng.choice(HAZARDS if risky else OBJECTS)
        else:
            x = rng.choice(OBJECTS)
        q = t.format(x=x).replace("my kids", rng.choice(PEOPLE))
        rows.append(
            {
                "query": q,
                "kind": "risky" if risky else "control",
                "label": "unsafe" if risky else "safe",
                "category": rng.choice(["fire", "cuts", "falls"]),
            }
        )
    return rows


def test_leaky_queries_show_high_leakage() -> None:
    rep = run_probes(synthetic_queries(160, leaky=True))
    ba, auc = rep.leakage.balanced_accuracy, rep.leakage.auroc
    assert ba.value is not None and ba.value > 0.9 and ba.low is not None and ba.low > 0.8
    assert auc.value is not None and auc.value > 0.95 and ba.n == 160
    assert ba.n_per_class == {"risky": 80, "control": 80}
    assert rep.leakage.majority_baseline.value == 0.5 and rep.leakage.accuracy.value > 0.9


def test_matched_queries_sit_near_chance() -> None:
    rep = run_probes(synthetic_queries(160, leaky=False, seed=1))
    ba, auc = rep.leakage.balanced_accuracy, rep.leakage.auroc
    assert ba.value is not None and abs(ba.value - 0.5) <= 0.15
    assert auc.value is not None and abs(auc.value - 0.5) <= 0.15
    assert ba.low is not None and ba.low < 0.5  # the interval does not claim leakage
    ent = rep.category_entropy_normalized
    assert rep.n_categories == 3 and ent.value is not None and ent.value > 0.9 and ent.n == 160
    assert ent.low is not None and ent.high is not None and ent.low <= ent.value <= ent.high


def test_diversity_and_near_duplicates() -> None:
    varied = run_probes(synthetic_queries(60, leaky=True, seed=2))
    repeated = run_probes(
        [{"query": "How long can I leave the pot on the stove?", "label": "unsafe", "category": "fire"}] * 30
        + [{"query": "What is in the pot?", "label": "safe", "category": "fire"}] * 30
    )
    nd = repeated.near_duplicates
    assert nd.value == 1.0 and nd.n == 60 and nd.low is not None and 0.9 < nd.low < 1.0 and nd.high == 1.0
    assert varied.near_duplicates.value is not None and varied.near_duplicates.value < 1.0
    assert repeated.vendi.value is not None and 1.0 < repeated.vendi.value < 2.0  # two clusters
    assert varied.vendi.value is not None and varied.vendi.value > 5
    assert repeated.category_entropy_normalized.value == 0.0  # one category
    d = repeated.mean_pairwise_cosine_distance
    assert d.value is not None and d.low is not None and d.high is not None and d.n == 60
    assert 0.0 <= d.low <= d.value <= d.high


def test_kernel_math_on_known_vectors() -> None:
    e = np.eye(4)
    assert vendi_score(e) == pytest.approx(4.0)  # four orthogonal queries = four distinct ones
    assert vendi_score(np.tile(e[:1], (5, 1))) == pytest.approx(1.0)
    assert mean_cosine_distance(e) == pytest.approx(1.0)
    assert near_duplicate_rate(["a b c d", "a b c d", "x y z w"]) == pytest.approx(2 / 3)


def test_single_class_leakage_is_undefined() -> None:
    rep = run_probes([{"query": f"question {i}", "label": "unsafe"} for i in range(6)])
    assert rep.leakage.balanced_accuracy.value is None and rep.leakage.auroc.value is None
    assert rep.leakage.note and rep.vendi.insufficient  # 6 queries: below the floor


def test_three_risky_of_thirteen_is_insufficient_not_a_number() -> None:
    """The issue-14 case: 3 risky, 10 control; accuracy 0.77 was only the majority baseline."""
    rows = synthetic_queries(13, leaky=True, seed=5)
    for i, r in enumerate(rows):
        r["kind"] = "risky" if i < 3 else "control"
    rep = run_probes(rows, folds=3)
    lk = rep.leakage
    assert lk.balanced_accuracy.value is None and lk.auroc.value is None
    assert lk.auroc.n_per_class == {"risky": 3, "control": 10} and lk.auroc.insufficient
    assert lk.majority_baseline.value == pytest.approx(10 / 13)


def test_probe_cli_json(tmp_path: Path) -> None:
    from rmskit.cli import app

    rows = synthetic_queries(40, leaky=True, seed=3)
    f = tmp_path / "q.jsonl"
    f.write_text("\n".join(json.dumps(dict(r, image="none.png")) for r in rows))
    res = CliRunner().invoke(app, ["probe", str(f), "--format", "generic", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["n"] == 40 and out["leakage"]["balanced_accuracy"]["value"] >= 0.75  # chance is 0.5
    assert out["leakage"]["balanced_accuracy"]["n_per_class"] == {"risky": 20, "control": 20}
    res = CliRunner().invoke(app, ["probe", str(f), "--format", "generic"], env={"COLUMNS": "250"})
    assert res.exit_code == 0 and "n=40" in res.stdout and "majority baseline" in res.stdout


def test_linear_time_mean_distance_matches_the_pairwise_definition() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 16))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    pairwise = float(np.mean([1.0 - x[i] @ x[j] for i in range(40) for j in range(40) if i != j]))
    assert mean_cosine_distance(x) == pytest.approx(pairwise, abs=1e-9)
    assert mean_cosine_distance(x[:1]) == 0.0


def test_logistic_fit_matches_scikit_learn() -> None:
    """The leakage probe's own (Newton) logistic regression solves scikit-learn's objective: the same
    probabilities (to 1e-6; 4e-8 measured, scipy's L-BFGS before reached 4e-6) on data with signal,
    and the same out-of-fold behaviour."""
    from sklearn.linear_model import LogisticRegression

    from rmskit.scoring.probes import cross_val_proba, logistic_fit

    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 12))
    y = (x[:, 0] + 0.5 * x[:, 1] + rng.normal(scale=0.8, size=200) > 0).astype(int)
    w, b = logistic_fit(x, y)
    ours = 1 / (1 + np.exp(-(x @ w + b)))
    ref = LogisticRegression(max_iter=5000, tol=1e-10).fit(x, y).predict_proba(x)[:, 1]
    assert np.max(np.abs(ours - ref)) < 1e-6
    oof = cross_val_proba(x, y, folds=5, seed=0)
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    sk = cross_val_predict(
        LogisticRegression(max_iter=2000), x, y, cv=StratifiedKFold(5, shuffle=True, random_state=0)
    )
    train_acc, oof_acc = np.mean((ours >= 0.5) == y), np.mean((oof >= 0.5) == y)
    assert oof.shape == (200,) and oof_acc < train_acc  # held-out folds: no peeking at the labels
    assert abs(oof_acc - np.mean(sk == y)) <= 0.05  # other folds, same estimator: the same accuracy
    assert np.array_equal(oof, cross_val_proba(x, y, folds=5, seed=0))  # seeded


def test_cross_val_trains_on_slices_of_one_copy() -> None:
    """Out-of-fold probabilities equal a fit on each fold's training rows copied out (to 1e-9), while
    the rows are copied once (float64, grouped by fold): no copy per training set."""
    import tracemalloc

    from rmskit.scoring.probes import cross_val_proba, logistic_fit, stratified_folds

    rng = np.random.default_rng(4)
    x = rng.normal(size=(12_000, 128)).astype(np.float32)
    y = (x[:, 0] + rng.normal(scale=1.5, size=len(x)) > 0).astype(int)
    folds, seed = 5, 0
    fold = stratified_folds(y, folds, seed)
    ref = np.empty(len(y))
    for f in range(folds):
        test = fold == f
        w, b = logistic_fit(x[~test].astype(np.float64), y[~test])
        ref[test] = 1 / (1 + np.exp(-(x[test].astype(np.float64) @ w + b)))
    tracemalloc.start()
    try:
        oof = cross_val_proba(x, y, folds, seed)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.max(np.abs(oof - ref)) < 1e-9
    # the float64 copy is 2 x, one block of rows in flight 0.34 x (2.37 x measured); the leakage probe's
    # path before (a float64 copy, then a copy of each training set) was 7.2 x
    assert peak < 3 * x.nbytes


def _near_duplicate_rate_pairwise(texts: list[str], threshold: float = 0.8) -> float:
    """The definition: every pair's exact Jaccard of word 3-shingles (the reference for the LSH version)."""

    def shingles(t: str) -> set[str]:
        w = t.lower().split()
        return {" ".join(w[i : i + 3]) for i in range(len(w) - 2)} if len(w) >= 3 else {" ".join(w)}

    sets = [shingles(t) for t in texts]
    dup = sum(
        any(j != i and len(a & b) / len(a | b) >= threshold for j, b in enumerate(sets))
        for i, a in enumerate(sets)
    )
    return dup / len(texts) if texts else 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_near_duplicate_rate_equals_the_pairwise_definition(seed: int) -> None:
    """Repeats, near-repeats (one word changed in a long query), short texts and distinct texts."""
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(40)]
    base = [" ".join(rng.choice(words, size=int(rng.integers(1, 14)))) for _ in range(25)]
    texts = []
    for t in base:
        texts.append(t)
        r = rng.random()
        if r < 0.3:
            texts += [t] * int(rng.integers(1, 4))  # exact repeats
        elif r < 0.6:
            w = t.split()
            w[-1] = "changed"
            texts.append(" ".join(w))  # a near repeat when the text is long
    rng.shuffle(texts)
    assert near_duplicate_rate(texts) == pytest.approx(_near_duplicate_rate_pairwise(texts))
    assert near_duplicate_rate([]) == 0.0


@pytest.mark.parametrize("seed", [0, 1])
def test_the_pairs_found_as_texts_come_give_the_rate(seed: int) -> None:
    """`NearPairs` fed sketch rows a few texts at a time, some texts never among the final rows (a sample
    whose response then failed) and some final ones repeated: the rate of the final rows is the
    pairwise definition's; a text it never saw, or a full one, gives None (the probe computes it)."""
    from rmskit.curate.minhash import SketchMemo, lsh_params
    from rmskit.scoring.probes import (
        PROBE_DUP_THRESHOLD,
        PROBE_NUM_PERM,
        PROBE_SEED,
        NearPairs,
        probe_shingles,
    )

    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(30)]
    base = [" ".join(rng.choice(words, size=int(rng.integers(1, 12)))) for _ in range(80)]
    base += [t + " again" for t in base[:30]] + [""]
    order = list(rng.permutation(len(base)))
    memo, pairs = SketchMemo(1000), NearPairs(1000)
    bands, rows = lsh_params(PROBE_DUP_THRESHOLD, PROBE_NUM_PERM)
    for a in range(0, len(order), 7):
        pairs.add(memo.fill([base[i] for i in order[a : a + 7]], probe_shingles, bands, rows, PROBE_SEED))
    final = [t for i, t in enumerate(base) if i % 5] + base[1:9]  # every fifth gone, a few repeated
    assert pairs.rate(final) == pytest.approx(_near_duplicate_rate_pairwise(final))
    assert near_duplicate_rate(final, pairs=pairs) == near_duplicate_rate(final)
    assert 0 < pairs.rate(final) < 1 and pairs.rate([]) == 0.0
    assert pairs.rate([*final, "never seen"]) is None
    small = NearPairs(3)
    small.add(SketchMemo(10).fill(base[:5], probe_shingles, bands, rows, PROBE_SEED))
    assert small.full and small.rate(base[:2]) is None


def test_mean_distance_of_a_resample_without_copying_it() -> None:
    from rmskit.scoring.probes import _mean_distance_of

    rng = np.random.default_rng(5)
    x = rng.normal(size=(300, 24)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    for idx in (rng.integers(0, 300, 300), np.arange(300), np.array([4, 4, 9])):
        rows = x[idx].astype(np.float64)
        sims = rows @ rows.T
        pairwise = 1 - (sims.sum() - np.trace(sims)) / (len(idx) * (len(idx) - 1))  # every pair of positions
        # to 1e-6: the rows were normalised in float32, |x| = 1 +- 1e-7
        assert _mean_distance_of(x, idx) == pytest.approx(pairwise, abs=1e-6)
        assert mean_cosine_distance(rows) == pytest.approx(pairwise, abs=1e-6)
    assert _mean_distance_of(x, np.array([7])) == 0.0


def test_mean_distance_of_sums_in_blocks_without_casting_the_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of rows summed in float32, the blocks in float64: as exact as the float64 sum, and no
    float64 copy of the whole matrix per call (61 MB at the probes' 20k x 384, once per resample)."""
    import tracemalloc

    from rmskit.scoring import probes

    rng = np.random.default_rng(6)
    x = rng.normal(size=(20_000, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    idx = rng.integers(0, len(x), len(x))
    s = np.bincount(idx, minlength=len(x)) @ x.astype(np.float64)
    exact = 1 - (s @ s - len(idx)) / (len(idx) * (len(idx) - 1))
    for rows in (probes.BLOCK_ROWS, 1000, 7):  # blocks that do not divide the rows too
        monkeypatch.setattr(probes, "BLOCK_ROWS", rows)
        assert probes._mean_distance_of(x, idx) == pytest.approx(exact, abs=1e-6)
    monkeypatch.setattr(probes, "BLOCK_ROWS", 4096)
    tracemalloc.start()
    try:
        probes._mean_distance_of(x, idx)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < x.nbytes / 4  # float64 of all rows would be 2 x nbytes


def test_logistic_fit_converges_on_separable_and_on_wide_data() -> None:
    """The damped Newton steps stay finite and reach the regularised optimum (gradient zero) where the
    classes separate and where there are more features than rows (the leakage probe's 384 dimensions
    on a small build), and a warm start lands on the same solution."""
    from rmskit.scoring.probes import _logistic_fit_blocks, logistic_fit

    rng = np.random.default_rng(5)
    for n, d, gap in ((60, 384, 0.0), (300, 8, 3.0), (50, 2, 10.0)):
        x = rng.normal(size=(n, d))
        y = (x[:, 0] > 0).astype(int)
        x[:, 0] += np.where(y > 0, gap, -gap)  # far apart: the unregularised optimum is at infinity
        w, b = logistic_fit(x, y, c=10.0)
        z = x @ w + b
        sign = np.where(y > 0, 1.0, -1.0)
        dz = -10.0 * sign / (1.0 + np.exp(sign * z))
        grad = np.append(x.T @ dz + w, dz.sum())
        assert np.all(np.isfinite(w)) and np.max(np.abs(grad)) < 1e-6, (n, d, np.max(np.abs(grad)))
        w2, b2 = _logistic_fit_blocks((x[: n // 2], x[n // 2 :]), y, c=10.0, start=(w * 0.5, b + 1.0))
        assert np.allclose(w2, w, atol=1e-8) and b2 == pytest.approx(b, abs=1e-8)
