"""The edge agent's drift hook: one object the agent calls for every scored row.

The edge agent (issue 5, contract §3) calls, per scored row,
``monitor.observe(features, score)``; it puts ``monitor.summary()`` into each
``Telemetry.drift`` and asks ``monitor.threshold(default)`` for the decision
threshold.  :class:`DriftMonitor` is the real implementation:

* rows are buffered into windows of ``window`` rows; every full window is tested
  against the reference (feature PSI + KS, score PSI + KS);
* delayed labels (``record`` at scoring time, ``label`` when the chargeback
  feed delivers) drive the performance detectors;
* the threshold follows a :class:`ThresholdRecalibrator` when one is given;
* each tested window becomes a ``DriftReport`` and each status change or
  recalibration an ``Event``, handed to a publisher (the edge helper's
  ``MqttPublisher``; anything with ``publish(payload)``).

Nothing here ever raises into the agent's scoring loop: malformed rows,
windows that cannot be tested and publisher failures are counted and shown in
:meth:`summary`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from consortium.continual.errors import DriftInputError
from consortium.continual.feature_drift import (
    MIN_WINDOW_ROWS,
    FeatureDriftDetector,
    FeatureDriftResult,
    ScoreDriftDetector,
)
from consortium.continual.performance import DelayedLabelMonitor
from consortium.continual.recalibration import ThresholdRecalibrator
from consortium.edge.messages import DriftReport, Event
from consortium.errors import ConsortiumError, param_error

logger = logging.getLogger(__name__)

_LEVEL = {"unknown": -1, "ok": 0, "warning": 1, "drift": 2}


class Publisher(Protocol):
    """What the monitor needs of the edge publisher: ``publish(payload)``."""

    def publish(self, payload: Any) -> object: ...


@dataclass(frozen=True)
class WindowVerdict:
    """The combined verdict of one tested window."""

    status: str
    features: FeatureDriftResult
    scores: FeatureDriftResult
    alert_rate: float
    performance_drift: bool
    statistics: dict[str, float] = field(default_factory=dict)


class DriftMonitor:
    """Drift detection, recalibration and reporting for one edge agent.

    Parameters
    ----------
    reference_features : numpy.ndarray
        ``(n, d)`` raw (unstandardised) feature rows the model is known to work on.
    reference_scores : numpy.ndarray
        The model's scores on those rows.
    feature_names : sequence of str
        Names of the ``d`` features (bundle order).
    institution, agent : str
        Who reports (topic segments).
    model_version : str
        Version of the deployed bundle (in reports).
    window : int
        Rows per tested window (>= ``MIN_WINDOW_ROWS``).
    threshold : float, optional
        Deployed decision threshold (for the reported alert rate).
    recalibrator : ThresholdRecalibrator, optional
        Moves the threshold; recomputed after every window.
    labels : DelayedLabelMonitor, optional
        Performance drift on delayed labels (default: ADWIN).
    publisher : Publisher, optional
        Receives ``DriftReport`` and ``Event`` payloads.
    exclude : sequence of str
        Features not tested (e.g. calendar features for windows shorter than a week).
    clock : callable
        Seconds since the epoch (tests pass a fake clock).
    detector_options : dict, optional
        Extra keyword arguments for the feature and score detectors (``psi_threshold``, ``alpha``, ...).
    """

    def __init__(
        self,
        reference_features: np.ndarray,
        reference_scores: np.ndarray,
        *,
        feature_names: Sequence[str],
        institution: str,
        agent: str,
        model_version: str,
        window: int = 5_000,
        threshold: float | None = None,
        recalibrator: ThresholdRecalibrator | None = None,
        labels: DelayedLabelMonitor | None = None,
        publisher: Publisher | None = None,
        exclude: Sequence[str] = (),
        clock: Callable[[], float] = time.time,
        detector_options: dict[str, Any] | None = None,
    ) -> None:
        owner = "DriftMonitor"
        if isinstance(window, bool) or not isinstance(window, int) or window < MIN_WINDOW_ROWS:
            raise param_error("window", owner, f"an int >= {MIN_WINDOW_ROWS}", window)
        opts = dict(detector_options or {})
        self.features = FeatureDriftDetector(reference_features, feature_names=feature_names, exclude=exclude, **opts)
        self.scores = ScoreDriftDetector(reference_scores, threshold=threshold, **opts)
        self.institution, self.agent, self.model_version = institution, agent, model_version
        self.window = window
        self.recalibrator = recalibrator
        self.labels = labels if labels is not None else DelayedLabelMonitor()
        self.publisher = publisher
        self.clock = clock
        self._x: list[np.ndarray] = []
        self._s: list[float] = []
        self._status = "unknown"
        self._last: WindowVerdict | None = None
        self._windows = 0
        self._counts: dict[str, int] = {"invalid_rows": 0, "untestable_windows": 0, "publish_errors": 0}
        self._last_error = ""
        self._default_threshold = threshold

    # -- the agent's hooks ------------------------------------------------------------

    def observe(self, features: np.ndarray, score: float) -> None:
        """Add one scored row (called by the agent per row; never raises)."""
        try:
            row = np.array(features, dtype=np.float64).reshape(-1)  # a copy: the agent reuses its buffer
            ok = row.size == self.features.n_features and bool(np.isfinite(row).all()) and math.isfinite(score)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            self._counts["invalid_rows"] += 1
            return
        self._x.append(row)
        self._s.append(float(score))
        if self.recalibrator is not None:
            self.recalibrator.observe(float(score))
        if len(self._s) >= self.window:
            self._close_window()

    def observe_batch(self, features: np.ndarray, scores: np.ndarray) -> list[WindowVerdict]:
        """Add many rows at once (nodes and benchmarks); returns the verdicts of windows closed."""
        X = np.asarray(features, dtype=np.float64)
        s = np.asarray(scores, dtype=np.float64).reshape(-1)
        if X.ndim != 2 or X.shape != (s.size, self.features.n_features):
            raise DriftInputError(
                f"The 'features' of DriftMonitor.observe_batch must have shape ({s.size}, "
                f"{self.features.n_features}). Got {X.shape} instead."
            )
        good = np.isfinite(X).all(axis=1) & np.isfinite(s)
        self._counts["invalid_rows"] += int((~good).sum())
        X, s = X[good], s[good]
        if self.recalibrator is not None:
            self.recalibrator.observe(s)
        verdicts = []
        start = 0
        while start < s.size:
            take = min(self.window - len(self._s), s.size - start)
            self._x.extend(X[start : start + take])
            self._s.extend(s[start : start + take].tolist())
            start += take
            if len(self._s) >= self.window:
                v = self._close_window()
                if v is not None:
                    verdicts.append(v)
        return verdicts

    def flush(self) -> WindowVerdict | None:
        """Test the rows buffered so far as one window now (time-aligned windows, e.g. one per week).

        Returns None (and counts an untestable window) when too few rows are buffered.
        """
        if not self._s:
            return None
        return self._close_window()

    def record(self, transaction_id: Hashable, score: float, *, alerted: bool) -> None:
        """Remember a scored transaction for the delayed-label join."""
        self.labels.record(transaction_id, score, alerted=alerted)

    def label(self, transaction_id: Hashable, is_fraud: object) -> bool:
        """Join a delayed label (unknown ids are counted, never raised)."""
        used = self.labels.label(transaction_id, is_fraud)
        if used and self.labels.drift_active and self._status != "drift":
            # Report at once: performance drift is the strongest evidence and should not wait for a window.
            self._publish(DriftReport(msg_id="", institution=self.institution, agent=self.agent, ts=self.clock(),
                                      model_version=self.model_version, status="drift",
                                      statistics=_finite(self.labels.statistics())))
            self._set_status("drift", reason="performance")
        return used

    def threshold(self, default: float) -> float:
        """The threshold the agent should use (recalibrated when a recalibrator is set)."""
        return default if self.recalibrator is None else self.recalibrator.threshold(default)

    def summary(self) -> dict[str, Any]:
        """JSON-ready drift state for ``Telemetry.drift`` (``status`` always present)."""
        out: dict[str, Any] = {"status": self._status, "windows": self._windows, **self._counts}
        out["rows_buffered"] = len(self._s)
        if self._last is not None:
            out["max_feature_psi"] = self._last.features.max_psi
            out["drifted_features"] = list(self._last.features.drifted)
            out["score_psi"] = self._last.scores.max_psi
            if math.isfinite(self._last.alert_rate):
                out["alert_rate"] = self._last.alert_rate
        labels = self.labels.counts()
        out["labels"] = {"used": labels.labelled, "unknown_id": labels.unknown_ids,
                         "duplicate": labels.duplicate_labels, "invalid": labels.invalid_labels,
                         "evicted": labels.evicted}
        out["performance_drift"] = self.labels.drift_active or (self._last is not None and self._last.performance_drift)
        if self.recalibrator is not None:
            out["recalibration"] = self.recalibrator.summary()
        if self._last_error:
            out["last_error"] = self._last_error
        return out

    @property
    def status(self) -> str:
        """``"unknown"`` (no window yet), ``"ok"``, ``"warning"`` or ``"drift"``."""
        return self._status

    def new_model(self, *, model_version: str, reference_features: np.ndarray, reference_scores: np.ndarray,
                  threshold: float | None = None) -> None:
        """Start over for a newly deployed model: new reference, detectors and recalibration reset."""
        opts_exclude = [n for j, n in enumerate(self.features.feature_names) if j not in self.features.columns]
        self.features = FeatureDriftDetector(
            reference_features, feature_names=self.features.feature_names, exclude=opts_exclude,
            psi_threshold=self.features.psi_threshold, psi_warning=self.features.psi_warning,
            alpha=self.features.alpha, bins=self.features.bins, min_rows=self.features.min_rows,
        )
        self.scores = ScoreDriftDetector(reference_scores, threshold=threshold)
        self.model_version = model_version
        self._default_threshold = threshold
        self.labels.acknowledge()
        if self.recalibrator is not None:
            self.recalibrator.reset()
        self._x, self._s = [], []
        self._status, self._last = "unknown", None

    # -- internals --------------------------------------------------------------------

    def _close_window(self) -> WindowVerdict | None:
        X = np.vstack(self._x)
        s = np.asarray(self._s)
        self._x, self._s = [], []
        try:
            feat = self.features.test(X)
            score = self.scores.test(s)
        except ConsortiumError as exc:  # a window that cannot be judged must not stop the agent
            self._counts["untestable_windows"] += 1
            self._last_error = str(exc)
            logger.warning("drift window not tested: %s", exc)
            return None
        self._windows += 1
        perf = self.labels.take_drift()
        levels = [_LEVEL[feat.status], _LEVEL[score.status], 2 if perf else 0]
        status = next(k for k, v in _LEVEL.items() if v == max(levels))
        stats = {**feat.statistics(prefix="feature."), **score.statistics(prefix="score."),
                 **self.labels.statistics()}
        alert_rate = self.scores.alert_rate(s)
        if math.isfinite(alert_rate):
            stats["alert_rate"] = alert_rate
            stats["reference_alert_rate"] = self.scores.reference_alert_rate
        verdict = WindowVerdict(status=status, features=feat, scores=score, alert_rate=alert_rate,
                                performance_drift=perf, statistics=stats)
        self._last = verdict
        self._publish(DriftReport(msg_id="", institution=self.institution, agent=self.agent, ts=self.clock(),
                                  model_version=self.model_version, status=status, statistics=_finite(stats)))
        reason = "performance" if perf else ("features" if feat.status == "drift" else "scores")
        self._set_status(status, reason=reason)
        if self.recalibrator is not None and self._default_threshold is not None:
            before = len(self.recalibrator.history)
            self.recalibrator.recompute(self._default_threshold)
            if len(self.recalibrator.history) > before:
                change = self.recalibrator.history[-1]
                self._event("recalibrated", {"old": change.old, "new": change.new, "basis": change.basis,
                                             "rows": change.rows})
        return verdict

    def _set_status(self, status: str, *, reason: str) -> None:
        previous, self._status = self._status, status
        if status == previous:
            return
        if status == "drift":
            detail: dict[str, Any] = {"reason": reason}
            if self._last is not None:
                detail["drifted_features"] = list(self._last.features.drifted)
                detail["max_feature_psi"] = self._last.features.max_psi
                detail["score_psi"] = self._last.scores.max_psi
            self._event("drift_detected", detail)
        elif previous == "drift":
            self._event("drift_cleared", {"status": status})

    def _event(self, name: str, detail: dict[str, Any]) -> None:
        self._publish(Event(msg_id="", institution=self.institution, agent=self.agent, ts=self.clock(),
                            event=name, detail=_finite(detail)))

    def _publish(self, payload: DriftReport | Event) -> None:
        if self.publisher is None:
            return
        try:
            self.publisher.publish(payload)
        except Exception as exc:  # noqa: BLE001 - the agent keeps scoring whatever the publisher does
            self._counts["publish_errors"] += 1
            self._last_error = f"publish failed: {exc}"
            logger.warning("could not publish %s: %s", type(payload).__name__, exc)


def _finite(d: dict[str, Any]) -> dict[str, Any]:
    """Drop NaN/inf values (JSON cannot carry them)."""
    return {k: v for k, v in d.items() if not (isinstance(v, float) and not math.isfinite(v))}
