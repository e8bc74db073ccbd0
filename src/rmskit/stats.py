"""Every number rmskit reports: a value, its n, a 95% interval, and a floor below which it is withheld.

- proportions (recall, false-refusal rate, plain accuracy): Wilson interval (scipy `binomtest`'s);
- balanced accuracy, macro-F1, AUROC, Cohen's kappa: stratified bootstrap (scipy `bootstrap`'s, each
  class resampled on its own so class counts stay fixed; seeded; 1,000 resamples by default);
- Vendi score: bootstrap over items (basic interval, because duplicates in a resample bias the
  resampled Vendi score downwards and the basic interval reflects that shift back); past 2,000 items
  the delta method (influence function of the kernel's spectrum), as resamples get expensive;
- two judges on the same items: paired stratified bootstrap of the difference, `excludes_zero`.

Binary convention: `y` true = positive class (unsafe / risky); predictions are booleans (y_hat) or
scores (AUROC). A metric that compares classes is `insufficient` (value None, counts kept) when a
class has fewer than `min_per_class` items (default 20): a number from 3 positives is noise."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from statistics import NormalDist
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

MIN_PER_CLASS = 20
N_RESAMPLES = 1000
CONFIDENCE = 0.95

Bools = Sequence[bool] | np.ndarray  # labels / predictions
Floats = Sequence[float] | np.ndarray  # scores


# Why scipy.stats is not imported here: its import (every distribution's docstrings and objects) costs
# ~21 MB and ~0.35 s of CPU on top of scipy.special (itself ~25 MB), in every process that reports a number, the build's
# finish worker included (issue 13: the memory of the build's processes together against curator's).
# What this module used from it (the Wilson interval, the normal quantile, average ranks, and the
# percentile and basic bootstrap) is written out below with scipy's own arithmetic, draw for draw, and
# tests/test_stats.py holds each to scipy.stats on the same inputs.


def normal_quantile(p: float) -> float:
    """The standard normal's p-quantile, from the standard library (Wichura's AS241): within 1e-15 of
    scipy.stats.norm.ppf (tested). scipy.special for this one function cost the finish worker ~25 MB."""
    return NormalDist().inv_cdf(p)


class Estimate(BaseModel):
    """One reported figure. `value` is None when `insufficient` (then `reason` says why)."""

    metric: str
    value: float | None
    low: float | None = None
    high: float | None = None
    n: int
    n_per_class: dict[str, int] = Field(default_factory=dict)
    method: str = "none"
    confidence: float = CONFIDENCE
    insufficient: bool = False
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.value is not None and not self.insufficient


class Difference(BaseModel):
    """A paired difference `a - b` on the same items, with its bootstrap interval."""

    metric: str
    a: str
    b: str
    estimate: Estimate
    excludes_zero: bool | None  # None when the difference itself is insufficient


def _counts(y: np.ndarray, names: tuple[str, str]) -> dict[str, int]:
    pos = int(y.sum())
    return {names[0]: pos, names[1]: int(len(y) - pos)}


def _floor(metric: str, counts: dict[str, int], min_per_class: int, method: str) -> Estimate | None:
    """An `insufficient` Estimate when a class is below the floor, else None."""
    n = sum(counts.values())
    small = {k: v for k, v in counts.items() if v < min_per_class}
    if not small:
        return None
    if any(v == 0 for v in counts.values()):
        missing = ", ".join(k for k, v in counts.items() if v == 0)
        reason = f"undefined: no {missing} items (needs both classes)"
    else:
        shown = ", ".join(f"{k} {v}" for k, v in small.items())
        reason = f"insufficient: {shown} < {min_per_class} per class"
    return Estimate(
        metric=metric, value=None, n=n, n_per_class=counts, method=method, insufficient=True, reason=reason
    )


# --- proportions -------------------------------------------------------------------------------------


def wilson(k: int, n: int, metric: str = "proportion", confidence: float = CONFIDENCE) -> Estimate:
    """k successes out of n with a Wilson score interval; n == 0 gives an insufficient Estimate."""
    if n == 0:
        return Estimate(metric=metric, value=None, n=0, method="wilson", insufficient=True, reason="no items")
    low, high = wilson_interval(int(k), int(n), confidence)
    return Estimate(
        metric=metric,
        value=k / n,
        low=low,
        high=high,
        n=n,
        method="wilson",
        confidence=confidence,
    )


def wilson_interval(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The two-sided Wilson score interval without continuity correction, as scipy's
    `binomtest(k, n).proportion_ci(method="wilson")` computes it (Newcombe 1998), operation for operation."""
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"k must be in [0, n] and n >= 1 (got k={k}, n={n})")
    p = k / n
    z = normal_quantile(0.5 + 0.5 * confidence)
    denom = 2 * (n + z**2)
    center = (2 * n * p + z**2) / denom
    q = 1 - p
    delta = z / denom * math.sqrt(4 * n * p * q + z**2)
    return (0.0 if k == 0 else center - delta), (1.0 if k == n else center + delta)


def majority_baseline(y: Bools) -> Estimate:
    """Accuracy of always predicting the larger class (Wilson interval): plain accuracy at or below
    this is no skill at all. Its balanced accuracy is 0.5 by construction."""
    yy = np.asarray(y, dtype=bool)
    k = max(int(yy.sum()), int(len(yy) - yy.sum()))
    return wilson(k, len(yy), "majority_baseline_accuracy")


# --- vectorised statistics (last axis = items; leading axes = bootstrap resamples) -------------------


def _ba(tp: Any, n_pos: int, tn: Any, n_neg: int) -> Any:
    return (tp / n_pos + tn / n_neg) / 2


def _macro_f1(tp: Any, n_pos: int, tn: Any, n_neg: int) -> Any:
    fn, fp = n_pos - tp, n_neg - tn
    with np.errstate(invalid="ignore", divide="ignore"):
        f_pos = np.where(tp > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
        f_neg = np.where(tn > 0, 2 * tn / (2 * tn + fn + fp), 0.0)
    return (f_pos + f_neg) / 2


def _kappa(tp: Any, n_pos: int, tn: Any, n_neg: int) -> Any:
    fn, fp = n_pos - tp, n_neg - tn
    n = n_pos + n_neg
    po = (tp + tn) / n
    pe = ((tp + fp) * n_pos + (tn + fn) * n_neg) / n**2
    with np.errstate(invalid="ignore", divide="ignore"):
        # pe == 1 only when both raters are constant and agree: no chance-corrected information
        return np.where(pe < 1, (po - pe) / (1 - pe), 0.0)


def _auroc(s_pos: Any, s_neg: Any) -> Any:
    """Mann-Whitney U / (n_pos n_neg), ties counted half, via average ranks along the last axis."""
    n_pos, n_neg = s_pos.shape[-1], s_neg.shape[-1]
    ranks = average_ranks(np.concatenate([s_pos, s_neg], axis=-1))
    u = ranks[..., :n_pos].sum(axis=-1) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def average_ranks(x: Any) -> np.ndarray:
    """1-based ranks along the last axis, tied values sharing the mean of their ranks (scipy's
    `rankdata(x, axis=-1)` for data without NaN, as scores are): sorted stably, each run of equal values
    gets (first + last) / 2 + 1."""
    a = np.asarray(x)
    order = np.argsort(a, axis=-1, kind="stable")
    s = np.take_along_axis(a, order, axis=-1)
    n = a.shape[-1]
    pos = np.broadcast_to(np.arange(n), a.shape)
    starts = np.ones(a.shape, dtype=bool)
    starts[..., 1:] = s[..., 1:] != s[..., :-1]
    ends = np.ones(a.shape, dtype=bool)
    ends[..., :-1] = starts[..., 1:]
    first = np.maximum.accumulate(np.where(starts, pos, 0), axis=-1)
    last = np.flip(np.minimum.accumulate(np.flip(np.where(ends, pos, n), axis=-1), axis=-1), axis=-1)
    ranks = np.empty(a.shape, dtype=np.float64)
    np.put_along_axis(ranks, order, (first + last) / 2 + 1, axis=-1)
    return ranks


CONFUSION_METRICS: dict[str, Callable[..., Any]] = {
    "balanced_accuracy": _ba,
    "macro_f1": _macro_f1,
    "kappa": _kappa,
}


BOOTSTRAP_INDICES = 1 << 20  # resampled indices per vectorised call: 8 MB


def _bootstrap(
    groups: Sequence[np.ndarray],
    stat: Callable[..., Any],
    *,
    n_resamples: int,
    seed: int,
    confidence: float,
    method: str = "percentile",
) -> tuple[float, float]:
    """The percentile or basic bootstrap interval of `stat` over index arrays, one per stratum (each
    resampled on its own): scipy.stats.bootstrap's algorithm (vectorised, unpaired, two-sided), the
    same draws from the same generator, so the same interval (a test holds it to scipy's)."""
    if method not in ("percentile", "basic"):
        raise ValueError(f"bootstrap method {method!r}: percentile or basic")
    data = tuple(np.asarray(g) for g in groups)
    if any(g.shape[-1] <= 1 for g in data):
        raise ValueError("each sample must contain two or more observations")
    rng = np.random.default_rng(seed)
    # a batch's resampled indices are drawn at once: all 200 x 100k of them would be 160 MB
    batch = max(1, BOOTSTRAP_INDICES // sum(g.shape[-1] for g in data))
    theta = []
    for k in range(0, n_resamples, batch):
        size = min(batch, n_resamples - k)
        theta.append(
            stat(*(g[..., rng.integers(0, g.shape[-1], (size, g.shape[-1]))] for g in data), axis=-1)
        )
    dist = np.concatenate(theta, axis=-1)  # float64: every statistic here is
    alpha = (1 - confidence) / 2
    low, high = np.quantile(dist, [alpha, 1 - alpha], axis=-1)
    if method == "basic":
        point = stat(*data, axis=-1)
        low, high = 2 * point - high, 2 * point - low
    return float(low), float(high)


def _strata(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.flatnonzero(y), np.flatnonzero(~y)


def _stratified_estimate(
    metric: str,
    yy: np.ndarray,
    make_stat: Callable[[int, int], Callable[..., Any]],
    *,
    classes: tuple[str, str],
    min_per_class: int,
    n_resamples: int,
    seed: int,
    confidence: float,
) -> Estimate:
    """The shared frame of every bootstrapped metric: per-class counts, the floor, then the point
    value and a stratified bootstrap interval of `make_stat(n_pos, n_neg)(pos_idx, neg_idx)`."""
    method = f"stratified bootstrap percentile ({n_resamples} resamples, seed {seed})"
    counts = _counts(yy, classes)
    if (bad := _floor(metric, counts, min_per_class, method)) is not None:
        return bad
    pos, neg = _strata(yy)
    stat = make_stat(len(pos), len(neg))
    low, high = _bootstrap([pos, neg], stat, n_resamples=n_resamples, seed=seed, confidence=confidence)
    return Estimate(
        metric=metric,
        value=float(stat(pos, neg)),
        low=low,
        high=high,
        n=len(yy),
        n_per_class=counts,
        method=method,
        confidence=confidence,
    )


def classifier_metric(
    metric: str,
    y: Bools,
    pred: Bools,
    *,
    min_per_class: int = MIN_PER_CLASS,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    confidence: float = CONFIDENCE,
    classes: tuple[str, str] = ("positive", "negative"),
) -> Estimate:
    """balanced_accuracy / macro_f1 / kappa of binary predictions with a stratified bootstrap CI.
    For kappa between two raters, `y` is rater A and `pred` rater B."""
    fn = CONFUSION_METRICS[metric]
    yy, pp = np.asarray(y, dtype=bool), np.asarray(pred, dtype=bool)
    if yy.shape != pp.shape:
        raise ValueError("y and pred differ in length")

    def make_stat(n_pos: int, n_neg: int) -> Callable[..., Any]:
        def stat(ip: Any, ineg: Any, axis: int = -1) -> Any:
            return fn(pp[ip].sum(axis=-1), n_pos, (~pp[ineg]).sum(axis=-1), n_neg)

        return stat

    return _stratified_estimate(
        metric,
        yy,
        make_stat,
        classes=classes,
        min_per_class=min_per_class,
        n_resamples=n_resamples,
        seed=seed,
        confidence=confidence,
    )


def auroc(
    y: Bools,
    scores: Floats,
    *,
    min_per_class: int = MIN_PER_CLASS,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    confidence: float = CONFIDENCE,
    classes: tuple[str, str] = ("positive", "negative"),
) -> Estimate:
    """AUROC with a stratified bootstrap CI; undefined (None + reason) when a class is missing."""
    yy, ss = np.asarray(y, dtype=bool), np.asarray(scores, dtype=float)
    if yy.shape != ss.shape:
        raise ValueError("y and scores differ in length")

    def make_stat(n_pos: int, n_neg: int) -> Callable[..., Any]:
        return lambda ip, ineg, axis=-1: _auroc(ss[ip], ss[ineg])

    return _stratified_estimate(
        "auroc",
        yy,
        make_stat,
        classes=classes,
        min_per_class=min_per_class,
        n_resamples=n_resamples,
        seed=seed,
        confidence=confidence,
    )


def paired_difference(
    metric: str,
    y: Bools,
    pred_a: Bools,
    pred_b: Bools,
    *,
    names: tuple[str, str] = ("a", "b"),
    min_per_class: int = MIN_PER_CLASS,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    confidence: float = CONFIDENCE,
    classes: tuple[str, str] = ("positive", "negative"),
) -> Difference:
    """metric(a) - metric(b) on the same items; both judges see the same resampled items each time."""
    fn = CONFUSION_METRICS[metric]
    yy = np.asarray(y, dtype=bool)
    pa, pb = np.asarray(pred_a, dtype=bool), np.asarray(pred_b, dtype=bool)
    if not (yy.shape == pa.shape == pb.shape):
        raise ValueError("y, pred_a and pred_b differ in length")
    method = f"paired stratified bootstrap percentile ({n_resamples} resamples, seed {seed})"
    label = f"{metric} difference"
    counts = _counts(yy, classes)
    if (bad := _floor(label, counts, min_per_class, method)) is not None:
        return Difference(metric=metric, a=names[0], b=names[1], estimate=bad, excludes_zero=None)
    pos, neg = _strata(yy)
    n_pos, n_neg = len(pos), len(neg)

    def stat(ip: Any, ineg: Any, axis: int = -1) -> Any:
        ma = fn(pa[ip].sum(axis=-1), n_pos, (~pa[ineg]).sum(axis=-1), n_neg)
        mb = fn(pb[ip].sum(axis=-1), n_pos, (~pb[ineg]).sum(axis=-1), n_neg)
        return ma - mb

    low, high = _bootstrap([pos, neg], stat, n_resamples=n_resamples, seed=seed, confidence=confidence)
    est = Estimate(
        metric=label,
        value=float(stat(pos, neg)),
        low=low,
        high=high,
        n=len(yy),
        n_per_class=counts,
        method=method,
        confidence=confidence,
    )
    return Difference(metric=metric, a=names[0], b=names[1], estimate=est, excludes_zero=low > 0 or high < 0)


# --- Vendi score -------------------------------------------------------------------------------------


def _entropy_exp(ev: np.ndarray) -> float:
    ev = ev[ev > 1e-12]
    ev = ev / ev.sum()
    return float(math.exp(-(ev * np.log(ev)).sum()))


def _vendi_of(x: np.ndarray) -> float:
    """exp(entropy of the eigenvalues of K/n), K = cosine kernel of unit rows; uses whichever of the
    n x n kernel and the d x d dual is smaller (same non-zero spectrum)."""
    n = x.shape[0]
    gram = (x @ x.T) if n <= x.shape[1] else (x.T @ x)
    return _entropy_exp(np.linalg.eigvalsh(gram / n))


class _WeightedVendi:
    """The Vendi score of a bootstrap resample from its item counts w, without copying the resample:
    the resample's kernel has the non-zero spectrum of X^T diag(w) X (d x d) or, when n <= d, of
    diag(sqrt w) X X^T diag(sqrt w) (n x n), both exact."""

    def __init__(self, x: np.ndarray) -> None:
        self.n, d = x.shape
        self.dual = self.n > d
        self.x32 = x.astype(np.float32)  # the gram in float32: ~2x faster, spectrum good to ~1e-6
        self.kernel = None if self.dual else x @ x.T

    def __call__(self, w: np.ndarray) -> float:
        if self.dual:
            gram = ((self.x32 * w[:, None].astype(np.float32)).T @ self.x32).astype(float)
        else:
            assert self.kernel is not None
            s = np.sqrt(w)
            gram = s[:, None] * self.kernel * s[None, :]
        return _entropy_exp(np.linalg.eigvalsh(gram / self.n))


# Past this many items the interval comes from the delta method (one pass) instead of 200 resamples of
# an n x d^2 product (1.65 s of a 400-sample build's finish). It is also the better interval there: on
# MiniLM embeddings of 6,000 docstrings and on a 15-cluster pool (60 independent draws per n), the delta
# method's SE was 0.80-1.01 of the true sampling error at n = 200-400, while the basic bootstrap's
# half-width was 3.3-8.6 times it (resampling with replacement duplicates items, which lowers Vendi).
# At n = 100 the delta SE fell to 0.69 of the truth: below this size the (conservative) bootstrap stays.
VENDI_BOOTSTRAP_MAX_N = 200
DELTA_ROWS = 2048  # rows per block of the delta method's passes (2048 x 384 float64: 6 MB)


def vendi_delta_se(x: np.ndarray) -> tuple[float, float]:
    """(Vendi score, its standard error) by the delta method. The score is a smooth function of the
    mean C = sum_i x_i x_i^T / n, so its influence function gives the error: with p = eigenvalues of
    C over tr C, eigenvectors v_k and H = entropy(p), item i moves H by
    -(1/tr C) [sum_k log p_k ((v_k . x_i)^2 - lambda_k) + H (|x_i|^2 - tr C)], and VS = exp(H)."""
    n = x.shape[0]
    step = max(1, DELTA_ROWS)
    # in row blocks, each in float64: x may be float32, and n x d temporaries of 20k rows are 61 MB each
    d = x.shape[1]
    gram = np.zeros((d, d))
    for i in range(0, n, step):
        b = x[i : i + step].astype(np.float64)
        gram += b.T @ b
    lam, vecs = np.linalg.eigh(gram / n)
    keep = lam > 1e-12 * max(lam.max(), 1e-300)
    lam, vecs = lam[keep], vecs[:, keep]
    tr = float(lam.sum())
    p = lam / tr
    h = float(-(p * np.log(p)).sum())
    log_p = np.log(p)
    infl = np.empty(n)
    for i in range(0, n, step):
        b = x[i : i + step].astype(np.float64)
        proj = (b @ vecs) ** 2  # (v_k . x_i)^2
        infl[i : i + step] = -((proj - lam) @ log_p + h * ((b * b).sum(axis=1) - tr)) / tr
    value = math.exp(h)
    return value, value * float(np.sqrt((infl**2).sum())) / n


def vendi(
    x: Any,
    *,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    confidence: float = CONFIDENCE,
    min_n: int = MIN_PER_CLASS,
    bootstrap_max_n: int = VENDI_BOOTSTRAP_MAX_N,
) -> Estimate:
    """Vendi score of unit-norm embeddings (rows) with a bootstrap interval over items (a delta-method
    interval past `bootstrap_max_n` items)."""
    from threadpoolctl import threadpool_limits

    xx = np.asarray(x)  # integer rows too: both paths below work in float64
    n = xx.shape[0]
    method = f"bootstrap basic ({n_resamples} resamples, seed {seed})"
    if n > bootstrap_max_n and n >= min_n:
        value, se = vendi_delta_se(xx)  # float32 rows too: it sums them in float64 blocks
        z = normal_quantile(0.5 + confidence / 2)
        return Estimate(
            metric="vendi_score",
            value=value,
            low=max(1.0, value - z * se),
            high=min(float(n), value + z * se),
            n=n,
            method=f"delta method (influence function; more than {bootstrap_max_n} items)",
            confidence=confidence,
        )
    if n < min_n:
        return Estimate(
            metric="vendi_score",
            value=None,
            n=n,
            method=method,
            insufficient=True,
            reason=f"insufficient: {n} items < {min_n}",
        )
    xx = xx.astype(float)  # at most bootstrap_max_n rows here
    weighted = _WeightedVendi(xx)

    def stat(idx: Any, axis: int = -1) -> Any:
        rows = np.asarray(idx).reshape(-1, n)
        out = [weighted(np.bincount(r, minlength=n).astype(float)) for r in rows]
        return np.array(out).reshape(np.shape(idx)[:-1]) if np.ndim(idx) > 1 else out[0]

    # One BLAS thread: hundreds of small eigendecompositions only contend for cores (measured 13x
    # slower with OpenBLAS's threads on a busy 2-core machine).
    with threadpool_limits(limits=1, user_api="blas"):
        value = _vendi_of(xx)
        low, high = _bootstrap(
            [np.arange(n)], stat, n_resamples=n_resamples, seed=seed, confidence=confidence, method="basic"
        )
    return Estimate(
        metric="vendi_score",
        value=value,
        # clipped to the possible range [1, n] and made to contain the estimate: with very spread
        # items the resampling bias is large and the reflected bounds can overshoot
        low=max(1.0, min(low, value)),
        high=min(float(n), max(high, value)),
        n=n,
        method=method,
        confidence=confidence,
    )


def item_estimate(
    metric: str,
    n: int,
    fn: Callable[[np.ndarray], float],
    *,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    confidence: float = CONFIDENCE,
    min_n: int = MIN_PER_CLASS,
) -> Estimate:
    """A statistic of n items (`fn(indices) -> float`) with a percentile bootstrap interval over
    items; below `min_n` items it is withheld as insufficient."""
    method = f"bootstrap percentile over items ({n_resamples} resamples, seed {seed})"
    if n < min_n:
        reason = f"insufficient: {n} items < {min_n}"
        return Estimate(metric=metric, value=None, n=n, method=method, insufficient=True, reason=reason)

    def stat(idx: Any, axis: int = -1) -> Any:
        idx = np.asarray(idx)
        if idx.ndim == 1:
            return fn(idx)
        rows = idx.reshape(-1, idx.shape[-1])
        return np.array([fn(row) for row in rows]).reshape(idx.shape[:-1])

    value = float(fn(np.arange(n)))
    low, high = _bootstrap([np.arange(n)], stat, n_resamples=n_resamples, seed=seed, confidence=confidence)
    return Estimate(
        metric=metric,
        value=value,
        low=min(low, value),
        high=max(high, value),
        n=n,
        method=method,
        confidence=confidence,
    )


# --- formatting --------------------------------------------------------------------------------------


def fmt_estimate(est: Estimate | dict[str, Any] | None, digits: int = 2) -> str:
    """`0.71 [0.64, 0.78], n=412`; `insufficient (unsafe 3, safe 10), n=13`; `n/a` for None.
    Accepts an Estimate or its JSON dict (as read back from score.json / the ledger)."""
    if est is None:
        return "n/a"
    e = est if isinstance(est, Estimate) else Estimate.model_validate(est)
    if e.value is None:
        counts = ", ".join(f"{k} {v}" for k, v in e.n_per_class.items())
        word = "undefined" if e.reason and e.reason.startswith("undefined") else "insufficient"
        return f"{word}{f' ({counts})' if counts else ''}, n={e.n}"
    if e.low is None or e.high is None:
        return f"{e.value:.{digits}f}, n={e.n}"
    return f"{e.value:.{digits}f} [{e.low:.{digits}f}, {e.high:.{digits}f}], n={e.n}"


def fmt_difference(d: Difference | dict[str, Any], digits: int = 2) -> str:
    """`ours - vlguard: +0.06 [0.01, 0.11], n=412 (excludes 0)`."""
    dd = d if isinstance(d, Difference) else Difference.model_validate(d)
    e = dd.estimate
    if e.value is None:
        return f"{dd.a} - {dd.b}: {fmt_estimate(e, digits)}"
    verdict = "excludes 0" if dd.excludes_zero else "includes 0"
    return (
        f"{dd.a} - {dd.b}: {e.value:+.{digits}f} [{e.low:.{digits}f}, {e.high:.{digits}f}], "
        f"n={e.n} ({verdict})"
    )


# --- means over several benchmarks (the score headline and its matrix comparisons) --------------------


def mean_balanced_accuracy(
    ys: Sequence[Bools],
    preds: Sequence[Bools],
    preds_b: Sequence[Bools] | None = None,
    *,
    names: tuple[str, str] = ("a", "b"),
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> Estimate | Difference:
    """Mean balanced accuracy over several item sets (one per benchmark), every class of every set a
    stratum of one bootstrap. With `preds_b`: the paired difference a - b on the same items.
    The caller passes only sets that clear the per-class floor."""
    if not ys:
        est = Estimate(
            metric="mean_balanced_accuracy",
            value=None,
            n=0,
            insufficient=True,
            reason="no benchmark with enough items of both classes",
        )
        return (
            est
            if preds_b is None
            else Difference(
                metric="mean_balanced_accuracy", a=names[0], b=names[1], estimate=est, excludes_zero=None
            )
        )
    yy = [np.asarray(y, dtype=bool) for y in ys]
    pa = [np.asarray(p, dtype=bool) for p in preds]
    pb = [np.asarray(p, dtype=bool) for p in preds_b] if preds_b is not None else None
    groups = [g for y in yy for g in _strata(y)]

    def one(p: list[np.ndarray], idx: Sequence[Any]) -> Any:
        bas = [
            _ba(
                p[k][idx[2 * k]].sum(axis=-1),
                len(groups[2 * k]),
                (~p[k][idx[2 * k + 1]]).sum(axis=-1),
                len(groups[2 * k + 1]),
            )
            for k in range(len(p))
        ]
        return sum(bas) / len(bas)

    def stat(*idx: Any, axis: int = -1) -> Any:
        return one(pa, idx) if pb is None else one(pa, idx) - one(pb, idx)

    kind = "paired stratified" if pb is not None else "stratified"
    method = f"{kind} bootstrap percentile ({n_resamples} resamples, seed {seed}) over {len(yy)} sets"
    low, high = _bootstrap(groups, stat, n_resamples=n_resamples, seed=seed, confidence=confidence)
    est = Estimate(
        metric="mean_balanced_accuracy" + (" difference" if pb is not None else ""),
        value=float(stat(*groups)),
        low=low,
        high=high,
        n=sum(len(y) for y in yy),
        n_per_class={"positive": sum(int(y.sum()) for y in yy), "negative": sum(int((~y).sum()) for y in yy)},
        method=method,
        confidence=confidence,
    )
    if pb is None:
        return est
    return Difference(
        metric="mean_balanced_accuracy",
        a=names[0],
        b=names[1],
        estimate=est,
        excludes_zero=low > 0 or high < 0,
    )
