"""rmskit.stats against known truth: intervals cover the true value at the nominal rate, constant
predictors get chance values, small classes are withheld."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from rmskit import stats

N_POS, N_NEG = 60, 100
Y = np.r_[np.ones(N_POS, bool), np.zeros(N_NEG, bool)]


def _coverage(make: callable, truth: float, reps: int = 200) -> float:
    rng = np.random.default_rng(12345)
    hits = 0
    for r in range(reps):
        e = make(rng, r)
        hits += e.low <= truth <= e.high
    return hits / reps


def test_balanced_accuracy_interval_covers_truth_at_nominal_rate() -> None:
    # recall 0.8 on positives, specificity 0.7 on negatives: true balanced accuracy 0.75
    def make(rng: np.random.Generator, r: int) -> stats.Estimate:
        pred = np.r_[rng.random(N_POS) < 0.8, rng.random(N_NEG) < 0.3]
        return stats.classifier_metric("balanced_accuracy", Y, pred, seed=r)

    assert abs(_coverage(make, 0.75) - 0.95) <= 0.05


def test_auroc_interval_covers_truth_at_nominal_rate() -> None:
    # scores N(1,1) vs N(0,1): true AUROC = Phi(1/sqrt 2)
    def make(rng: np.random.Generator, r: int) -> stats.Estimate:
        s = np.r_[rng.normal(1, 1, N_POS), rng.normal(0, 1, N_NEG)]
        return stats.auroc(Y, s, seed=r)

    assert abs(_coverage(make, float(norm.cdf(1 / np.sqrt(2)))) - 0.95) <= 0.05


def test_wilson_covers_truth_at_nominal_rate() -> None:
    def make(rng: np.random.Generator, r: int) -> stats.Estimate:
        return stats.wilson(int((rng.random(80) < 0.3).sum()), 80)

    assert abs(_coverage(make, 0.3) - 0.95) <= 0.05


@pytest.mark.parametrize("const", [True, False])
def test_constant_predictors_get_chance(const: bool) -> None:
    pred = np.full(len(Y), const)
    assert stats.classifier_metric("balanced_accuracy", Y, pred).value == 0.5
    k = stats.classifier_metric("kappa", Y, pred)
    assert k.value == 0.0 and k.low == 0.0 and k.high == 0.0
    assert stats.auroc(Y, pred.astype(float)).value == 0.5
    # plain accuracy of the constant predictor is the majority baseline or its complement
    assert stats.majority_baseline(Y).value == pytest.approx(N_NEG / (N_POS + N_NEG))


def test_known_values_match_sklearn() -> None:
    from sklearn.metrics import balanced_accuracy_score, cohen_kappa_score, f1_score, roc_auc_score

    rng = np.random.default_rng(3)
    pred = rng.random(len(Y)) < np.where(Y, 0.7, 0.4)
    s = rng.random(len(Y)) + Y * 0.3
    s[:10] = s[100:110]  # ties across classes
    kw = {"n_resamples": 100}
    assert stats.classifier_metric("balanced_accuracy", Y, pred, **kw).value == pytest.approx(
        balanced_accuracy_score(Y, pred)
    )
    assert stats.classifier_metric("macro_f1", Y, pred, **kw).value == pytest.approx(
        f1_score(Y, pred, average="macro")
    )
    assert stats.classifier_metric("kappa", Y, pred, **kw).value == pytest.approx(cohen_kappa_score(Y, pred))
    assert stats.auroc(Y, s, **kw).value == pytest.approx(roc_auc_score(Y, s))


def test_three_positives_are_insufficient() -> None:
    y = [True] * 3 + [False] * 10
    for e in (
        stats.auroc(y, [0.9, 0.8, 0.3] + [0.1] * 10),
        stats.classifier_metric("balanced_accuracy", y, [True] * 13),
    ):
        assert e.value is None and e.insufficient and e.n == 13
        assert e.n_per_class == {"positive": 3, "negative": 10}
    assert stats.fmt_estimate(e) == "insufficient (positive 3, negative 10), n=13"


def test_missing_class_is_undefined() -> None:
    e = stats.auroc([True] * 30, [0.5] * 30)
    assert e.value is None and e.reason == "undefined: no negative items (needs both classes)"
    assert stats.fmt_estimate(e).startswith("undefined")


def test_paired_difference_detects_a_better_judge_and_not_an_equal_one() -> None:
    rng = np.random.default_rng(0)
    good = np.r_[rng.random(N_POS) < 0.9, rng.random(N_NEG) < 0.1]
    coin = rng.random(len(Y)) < 0.5
    d = stats.paired_difference("balanced_accuracy", Y, good, coin, names=("good", "coin"))
    assert d.excludes_zero and d.estimate.low > 0
    same = stats.paired_difference("balanced_accuracy", Y, good, good)
    assert same.estimate.value == 0 and not same.excludes_zero
    assert stats.fmt_difference(d).startswith("good - coin: +0.")


def test_mean_balanced_accuracy_over_sets() -> None:
    ys = [Y, Y[:80]]
    preds = [Y.copy(), np.zeros(80, bool)]  # perfect on one set, constant on the other
    e = stats.mean_balanced_accuracy(ys, preds, n_resamples=200)
    assert isinstance(e, stats.Estimate) and e.value == pytest.approx(0.75) and e.n == 240
    d = stats.mean_balanced_accuracy(ys, preds, [np.zeros(160, bool), np.zeros(80, bool)], n_resamples=200)
    assert isinstance(d, stats.Difference) and d.estimate.value == pytest.approx(0.25) and d.excludes_zero


def test_vendi_interval_and_floor() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16))
    x = np.repeat(centres, 10, axis=0) + 0.05 * rng.normal(size=(40, 16))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    e = stats.vendi(x, n_resamples=200)
    assert e.value is not None and 3 < e.value < 6 and 1 <= e.low <= e.value <= e.high <= 40
    assert stats.vendi(x[:5]).insufficient


def test_fmt_estimate() -> None:
    e = stats.Estimate(metric="m", value=0.712, low=0.641, high=0.783, n=412)
    assert stats.fmt_estimate(e) == "0.71 [0.64, 0.78], n=412"
    assert stats.fmt_estimate(e.model_dump()) == "0.71 [0.64, 0.78], n=412"
    assert stats.fmt_estimate(None) == "n/a"


@pytest.mark.parametrize("n", [1200, stats.VENDI_BOOTSTRAP_MAX_N + 1])
def test_vendi_delta_method_matches_the_sampling_error_and_takes_over_for_large_n(n: int) -> None:
    """Past VENDI_BOOTSTRAP_MAX_N items the Vendi interval comes from the delta method (one pass, not
    hundreds of n x d^2 resamples). Its standard error (averaged over 10 data sets) must match the real
    sampling error, found by drawing 100 independent data sets from the same mixture, also just past
    the switch; and it must be tighter there than the bootstrap it replaces (whose resamples repeat
    items, which lowers Vendi and widens the interval)."""
    rng = np.random.default_rng(1)
    d, k = 64, 20
    centres = rng.normal(size=(k, d))

    def draw() -> np.ndarray:
        x = centres[rng.integers(0, k, n)] + 0.3 * rng.normal(size=(n, d))
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    true_sd = float(np.std([stats._vendi_of(draw()) for _ in range(100)]))
    mean_se = float(np.mean([stats.vendi_delta_se(draw())[1] for _ in range(10)]))
    assert 0.6 * true_sd < mean_se < 1.6 * true_sd
    x = draw()
    value, se = stats.vendi_delta_se(x)
    assert value == pytest.approx(stats._vendi_of(x))
    e = stats.vendi(x)
    assert e.method.startswith("delta method") and e.value == pytest.approx(value)
    assert e.low is not None and e.high is not None
    assert e.high - e.low == pytest.approx(2 * 1.959964 * se, rel=1e-4)
    boot = stats.vendi(x, bootstrap_max_n=n)
    assert boot.method.startswith("bootstrap basic") and boot.low is not None and boot.high is not None
    assert e.high - e.low < boot.high - boot.low
    small = stats.vendi(x[:500], n_resamples=50, bootstrap_max_n=1000)
    assert small.method.startswith("bootstrap basic")


def test_vendi_delta_method_in_blocks_and_from_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    """The delta method passes over the rows in blocks of DELTA_ROWS, each summed in float64, so 20k
    float32 embeddings never become 61 MB float64 temporaries: the same score and error as one block."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1000, 48))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    whole = stats.vendi_delta_se(x)
    monkeypatch.setattr(stats, "DELTA_ROWS", 77)  # blocks of uneven size, the last one short
    assert stats.vendi_delta_se(x) == pytest.approx(whole, rel=1e-12)
    assert stats.vendi_delta_se(x.astype(np.float32)) == pytest.approx(whole, rel=1e-5)
    assert stats.vendi(x.astype(np.float32)).value == pytest.approx(whole[0], rel=1e-5)


def test_bootstrap_draws_in_bounded_batches_with_the_same_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each batch's resampled indices are drawn at once (200 x n of them): batches bounded by
    BOOTSTRAP_INDICES keep that flat at 100k items, and give the interval one batch gives."""
    rng = np.random.default_rng(4)
    codes = rng.integers(0, 5, 3000)
    calls: list[int] = []

    def entropy(idx: np.ndarray) -> float:
        calls.append(1)
        p = np.bincount(codes[idx], minlength=5) / len(idx)
        return float(-(p[p > 0] * np.log(p[p > 0])).sum())

    batches: list[int] = []
    real = stats._bootstrap

    def spy(groups: list[np.ndarray], stat: object, **k: object) -> object:
        def counted(*idx: np.ndarray, axis: int = -1) -> object:
            batches.append(idx[0].shape[0] if idx[0].ndim > 1 else 0)
            return stat(*idx, axis=axis)  # type: ignore[operator]

        return real(groups, counted, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(stats, "_bootstrap", spy)
    one = stats.item_estimate("h", len(codes), entropy, n_resamples=200)
    assert batches == [200]
    monkeypatch.setattr(stats, "BOOTSTRAP_INDICES", 3000 * 7)  # 7 resamples per call
    calls.clear()
    batches.clear()
    batched = stats.item_estimate("h", len(codes), entropy, n_resamples=200)
    assert batches == [7] * 28 + [4]
    assert (batched.low, batched.high) == (one.low, one.high)
    assert len(calls) == 1 + 200  # the point value, then every resample once


# --- the arithmetic taken from scipy.stats, held to scipy.stats -------------------------------------


def test_wilson_interval_is_scipys_binomtest_wilson() -> None:
    from scipy.stats import binomtest

    for n in (1, 2, 3, 7, 20, 33, 100, 1000, 96_379):
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n} - {-1}):
            for conf in (0.8, 0.95, 0.99):
                ci = binomtest(k, n).proportion_ci(confidence_level=conf, method="wilson")
                # to a few ulps: the normal quantile is the standard library's, not scipy's ndtri
                ours = stats.wilson_interval(k, n, conf)
                assert ours == pytest.approx((ci.low, ci.high), rel=1e-14, abs=1e-16), (k, n, conf)
    with pytest.raises(ValueError, match="k must be in"):
        stats.wilson_interval(3, 2)
    with pytest.raises(ValueError, match="k must be in"):
        stats.wilson_interval(0, 0)


def test_normal_quantile_is_scipys_norm_ppf() -> None:
    ps = np.concatenate([np.linspace(1e-9, 1 - 1e-9, 20_001), [0.5, 0.9, 0.95, 0.975, 0.995, 0.001]])
    ours = np.array([stats.normal_quantile(float(p)) for p in ps])
    assert np.max(np.abs(ours - norm.ppf(ps)) / np.maximum(1.0, np.abs(norm.ppf(ps)))) < 1e-15


def test_average_ranks_are_scipys_rankdata() -> None:
    from scipy.stats import rankdata

    rng = np.random.default_rng(0)
    cases = [
        rng.integers(0, 4, (50, 37)).astype(float),  # many ties per row
        rng.random((3, 200)),  # none
        np.array([[1.0, 1.0, 1.0]]),  # one run
        np.array([2.0, 1.0, 2.0, 3.0, 1.0]),  # 1-D
        rng.integers(0, 3, (2, 4, 9)),  # 3-D, integers
        np.array([[0.5, -np.inf, np.inf, 0.5]]),
    ]
    for x in cases:
        np.testing.assert_array_equal(stats.average_ranks(x), rankdata(x, axis=-1))


@pytest.mark.parametrize("method", ["percentile", "basic"])
@pytest.mark.parametrize("strata", [1, 2])
def test_bootstrap_is_scipys_bootstrap_draw_for_draw(
    method: str, strata: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same generator, the same draws in the same batches (with two strata the batch size decides
    the order of the draws): scipy's interval."""
    from scipy.stats import bootstrap

    rng = np.random.default_rng(7)
    scores = rng.random(90)
    groups = [np.arange(60), np.arange(60, 90)][:strata]
    total = sum(len(g) for g in groups)

    def stat(*idx: np.ndarray, axis: int = -1) -> np.ndarray:
        return sum(scores[i].mean(axis=axis) * (j + 1) for j, i in enumerate(idx))

    for n_resamples, batch in ((200, 200), (200, 7), (99, 99)):
        monkeypatch.setattr(stats, "BOOTSTRAP_INDICES", total * batch)
        ours = stats._bootstrap(groups, stat, n_resamples=n_resamples, seed=3, confidence=0.9, method=method)
        ref = bootstrap(
            tuple(groups),
            stat,
            n_resamples=n_resamples,
            batch=batch,
            vectorized=True,
            paired=False,
            confidence_level=0.9,
            method=method,
            rng=np.random.default_rng(3),
        ).confidence_interval
        assert ours == pytest.approx((ref.low, ref.high), rel=1e-12, abs=0)
    with pytest.raises(ValueError, match=r"^each sample must contain two or more observations$"):
        stats._bootstrap([np.arange(1)], stat, n_resamples=10, seed=0, confidence=0.9)
    with pytest.raises(ValueError, match=r"^bootstrap method 'BCa': percentile or basic$"):
        stats._bootstrap(groups, stat, n_resamples=10, seed=0, confidence=0.9, method="BCa")


def test_bootstrap_draws_one_resample_at_a_time_when_one_is_over_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """More items than BOOTSTRAP_INDICES: batches of one resample, never of none (and the same interval)."""
    rng = np.random.default_rng(1)
    scores = rng.random(40)
    sizes: list[int] = []

    def stat(idx: np.ndarray, axis: int = -1) -> np.ndarray:
        sizes.append(idx.shape[0] if idx.ndim > 1 else 0)
        return scores[idx].mean(axis=-1)

    whole = stats._bootstrap([np.arange(40)], stat, n_resamples=5, seed=2, confidence=0.9)
    monkeypatch.setattr(stats, "BOOTSTRAP_INDICES", 39)
    sizes.clear()
    assert (
        stats._bootstrap([np.arange(40)], stat, n_resamples=5, seed=2, confidence=0.9) == whole
    )  # one stratum
    assert sizes == [1, 1, 1, 1, 1]


def test_vendi_of_integer_rows_is_vendi_of_the_same_rows_as_floats() -> None:
    rng = np.random.default_rng(5)
    rows = rng.integers(-3, 4, (30, 6))
    rows[rows.sum(axis=1) == 0, 0] += 1  # no zero row
    for kw in ({}, {"bootstrap_max_n": 10}):  # the bootstrap, then the delta method
        a, b = stats.vendi(rows, n_resamples=20, **kw), stats.vendi(rows.astype(float), n_resamples=20, **kw)
        assert (a.value, a.low, a.high) == pytest.approx((b.value, b.low, b.high), rel=1e-12)


def test_no_reported_number_imports_scipy_stats() -> None:
    """The finish worker's probes (Wilson, AUROC, bootstraps, the delta method) without scipy.stats."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from rmskit import stats\n"
        "rng = np.random.default_rng(0); y = rng.random(300) < 0.4; s = rng.random(300)\n"
        "x = rng.normal(size=(260, 8)); x /= np.linalg.norm(x, axis=1, keepdims=True)\n"
        "stats.wilson(3, 10); stats.auroc(y, s); stats.classifier_metric('kappa', y, s < 0.5)\n"
        "stats.vendi(x[:40]); stats.vendi(x); stats.item_estimate('m', 50, lambda i: float(len(set(i))))\n"
        "print('scipy.stats' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False"]
