"""Fraud-detection metrics that stay honest under heavy class imbalance.

With 1 % fraud, a model that never flags anything is 99 % accurate, so accuracy
is only ever reported beside that all-negative baseline.  The headline numbers
are threshold-free ranking metrics (AUPRC, ROC AUC) and operating-point metrics
that match how fraud teams work: recall at a fixed false-positive budget
(analysts can review only so many alerts) and precision in the top-k alerts.

Conventions: higher scores mean more suspicious; a row is flagged when
``score >= threshold``; tied scores are always flagged together (a threshold
cannot split a tie), and :func:`precision_at_k` averages over tie orders.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from consortium.errors import DataError, param_error

logger = logging.getLogger(__name__)

__all__ = [
    "FraudMetrics",
    "choose_threshold",
    "evaluate_scores",
    "precision_at_k",
    "recall_at_fpr",
]

# Slack for comparing float FPRs (fp / n_neg) with a budget such as 0.01.
_FPR_TOL = 1e-12


@dataclass(frozen=True)
class FraudMetrics:
    """Evaluation of fraud scores on one labelled dataset.

    Attributes
    ----------
    auprc : float
        Average precision (area under the precision-recall curve); its
        no-skill value is the positive rate.  NaN if ``y`` has one class.
    roc_auc : float
        Area under the ROC curve; NaN if ``y`` has one class.
    recall_at_1pct_fpr : float
        Highest recall with false-positive rate <= 1 %; NaN if one class.
    precision_at_k : float
        Precision among the ``k`` highest scores.
    k : int
        The ``k`` used.
    threshold : float or None
        Operating threshold, if one was given.
    precision_at_threshold, recall_at_threshold, fpr_at_threshold : float
        Operating-point metrics; NaN without a threshold or when undefined
        (nothing flagged, no positives, no negatives).
    accuracy : float
        Accuracy at the threshold (NaN without one); meaningful only beside
        ``all_negative_accuracy``.
    all_negative_accuracy : float
        Accuracy of flagging nothing, i.e. the negative rate.
    n : int
        Rows evaluated.
    positives : int
        Rows labelled 1.
    """

    auprc: float
    roc_auc: float
    recall_at_1pct_fpr: float
    precision_at_k: float
    k: int
    threshold: float | None
    precision_at_threshold: float
    recall_at_threshold: float
    fpr_at_threshold: float
    accuracy: float
    all_negative_accuracy: float
    n: int
    positives: int

    def as_dict(self) -> dict[str, float]:
        """All fields as floats (``threshold`` None becomes NaN), e.g. for logging."""
        return {
            key: (math.nan if value is None else float(value))
            for key, value in asdict(self).items()
        }


def _check_inputs(y: object, scores: object, owner: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate labels and scores; return them as int64 and float64 arrays."""
    y_arr = np.asarray(y)
    s_arr = np.asarray(scores)
    if y_arr.ndim != 1 or y_arr.dtype.kind not in "biuf":
        raise DataError(
            f"The 'y' parameter of {owner} must be a 1-D numeric array of 0/1 labels. "
            f"Got shape {y_arr.shape} and dtype {y_arr.dtype} instead."
        )
    if s_arr.ndim != 1 or s_arr.dtype.kind not in "biuf":
        raise DataError(
            f"The 'scores' parameter of {owner} must be a 1-D numeric array. "
            f"Got shape {s_arr.shape} and dtype {s_arr.dtype} instead."
        )
    if s_arr.shape[0] != y_arr.shape[0]:
        raise DataError(
            f"The 'scores' parameter of {owner} must have the length of 'y' ({y_arr.shape[0]}). "
            f"Got length {s_arr.shape[0]} instead."
        )
    if y_arr.shape[0] == 0:
        raise DataError(f"The 'y' parameter of {owner} must not be empty. Got 0 rows instead.")
    if not np.all((y_arr == 0) | (y_arr == 1)):
        bad = np.unique(y_arr[(y_arr != 0) & (y_arr != 1)])[:5]
        raise DataError(
            f"The 'y' parameter of {owner} must hold only 0 and 1. "
            f"Got values {bad.tolist()} instead."
        )
    s_arr = s_arr.astype(np.float64, copy=False)
    if not np.all(np.isfinite(s_arr)):
        bad_idx = np.flatnonzero(~np.isfinite(s_arr))
        raise DataError(
            f"The 'scores' parameter of {owner} must hold finite values. Got "
            f"{bad_idx.size} NaN/inf values (first at index {int(bad_idx[0])}) instead."
        )
    return y_arr.astype(np.int64, copy=False), s_arr


def _check_fpr(max_fpr: object, owner: str) -> float:
    if (
        isinstance(max_fpr, bool)
        or not isinstance(max_fpr, int | float | np.floating)
        or not 0.0 <= float(max_fpr) <= 1.0
    ):
        raise param_error("max_fpr", owner, "a float in [0, 1]", max_fpr)
    return float(max_fpr)


def _single_class(y: np.ndarray) -> bool:
    positives = int(y.sum())
    return positives == 0 or positives == y.shape[0]


def _best_roc_point(y: np.ndarray, scores: np.ndarray, max_fpr: float) -> tuple[float, float]:
    """(recall, threshold) of the highest threshold reaching max recall at FPR <= max_fpr.

    ``roc_curve`` puts one point per distinct score, so tied scores are never
    split; its first point (threshold ``inf``) flags nothing.
    """
    fpr, tpr, thresholds = roc_curve(y, scores, drop_intermediate=False)
    allowed = fpr <= max_fpr + _FPR_TOL
    masked_tpr = np.where(allowed, tpr, -1.0)
    best = int(np.argmax(masked_tpr))  # first = highest threshold among the maxima
    return float(tpr[best]), float(thresholds[best])


def recall_at_fpr(y: np.ndarray, scores: np.ndarray, *, max_fpr: float = 0.01) -> float:
    """Highest recall reachable with false-positive rate <= ``max_fpr``.

    Returns NaN (with a logged warning) when ``y`` holds a single class.
    """
    owner = "recall_at_fpr"
    max_fpr = _check_fpr(max_fpr, owner)
    y_arr, s_arr = _check_inputs(y, scores, owner)
    if _single_class(y_arr):
        logger.warning("%s: labels hold a single class; recall at FPR is undefined (NaN)", owner)
        return math.nan
    return _best_roc_point(y_arr, s_arr, max_fpr)[0]


def precision_at_k(y: np.ndarray, scores: np.ndarray, *, k: int) -> float:
    """Fraction of positives among the ``k`` highest-scored rows.

    When the ``k``-th score is tied with rows beyond ``k``, the tied group counts
    with its average positive rate (the expectation over random tie orders), so
    the result does not depend on row order.
    """
    owner = "precision_at_k"
    y_arr, s_arr = _check_inputs(y, scores, owner)
    n = y_arr.shape[0]
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= n:
        raise param_error("k", owner, f"an integer in [1, {n}] (the number of rows)", k)
    kth_score = np.sort(s_arr)[::-1][int(k) - 1]
    above = s_arr > kth_score
    tied = s_arr == kth_score
    n_needed = int(k) - int(np.count_nonzero(above))
    expected_tp = float(y_arr[above].sum()) + n_needed * float(y_arr[tied].mean())
    return expected_tp / int(k)


def choose_threshold(y_val: np.ndarray, scores_val: np.ndarray, *, max_fpr: float = 0.01) -> float:
    """Threshold with the highest validation recall at FPR <= ``max_fpr``.

    Among thresholds with equal recall the highest (fewest false positives) is
    taken.  If no threshold flags any positive within the budget, a value just
    above the highest validation score is returned (flag nothing), with a
    warning.  Apply as ``score >= threshold``.

    Raises
    ------
    DataError
        When ``y_val`` lacks either class (the FPR or recall is undefined).
    """
    owner = "choose_threshold"
    max_fpr = _check_fpr(max_fpr, owner)
    y_arr, s_arr = _check_inputs(y_val, scores_val, owner)
    if _single_class(y_arr):
        raise DataError(
            f"The 'y_val' parameter of {owner} must contain both classes to choose a "
            f"threshold. Got only label {int(y_arr[0])} instead."
        )
    recall, threshold = _best_roc_point(y_arr, s_arr, max_fpr)
    if not math.isfinite(threshold):
        threshold = float(np.nextafter(s_arr.max(), np.inf))
        logger.warning(
            "%s: no threshold reaches any recall at FPR <= %g; returning %r (flags nothing)",
            owner,
            max_fpr,
            threshold,
        )
    logger.debug("%s: threshold %r gives validation recall %.4f", owner, threshold, recall)
    return threshold


def evaluate_scores(
    y: np.ndarray,
    scores: np.ndarray,
    *,
    threshold: float | None = None,
    k: int | None = None,
) -> FraudMetrics:
    """Compute :class:`FraudMetrics` for scores against 0/1 labels.

    Parameters
    ----------
    y : np.ndarray
        0/1 labels ``(n,)``.
    scores : np.ndarray
        Finite scores ``(n,)``, higher = more suspicious.
    threshold : float, optional
        Operating threshold (e.g. from :func:`choose_threshold`) for the
        ``*_at_threshold`` metrics and accuracy.
    k : int, optional
        Alert budget for precision@k; defaults to the number of positives (at
        least 1), where precision@k equals R-precision.
    """
    owner = "evaluate_scores"
    y_arr, s_arr = _check_inputs(y, scores, owner)
    n = int(y_arr.shape[0])
    positives = int(y_arr.sum())
    negatives = n - positives
    if k is None:
        k = max(1, positives)
    if threshold is not None and (
        isinstance(threshold, bool)
        or not isinstance(threshold, int | float | np.floating)
        or math.isnan(float(threshold))
    ):
        raise param_error("threshold", owner, "None or a number", threshold)

    if _single_class(y_arr):
        logger.warning(
            "%s: labels hold a single class (%d positives of %d); AUPRC, ROC AUC and "
            "recall at 1%% FPR are undefined (NaN)",
            owner,
            positives,
            n,
        )
        auprc = roc_auc = recall_1pct = math.nan
    else:
        auprc = float(average_precision_score(y_arr, s_arr))
        roc_auc = float(roc_auc_score(y_arr, s_arr))
        recall_1pct = _best_roc_point(y_arr, s_arr, 0.01)[0]

    p_at_k = precision_at_k(y_arr, s_arr, k=k)

    precision_t = recall_t = fpr_t = accuracy = math.nan
    if threshold is not None:
        threshold = float(threshold)
        flagged = s_arr >= threshold
        tp = int(np.count_nonzero(flagged & (y_arr == 1)))
        fp = int(np.count_nonzero(flagged & (y_arr == 0)))
        tn = negatives - fp
        precision_t = tp / (tp + fp) if tp + fp else math.nan
        recall_t = tp / positives if positives else math.nan
        fpr_t = fp / negatives if negatives else math.nan
        accuracy = (tp + tn) / n

    return FraudMetrics(
        auprc=auprc,
        roc_auc=roc_auc,
        recall_at_1pct_fpr=recall_1pct,
        precision_at_k=p_at_k,
        k=int(k),
        threshold=threshold,
        precision_at_threshold=precision_t,
        recall_at_threshold=recall_t,
        fpr_at_threshold=fpr_t,
        accuracy=accuracy,
        all_negative_accuracy=negatives / n,
        n=n,
        positives=positives,
    )
