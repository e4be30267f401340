"""Local adaptation without retraining: move the decision threshold, not the model.

When the score distribution shifts (customers spend more, a new terminal
network), a fixed threshold silently changes how many alerts an institution's
analysts receive and how many of them are real.  :class:`ThresholdRecalibrator`
keeps a sliding window of recent scores (and of labelled scores, when delayed
labels arrive) at the institution and recomputes the threshold so that

* the **alert rate** stays at its target (unlabelled: a quantile of recent scores), or
* the **precision** stays at its target (labelled: the lowest threshold whose
  precision on recent labelled rows reaches the target, i.e. the most recall
  the target allows).

Nothing leaves the institution: the window lives in the node or edge agent.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from consortium.errors import param_error

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recalibration:
    """One threshold change (also what goes into an ``Event(event="recalibrated")``)."""

    old: float
    new: float
    basis: str
    """``"alert_rate"`` or ``"precision"``."""
    rows: int


def _check_share(value: object, name: str, owner: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 < float(value) < 1.0:
        raise param_error(name, owner, "None or a float in (0, 1)", value)
    return float(value)


def _check_count(value: object, name: str, owner: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise param_error(name, owner, f"an int >= {low}", value)
    return value


def precision_threshold(scores: np.ndarray, y: np.ndarray, *, target_precision: float, min_alerts: int = 5) -> float:
    """Lowest threshold whose precision on ``(scores, y)`` is at least ``target_precision``.

    Returns NaN when no threshold with at least ``min_alerts`` alerts reaches the target.
    """
    order = np.argsort(-scores, kind="stable")
    s, lab = scores[order], y[order].astype(np.float64)
    tp = np.cumsum(lab)
    k = np.arange(1, s.size + 1)
    precision = tp / k
    # Only cut between distinct scores: ties alert together.
    last_of_tie = np.r_[s[1:] != s[:-1], True]
    ok = (precision >= target_precision) & (k >= min_alerts) & last_of_tie
    if not ok.any():
        return math.nan
    return float(s[np.flatnonzero(ok)[-1]])


class ThresholdRecalibrator:
    """Keep an institution's alert rate or alert precision at a target as scores move.

    Parameters
    ----------
    target_alert_rate : float, optional
        Share of transactions to alert on (e.g. the rate the deployed threshold
        gave on its validation rows).
    target_precision : float, optional
        Alert precision to hold once labelled rows exist; takes precedence over
        the alert rate when enough labelled alerts are in the window.
    window : int
        Recent scores kept for the alert-rate quantile.
    labelled_window : int
        Recent labelled rows kept for the precision target.
    min_rows : int
        Scores needed before the alert-rate target is applied.
    min_labelled_alerts : int
        Positive labels needed in the labelled window before the precision target applies.

    Notes
    -----
    At least one target must be given.  Without enough data,
    :meth:`threshold` returns the default it is given (the bundle's threshold).
    """

    def __init__(
        self,
        *,
        target_alert_rate: float | None = None,
        target_precision: float | None = None,
        window: int = 20_000,
        labelled_window: int = 50_000,
        min_rows: int = 1_000,
        min_labelled_alerts: int = 20,
    ) -> None:
        owner = "ThresholdRecalibrator"
        self.target_alert_rate = _check_share(target_alert_rate, "target_alert_rate", owner)
        self.target_precision = _check_share(target_precision, "target_precision", owner)
        if self.target_alert_rate is None and self.target_precision is None:
            raise param_error("target_alert_rate", owner, "given (or target_precision given)", None)
        self.window = _check_count(window, "window", owner, 10)
        self.min_rows = _check_count(min_rows, "min_rows", owner, 10)
        self.min_labelled_alerts = _check_count(min_labelled_alerts, "min_labelled_alerts", owner, 1)
        self._scores: deque[float] = deque(maxlen=self.window)
        self._labelled: deque[tuple[float, int]] = deque(maxlen=_check_count(labelled_window, "labelled_window",
                                                                              owner, 10))
        self._current: float | None = None
        self._basis = ""
        self.history: list[Recalibration] = []
        self.invalid = 0

    def observe(self, scores: np.ndarray | float) -> None:
        """Add scored rows (NaN/inf are counted in :attr:`invalid` and skipped)."""
        arr = np.atleast_1d(np.asarray(scores, dtype=np.float64))
        good = np.isfinite(arr)
        self.invalid += int((~good).sum())
        self._scores.extend(arr[good].tolist())

    def observe_labels(self, scores: np.ndarray, y: np.ndarray) -> None:
        """Add labelled rows (delayed labels joined to their scores)."""
        s = np.atleast_1d(np.asarray(scores, dtype=np.float64))
        lab = np.atleast_1d(np.asarray(y))
        if s.shape != lab.shape:
            raise param_error("y", "ThresholdRecalibrator.observe_labels", f"shape {s.shape}", lab.shape)
        good = np.isfinite(s) & np.isin(lab, (0, 1))
        self.invalid += int((~good).sum())
        self._labelled.extend(zip(s[good].tolist(), lab[good].astype(int).tolist(), strict=True))

    def recompute(self, default: float) -> float:
        """Recompute the threshold from the windows; record and return it."""
        new, basis, rows = math.nan, "", 0
        if self.target_precision is not None and self._labelled:
            arr = np.asarray(self._labelled, dtype=np.float64)
            if arr[:, 1].sum() >= self.min_labelled_alerts:
                new = precision_threshold(arr[:, 0], arr[:, 1], target_precision=self.target_precision)
                basis, rows = "precision", arr.shape[0]
        if not math.isfinite(new) and self.target_alert_rate is not None and len(self._scores) >= self.min_rows:
            scores = np.fromiter(self._scores, dtype=np.float64)
            new = float(np.quantile(scores, 1.0 - self.target_alert_rate, method="higher"))
            basis, rows = "alert_rate", scores.size
        if not math.isfinite(new):
            return self.threshold(default)
        old = self.threshold(default)
        if new != old:
            self.history.append(Recalibration(old=old, new=new, basis=basis, rows=rows))
            logger.info("threshold %.6g -> %.6g (%s, %d rows)", old, new, basis, rows)
        self._current, self._basis = new, basis
        return new

    def threshold(self, default: float) -> float:
        """The recalibrated threshold, or ``default`` until there was enough data."""
        return default if self._current is None else self._current

    def reset(self) -> None:
        """Forget windows and threshold (after a new model is deployed: its scores are on another scale)."""
        self._scores.clear()
        self._labelled.clear()
        self._current = None

    def summary(self) -> dict[str, float | str]:
        """Current state for telemetry."""
        out: dict[str, float | str] = {"recalibrations": float(len(self.history)), "basis": self._basis}
        if self._current is not None:
            out["threshold"] = self._current
        return out
