"""rmskit.stats and scoring.metrics pinned where `make mutate` found them loose: what each Estimate
carries (method, confidence, class names, n), Wilson against its closed form, intervals that react to
confidence and seed, paired differences and means against their parts, Vendi on known spectra, the
formatting strings, and compute_metrics' plumbing."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm

from rmskit import stats
from rmskit.scoring.metrics import compute_metrics, predictions

Y = np.r_[np.ones(30, bool), np.zeros(40, bool)]
RNG = np.random.default_rng(7)
PRED = np.r_[RNG.random(30) < 0.8, RNG.random(40) < 0.3]
PRED_B = np.r_[RNG.random(30) < 0.5, RNG.random(40) < 0.5]
SCORES = np.r_[RNG.random(30) * 0.7 + 0.3, RNG.random(40) * 0.7]


def _wilson(k: int, n: int, conf: float) -> tuple[float, float]:
    z = norm.ppf(1 - (1 - conf) / 2)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


@pytest.mark.parametrize(("k", "n", "conf"), [(0, 10, 0.95), (7, 10, 0.95), (30, 80, 0.9), (80, 80, 0.99)])
def test_wilson_matches_the_closed_form(k: int, n: int, conf: float) -> None:
    e = stats.wilson(k, n, "recall", confidence=conf)
    assert (e.metric, e.value, e.n, e.method, e.confidence) == ("recall", k / n, n, "wilson", conf)
    assert (e.low, e.high) == pytest.approx(_wilson(k, n, conf), abs=1e-9)
    assert e.ok and not e.insufficient and e.reason is None


def test_wilson_defaults_and_empty() -> None:
    e = stats.wilson(3, 4)
    assert e.metric == "proportion" and e.confidence == 0.95
    empty = stats.wilson(0, 0, "frr")
    assert (empty.metric, empty.value, empty.n, empty.method, empty.insufficient, empty.reason) == (
        "frr",
        None,
        0,
        "wilson",
        True,
        "no items",
    )
    assert not empty.ok
    mb = stats.majority_baseline([True, True, False])
    assert (mb.metric, mb.value, mb.n) == ("majority_baseline_accuracy", 2 / 3, 3)
    assert stats.majority_baseline([False, False, True]).value == 2 / 3


@pytest.mark.parametrize("metric", ["balanced_accuracy", "macro_f1", "kappa"])
def test_classifier_metric_carries_its_context(metric: str) -> None:
    e = stats.classifier_metric(
        metric, Y, PRED, n_resamples=300, seed=4, classes=("unsafe", "safe"), min_per_class=5
    )
    assert e.metric == metric and e.n == 70 and e.n_per_class == {"unsafe": 30, "safe": 40}
    assert e.method == "stratified bootstrap percentile (300 resamples, seed 4)" and e.confidence == 0.95
    assert e.low < e.value < e.high
    again = stats.classifier_metric(metric, Y, PRED, n_resamples=300, seed=4, min_per_class=5)
    assert (again.low, again.high) == (e.low, e.high)  # seeded
    other = stats.classifier_metric(metric, Y, PRED, n_resamples=300, seed=5, min_per_class=5)
    assert (other.low, other.high) != (e.low, e.high)
    narrow = stats.classifier_metric(
        metric, Y, PRED, n_resamples=300, seed=4, confidence=0.5, min_per_class=5
    )
    assert narrow.confidence == 0.5 and e.low < narrow.low <= narrow.high < e.high
    with pytest.raises(ValueError, match="^y and pred differ in length$"):
        stats.classifier_metric(metric, Y, PRED[:-1])


def test_class_floor_boundary_and_reasons() -> None:
    y = np.r_[np.ones(20, bool), np.zeros(19, bool)]
    pred = np.r_[np.ones(15, bool), np.zeros(24, bool)]
    e = stats.classifier_metric("balanced_accuracy", y, pred)
    assert e.insufficient and e.reason == "insufficient: negative 19 < 20 per class"
    assert e.method == "stratified bootstrap percentile (1000 resamples, seed 0)"
    ok = stats.classifier_metric("balanced_accuracy", y, pred, min_per_class=19, n_resamples=50)
    assert ok.ok  # exactly the floor is enough
    both = stats.classifier_metric("macro_f1", [True] * 2 + [False] * 3, [True] * 5)
    assert both.reason == "insufficient: positive 2, negative 3 < 20 per class"
    none = stats.classifier_metric("kappa", [False] * 30, [True] * 30, classes=("unsafe", "safe"))
    assert none.reason == "undefined: no unsafe items (needs both classes)" and none.n == 30


def test_macro_f1_zero_division_matches_sklearn() -> None:
    from sklearn.metrics import f1_score

    for pred in (np.zeros(70, bool), np.ones(70, bool), ~Y):
        got = stats.classifier_metric("macro_f1", Y, pred, n_resamples=50, min_per_class=5).value
        assert got == pytest.approx(f1_score(Y, pred, average="macro", zero_division=0))


def test_kappa_matches_sklearn_on_skewed_raters() -> None:
    from sklearn.metrics import cohen_kappa_score

    for pred in (PRED, PRED_B, np.r_[np.ones(60, bool), np.zeros(10, bool)]):
        got = stats.classifier_metric("kappa", Y, pred, n_resamples=50, min_per_class=5).value
        assert got == pytest.approx(cohen_kappa_score(Y, pred))


def test_auroc_carries_its_context() -> None:
    from sklearn.metrics import roc_auc_score

    e = stats.auroc(Y, SCORES, n_resamples=300, seed=2, classes=("unsafe", "safe"), min_per_class=5)
    assert (e.metric, e.n, e.n_per_class) == ("auroc", 70, {"unsafe": 30, "safe": 40})
    assert e.value == pytest.approx(roc_auc_score(Y, SCORES))
    assert e.method == "stratified bootstrap percentile (300 resamples, seed 2)" and e.low < e.value < e.high
    narrow = stats.auroc(Y, SCORES, n_resamples=300, seed=2, confidence=0.5, min_per_class=5)
    assert narrow.confidence == 0.5 and e.low < narrow.low and narrow.high < e.high
    assert stats.auroc(Y, SCORES, n_resamples=300, seed=3, min_per_class=5).low != e.low
    assert stats.auroc(Y[:10], SCORES[:10]).reason == "undefined: no negative items (needs both classes)"
    with pytest.raises(ValueError, match="^y and scores differ in length$"):
        stats.auroc(Y, SCORES[:-1])


def test_paired_difference_is_the_difference_of_the_parts() -> None:
    kw = {"n_resamples": 300, "seed": 1, "min_per_class": 5}
    d = stats.paired_difference(
        "balanced_accuracy", Y, PRED_B, PRED, names=("coin", "good"), classes=("u", "s"), **kw
    )
    a = stats.classifier_metric("balanced_accuracy", Y, PRED_B, **kw).value
    b = stats.classifier_metric("balanced_accuracy", Y, PRED, **kw).value
    e = d.estimate
    assert (d.metric, d.a, d.b) == ("balanced_accuracy", "coin", "good")
    assert e.value == pytest.approx(a - b) and e.value < 0 and e.high < 0 and d.excludes_zero
    assert e.metric == "balanced_accuracy difference" and e.n == 70 and e.n_per_class == {"u": 30, "s": 40}
    assert e.method == "paired stratified bootstrap percentile (300 resamples, seed 1)"
    narrow = stats.paired_difference("balanced_accuracy", Y, PRED_B, PRED, confidence=0.5, **kw)
    assert narrow.estimate.confidence == 0.5 and e.low < narrow.estimate.low
    small = stats.paired_difference("kappa", Y[25:], PRED[25:], PRED_B[25:])
    assert small.excludes_zero is None and small.estimate.insufficient
    assert small.estimate.metric == "kappa difference" and (small.a, small.b) == ("a", "b")
    with pytest.raises(ValueError, match="^y, pred_a and pred_b differ in length$"):
        stats.paired_difference("kappa", Y, PRED, PRED_B[:-1])


def test_mean_balanced_accuracy_against_its_parts() -> None:
    ys = [Y, Y[10:60]]
    preds = [PRED, PRED_B[10:60]]
    kw = {"n_resamples": 300, "seed": 6}
    e = stats.mean_balanced_accuracy(ys, preds, **kw)
    parts = [
        stats.classifier_metric("balanced_accuracy", y, p, n_resamples=50, min_per_class=1).value
        for y, p in zip(ys, preds, strict=True)
    ]
    assert isinstance(e, stats.Estimate)
    assert e.value == pytest.approx(sum(parts) / 2) and e.low < e.value < e.high
    assert e.metric == "mean_balanced_accuracy" and e.n == 120 and e.confidence == 0.95
    assert e.n_per_class == {"positive": 30 + 20, "negative": 40 + 30}
    assert e.method == "stratified bootstrap percentile (300 resamples, seed 6) over 2 sets"
    narrow = stats.mean_balanced_accuracy(ys, preds, confidence=0.5, **kw)
    assert narrow.confidence == 0.5 and e.low < narrow.low and narrow.high < e.high
    assert stats.mean_balanced_accuracy(ys, preds, n_resamples=300, seed=7).low != e.low
    d = stats.mean_balanced_accuracy(ys, [PRED_B, PRED[10:60]], preds, names=("x", "y"), **kw)
    assert isinstance(d, stats.Difference) and (d.metric, d.a, d.b) == ("mean_balanced_accuracy", "x", "y")
    other = stats.mean_balanced_accuracy(ys, [PRED_B, PRED[10:60]], **kw)
    assert isinstance(other, stats.Estimate)
    assert d.estimate.value == pytest.approx(other.value - e.value)
    assert d.estimate.metric == "mean_balanced_accuracy difference"
    assert d.estimate.method == "paired stratified bootstrap percentile (300 resamples, seed 6) over 2 sets"
    assert d.excludes_zero == (d.estimate.low > 0 or d.estimate.high < 0)
    same = stats.mean_balanced_accuracy(ys, preds, preds, **kw)
    assert isinstance(same, stats.Difference) and same.estimate.value == 0 and same.excludes_zero is False
    empty = stats.mean_balanced_accuracy([], [])
    assert isinstance(empty, stats.Estimate) and empty.value is None and empty.insufficient
    assert empty.reason == "no benchmark with enough items of both classes" and empty.n == 0
    empty_d = stats.mean_balanced_accuracy([], [], [], names=("p", "q"))
    assert isinstance(empty_d, stats.Difference) and empty_d.excludes_zero is None
    assert (empty_d.metric, empty_d.a, empty_d.b) == ("mean_balanced_accuracy", "p", "q")


def test_vendi_on_known_spectra() -> None:
    eye = np.eye(25)
    e = stats.vendi(eye, n_resamples=100, seed=1)
    assert e.value == pytest.approx(25.0) and e.high == 25.0 and 1.0 <= e.low <= 25.0
    assert e.metric == "vendi_score" and e.n == 25 and e.method == "bootstrap basic (100 resamples, seed 1)"
    same = stats.vendi(np.tile([[1.0, 0.0, 0.0]], (30, 1)), n_resamples=100)
    assert same.value == pytest.approx(1.0) and same.low == 1.0 and same.high == pytest.approx(1.0)
    two = np.r_[np.tile([[1.0, 0.0]], (15, 1)), np.tile([[0.0, 1.0]], (15, 1))]  # n > d: the dual kernel
    assert stats.vendi(two, n_resamples=100).value == pytest.approx(2.0)
    few = stats.vendi(eye[:7], min_n=8)
    assert few.insufficient and few.reason == "insufficient: 7 items < 8" and few.value is None
    assert stats.vendi(eye[:8], min_n=8, n_resamples=50).ok
    assert stats.vendi(eye, n_resamples=100, confidence=0.5).confidence == 0.5


def test_formatting() -> None:
    e = stats.Estimate(metric="m", value=0.5, n=9)
    assert stats.fmt_estimate(e) == "0.50, n=9" and stats.fmt_estimate(e, digits=3) == "0.500, n=9"
    full = stats.Estimate(metric="m", value=0.7123, low=0.6, high=0.8, n=5)
    assert stats.fmt_estimate(full, digits=1) == "0.7 [0.6, 0.8], n=5"
    bare = stats.Estimate(metric="m", value=None, n=0, insufficient=True, reason="no items")
    assert stats.fmt_estimate(bare) == "insufficient, n=0"
    undefined = stats.Estimate(
        metric="m", value=None, n=4, n_per_class={"u": 4, "s": 0}, reason="undefined: x"
    )
    assert stats.fmt_estimate(undefined) == "undefined (u 4, s 0), n=4"
    diff = stats.Difference(
        metric="m",
        a="ours",
        b="base",
        estimate=stats.Estimate(metric="m", value=-0.061, low=-0.1, high=0.02, n=12),
        excludes_zero=False,
    )
    assert stats.fmt_difference(diff) == "ours - base: -0.06 [-0.10, 0.02], n=12 (includes 0)"
    assert (
        stats.fmt_difference(diff.model_dump(), digits=1)
        == "ours - base: -0.1 [-0.1, 0.0], n=12 (includes 0)"
    )
    yes = diff.model_copy(update={"excludes_zero": True})
    assert stats.fmt_difference(yes).endswith("(excludes 0)")
    none = stats.Difference(metric="m", a="p", b="q", estimate=bare, excludes_zero=None)
    assert stats.fmt_difference(none) == "p - q: insufficient, n=0"


def test_compute_metrics_plumbing() -> None:
    labels = ["unsafe"] * 25 + ["safe"] * 30
    scores = list(np.r_[np.linspace(0.2, 1.0, 25), np.linspace(0.0, 0.7, 30)])
    m = compute_metrics(labels, scores, threshold=0.6, n_resamples=120, seed=9)
    pred = predictions(scores, 0.6)
    assert pred == [s >= 0.6 for s in scores] and predictions([0.5, 0.49]) == [True, False]
    tp = sum(p for p, lab in zip(pred, labels, strict=True) if lab == "unsafe")
    fp = sum(p for p, lab in zip(pred, labels, strict=True) if lab == "safe")
    assert m.unsafe_recall.value == tp / 25 and m.unsafe_recall.metric == "unsafe_recall"
    assert m.false_refusal_rate.value == fp / 30 and m.false_refusal_rate.metric == "false_refusal_rate"
    assert m.accuracy.value == (tp + 30 - fp) / 55 and m.accuracy.metric == "accuracy"
    assert m.majority_baseline.value == 30 / 55
    for e in (m.balanced_accuracy, m.macro_f1, m.auroc):
        assert e.n_per_class == {"unsafe": 25, "safe": 30}
        assert e.method == "stratified bootstrap percentile (120 resamples, seed 9)"
    assert m.balanced_accuracy.value == pytest.approx((tp / 25 + (30 - fp) / 30) / 2)
    assert m.balanced_accuracy.metric == "balanced_accuracy" and m.macro_f1.metric == "macro_f1"
    floor = compute_metrics(labels, scores, min_per_class=26)
    assert floor.balanced_accuracy.reason == "insufficient: unsafe 25 < 26 per class"
    only_safe = compute_metrics(["safe"] * 3, [0.1, 0.2, 0.9])
    assert only_safe.unsafe_recall.reason == "undefined: no unsafe items in this benchmark"
    only_unsafe = compute_metrics(["unsafe"] * 3, [0.1, 0.2, 0.9])
    assert only_unsafe.false_refusal_rate.reason == "undefined: no safe items in this benchmark"
    with pytest.raises(ValueError, match="^labels and scores differ in length$"):
        compute_metrics(["safe"], [0.1, 0.2])
    with pytest.raises(ValueError, match=r"^scores must be probabilities in \[0, 1\]$"):
        compute_metrics(["safe"], [float("nan")])
    with pytest.raises(ValueError, match=r"^scores must be probabilities in \[0, 1\]$"):
        compute_metrics(["safe"], [-0.01])
    compute_metrics(["safe", "unsafe"], [0.0, 1.0])  # both ends are probabilities


def test_zero_one_integers_are_read_as_booleans() -> None:
    yi, pi, bi = Y.astype(int).tolist(), PRED.astype(int).tolist(), PRED_B.astype(int).tolist()
    kw = {"n_resamples": 100, "min_per_class": 5}
    for metric in ("balanced_accuracy", "macro_f1", "kappa"):
        assert stats.classifier_metric(metric, yi, pi, **kw) == stats.classifier_metric(metric, Y, PRED, **kw)
        assert stats.paired_difference(metric, yi, pi, bi, **kw) == stats.paired_difference(
            metric, Y, PRED, PRED_B, **kw
        )
    assert stats.auroc(yi, SCORES.tolist(), **kw) == stats.auroc(Y, SCORES, **kw)
    assert stats.mean_balanced_accuracy([yi], [pi], n_resamples=100) == stats.mean_balanced_accuracy(
        [Y], [PRED], n_resamples=100
    )
    assert stats.mean_balanced_accuracy([yi], [pi], [bi], n_resamples=100) == stats.mean_balanced_accuracy(
        [Y], [PRED], [PRED_B], n_resamples=100
    )


def test_every_interval_is_reproducible_with_the_default_seed() -> None:
    kw = {"n_resamples": 100}
    assert stats.auroc(Y, SCORES, min_per_class=5, **kw) == stats.auroc(
        Y, SCORES, min_per_class=5, seed=0, **kw
    )
    assert stats.paired_difference(
        "kappa", Y, PRED, PRED_B, min_per_class=5, **kw
    ) == stats.paired_difference("kappa", Y, PRED, PRED_B, min_per_class=5, seed=0, **kw)
    assert stats.mean_balanced_accuracy([Y], [PRED], **kw) == stats.mean_balanced_accuracy(
        [Y], [PRED], seed=0, **kw
    )
    x = np.random.default_rng(1).normal(size=(25, 6))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    assert stats.vendi(x, **kw) == stats.vendi(x, seed=0, **kw)
    assert stats.vendi(x, seed=1, **kw).high != stats.vendi(x, **kw).high
    labels = ["unsafe"] * 25 + ["safe"] * 30
    scores = list(np.r_[np.linspace(0.2, 1.0, 25), np.linspace(0.0, 0.7, 30)])
    assert compute_metrics(labels, scores, n_resamples=100) == compute_metrics(
        labels, scores, n_resamples=100, seed=0
    )


def test_f1_with_a_single_true_item_in_a_class() -> None:
    y = [True, True, False, False]
    one_tp = stats.classifier_metric(
        "macro_f1", y, [True, False, False, False], min_per_class=1, n_resamples=20
    )
    assert one_tp.value == pytest.approx((2 / 3 + 0.8) / 2)  # F1(pos) = 2/(2+0+1), F1(neg) = 4/(4+1+0)
    one_tn = stats.classifier_metric(
        "macro_f1", y, [True, True, True, False], min_per_class=1, n_resamples=20
    )
    assert one_tn.value == pytest.approx((0.8 + 2 / 3) / 2)


def test_insufficient_estimates_name_their_metric() -> None:
    assert stats.auroc([True] * 3 + [False] * 3, [0.5] * 6).metric == "auroc"
    assert stats.auroc([], []).reason == "undefined: no positive, negative items (needs both classes)"
    few = stats.vendi(np.eye(5), n_resamples=10)
    assert (few.metric, few.method) == ("vendi_score", "bootstrap basic (10 resamples, seed 0)")
    assert stats.mean_balanced_accuracy([], []).metric == "mean_balanced_accuracy"


def test_item_estimate_of_a_mean() -> None:
    x = np.random.default_rng(5).random(40)

    def mean(idx: np.ndarray) -> float:
        return float(x[idx].mean())

    e = stats.item_estimate("mean_x", 40, mean, n_resamples=400, seed=2)
    assert (e.metric, e.n, e.confidence) == ("mean_x", 40, 0.95) and e.value == pytest.approx(x.mean())
    assert e.method == "bootstrap percentile over items (400 resamples, seed 2)"
    se = x.std(ddof=1) / math.sqrt(40)  # the percentile interval is close to the normal one
    assert e.low == pytest.approx(x.mean() - 1.96 * se, abs=0.5 * se)
    assert e.high == pytest.approx(x.mean() + 1.96 * se, abs=0.5 * se)
    assert stats.item_estimate("mean_x", 40, mean, n_resamples=400) == stats.item_estimate(
        "mean_x", 40, mean, n_resamples=400, seed=0
    )
    narrow = stats.item_estimate("mean_x", 40, mean, n_resamples=400, seed=2, confidence=0.5)
    assert narrow.confidence == 0.5 and e.low < narrow.low < narrow.high < e.high
    exact = stats.item_estimate("mean_x", 20, mean, n_resamples=50)  # exactly min_n: computed
    assert exact.ok
    few = stats.item_estimate("mean_x", 19, mean, n_resamples=50)
    assert (few.metric, few.value, few.n, few.insufficient) == ("mean_x", None, 19, True)
    assert few.reason == "insufficient: 19 items < 20"
    assert few.method == "bootstrap percentile over items (50 resamples, seed 0)"
    const = stats.item_estimate("c", 25, lambda idx: 3.0, n_resamples=50)  # noqa: ARG005
    assert (const.value, const.low, const.high) == (3.0, 3.0, 3.0)
