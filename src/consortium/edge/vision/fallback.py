"""No-model fallback: background subtraction finds moving blobs, a centroid tracker follows them.

Used when no detector bundle is present, and labelled ``"mode": "fallback"`` in
telemetry: it cannot tell a car from a pedestrian or a shadow, every blob is
counted as class ``"object"``.  The same :class:`~.counting.TrafficCounter`
counts line crossings, with :class:`CentroidTracker` instead of ByteTrack.
"""

from __future__ import annotations

import cv2
import numpy as np
import supervision as sv
from scipy.optimize import linear_sum_assignment

from consortium.edge.vision.detector import Detections
from consortium.errors import param_error

FALLBACK_CLASSES = ["object"]


class MotionDetector:
    """MOG2 background subtraction → boxes of moving blobs larger than ``min_area`` pixels."""

    def __init__(self, *, min_area: int = 1500, history: int = 200, var_threshold: float = 32.0,
                 scale: float = 0.5, merge_px: int = 35) -> None:
        if min_area < 1:
            raise param_error("min_area", "MotionDetector", "an integer >= 1", min_area)
        self.min_area = min_area
        self.scale = scale
        self.subtractor = cv2.createBackgroundSubtractorMOG2(history=history, varThreshold=var_threshold,
                                                             detectShadows=True)
        self.kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))
        # closing with a large kernel joins the fragments one vehicle breaks into
        self.merge = cv2.getStructuringElement(cv2.MORPH_RECT, (merge_px, merge_px))

    def detect(self, frame: np.ndarray) -> Detections:
        """Moving blobs of one BGR frame (class 0 = ``"object"``, confidence 1)."""
        small = cv2.resize(frame, None, fx=self.scale, fy=self.scale, interpolation=cv2.INTER_AREA)
        mask = self.subtractor.apply(small)
        mask = np.where(mask == 255, 255, 0).astype(np.uint8)  # 127 = shadow
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, self.kernel)
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, self.merge)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        boxes = []
        for c in contours:
            x, y, w, h = cv2.boundingRect(c)
            if w * h / (self.scale * self.scale) >= self.min_area:
                boxes.append([x, y, x + w, y + h])
        if not boxes:
            return Detections.empty()
        xyxy = np.array(boxes, np.float32) / self.scale
        return Detections(xyxy, np.ones(len(boxes), np.float32), np.zeros(len(boxes), np.int64))


class CentroidTracker:
    """Match each frame's boxes to tracks by centroid distance (Hungarian), with a lost-track buffer.

    Has the tracker interface :class:`~.counting.TrafficCounter` expects
    (``update(sv.Detections) -> sv.Detections`` with ``tracker_id`` set).
    """

    def __init__(self, *, max_distance: float = 80.0, max_missing: int = 10, min_hits: int = 3) -> None:
        self.max_distance = max_distance
        self.max_missing = max_missing
        self.min_hits = min_hits
        self.tracks: dict[int, tuple[np.ndarray, int]] = {}  # id -> (centroid, frames missing)
        self.hits: dict[int, int] = {}
        self._next = 1

    def update(self, dets: sv.Detections) -> sv.Detections:
        centroids = (dets.xyxy[:, :2] + dets.xyxy[:, 2:]) / 2 if len(dets) else np.zeros((0, 2))
        ids = np.full(len(dets), -1, dtype=int)
        track_ids = list(self.tracks)
        if track_ids and len(dets):
            known = np.array([self.tracks[t][0] for t in track_ids])
            dist = np.linalg.norm(known[:, None, :] - centroids[None, :, :], axis=2)
            rows, cols = linear_sum_assignment(dist)
            for r, c in zip(rows, cols, strict=True):
                if dist[r, c] <= self.max_distance:
                    ids[c] = track_ids[r]
        matched = set(ids[ids >= 0].tolist())
        for t in track_ids:
            if t not in matched:
                centroid, missing = self.tracks[t]
                if missing + 1 > self.max_missing:
                    del self.tracks[t]
                    self.hits.pop(t, None)
                else:
                    self.tracks[t] = (centroid, missing + 1)
        for i in range(len(dets)):
            if ids[i] < 0:
                ids[i] = self._next
                self._next += 1
            self.tracks[int(ids[i])] = (centroids[i], 0)
            self.hits[int(ids[i])] = self.hits.get(int(ids[i]), 0) + 1
        # blobs seen fewer than min_hits frames (fragments, flicker) stay unconfirmed: negative ids,
        # which LineZone ignores
        confirmed = np.array([self.hits[int(i)] >= self.min_hits for i in ids], dtype=bool)
        dets.tracker_id = np.where(confirmed, ids, -ids)
        return dets
