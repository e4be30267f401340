"""A generated test video with known vehicle crossings, made of real images.

Real vehicle crops (the car in Darknet's ``dog.jpg``) are moved across a real
background (the beach of Darknet's ``kite.jpg``) along straight paths whose
crossings of a counting line are known by construction.  The images come from
Debian's ``darknet`` package (``/usr/share/darknet/data``); ``make vision-samples``
unpacks that package into ``~/.cache/consortium/darknet`` without installing its
120 dependencies.  Nothing is downloaded at run time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from consortium.edge.vision.counting import CountingLine
from consortium.errors import DataError

SAMPLE_DIRS = (
    Path("/usr/share/darknet/data"),
    Path.home() / ".cache" / "consortium" / "darknet" / "usr" / "share" / "darknet" / "data",
)
CAR_BOX = (466, 82, 686, 171)
"""The car in ``dog.jpg`` (x1, y1, x2, y2), as YOLOv3-tiny finds it."""


def sample_image(name: str) -> Path:
    """Path of one of Darknet's sample images (``dog.jpg``, ``kite.jpg``, ...)."""
    dirs = [Path(d) for d in os.environ.get("CONSORTIUM_VISION_SAMPLES", "").split(os.pathsep) if d]
    for d in (*dirs, *SAMPLE_DIRS):
        if (d / name).is_file():
            return d / name
    raise DataError(
        f"Sample image {name!r} not found in {[str(d) for d in (*dirs, *SAMPLE_DIRS)]}. "
        "Run `make vision-samples` (unpacks Debian's darknet package) or `apt-get install darknet`, "
        "or point CONSORTIUM_VISION_SAMPLES at a directory holding it."
    )


def read_image(path: Path) -> np.ndarray:
    """Read a BGR image or raise a :class:`DataError` naming the file."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise DataError(f"Cannot read image {path}: missing, unreadable or not an image.")
    return img


@dataclass(frozen=True)
class Trip:
    """One vehicle's straight path: centre from ``start`` to ``end`` over frames [first, last]."""

    first: int
    last: int
    start: tuple[float, float]
    end: tuple[float, float]
    scale: float = 1.0
    flip: bool = False

    def centre(self, frame: int) -> tuple[float, float] | None:
        if not self.first <= frame <= self.last:
            return None
        a = (frame - self.first) / max(self.last - self.first, 1)
        return (self.start[0] + a * (self.end[0] - self.start[0]), self.start[1] + a * (self.end[1] - self.start[1]))


@dataclass(frozen=True)
class Scenario:
    """A generated video's parameters and its ground truth."""

    width: int
    height: int
    fps: float
    frames: int
    line: CountingLine
    trips: tuple[Trip, ...]

    def expected(self) -> dict[str, int]:
        """Crossings of :attr:`line` per direction (``"in"``: right-hand → left-hand side of start→end)."""
        (x1, y1), (x2, y2) = self.line.start, self.line.end
        out = {"in": 0, "out": 0}
        for trip in self.trips:
            sides = []
            for p in (trip.start, trip.end):
                cross = (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1)
                sides.append(np.sign(cross))
            if sides[0] != sides[1]:
                # image y points down: a positive cross product is the right-hand side
                out["in" if sides[0] > 0 else "out"] += 1
        return out


def default_scenario(*, frames: int = 150, fps: float = 25.0) -> Scenario:
    """Five vehicles on a two-lane road at 640×360: 2 left→right, 2 right→left, 1 turning back before the line."""
    w, h = 640, 360
    f = frames / 150
    trips = (
        Trip(int(0 * f), int(45 * f), (-20, 120), (660, 120)),
        Trip(int(25 * f), int(75 * f), (660, 250), (-20, 250), scale=0.9, flip=True),
        Trip(int(60 * f), int(105 * f), (-20, 120), (660, 120), scale=0.8),
        Trip(int(85 * f), int(135 * f), (660, 250), (-20, 250), flip=True),
        Trip(int(110 * f), int(frames - 1), (60, 120), (250, 120), scale=0.85),  # stops short of the line
    )
    line = CountingLine("crossing", (w / 2, 0), (w / 2, h))
    return Scenario(w, h, fps, frames, line, trips)


def render(scenario: Scenario) -> Iterator[np.ndarray]:
    """The scenario's frames (BGR), each vehicle pasted at its path's position."""
    bg = read_image(sample_image("kite.jpg"))
    bg = cv2.resize(bg[450:900, :], (scenario.width, scenario.height), interpolation=cv2.INTER_AREA)
    x1, y1, x2, y2 = CAR_BOX
    car = read_image(sample_image("dog.jpg"))[y1 - 6 : y2 + 6, x1 - 6 : x2 + 6]
    sprites = []
    for trip in scenario.trips:
        img = cv2.flip(car, 1) if trip.flip else car
        sprites.append(cv2.resize(img, None, fx=0.75 * trip.scale, fy=0.75 * trip.scale,
                                  interpolation=cv2.INTER_AREA))
    for t in range(scenario.frames):
        frame = bg.copy()
        for trip, sprite in zip(scenario.trips, sprites, strict=True):
            c = trip.centre(t)
            if c is None:
                continue
            sh, sw = sprite.shape[:2]
            fx, fy = int(round(c[0] - sw / 2)), int(round(c[1] - sh / 2))
            ax, ay = max(fx, 0), max(fy, 0)
            bx, by = min(fx + sw, scenario.width), min(fy + sh, scenario.height)
            if bx > ax and by > ay:
                frame[ay:by, ax:bx] = sprite[ay - fy : by - fy, ax - fx : bx - fx]
        yield frame


def write_video(scenario: Scenario, path: Path) -> Path:
    """Render ``scenario`` to an MJPG ``.avi`` at ``path`` (read back through the video-file source)."""
    path = Path(path)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), scenario.fps,
                             (scenario.width, scenario.height))
    if not writer.isOpened():
        raise DataError(f"Cannot write video {path} (OpenCV has no MJPG writer?).")
    try:
        for frame in render(scenario):
            writer.write(frame)
    finally:
        writer.release()
    return path
