"""The vision edge application: frames in, vehicle counts out over MQTT (never frames).

Per frame: read (decode) → detect (pre-process, inference, post-process) →
track and count.  At the end of every interval of stream time the agent
publishes a :class:`~consortium.edge.messages.TrafficCounts` (crossings per
line, direction and class) and a :class:`~consortium.edge.messages.Telemetry`
(``app="vision"``; ``extra`` holds the mode, FPS, per-stage latency p50/p99 in
ms, dropped frames) through the edge agent's :class:`MqttPublisher`, so counts
get the same topics, QoS 1 and store-and-forward as the fraud agent's alerts.
With ``interval_s=0`` every frame with a crossing is published at once (the
lowest frame → count latency; the benchmark measures it).

Images stay on the device; the optional debug video (boxes, tracks, lines) is
written locally only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
import supervision as sv

from consortium.edge import messages as m
from consortium.edge.vision.counting import CountingLine, Counts, TrafficCounter
from consortium.edge.vision.detector import Detections
from consortium.edge.vision.sources import Frame, FrameSource
from consortium.errors import param_error

logger = logging.getLogger(__name__)

STAGES = ("decode", "preprocess", "inference", "postprocess", "tracking", "total")


class Detector(Protocol):
    """What the agent needs from a detector (:class:`YoloDetector` or :class:`MotionDetector`)."""

    def detect(self, frame: np.ndarray) -> Detections: ...


class Publisher(Protocol):
    """What the agent needs from :class:`~consortium.edge.publisher.MqttPublisher`."""

    def publish(self, payload: Any) -> None: ...

    @property
    def backlog(self) -> int: ...


@dataclass
class FrameTiming:
    """Seconds per stage of one frame."""

    decode: float = 0.0
    preprocess: float = 0.0
    inference: float = 0.0
    postprocess: float = 0.0
    tracking: float = 0.0

    @property
    def total(self) -> float:
        return self.decode + self.preprocess + self.inference + self.postprocess + self.tracking


@dataclass
class RunSummary:
    """What one :meth:`VisionAgent.run` did."""

    frames: int = 0
    dropped: int = 0
    seconds: float = 0.0
    totals: Counts = field(default_factory=dict)
    timings: list[FrameTiming] = field(default_factory=list)
    publish_latency_s: list[float] = field(default_factory=list)
    """Frame captured → counts handed to the publisher, for every published TrafficCounts."""
    published_frames: list[float] = field(default_factory=list)
    """``perf_counter`` capture time of the frame that closed each published interval (in order)."""

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


def quantiles_ms(values: list[float]) -> dict[str, float]:
    """``{"p50": ..., "p99": ...}`` in milliseconds of a list of seconds."""
    if not values:
        return {"p50": 0.0, "p99": 0.0}
    arr = np.asarray(values) * 1000
    return {"p50": round(float(np.percentile(arr, 50)), 3), "p99": round(float(np.percentile(arr, 99)), 3)}


class VisionAgent:
    """Count vehicles crossing lines in a frame source and publish the counts.

    Parameters
    ----------
    detector : Detector
        :class:`~.detector.YoloDetector` (``mode="detector"``) or
        :class:`~.fallback.MotionDetector` (``mode="fallback"``).
    counter : TrafficCounter
        Tracker and counting lines.
    publisher : Publisher or None
        Where counts and telemetry go (None: count locally only).
    institution, agent : str
        Who is counting (topic segments).
    model_version : str
        Detector bundle version (``"none"`` in fallback mode).
    mode : {"detector", "fallback"}
        Reported in telemetry so nobody mistakes motion blobs for classified vehicles.
    interval_s : float
        Stream seconds per published interval (0: publish every frame with a crossing).
    debug_video : Path, optional
        Write an annotated local video (never sent anywhere).
    """

    def __init__(
        self,
        *,
        detector: Detector,
        counter: TrafficCounter,
        publisher: Publisher | None,
        institution: str,
        agent: str,
        model_version: str,
        mode: str = "detector",
        interval_s: float = 5.0,
        debug_video: Path | None = None,
    ) -> None:
        if mode not in ("detector", "fallback"):
            raise param_error("mode", "VisionAgent", "'detector' or 'fallback'", mode)
        if interval_s < 0:
            raise param_error("interval_s", "VisionAgent", "a number >= 0", interval_s)
        self.detector = detector
        self.counter = counter
        self.publisher = publisher
        self.institution = m.check_name(institution, what="institution")
        self.agent = m.check_name(agent, what="agent")
        self.model_version = model_version
        self.mode = mode
        self.interval_s = interval_s
        self.debug_video = debug_video
        self.last_frame: np.ndarray | None = None
        """The most recent frame (kept on the device; OTA updates shadow-run candidates on it)."""
        self._writer: cv2.VideoWriter | None = None
        self._window: list[FrameTiming] = []
        self._window_start: float | None = None
        self._window_wall = time.perf_counter()
        self._window_dropped = 0

    def swap_detector(self, detector: Detector, model_version: str, *, mode: str = "detector") -> None:
        """Serve ``detector`` from the next frame on (tracks and counts carry over).

        A fallback agent that receives a detector starts naming classes by the detector's names.
        """
        names = getattr(detector, "class_names", None)
        if names is not None:
            self.counter.class_names = list(names)
        self.detector, self.model_version, self.mode = detector, model_version, mode
        set_version = getattr(self.publisher, "set_model_version", None)
        if set_version is not None:
            set_version(model_version)

    # ------------------------------------------------------------------ per frame

    def process(self, frame: Frame, *, decode_s: float = 0.0) -> tuple[sv.Detections, FrameTiming]:
        """Detect, track and count one frame."""
        timing = FrameTiming(decode=decode_s)
        detector = self.detector  # one read: an OTA swap lands between frames
        dets = detector.detect(frame.image)
        self.last_frame = frame.image
        times = getattr(detector, "times", None)
        if times is not None:
            timing.preprocess, timing.inference, timing.postprocess = (
                times.preprocess, times.inference, times.postprocess)
        else:
            timing.inference = time.perf_counter() - frame.captured - decode_s
        t = time.perf_counter()
        tracked = self.counter.update(dets)
        timing.tracking = time.perf_counter() - t
        if self.debug_video is not None:
            self._annotate(frame.image, tracked)
        return tracked, timing

    def _annotate(self, image: np.ndarray, tracked: sv.Detections) -> None:
        canvas = image.copy()
        for line in self.counter.lines:
            if isinstance(line, CountingLine):
                cv2.line(canvas, tuple(map(int, line.start)), tuple(map(int, line.end)), (0, 255, 255), 2)
            else:
                cv2.polylines(canvas, [np.array(line.points, np.int32)], True, (0, 255, 255), 2)
        ids = tracked.tracker_id if tracked.tracker_id is not None else [None] * len(tracked)
        for box, tid in zip(tracked.xyxy.astype(int), ids, strict=True):
            cv2.rectangle(canvas, (box[0], box[1]), (box[2], box[3]), (0, 255, 0), 2)
            cv2.putText(canvas, str(tid), (box[0], max(box[1] - 4, 10)), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                        (0, 255, 0), 1)
        if self._writer is None:
            h, w = canvas.shape[:2]
            self._writer = cv2.VideoWriter(str(self.debug_video), cv2.VideoWriter.fourcc(*"MJPG"), 25, (w, h))
        self._writer.write(canvas)

    # ------------------------------------------------------------------ publishing

    def _publish(self, counts: Counts, *, window_s: float, frame: Frame, summary: RunSummary) -> None:
        if self.publisher is None:
            return
        ts = m.now()
        self.publisher.publish(m.TrafficCounts(
            msg_id="", institution=self.institution, agent=self.agent, ts=ts, interval_s=float(window_s),
            model_version=self.model_version, counts=counts,
        ))
        summary.publish_latency_s.append(time.perf_counter() - frame.captured)
        summary.published_frames.append(frame.captured)

    def _telemetry(self, *, window_s: float, crossings: int, source: FrameSource) -> None:
        if self.publisher is None or not self._window:
            return
        wall = time.perf_counter() - self._window_wall
        totals = [t.total for t in self._window]
        stages = {s: quantiles_ms([getattr(t, s) for t in self._window]) for s in STAGES}
        dropped = source.dropped - self._window_dropped
        self.publisher.publish(m.Telemetry(
            msg_id="", institution=self.institution, agent=self.agent, ts=m.now(), window_s=float(window_s),
            model_version=self.model_version, scored=len(self._window), alerts=crossings,
            latency_us={k: v * 1000 for k, v in quantiles_ms(totals).items()},
            queue_backlog=self.publisher.backlog, drift={"status": "unknown"}, app="vision",
            extra={
                "mode": self.mode,
                "fps": round(len(self._window) / wall, 2) if wall > 0 else 0.0,
                "stages_ms": stages,
                "dropped_frames": dropped,
                "lines": [line.name for line in self.counter.lines],
            },
        ))
        self._window_dropped = source.dropped

    # ------------------------------------------------------------------ loop

    def run(self, source: FrameSource, *, max_frames: int | None = None,
            max_seconds: float | None = None) -> RunSummary:
        """Process ``source`` until it ends (or ``max_frames``/``max_seconds``); publish per interval."""
        summary = RunSummary()
        start = time.perf_counter()
        frames: Iterator[Frame] = iter(source)
        pending_crossings = 0
        last: Frame | None = None
        try:
            while max_frames is None or summary.frames < max_frames:
                if max_seconds is not None and time.perf_counter() - start > max_seconds:
                    break
                t = time.perf_counter()
                try:
                    frame = next(frames)
                except StopIteration:
                    break
                decode = time.perf_counter() - t
                frame = Frame(frame.image, min(frame.captured, t) if source.live else t, frame.ts, frame.index)
                if self._window_start is None:
                    self._window_start = frame.ts
                before = self.counter.total()
                _, timing = self.process(frame, decode_s=decode)
                crossed = self.counter.total() - before
                pending_crossings += crossed
                self._window.append(timing)
                summary.timings.append(timing)
                summary.frames += 1
                last = frame
                elapsed = frame.ts - self._window_start
                if (self.interval_s == 0 and crossed) or (self.interval_s > 0 and elapsed >= self.interval_s):
                    self._close_window(frame, elapsed, pending_crossings, source, summary)
                    pending_crossings = 0
            if last is not None and self._window_start is not None and (pending_crossings or self._window):
                self._close_window(last, last.ts - self._window_start + 1 / source.fps, pending_crossings, source,
                                   summary)
        finally:
            if self._writer is not None:
                self._writer.release()
                self._writer = None
        summary.seconds = time.perf_counter() - start
        summary.dropped = source.dropped
        summary.totals = self.counter.totals
        return summary

    def _close_window(self, frame: Frame, window_s: float, crossings: int, source: FrameSource,
                      summary: RunSummary) -> None:
        counts = self.counter.drain()
        self._publish(counts, window_s=max(window_s, 1e-3), frame=frame, summary=summary)
        if self.interval_s > 0 or len(self._window) >= max(int(source.fps), 1):
            self._telemetry(window_s=max(window_s, 1e-3), crossings=crossings, source=source)
            self._window = []
            self._window_wall = time.perf_counter()
        self._window_start = frame.ts
