"""Performance drift on delayed labels (chargebacks), with ADWIN or Page-Hinkley.

A fraud label arrives days after the transaction (``LABEL_DELAY_DAYS`` in the
generator).  :class:`DelayedLabelMonitor` keeps the score and the alert
decision of recent transactions by id; when a label arrives it joins it and
feeds two Bernoulli streams into change detectors from ``river``:

* **miss** — one value per labelled fraud: 1 if the model did not alert on it.
  A rise is a recall drop (a new fraud pattern the model does not know).
* **false_alert** — one value per labelled alert: 1 if it was not fraud.  A rise
  is a precision drop (legitimate behaviour moved into the alert region).

Only rises count as drift (ADWIN also notices improvements; those are ignored).
Labels for unknown transaction ids (never scored, already evicted, or a second
label) are counted and reported, never raised: a chargeback feed with a stray
id must not stop a node.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Literal, Protocol

from river import drift as river_drift

from consortium.errors import param_error

logger = logging.getLogger(__name__)

Method = Literal["adwin", "page_hinkley"]
METHODS: tuple[str, ...] = ("adwin", "page_hinkley")
STREAMS: tuple[str, ...] = ("miss", "false_alert")


class _RiverDetector(Protocol):
    @property
    def drift_detected(self) -> bool: ...

    def update(self, x: float) -> object: ...


@dataclass
class _Stream:
    """One Bernoulli stream, its change detector and its running mean."""

    detector: _RiverDetector
    n: int = 0
    total: float = 0.0
    recent_n: int = 0
    recent_total: float = 0.0
    detections: int = 0
    last_detection_at: int = -1


def make_detector(method: str, *, delta: float | None = None, threshold: float | None = None) -> _RiverDetector:
    """A fresh ``river`` change detector for a 0/1 stream.

    ``adwin``: ``river.drift.ADWIN(delta)`` (default delta 0.002).
    ``page_hinkley``: ``river.drift.PageHinkley(mode="up")`` (default threshold 15,
    a tolerance ``delta`` of 0.05 per observation).
    """
    if method == "adwin":
        return river_drift.ADWIN(delta=0.002 if delta is None else delta)
    if method == "page_hinkley":
        return river_drift.PageHinkley(
            min_instances=30, delta=0.05 if delta is None else delta,
            threshold=15.0 if threshold is None else threshold, mode="up",
        )
    raise param_error("method", "make_detector", f"one of {list(METHODS)}", method)


@dataclass(frozen=True)
class LabelCounts:
    """Bookkeeping of the label join (all cumulative)."""

    recorded: int
    labelled: int
    unknown_ids: int
    duplicate_labels: int
    evicted: int
    invalid_labels: int
    pending: int


class DelayedLabelMonitor:
    """Join delayed labels to scored transactions and detect performance drift.

    Parameters
    ----------
    method : {"adwin", "page_hinkley"}
        Change detector per stream.
    max_pending : int
        Scored transactions kept waiting for a label; the oldest are evicted
        (counted) beyond this.
    delta, threshold : float, optional
        Detector parameters (see :func:`make_detector`).
    recent : int
        Window (observations per stream) of the reported recent rates.
    """

    def __init__(
        self,
        *,
        method: Method = "adwin",
        max_pending: int = 200_000,
        delta: float | None = None,
        threshold: float | None = None,
        recent: int = 200,
    ) -> None:
        owner = "DelayedLabelMonitor"
        if method not in METHODS:
            raise param_error("method", owner, f"one of {list(METHODS)}", method)
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise param_error("max_pending", owner, "an int >= 1", max_pending)
        if isinstance(recent, bool) or not isinstance(recent, int) or recent < 1:
            raise param_error("recent", owner, "an int >= 1", recent)
        self.method = method
        self.max_pending = max_pending
        self.recent = recent
        self._delta, self._threshold = delta, threshold
        self._pending: OrderedDict[Hashable, tuple[float, bool]] = OrderedDict()
        self._streams = {s: _Stream(make_detector(method, delta=delta, threshold=threshold)) for s in STREAMS}
        self._recent: dict[str, list[float]] = {s: [] for s in STREAMS}
        self._recorded = self._labelled = self._unknown = self._duplicates = self._evicted = self._invalid = 0
        self._seen_labels: OrderedDict[Hashable, None] = OrderedDict()
        self.drift_active = False

    def record(self, transaction_id: Hashable, score: float, *, alerted: bool) -> None:
        """Remember a scored transaction until its label arrives."""
        if transaction_id in self._pending:
            self._pending.move_to_end(transaction_id)
        self._pending[transaction_id] = (float(score), bool(alerted))
        self._recorded += 1
        while len(self._pending) > self.max_pending:
            self._pending.popitem(last=False)
            self._evicted += 1

    def label(self, transaction_id: Hashable, is_fraud: object) -> bool:
        """Join one label; returns False (and counts why) if it could not be used.

        ``is_fraud`` must be 0/1 or a bool; anything else is counted as invalid.
        """
        if isinstance(is_fraud, bool) or is_fraud in (0, 1):
            fraud = bool(is_fraud)
        else:
            self._invalid += 1
            return False
        entry = self._pending.pop(transaction_id, None)
        if entry is None:
            if transaction_id in self._seen_labels:
                self._duplicates += 1
            else:
                self._unknown += 1
            return False
        self._seen_labels[transaction_id] = None
        while len(self._seen_labels) > self.max_pending:
            self._seen_labels.popitem(last=False)
        self._labelled += 1
        _, alerted = entry
        if fraud:
            self._update("miss", 0.0 if alerted else 1.0)
        if alerted:
            self._update("false_alert", 0.0 if fraud else 1.0)
        return True

    def _update(self, name: str, value: float) -> None:
        stream = self._streams[name]
        before = stream.total / stream.n if stream.n else math.nan
        est_before = getattr(stream.detector, "estimation", before)
        stream.detector.update(value)
        stream.n += 1
        stream.total += value
        recent = self._recent[name]
        recent.append(value)
        if len(recent) > self.recent:
            del recent[0]
        if stream.detector.drift_detected:
            est_after = getattr(stream.detector, "estimation", None)
            rising = est_after is None or est_after > est_before  # Page-Hinkley runs in "up" mode only
            if rising:
                stream.detections += 1
                stream.last_detection_at = stream.n
                self.drift_active = True
                logger.info("performance drift on %s after %d observations (%s)", name, stream.n, self.method)

    def take_drift(self) -> bool:
        """Whether a (rising) detection happened since the last call; clears the flag.

        The monitor calls this once per window, so one detection marks one window
        as drifted instead of latching every later window.
        """
        active, self.drift_active = self.drift_active, False
        return active

    def detections(self) -> dict[str, int]:
        """Number of (rising) detections per stream so far."""
        return {s: st.detections for s, st in self._streams.items()}

    def acknowledge(self) -> None:
        """Clear :attr:`drift_active` (e.g. after a new model was deployed) and restart the detectors."""
        self.drift_active = False
        for s in STREAMS:
            self._streams[s] = _Stream(make_detector(self.method, delta=self._delta, threshold=self._threshold))
            self._recent[s] = []

    def counts(self) -> LabelCounts:
        """How many transactions and labels were seen, used, or refused (and why)."""
        return LabelCounts(
            recorded=self._recorded,
            labelled=self._labelled,
            unknown_ids=self._unknown,
            duplicate_labels=self._duplicates,
            evicted=self._evicted,
            invalid_labels=self._invalid,
            pending=len(self._pending),
        )

    def rates(self) -> dict[str, float]:
        """Recent miss rate (1 - recall) and false-alert rate (1 - precision); NaN without data."""
        return {
            f"recent_{s}_rate": (sum(v) / len(v)) if (v := self._recent[s]) else math.nan for s in STREAMS
        }

    def statistics(self) -> dict[str, float]:
        """Flat numbers for a DriftReport (NaN left out: JSON cannot carry it)."""
        c = self.counts()
        out: dict[str, float] = {
            "labels_used": float(c.labelled),
            "labels_unknown_id": float(c.unknown_ids),
            "labels_duplicate": float(c.duplicate_labels),
            "labels_invalid": float(c.invalid_labels),
            "pending_evicted": float(c.evicted),
        }
        out.update({f"detections_{s}": float(n) for s, n in self.detections().items()})
        out.update({k: v for k, v in self.rates().items() if math.isfinite(v)})
        return out
