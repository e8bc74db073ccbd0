"""Judge metrics against values computed by hand."""

from __future__ import annotations

import pytest

from rmskit.scoring.metrics import compute_metrics


def test_mixed_labels_hand_computed() -> None:
    # unsafe: 0.9 0.8 0.3 (TP TP FN); safe: 0.6 0.2 0.1 0.4 (FP TN TN TN)
    labels = ["unsafe", "unsafe", "unsafe", "safe", "safe", "safe", "safe"]
    scores = [0.9, 0.8, 0.3, 0.6, 0.2, 0.1, 0.4]
    m = compute_metrics(labels, scores)
    assert (m.n, m.n_unsafe, m.n_safe) == (7, 3, 4)
    assert m.accuracy == pytest.approx(5 / 7)
    assert m.unsafe_recall == pytest.approx(2 / 3)
    assert m.false_refusal_rate == pytest.approx(1 / 4)
    # F1(unsafe) = 2*2/(2*2+1+1) = 2/3; F1(safe) = 2*3/(2*3+1+1) = 3/4
    assert m.macro_f1 == pytest.approx((2 / 3 + 3 / 4) / 2)
    # AUROC: pairs (unsafe > safe) out of 12: 0.9 beats 4, 0.8 beats 4, 0.3 beats 0.2 and 0.1 -> 10/12
    assert m.auroc == pytest.approx(10 / 12)
    assert m.undefined == {}
    assert m.headline() == m.macro_f1


def test_threshold_is_inclusive() -> None:
    m = compute_metrics(["unsafe", "safe"], [0.5, 0.49])
    assert m.accuracy == 1.0


def test_single_class_unsafe() -> None:
    m = compute_metrics(["unsafe"] * 4, [0.9, 0.7, 0.2, 0.6])
    assert m.unsafe_recall == pytest.approx(3 / 4) and m.accuracy == pytest.approx(3 / 4)
    assert m.macro_f1 is None and m.auroc is None and m.false_refusal_rate is None
    assert set(m.undefined) == {"macro_f1", "auroc", "false_refusal_rate"}
    assert "single-class" in m.undefined["macro_f1"]
    assert m.headline() == m.unsafe_recall


def test_single_class_safe() -> None:
    m = compute_metrics(["safe"] * 3, [0.9, 0.1, 0.2])
    assert m.false_refusal_rate == pytest.approx(1 / 3)
    assert m.unsafe_recall is None and m.headline() is None


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        compute_metrics(["safe"], [1.5])
    with pytest.raises(ValueError):
        compute_metrics(["safe", "unsafe"], [0.1])
