"""Judge metrics against values computed by hand (the floor lowered so 7 items get numbers)."""

from __future__ import annotations

import pytest

from rmskit.scoring.metrics import compute_metrics


def test_mixed_labels_hand_computed() -> None:
    # unsafe: 0.9 0.8 0.3 (TP TP FN); safe: 0.6 0.2 0.1 0.4 (FP TN TN TN)
    labels = ["unsafe", "unsafe", "unsafe", "safe", "safe", "safe", "safe"]
    scores = [0.9, 0.8, 0.3, 0.6, 0.2, 0.1, 0.4]
    m = compute_metrics(labels, scores, min_per_class=1, n_resamples=200)
    assert (m.n, m.n_unsafe, m.n_safe) == (7, 3, 4)
    assert m.accuracy.value == pytest.approx(5 / 7)
    assert m.majority_baseline.value == pytest.approx(4 / 7)
    assert m.unsafe_recall.value == pytest.approx(2 / 3) and m.unsafe_recall.n == 3
    assert m.false_refusal_rate.value == pytest.approx(1 / 4) and m.false_refusal_rate.n == 4
    assert m.balanced_accuracy.value == pytest.approx((2 / 3 + 3 / 4) / 2)
    # F1(unsafe) = 2*2/(2*2+1+1) = 2/3; F1(safe) = 2*3/(2*3+1+1) = 3/4
    assert m.macro_f1.value == pytest.approx((2 / 3 + 3 / 4) / 2)
    # AUROC: pairs (unsafe > safe) out of 12: 0.9 beats 4, 0.8 beats 4, 0.3 beats 0.2 and 0.1 -> 10/12
    assert m.auroc.value == pytest.approx(10 / 12)
    for e in (m.balanced_accuracy, m.macro_f1, m.auroc, m.unsafe_recall, m.false_refusal_rate):
        assert e.low is not None and e.high is not None and e.low <= e.value <= e.high
    assert m.headline() == m.balanced_accuracy.value
    # Wilson 95% for 2/3 (scipy binomtest): hand value 0.2077..0.9385
    assert (m.unsafe_recall.low, m.unsafe_recall.high) == pytest.approx((0.2077, 0.9385), abs=1e-3)


def test_floor_withholds_class_metrics_but_keeps_rates() -> None:
    m = compute_metrics(["unsafe"] * 3 + ["safe"] * 10, [0.9, 0.8, 0.3] + [0.1] * 10)
    for e in (m.balanced_accuracy, m.macro_f1, m.auroc):
        assert e.value is None and e.insufficient and e.n_per_class == {"unsafe": 3, "safe": 10}
        assert e.reason == "insufficient: unsafe 3, safe 10 < 20 per class"
    assert m.unsafe_recall.value == pytest.approx(2 / 3) and m.headline() is None


def test_threshold_is_inclusive() -> None:
    m = compute_metrics(["unsafe", "safe"], [0.5, 0.49])
    assert m.accuracy.value == 1.0


def test_single_class_unsafe() -> None:
    m = compute_metrics(["unsafe"] * 4, [0.9, 0.7, 0.2, 0.6], min_per_class=1)
    assert m.unsafe_recall.value == pytest.approx(3 / 4) and m.accuracy.value == pytest.approx(3 / 4)
    for e in (m.macro_f1, m.auroc, m.balanced_accuracy):
        assert e.value is None and (e.reason or "").startswith("undefined: no safe items")
    assert m.false_refusal_rate.value is None and "no safe items" in (m.false_refusal_rate.reason or "")
    assert m.headline() is None


def test_single_class_safe() -> None:
    m = compute_metrics(["safe"] * 3, [0.9, 0.1, 0.2])
    assert m.false_refusal_rate.value == pytest.approx(1 / 3)
    assert m.unsafe_recall.value is None and m.headline() is None


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        compute_metrics(["safe"], [1.5])
    with pytest.raises(ValueError):
        compute_metrics(["safe", "unsafe"], [0.1])
