"""Tests for consortium.models.metrics against hand-computed small examples."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, roc_auc_score

from consortium.errors import ConfigError, DataError
from consortium.models import (
    FraudMetrics,
    choose_threshold,
    evaluate_scores,
    precision_at_k,
    recall_at_fpr,
)

# 4 positives, 10 negatives.  A negative is tied with two positives at 0.8.
Y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
S = np.array([0.9, 0.8, 0.8, 0.3, 0.8, 0.5, 0.4, 0.25, 0.2, 0.15, 0.1, 0.05, 0.02, 0.01])


def brute_force_recall(y: np.ndarray, scores: np.ndarray, max_fpr: float) -> float:
    """Max recall over every threshold 'score >= t' whose FPR is within budget."""
    best = 0.0
    for t in np.unique(scores):
        flagged = scores >= t
        fpr = np.sum(flagged & (y == 0)) / np.sum(y == 0)
        if fpr <= max_fpr + 1e-12:
            best = max(best, np.sum(flagged & (y == 1)) / np.sum(y == 1))
    return float(best)


def test_recall_at_fpr_by_hand_with_ties() -> None:
    # One false positive allowed (10 %): the 0.8 tie group brings 2 positives + 1 negative.
    assert recall_at_fpr(Y, S, max_fpr=0.1) == pytest.approx(0.75)
    # No false positive allowed: the tie cannot be split, only the 0.9 row counts.
    assert recall_at_fpr(Y, S, max_fpr=0.0) == pytest.approx(0.25)
    # Two negatives allowed: down to 0.5 -> still 3 positives; 0.4 would be a third negative.
    assert recall_at_fpr(Y, S, max_fpr=0.25) == pytest.approx(0.75)
    # Three negatives allowed: down to 0.3 (negatives 0.8, 0.5, 0.4) -> all 4 positives.
    assert recall_at_fpr(Y, S, max_fpr=0.3) == pytest.approx(1.0)
    assert recall_at_fpr(Y, S, max_fpr=1.0) == pytest.approx(1.0)


def test_a_top_tie_with_a_negative_gives_zero_recall_at_zero_fpr() -> None:
    y = np.array([1, 0, 0, 0])
    scores = np.array([0.7, 0.7, 0.1, 0.0])
    assert recall_at_fpr(y, scores, max_fpr=0.0) == 0.0
    # Row order does not matter.
    assert recall_at_fpr(y[::-1], scores[::-1], max_fpr=0.0) == 0.0


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 1), st.integers(0, 6)), min_size=2, max_size=40),
    st.sampled_from([0.0, 0.05, 0.1, 0.25, 0.5]),
)
def test_recall_at_fpr_matches_brute_force(pairs: list[tuple[int, int]], max_fpr: float) -> None:
    y = np.array([p[0] for p in pairs])
    scores = np.array([p[1] for p in pairs], dtype=float)  # few values: many ties
    if y.min() == y.max():
        assert math.isnan(recall_at_fpr(y, scores, max_fpr=max_fpr))
        return
    assert recall_at_fpr(y, scores, max_fpr=max_fpr) == pytest.approx(
        brute_force_recall(y, scores, max_fpr)
    )


def test_precision_at_k_by_hand() -> None:
    y = np.array([1, 0, 1, 0])
    scores = np.array([0.9, 0.8, 0.7, 0.1])
    assert precision_at_k(y, scores, k=1) == 1.0
    assert precision_at_k(y, scores, k=2) == 0.5
    assert precision_at_k(y, scores, k=3) == pytest.approx(2 / 3)
    assert precision_at_k(y, scores, k=4) == 0.5


def test_precision_at_k_averages_over_boundary_ties() -> None:
    y = np.array([1, 1, 0, 0, 1])
    scores = np.array([0.9, 0.5, 0.5, 0.5, 0.1])
    # One positive above the tie, one more row drawn from {1, 0, 0}: (1 + 1/3) / 2.
    assert precision_at_k(y, scores, k=2) == pytest.approx(2 / 3)
    order = np.array([3, 1, 4, 0, 2])
    assert precision_at_k(y[order], scores[order], k=2) == pytest.approx(2 / 3)


def test_precision_at_k_validates_k() -> None:
    with pytest.raises(ConfigError, match=r"'k' parameter of precision_at_k.*\[1, 14\]"):
        precision_at_k(Y, S, k=15)
    with pytest.raises(ConfigError, match="'k'"):
        precision_at_k(Y, S, k=0)


def test_choose_threshold_by_hand() -> None:
    assert choose_threshold(Y, S, max_fpr=0.1) == 0.8
    assert choose_threshold(Y, S, max_fpr=0.0) == 0.9
    # Recall 0.75 is reached at 0.8 and at 0.5 within budget: the highest threshold wins.
    assert choose_threshold(Y, S, max_fpr=0.25) == 0.8
    assert choose_threshold(Y, S, max_fpr=0.3) == 0.3


def test_choose_threshold_respects_the_fpr_budget_on_validation_data() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random(3000) < 0.05).astype(np.int64)
    scores = rng.normal(size=3000) + 1.5 * y
    scores = np.round(scores, 1)  # ties
    for max_fpr in (0.0, 0.01, 0.05, 0.2):
        threshold = choose_threshold(y, scores, max_fpr=max_fpr)
        metrics = evaluate_scores(y, scores, threshold=threshold)
        assert metrics.fpr_at_threshold <= max_fpr
        assert metrics.recall_at_threshold == pytest.approx(
            recall_at_fpr(y, scores, max_fpr=max_fpr)
        )


def test_choose_threshold_flags_nothing_when_no_recall_fits(
    caplog: pytest.LogCaptureFixture,
) -> None:
    y = np.array([1, 0, 0, 0])
    scores = np.array([0.7, 0.7, 0.1, 0.0])
    with caplog.at_level(logging.WARNING, logger="consortium.models.metrics"):
        threshold = choose_threshold(y, scores, max_fpr=0.0)
    assert threshold > 0.7 and math.isfinite(threshold)
    assert "flags nothing" in caplog.text
    assert evaluate_scores(y, scores, threshold=threshold).fpr_at_threshold == 0.0


def test_choose_threshold_needs_both_classes() -> None:
    with pytest.raises(DataError, match="'y_val' parameter of choose_threshold.*both classes"):
        choose_threshold(np.zeros(5), np.arange(5.0))


def test_evaluate_scores_by_hand() -> None:
    metrics = evaluate_scores(Y, S, threshold=0.8)
    assert isinstance(metrics, FraudMetrics)
    assert (metrics.n, metrics.positives, metrics.k) == (14, 4, 4)
    # Flagged at >= 0.8: rows 0, 1, 2 (positives) and 4 (negative).
    assert metrics.precision_at_threshold == pytest.approx(3 / 4)
    assert metrics.recall_at_threshold == pytest.approx(3 / 4)
    assert metrics.fpr_at_threshold == pytest.approx(1 / 10)
    assert metrics.accuracy == pytest.approx((3 + 9) / 14)
    assert metrics.all_negative_accuracy == pytest.approx(10 / 14)
    # Top 4: 0.9 (pos) + 3 of the 0.8 tie {pos, pos, neg} -> exactly 3 positives.
    assert metrics.precision_at_k == pytest.approx(3 / 4)
    assert metrics.recall_at_1pct_fpr == pytest.approx(0.25)
    assert metrics.auprc == pytest.approx(average_precision_score(Y, S))
    assert metrics.roc_auc == pytest.approx(roc_auc_score(Y, S))


def test_evaluate_scores_without_threshold_and_as_dict() -> None:
    metrics = evaluate_scores(Y, S, k=2)
    assert metrics.threshold is None
    assert math.isnan(metrics.accuracy) and math.isnan(metrics.precision_at_threshold)
    assert metrics.precision_at_k == pytest.approx(0.5 * (1 + 2 / 3))
    as_dict = metrics.as_dict()
    assert set(as_dict) == {f for f in FraudMetrics.__dataclass_fields__}
    assert all(isinstance(v, float) for v in as_dict.values())
    assert math.isnan(as_dict["threshold"]) and as_dict["k"] == 2.0


def test_nothing_flagged_gives_nan_precision() -> None:
    metrics = evaluate_scores(Y, S, threshold=5.0)
    assert math.isnan(metrics.precision_at_threshold)
    assert metrics.recall_at_threshold == 0.0 and metrics.fpr_at_threshold == 0.0
    assert metrics.accuracy == metrics.all_negative_accuracy


def test_single_class_gives_nan_and_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    y = np.zeros(6, dtype=np.int64)
    scores = np.linspace(0, 1, 6)
    with caplog.at_level(logging.WARNING, logger="consortium.models.metrics"):
        metrics = evaluate_scores(y, scores, threshold=0.5)
    assert math.isnan(metrics.auprc) and math.isnan(metrics.roc_auc)
    assert math.isnan(metrics.recall_at_1pct_fpr)
    assert math.isnan(metrics.recall_at_threshold)
    assert metrics.fpr_at_threshold == pytest.approx(3 / 6)
    assert metrics.k == 1 and metrics.precision_at_k == 0.0
    assert "single class" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="consortium.models.metrics"):
        all_positive = evaluate_scores(np.ones(3), np.array([0.1, 0.2, 0.3]))
    assert math.isnan(all_positive.auprc) and all_positive.precision_at_k == 1.0
    assert math.isnan(recall_at_fpr(np.ones(3), np.array([0.1, 0.2, 0.3])))
    assert "single class" in caplog.text


def test_bad_inputs_name_the_field() -> None:
    with pytest.raises(
        DataError, match=r"'scores' parameter of evaluate_scores.*length of 'y' \(14\)"
    ):
        evaluate_scores(Y, S[:-1])
    with pytest.raises(DataError, match=r"'scores' parameter of recall_at_fpr.*first at index 2"):
        recall_at_fpr(Y, np.where(np.arange(14) == 2, np.nan, S))
    with pytest.raises(DataError, match=r"'y' parameter of precision_at_k.*only 0 and 1"):
        precision_at_k(np.array([0, 2, 1]), np.array([0.1, 0.2, 0.3]), k=1)
    with pytest.raises(DataError, match="'y' parameter of evaluate_scores must not be empty"):
        evaluate_scores(np.array([]), np.array([]))
    with pytest.raises(DataError, match="'scores' parameter .* 1-D"):
        evaluate_scores(Y, S.reshape(2, 7))
    with pytest.raises(ConfigError, match="'max_fpr' parameter of recall_at_fpr"):
        recall_at_fpr(Y, S, max_fpr=1.5)
    with pytest.raises(ConfigError, match="'threshold' parameter of evaluate_scores"):
        evaluate_scores(Y, S, threshold=math.nan)
