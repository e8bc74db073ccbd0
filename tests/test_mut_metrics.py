"""The Vendi score (rmskit.stats) pinned where `make mutate` found it loose: its noise floor and scale
invariance, the weighted-resample shortcut against the explicit resample (and its memory, which is the
reason it exists), the delta-method error against a brute-force influence function, the switch between
bootstrap and delta method at its exact boundaries, and the one-BLAS-thread rule."""

from __future__ import annotations

import math
import tracemalloc
from typing import Any

import numpy as np
import pytest
from scipy.stats import norm

from rmskit import stats


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _vs_ref(c: np.ndarray) -> float:
    """exp(entropy) of the spectrum of a PSD matrix, brute force (eigenvalues <= 1e-12 of the largest
    count as zero)."""
    lam = np.linalg.eigvalsh(c)
    lam = lam[lam > 1e-12 * lam.max()]
    p = lam / lam.sum()
    return math.exp(-sum(float(q) * math.log(float(q)) for q in p))


def test_entropy_exp_normalises_and_drops_the_noise_floor() -> None:
    assert stats._entropy_exp(np.array([2.0, 2.0])) == pytest.approx(2.0)  # any scale: two equal = 2
    assert stats._entropy_exp(np.array([3.0, 1.0, 0.0])) == pytest.approx(_vs_ref(np.diag([3.0, 1.0, 0.0])))
    assert stats._entropy_exp(np.array([1.0, 1e-12])) == 1.0  # exactly at the floor: zero
    assert stats._entropy_exp(np.array([1.0, 1e-11])) > 1.0
    rng = np.random.default_rng(3)
    x = _unit(rng.normal(size=(12, 5)))
    assert stats._vendi_of(7.0 * x) == pytest.approx(stats._vendi_of(x), rel=1e-12)  # scale-free


@pytest.mark.parametrize(("n", "d"), [(6, 9), (9, 9), (30, 4)])
def test_weighted_vendi_is_the_vendi_of_the_explicit_resample(n: int, d: int) -> None:
    """w counts how often each item is drawn: the result is the Vendi score of the resample itself. In
    float64 (n <= d, the n x n kernel) to 1e-12; past d items the d x d gram is float32 (~1e-6)."""
    rng = np.random.default_rng(n + d)
    x = _unit(rng.normal(size=(n, d)))
    wv = stats._WeightedVendi(x)
    tol = 1e-12 if n <= d else 1e-5
    for _ in range(3):
        idx = rng.integers(0, n, size=n)
        w = np.bincount(idx, minlength=n).astype(float)
        xr = x[idx]
        assert wv(w) == pytest.approx(_vs_ref(xr @ xr.T / n), rel=tol)
    assert wv(np.ones(n)) == pytest.approx(_vs_ref(x @ x.T / n), rel=tol)


def test_weighted_vendi_noise_floor_is_on_the_unit_trace_kernel() -> None:
    """A direction whose share of the unit-trace kernel K/n is below 1e-12 counts as none: four copies of
    one embedding, one nudged by 1.15e-6 in another direction, score exactly 1."""
    eps = 1.15e-6
    x = _unit(np.array([[1.0, 0, 0, 0]] * 3 + [[1.0, eps, 0, 0]]))
    assert stats._WeightedVendi(x)(np.ones(4)) == 1.0
    assert stats._vendi_of(x) == 1.0
    wide = _unit(np.array([[1.0, 0, 0, 0]] * 3 + [[1.0, 1e-3, 0, 0]]))
    assert stats._WeightedVendi(wide)(np.ones(4)) > 1.0


def test_weighted_vendi_memory_stays_linear_in_n() -> None:
    """Past d items a resample costs two n x d float32 arrays, never an n x n kernel (3000 items: 72 MB
    in float64) nor float64 copies of the embeddings."""
    rng = np.random.default_rng(0)
    n, d = 3000, 64
    x = _unit(rng.normal(size=(n, d)))
    w = np.bincount(rng.integers(0, n, size=n), minlength=n).astype(float)
    tracemalloc.start()
    try:
        wv = stats._WeightedVendi(x)
        wv(w)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1.25 * (2 * n * d * 4)


def _influence_se(x: np.ndarray) -> tuple[float, float]:
    """(Vendi, delta-method SE) with the influence of each item taken by finite differences of
    H((1 - t) C + t x_i x_i^T) at t = 0, C = sum x_i x_i^T / n (any row norms)."""
    n = x.shape[0]
    c = x.T @ x / n

    def h(m: np.ndarray) -> float:
        return math.log(_vs_ref(m))

    h0, t = h(c), 1e-6
    infl = np.array([(h((1 - t) * c + t * np.outer(xi, xi)) - h0) / t for xi in x])
    value = math.exp(h0)
    return value, value * float(np.sqrt((infl**2).sum())) / n


@pytest.mark.parametrize("scale", ["unit", "mixed"])
def test_vendi_delta_se_matches_a_brute_force_influence_function(scale: str) -> None:
    rng = np.random.default_rng(11)
    x = _unit(rng.normal(size=(40, 6)) * np.array([3, 2, 1, 1, 0.5, 0.2]))
    if scale == "mixed":  # rows of different lengths: the trace and |x_i|^2 terms matter
        x = x * rng.uniform(0.5, 3.0, size=(40, 1))
    value, se = stats.vendi_delta_se(x)
    ref_value, ref_se = _influence_se(x)
    assert value == pytest.approx(ref_value, rel=1e-10)
    assert se == pytest.approx(ref_se, rel=1e-4)


def test_vendi_delta_se_noise_floor_is_relative_to_the_largest_eigenvalue() -> None:
    # exactly at the floor (1e-12 of the largest): dropped, one direction left
    at = np.array([[1.0, 0.0], [0.0, 1e-6]])
    assert stats.vendi_delta_se(at) == (1.0, 0.0)
    for s in (1e-3, 1.0, 1e3):  # the floor scales with the data
        above = s * np.array([[1.0, 0.0]] * 3 + [[0.0, 1e-5]])  # 1e-10 of the largest: kept
        below = s * np.array([[1.0, 0.0]] * 3 + [[0.0, 1e-7]])  # 1e-14: dropped
        v_above = stats.vendi_delta_se(above)[0]
        assert v_above - 1 == pytest.approx(_vs_ref(np.diag([3.0, 1e-10])) - 1, rel=1e-3)
        assert stats.vendi_delta_se(below)[0] == 1.0


def _x(n: int, d: int = 6, seed: int = 5) -> np.ndarray:
    return _unit(np.random.default_rng(seed).normal(size=(n, d)))


def test_vendi_switches_to_the_delta_method_strictly_past_the_bootstrap_limit() -> None:
    x = _x(21)
    at = stats.vendi(x[:20], bootstrap_max_n=20, n_resamples=30)
    assert at.method == "bootstrap basic (30 resamples, seed 0)"
    past = stats.vendi(x, bootstrap_max_n=20, n_resamples=30, confidence=0.8)
    assert past.method == "delta method (influence function; more than 20 items)"
    value, se = stats.vendi_delta_se(x)
    z = float(norm.ppf(0.9))
    assert (past.metric, past.value, past.n, past.confidence) == ("vendi_score", value, 21, 0.8)
    # to a few ulps: rmskit's normal quantile is the standard library's, not scipy's ndtri
    assert past.low == pytest.approx(max(1.0, value - z * se), rel=1e-14)
    assert past.high == pytest.approx(min(21.0, value + z * se), rel=1e-14)
    # exactly min_n items, past the bootstrap limit: the delta method, not withheld
    floor = stats.vendi(x[:10], min_n=10, bootstrap_max_n=5)
    assert floor.method.startswith("delta method") and floor.value is not None and not floor.insufficient


def test_vendi_delta_interval_is_clipped_at_one() -> None:
    near = np.array([[1.0, 0.0]] * 20 + [[0.0, 1.0]])  # one item apart from twenty copies
    e = stats.vendi(near, bootstrap_max_n=10)
    value, se = stats.vendi_delta_se(near)
    assert value - 1.96 * se < 1.0 < value < 1.3
    assert e.low == 1.0 and e.high == pytest.approx(value + float(norm.ppf(0.975)) * se)


def test_vendi_bootstrap_runs_on_one_blas_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hundreds of small eigendecompositions: BLAS is held to one thread during the bootstrap, other
    thread pools (OpenMP) are left as they were."""
    import sklearn.cluster  # noqa: F401 - loads an OpenMP runtime, so there is a pool to leave alone
    from threadpoolctl import threadpool_info, threadpool_limits

    seen: list[list[dict[str, Any]]] = []
    real = stats._bootstrap

    def spy(*a: Any, **k: Any) -> Any:
        seen.append(threadpool_info())
        return real(*a, **k)

    monkeypatch.setattr(stats, "_bootstrap", spy)
    with threadpool_limits(limits=3):  # every pool at 3 threads around the call
        before = threadpool_info()
        stats.vendi(_x(12), n_resamples=20, min_n=5)
    assert len(seen) == 1
    blas = [p["num_threads"] for p in seen[0] if p["user_api"] == "blas"]
    assert blas and set(blas) == {1}
    other = [(p["filepath"], p["num_threads"]) for p in seen[0] if p["user_api"] != "blas"]
    assert other == [(p["filepath"], p["num_threads"]) for p in before if p["user_api"] != "blas"]
    assert all(p["num_threads"] == 3 for p in before) and other


def test_item_estimate_value_is_the_statistic_of_all_items() -> None:
    """The point estimate is fn over the indices of all n items, as the probes call it (the mean pairwise
    cosine distance of the embedded queries), checked against a pairwise brute force."""
    from rmskit.scoring.probes import mean_cosine_distance

    x = _x(25, d=4, seed=9)
    brute = float(np.mean([1.0 - x[i] @ x[j] for i in range(25) for j in range(25) if i != j]))
    e = stats.item_estimate("mean_pairwise_cosine_distance", 25, lambda idx: mean_cosine_distance(x[idx]))
    assert e.value == pytest.approx(brute, rel=1e-12)
    assert e.low is not None and e.high is not None and e.low <= e.value <= e.high
