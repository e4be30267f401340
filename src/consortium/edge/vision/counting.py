"""Tracking and counting: ByteTrack (``trackers``) and line crossings (``supervision.LineZone``).

A :class:`TrafficCounter` takes each frame's :class:`~.detector.Detections`,
assigns track ids (ByteTrack: IoU matching with a Kalman-free box state, low-
confidence second pass, lost-track buffer so short occlusions keep their id)
and asks one :class:`supervision.LineZone` per counting line which tracks
crossed it, and in which direction.  Crossings accumulate per
``line → direction → class`` until :meth:`TrafficCounter.drain` hands over one
interval's counts and starts the next.

Directions: walking from a line's ``start`` to its ``end``, ``"in"`` is a
crossing from the right-hand side to the left-hand side (image coordinates,
y down) and ``"out"`` the reverse; name the lines so that the directions read
naturally (e.g. a line drawn left → right across a road counts vehicles going
up the image as ``"in"``).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import supervision as sv

from consortium.edge.messages import check_name
from consortium.edge.vision.detector import Detections
from consortium.errors import ConfigError, param_error

logger = logging.getLogger(__name__)

Counts = dict[str, dict[str, dict[str, int]]]
"""``{line: {direction: {class: count}}}`` as in :class:`~consortium.edge.messages.TrafficCounts`."""


@dataclass(frozen=True)
class CountingLine:
    """A named segment from ``start`` to ``end`` in frame pixels."""

    name: str
    start: tuple[float, float]
    end: tuple[float, float]

    def __post_init__(self) -> None:
        check_name(self.name, what="counting line")
        if tuple(self.start) == tuple(self.end):
            raise param_error("end", f"CountingLine {self.name!r}", "a point different from 'start'", self.end)

    @classmethod
    def parse(cls, spec: str) -> CountingLine:
        """Parse ``"name:x1,y1,x2,y2"`` (the CLI form)."""
        name, _, coords = spec.partition(":")
        try:
            x1, y1, x2, y2 = (float(v) for v in coords.split(","))
        except ValueError:
            raise ConfigError(
                f"A counting line must look like 'name:x1,y1,x2,y2' (pixels). Got {spec!r} instead."
            ) from None
        return cls(name, (x1, y1), (x2, y2))


@dataclass(frozen=True)
class CountingZone:
    """A named polygon (frame pixels): ``"in"`` counts tracks entering it, ``"out"`` tracks leaving it."""

    name: str
    points: tuple[tuple[float, float], ...]

    def __post_init__(self) -> None:
        check_name(self.name, what="counting zone")
        if len(self.points) < 3:
            raise param_error("points", f"CountingZone {self.name!r}", "at least 3 (x, y) corners", self.points)

    @classmethod
    def parse(cls, spec: str) -> CountingZone:
        """Parse ``"name:x1,y1,x2,y2,x3,y3[,...]"`` (the CLI form)."""
        name, _, coords = spec.partition(":")
        try:
            values = [float(v) for v in coords.split(",")]
        except ValueError:
            values = []
        if len(values) < 6 or len(values) % 2:
            raise ConfigError(
                f"A counting zone must look like 'name:x1,y1,x2,y2,x3,y3[,...]' (pixels, >= 3 corners). "
                f"Got {spec!r} instead."
            )
        return cls(name, tuple(zip(values[::2], values[1::2], strict=True)))


class _ZoneCounter:
    """Entries into and exits from one polygon, per confirmed track (same occlusion patience as lines)."""

    def __init__(self, zone: CountingZone, *, max_absent_frames: int) -> None:
        self.zone = sv.PolygonZone(polygon=np.array(zone.points, dtype=np.int32),
                                   triggering_anchors=(sv.Position.CENTER,))
        self.max_absent_frames = max_absent_frames
        self.state: dict[int, tuple[bool, int]] = {}  # tracker id -> (inside, frames absent)

    def trigger(self, tracked: sv.Detections) -> tuple[np.ndarray, np.ndarray]:
        entered = np.zeros(len(tracked), dtype=bool)
        left = np.zeros(len(tracked), dtype=bool)
        seen: set[int] = set()
        if len(tracked) and tracked.tracker_id is not None:
            inside = self.zone.trigger(tracked)
            for i, (tid, now_in) in enumerate(zip(tracked.tracker_id, inside, strict=True)):
                if tid < 0:
                    continue  # unconfirmed track
                tid = int(tid)
                seen.add(tid)
                before = self.state.get(tid)
                if before is not None and before[0] != bool(now_in):
                    entered[i], left[i] = bool(now_in), not bool(now_in)
                self.state[tid] = (bool(now_in), 0)
        for tid, (was_in, absent) in list(self.state.items()):
            if tid not in seen:
                if absent + 1 > self.max_absent_frames:
                    del self.state[tid]
                else:
                    self.state[tid] = (was_in, absent + 1)
        return entered, left


class _PatientLineZone(sv.LineZone):
    """``supervision.LineZone`` that remembers a track's side while the track is occluded.

    ``LineZone`` forgets a track after ``minimum_crossing_threshold + 1`` frames
    without it, so a vehicle hidden while it crosses (behind a bus, say) comes
    back on the other side as a "new" track and is never counted.  The tracker
    keeps its id for ``lost_track_buffer`` frames; the zone must remember its side
    as long.  Only the eviction rule changes (pinned by the occlusion test).
    """

    def __init__(self, *args: Any, max_absent_frames: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_absent_frames = max(max_absent_frames, self.crossing_history_length)

    def _evict_stale_crossing_history(self, current_keys: set[int]) -> None:
        for key in list(self.crossing_state_history):
            if key in current_keys:
                self._tracker_frames_absent.pop(key, None)
                continue
            absent = self._tracker_frames_absent.get(key, 0) + 1
            if absent > self.max_absent_frames:
                del self.crossing_state_history[key]
                self._confirmed_crossing_side.pop(key, None)
                self._tracker_frames_absent.pop(key, None)
            else:
                self._tracker_frames_absent[key] = absent


def to_supervision(dets: Detections) -> sv.Detections:
    """Our detections as ``supervision.Detections``."""
    return sv.Detections(xyxy=dets.xyxy.astype(np.float32), confidence=dets.confidence.astype(np.float32),
                         class_id=dets.class_id.astype(int))


class TrafficCounter:
    """Track detections across frames and count line crossings per direction and class.

    Parameters
    ----------
    lines : sequence of CountingLine or CountingZone
        Where to count (at least one; names unique).  A zone counts ``"in"`` when a
        track enters the polygon and ``"out"`` when it leaves.
    class_names : list of str
        The detector's class names (``class_id`` → name in the counts).
    frame_rate : float
        Frames per second reaching the tracker (sizes the lost-track buffer in frames).
    lost_track_seconds : float
        How long a track survives without detections (occlusions shorter than this keep the id).
    tracker : object, optional
        Anything with ``update(sv.Detections) -> sv.Detections`` that fills ``tracker_id``
        (the no-model fallback passes its centroid tracker).  Default: ByteTrack.
    min_crossing_frames : int
        Frames a track must be seen on the new side before a crossing counts (debounce).
    """

    def __init__(
        self,
        lines: Sequence[CountingLine | CountingZone],
        class_names: list[str],
        *,
        frame_rate: float = 25.0,
        lost_track_seconds: float = 1.0,
        tracker: Any | None = None,
        min_crossing_frames: int = 1,
        track_activation_threshold: float = 0.3,
    ) -> None:
        if not lines:
            raise param_error("lines", "TrafficCounter", "at least one CountingLine", list(lines))
        names = [line.name for line in lines]
        if len(set(names)) != len(names):
            raise param_error("lines", "TrafficCounter", "lines with unique names", names)
        if frame_rate <= 0:
            raise param_error("frame_rate", "TrafficCounter", "a positive number", frame_rate)
        self.lines = list(lines)
        self.class_names = list(class_names)
        lost_frames = max(1, round(lost_track_seconds * frame_rate))
        if tracker is None:
            from trackers import ByteTrackTracker

            tracker = ByteTrackTracker(
                lost_track_buffer=lost_frames,
                frame_rate=frame_rate,
                track_activation_threshold=track_activation_threshold,
                high_conf_det_threshold=max(track_activation_threshold, 0.4),
                minimum_consecutive_frames=1,
                minimum_iou_threshold=0.1,
            )
        self.tracker = tracker
        self._zones: list[_PatientLineZone | _ZoneCounter] = [
            _PatientLineZone(
                start=sv.Point(*line.start), end=sv.Point(*line.end), max_absent_frames=lost_frames,
                triggering_anchors=(sv.Position.CENTER,),
                minimum_crossing_threshold=min_crossing_frames,
            )
            if isinstance(line, CountingLine)
            else _ZoneCounter(line, max_absent_frames=lost_frames)
            for line in self.lines
        ]
        self._interval: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        self._total: defaultdict[tuple[str, str, str], int] = defaultdict(int)

    def _class(self, class_id: int) -> str:
        return self.class_names[class_id] if 0 <= class_id < len(self.class_names) else f"class{class_id}"

    def update(self, detections: Detections | sv.Detections) -> sv.Detections:
        """Track one frame's detections and count crossings; returns the tracked detections."""
        dets = to_supervision(detections) if isinstance(detections, Detections) else detections
        tracked = self.tracker.update(dets)
        if len(tracked) == 0 or tracked.tracker_id is None:
            for zone in self._zones:
                zone.trigger(sv.Detections.empty())
            return tracked
        if tracked.class_id is None:
            tracked.class_id = np.zeros(len(tracked), dtype=int)
        for line, zone in zip(self.lines, self._zones, strict=True):
            crossed_in, crossed_out = zone.trigger(tracked)
            for direction, crossed in (("in", crossed_in), ("out", crossed_out)):
                for cid in tracked.class_id[crossed]:
                    key = (line.name, direction, self._class(int(cid)))
                    self._interval[key] += 1
                    self._total[key] += 1
        return tracked

    @staticmethod
    def _nest(flat: dict[tuple[str, str, str], int]) -> Counts:
        out: Counts = {}
        for (line, direction, cls), n in sorted(flat.items()):
            out.setdefault(line, {}).setdefault(direction, {})[cls] = n
        return out

    def drain(self) -> Counts:
        """Counts since the previous drain (the interval that just ended), then reset them."""
        counts = self._nest(self._interval)
        self._interval.clear()
        return counts

    @property
    def totals(self) -> Counts:
        """Counts since the counter was created."""
        return self._nest(self._total)

    def total(self, *, line: str | None = None, direction: str | None = None) -> int:
        """Sum of crossings since creation, optionally of one line and/or direction."""
        return sum(
            n for (ln, d, _c), n in self._total.items()
            if (line is None or ln == line) and (direction is None or d == direction)
        )
