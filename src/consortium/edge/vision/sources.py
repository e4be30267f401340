"""Frame sources: video file, camera device, RTSP/HTTP stream (OpenCV), directory of images.

Every source yields :class:`Frame` objects (image, capture time, stream time).
Files and directories are read in order, every frame.  Live sources (camera,
stream) are read by a grabber thread that keeps only the newest frame: when
inference falls behind, older frames are dropped (counted in
:attr:`FrameSource.dropped`) so latency stays bounded.  A stream that stops is
reopened with back-off; an unreadable source is a :class:`SourceError` naming it.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from consortium.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
_URL = re.compile(r"^(rtsp|rtsps|http|https|rtmp|udp|tcp)://", re.IGNORECASE)


class SourceError(DataError):
    """A frame source cannot be opened or read."""


@dataclass(frozen=True)
class Frame:
    """One frame and when it arrived."""

    image: np.ndarray
    captured: float
    """``time.perf_counter()`` when the frame was read (start of its latency budget)."""
    ts: float
    """Stream time in seconds (video position for files, wall-clock seconds for live sources)."""
    index: int


class FrameSource:
    """Base class: iterate to get frames; :meth:`close` releases the device."""

    fps: float = 25.0
    dropped: int = 0
    live: bool = False

    def __iter__(self) -> Iterator[Frame]:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        """Release the underlying device or file."""


def open_source(spec: str | int, *, reconnect_s: float = 2.0, max_reconnects: int | None = None) -> FrameSource:
    """Open ``spec``: a camera index (``0``), a stream URL, a video file or a directory of images."""
    if isinstance(spec, int) or (isinstance(spec, str) and spec.isdigit()):
        return LiveSource(int(spec), reconnect_s=reconnect_s, max_reconnects=max_reconnects)
    if not isinstance(spec, str) or not spec:
        raise SourceError(f"A frame source must be a camera index, URL, video file or directory. Got {spec!r}.")
    if _URL.match(spec):
        return LiveSource(spec, reconnect_s=reconnect_s, max_reconnects=max_reconnects)
    path = Path(spec)
    if path.is_dir():
        return ImageDirSource(path)
    if path.is_file():
        return VideoFileSource(path)
    raise SourceError(f"Frame source {spec!r} does not exist (not a camera index, URL, file or directory).")


class VideoFileSource(FrameSource):
    """Every frame of a video file, in order."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.cap = cv2.VideoCapture(str(self.path))
        if not self.cap.isOpened():
            raise SourceError(f"Cannot open video file {self.path}: unreadable or unsupported format.")
        fps = self.cap.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if fps and fps > 0 else 25.0

    def __iter__(self) -> Iterator[Frame]:
        index = 0
        while True:
            ok, image = self.cap.read()
            captured = time.perf_counter()
            if not ok:
                if index == 0:
                    raise SourceError(f"Video file {self.path} holds no readable frame.")
                return
            yield Frame(image, captured, index / self.fps, index)
            index += 1

    def close(self) -> None:
        self.cap.release()


class ImageDirSource(FrameSource):
    """The images of a directory in name order, as frames at ``fps``."""

    def __init__(self, path: Path, *, fps: float = 25.0) -> None:
        self.path = Path(path)
        self.files = sorted(p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise SourceError(f"Directory {self.path} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
        self.fps = fps

    def __iter__(self) -> Iterator[Frame]:
        for index, file in enumerate(self.files):
            image = cv2.imread(str(file), cv2.IMREAD_COLOR)
            if image is None:
                raise SourceError(f"Cannot read image {file} (frame {index} of {self.path}).")
            yield Frame(image, time.perf_counter(), index / self.fps, index)


class LiveSource(FrameSource):
    """Camera device or network stream; a grabber thread keeps only the newest frame.

    Parameters
    ----------
    target : int or str
        Camera index or stream URL.
    reconnect_s : float
        Wait between attempts to reopen a failed stream.
    max_reconnects : int or None
        Give up (:class:`SourceError`) after this many failed reopen attempts in a row.
    """

    live = True

    def __init__(self, target: int | str, *, reconnect_s: float = 2.0, max_reconnects: int | None = None) -> None:
        self.target = target
        self.reconnect_s = reconnect_s
        self.max_reconnects = max_reconnects
        self.reconnects = 0
        self.cap = self._open()
        if self.cap is None:
            raise SourceError(f"Cannot open {self._what()}: no device or stream answers.")
        fps = self.cap.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if fps and 0 < fps < 240 else 25.0
        self._cond = threading.Condition()
        self._latest: tuple[np.ndarray, float] | None = None
        self._stop = threading.Event()
        self._error: SourceError | None = None
        self._thread = threading.Thread(target=self._grab, name="vision-grabber", daemon=True)
        self._thread.start()

    def _what(self) -> str:
        return f"camera {self.target}" if isinstance(self.target, int) else f"stream {self.target}"

    def _open(self) -> cv2.VideoCapture | None:
        cap = cv2.VideoCapture(self.target)
        if cap.isOpened():
            return cap
        cap.release()
        return None

    def _grab(self) -> None:
        failures = 0
        while not self._stop.is_set():
            ok, image = self.cap.read() if self.cap is not None else (False, None)
            if ok:
                failures = 0
                with self._cond:
                    if self._latest is not None:
                        self.dropped += 1
                    self._latest = (np.asarray(image), time.perf_counter())
                    self._cond.notify()
                continue
            # stream ended or broke: reopen with back-off
            if self.cap is not None:
                self.cap.release()
            failures += 1
            if self.max_reconnects is not None and failures > self.max_reconnects:
                with self._cond:
                    self._error = SourceError(f"Lost {self._what()} and {self.max_reconnects} reopen attempts failed.")
                    self._cond.notify()
                return
            logger.warning("lost %s; reopening in %.1f s (attempt %d)", self._what(), self.reconnect_s, failures)
            self._stop.wait(self.reconnect_s)
            self.cap = self._open()
            if self.cap is not None:
                self.reconnects += 1

    def __iter__(self) -> Iterator[Frame]:
        index = 0
        start = time.time()
        while not self._stop.is_set():
            with self._cond:
                while self._latest is None and self._error is None and not self._stop.is_set():
                    self._cond.wait(0.5)
                if self._error is not None:
                    raise self._error
                if self._latest is None:
                    return
                image, captured = self._latest
                self._latest = None
            yield Frame(image, captured, time.time() - start, index)
            index += 1

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout=2)
        if self.cap is not None:
            self.cap.release()
