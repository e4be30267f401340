"""Counting on synthetic trajectories with known crossings: both directions, occlusions, ID switches."""

from __future__ import annotations

import numpy as np
import pytest
import supervision as sv

from consortium.edge.vision.counting import CountingLine, TrafficCounter
from consortium.edge.vision.detector import Detections
from consortium.errors import ConfigError

NAMES = ["person", "bicycle", "car", "motorbike", "aeroplane", "bus", "train", "truck"]
CAR, BUS, TRUCK = 2, 5, 7
LINE = CountingLine("main", (0, 200), (640, 200))  # horizontal, drawn left to right


def box(cx: float, cy: float, w: float = 60, h: float = 40) -> list[float]:
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


def frames(paths: list[tuple[int, list[tuple[float, float]]]], *, hidden: dict[int, range] | None = None):
    """Per frame, the detections of every path alive then (path: (class_id, [centre per frame]))."""
    n = max(len(p) for _, p in paths)
    hidden = hidden or {}
    for t in range(n):
        rows, cls = [], []
        for i, (cid, pts) in enumerate(paths):
            if t < len(pts) and t not in hidden.get(i, range(0)):
                rows.append(box(*pts[t]))
                cls.append(cid)
        yield Detections(np.array(rows, np.float32).reshape(-1, 4), np.full(len(rows), 0.9, np.float32),
                         np.array(cls, np.int64))


def straight(x: float, y0: float, y1: float, steps: int) -> list[tuple[float, float]]:
    return [(x, y) for y in np.linspace(y0, y1, steps)]


def run(counter: TrafficCounter, stream) -> None:
    for dets in stream:
        counter.update(dets)


def test_both_directions_per_class() -> None:
    counter = TrafficCounter([LINE], NAMES)
    paths = [
        (CAR, straight(100, 350, 50, 40)),  # upwards
        (TRUCK, straight(300, 50, 350, 40)),  # downwards
        (CAR, straight(500, 60, 340, 40)),  # downwards
    ]
    run(counter, frames(paths))
    assert counter.totals == {"main": {"in": {"car": 1}, "out": {"car": 1, "truck": 1}}}
    assert counter.drain() == counter.totals
    assert counter.drain() == {}  # the interval was reset, totals stay
    assert counter.total() == 3


def test_vehicle_not_reaching_the_line_is_not_counted() -> None:
    counter = TrafficCounter([LINE], NAMES)
    run(counter, frames([(CAR, straight(100, 350, 230, 30)), (BUS, straight(300, 350, 230, 30)[::-1])]))
    assert counter.total() == 0


def test_occlusion_keeps_the_track_and_counts_once() -> None:
    counter = TrafficCounter([LINE], NAMES, frame_rate=25, lost_track_seconds=1.0)
    path = straight(200, 350, 50, 60)
    # hidden for 10 frames (0.4 s) right while crossing the line
    run(counter, frames([(CAR, path)], hidden={0: range(25, 35)}))
    assert counter.total() == 1
    assert counter.totals["main"]["in"] == {"car": 1}


def test_two_vehicles_passing_each_other_at_the_line() -> None:
    # opposite directions, overlapping boxes at the line: the classic ID-switch trap
    counter = TrafficCounter([LINE], NAMES)
    up = [(300, y) for y in np.linspace(350, 50, 50)]
    down = [(330, y) for y in np.linspace(50, 350, 50)]
    run(counter, frames([(CAR, up), (TRUCK, down)]))
    assert counter.totals == {"main": {"in": {"car": 1}, "out": {"truck": 1}}}


class SwitchingTracker:
    """Tracker that hands out a new id every ``every`` frames: forced ID switches."""

    def __init__(self, every: int) -> None:
        self.every, self.frame = every, 0

    def update(self, dets: sv.Detections) -> sv.Detections:
        self.frame += 1
        dets.tracker_id = np.arange(len(dets)) + 1000 * (self.frame // self.every)
        return dets


def test_id_switch_away_from_the_line_does_not_double_count() -> None:
    counter = TrafficCounter([LINE], NAMES, tracker=SwitchingTracker(every=12))
    run(counter, frames([(CAR, straight(100, 350, 50, 30))]))  # switch at frames 12, 24; crossing ~ frame 15
    assert counter.total() == 1


def test_several_lines_and_intervals() -> None:
    lines = [LINE, CountingLine("side", (320, 0), (320, 400))]
    counter = TrafficCounter(lines, NAMES)
    run(counter, frames([(CAR, [(x, 300) for x in np.linspace(100, 600, 40)])]))  # crosses "side" only
    first = counter.drain()
    run(counter, frames([(BUS, straight(100, 350, 50, 40))]))
    second = counter.drain()
    assert first == {"side": {"in": {"car": 1}}}  # walking down the line, the car goes right-hand → left-hand
    assert second == {"main": {"in": {"bus": 1}}}


def test_bad_configuration_is_refused_with_a_clear_message() -> None:
    with pytest.raises(ConfigError, match="x1,y1,x2,y2"):
        CountingLine.parse("main:1,2,3")
    with pytest.raises(ConfigError, match="unique names"):
        TrafficCounter([LINE, LINE], NAMES)
    with pytest.raises(ConfigError, match="'end' parameter"):
        CountingLine("a", (1, 1), (1, 1))
    assert CountingLine.parse("n:0,1,2,3") == CountingLine("n", (0.0, 1.0), (2.0, 3.0))


def test_zone_counts_entries_and_exits_per_class() -> None:
    from consortium.edge.vision.counting import CountingZone

    zone = CountingZone.parse("box:200,100,440,100,440,300,200,300")
    counter = TrafficCounter([zone], NAMES)
    paths = [
        (CAR, [(x, 200) for x in np.linspace(50, 600, 40)]),  # through: enters and leaves
        (BUS, [(x, 150) for x in np.linspace(50, 320, 30)]),  # enters and stays
        (TRUCK, [(x, 350) for x in np.linspace(50, 600, 40)]),  # passes below, never inside
    ]
    run(counter, frames(paths))
    assert counter.totals == {"box": {"in": {"bus": 1, "car": 1}, "out": {"car": 1}}}
    with pytest.raises(ConfigError, match=">= 3 corners"):
        CountingZone.parse("z:0,0,1,1")


def test_zone_keeps_state_through_an_occlusion() -> None:
    from consortium.edge.vision.counting import CountingZone

    counter = TrafficCounter([CountingZone("box", ((200, 100), (440, 100), (440, 300), (200, 300)))], NAMES)
    path = [(x, 200) for x in np.linspace(50, 350, 40)]
    run(counter, frames([(CAR, path)], hidden={0: range(15, 24)}))  # hidden while entering
    assert counter.totals == {"box": {"in": {"car": 1}}}
