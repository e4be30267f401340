"""Vehicle detection with a YOLO ONNX model in ONNX Runtime (and OpenCV DNN as the reference).

The model (see :mod:`consortium.edge.vision.darknet`) outputs decoded boxes;
this module does what is left: pre-processing (resize to the square input,
BGR → RGB, scale to [0, 1], NCHW) and post-processing in NumPy (score =
objectness × class probability, keep the vehicle classes, confidence
threshold, per-class non-maximum suppression, boxes back to frame pixels).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from consortium.errors import param_error

logger = logging.getLogger(__name__)

VEHICLE_CLASSES = ("car", "motorbike", "bus", "truck")
"""COCO classes counted as vehicles (Darknet's coco.names calls the motorcycle ``motorbike``)."""


@dataclass(frozen=True)
class Detections:
    """Boxes found in one frame (``xyxy`` in frame pixels)."""

    xyxy: np.ndarray
    """``float32[n, 4]`` corners ``x1, y1, x2, y2``."""
    confidence: np.ndarray
    """``float32[n]`` objectness × class probability."""
    class_id: np.ndarray
    """``int64[n]`` index into the detector's class names."""

    def __len__(self) -> int:
        return int(self.xyxy.shape[0])

    @classmethod
    def empty(cls) -> Detections:
        """No boxes."""
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))


@dataclass
class StageTimes:
    """Seconds spent in each stage of the last :meth:`YoloDetector.detect` call."""

    preprocess: float = 0.0
    inference: float = 0.0
    postprocess: float = 0.0


def preprocess(frame: np.ndarray, size: int) -> np.ndarray:
    """BGR ``uint8[h, w, 3]`` frame → ``float32[1, 3, size, size]`` RGB in [0, 1] (plain resize, as Darknet)."""
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise param_error("frame", "preprocess", "a BGR image of shape (h, w, 3)", frame.shape)
    resized = cv2.resize(frame, (size, size), interpolation=cv2.INTER_LINEAR)
    rgb = resized[:, :, ::-1].transpose(2, 0, 1)
    return (np.ascontiguousarray(rgb, dtype=np.float32) * np.float32(1 / 255.0))[None]


def nms(
    boxes: np.ndarray, scores: np.ndarray, *, iou_threshold: float, contain_threshold: float | None = None
) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression, highest score first.

    A box is dropped when its IoU with a stronger kept box exceeds ``iou_threshold``
    or when their intersection covers at least ``contain_threshold`` of the smaller
    of the two (YOLO often adds a second box for part of a vehicle, or the whole
    vehicle around a stronger part box).
    """
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = boxes.T
    area = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = w * h
        iou = inter / np.maximum(area[i] + area[rest] - inter, 1e-9)
        keep_rest = iou <= iou_threshold
        if contain_threshold is not None:
            keep_rest &= inter / np.maximum(np.minimum(area[i], area[rest]), 1e-9) < contain_threshold
        order = rest[keep_rest]
    return np.array(keep, dtype=np.int64)


def postprocess(
    raw: np.ndarray,
    *,
    frame_shape: tuple[int, ...],
    class_ids: Sequence[int],
    conf_threshold: float,
    iou_threshold: float,
    contain_threshold: float | None = 0.8,
    agnostic: bool = True,
) -> Detections:
    """Decoded YOLO rows ``[cx, cy, w, h, obj, cls...]`` (fractions) → :class:`Detections` in pixels.

    With ``agnostic`` (default) NMS runs across the kept classes: one vehicle seen
    as both "car" and "truck" must be counted once.
    """
    rows = raw.reshape(-1, raw.shape[-1])
    ids = np.asarray(class_ids, dtype=np.int64)
    obj = rows[:, 4]
    candidates = obj > conf_threshold  # score = obj * p <= obj: a cheap first cut
    rows = rows[candidates]
    if rows.size == 0 or ids.size == 0:
        return Detections.empty()
    scores = rows[:, 4:5] * rows[:, 5 + ids]
    best = scores.argmax(axis=1)
    conf = scores[np.arange(len(rows)), best]
    keep = conf > conf_threshold
    rows, conf, cls = rows[keep], conf[keep], ids[best[keep]]
    if rows.size == 0:
        return Detections.empty()
    h, w = frame_shape[:2]
    cx, cy, bw, bh = rows[:, 0] * w, rows[:, 1] * h, rows[:, 2] * w, rows[:, 3] * h
    xyxy = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1)
    xyxy = np.clip(xyxy, 0, [w, h, w, h]).astype(np.float32)
    chosen: list[np.ndarray] = []
    groups = [np.arange(len(cls))] if agnostic else [np.flatnonzero(cls == c) for c in np.unique(cls)]
    for idx in groups:
        chosen.append(idx[nms(xyxy[idx], conf[idx], iou_threshold=iou_threshold, contain_threshold=contain_threshold)])
    sel = np.concatenate(chosen)
    sel = sel[np.argsort(-conf[sel], kind="stable")]
    return Detections(xyxy[sel], conf[sel].astype(np.float32), cls[sel])


@dataclass
class YoloDetector:
    """A YOLO ONNX model run by ONNX Runtime on a fixed number of threads.

    Parameters
    ----------
    onnx_model : bytes
        The converted model (input ``images`` of shape ``(1, 3, size, size)``).
    class_names : list of str
        Names of the model's classes, in output order.
    keep : sequence of str
        Class names to report (default: vehicles).
    conf_threshold, iou_threshold : float
        Minimum score of a box and the NMS overlap above which the weaker box is dropped.
    threads : int
        ONNX Runtime intra-op threads (1: the edge device's other core decodes video).
    """

    onnx_model: bytes
    class_names: list[str]
    keep: Sequence[str] = VEHICLE_CLASSES
    conf_threshold: float = 0.25
    iou_threshold: float = 0.45
    threads: int = 1
    times: StageTimes = field(default_factory=StageTimes, init=False)

    def __post_init__(self) -> None:
        import onnxruntime as ort

        if not 0.0 < self.conf_threshold < 1.0:
            raise param_error("conf_threshold", "YoloDetector", "a float in (0, 1)", self.conf_threshold)
        if not 0.0 < self.iou_threshold <= 1.0:
            raise param_error("iou_threshold", "YoloDetector", "a float in (0, 1]", self.iou_threshold)
        unknown = [k for k in self.keep if k not in self.class_names]
        if unknown:
            raise param_error("keep", "YoloDetector", f"class names of the model (e.g. {VEHICLE_CLASSES})", unknown)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = ort.InferenceSession(self.onnx_model, opts, providers=["CPUExecutionProvider"])
        inp = self._session.get_inputs()[0]
        self.input_name = inp.name
        self.size = int(inp.shape[2])
        self.class_ids = [self.class_names.index(k) for k in self.keep]

    def infer(self, blob: np.ndarray) -> np.ndarray:
        """Raw decoded rows for one pre-processed blob."""
        return np.asarray(self._session.run(None, {self.input_name: blob})[0])

    def detect(self, frame: np.ndarray) -> Detections:
        """Vehicles in one BGR frame; stage times are left in :attr:`times`."""
        t0 = time.perf_counter()
        blob = preprocess(frame, self.size)
        t1 = time.perf_counter()
        raw = self.infer(blob)
        t2 = time.perf_counter()
        dets = postprocess(
            raw, frame_shape=frame.shape, class_ids=self.class_ids,
            conf_threshold=self.conf_threshold, iou_threshold=self.iou_threshold,
        )
        t3 = time.perf_counter()
        self.times = StageTimes(t1 - t0, t2 - t1, t3 - t2)
        return dets


class OpenCvDetector:
    """OpenCV DNN running the original Darknet files: the reference the converter is checked against.

    Its output rows have the same layout as the ONNX model's, except that class
    columns already hold objectness × probability and are zeroed below OpenCV's
    internal threshold; :meth:`infer` undoes neither, :meth:`detect` treats both alike.
    """

    def __init__(self, cfg: Path, weights: Path, class_names: list[str], *, size: int = 320,
                 keep: Sequence[str] = VEHICLE_CLASSES, conf_threshold: float = 0.25,
                 iou_threshold: float = 0.45) -> None:
        self.net = cv2.dnn.readNetFromDarknet(str(cfg), str(weights))
        self.net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
        self.net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
        self.outputs = self.net.getUnconnectedOutLayersNames()
        self.size = size
        self.class_names = class_names
        self.class_ids = [class_names.index(k) for k in keep]
        self.conf_threshold = conf_threshold
        self.iou_threshold = iou_threshold

    def infer(self, blob: np.ndarray) -> np.ndarray:
        """OpenCV's rows ``[cx, cy, w, h, obj, obj*cls...]`` for one blob."""
        self.net.setInput(blob)
        return np.concatenate(self.net.forward(self.outputs), axis=0)

    def detect(self, frame: np.ndarray) -> Detections:
        """Vehicles in one BGR frame."""
        raw = self.infer(preprocess(frame, self.size)).copy()
        obj = np.maximum(raw[:, 4:5], 1e-12)
        raw[:, 5:] = raw[:, 5:] / obj  # back to class probabilities so postprocess multiplies once
        return postprocess(raw, frame_shape=frame.shape, class_ids=self.class_ids,
                           conf_threshold=self.conf_threshold, iou_threshold=self.iou_threshold)
