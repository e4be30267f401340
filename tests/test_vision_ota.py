"""Over-the-air detector updates through the shared Mosquitto: announce → verify → swap; rollback; refusals."""

from __future__ import annotations

import http.server
import threading
import time
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from consortium.edge import messages as m
from consortium.edge.publisher import MqttPublisher
from consortium.edge.vision.model import build_detector_bundle, load_detector
from consortium.edge.vision.ota import DetectorUpdater
from consortium.edge.vision.runner import build_agent
from consortium.edge.vision.sources import open_source
from consortium.edge.vision.synth import Scenario, default_scenario, write_video
from consortium.registry.bundle import sha256_hex
from consortium.registry.signing import generate_signing_key


@pytest.fixture
def served(tmp_path: Path) -> Iterator[str]:
    """An HTTP server for tmp_path (stands in for the coordinator's registry API)."""
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _wait(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_announced_bundle_is_verified_swapped_and_rolled_back(tmp_path: Path, served: str) -> None:
    key = generate_signing_key(tmp_path / "coordinator.key")
    rogue = generate_signing_key(tmp_path / "rogue.key")
    a = build_detector_bundle(tmp_path / "a.bundle", private_key_path=key, model_version="det-a")
    b = build_detector_bundle(tmp_path / "b.bundle", private_key_path=key, model_version="det-b", conf_threshold=0.3)
    bad = build_detector_bundle(tmp_path / "bad.bundle", private_key_path=rogue, model_version="det-rogue")
    sc = default_scenario(frames=20)
    video = write_video(Scenario(sc.width, sc.height, sc.fps, 20, sc.line, sc.trips), tmp_path / "v.avi")

    institution, channel = f"ota{uuid.uuid4().hex[:8]}", f"det{uuid.uuid4().hex[:8]}"
    events: list[m.Event] = []
    watcher = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2)
    watcher.on_message = lambda _c, _u, msg: events.append(m.parse_message(msg.topic, msg.payload)[1])
    watcher.connect("127.0.0.1", 1883)
    watcher.subscribe(m.agent_topic(institution, "cam1", "events"), qos=1)
    watcher.loop_start()
    publisher = MqttPublisher("mqtt://127.0.0.1:1883", institution=institution, agent="cam1",
                              outbox_path=tmp_path / "outbox.sqlite", app="vision").start()
    try:
        agent = build_agent(lines=[sc.line], bundle_path=a, public_key=Path(f"{key}.pub"), publisher=publisher,
                            institution=institution, agent="cam1")
        updater = DetectorUpdater(agent, public_key=Path(f"{key}.pub"), channel=channel).start()
        assert _wait(lambda: publisher.connected)
        agent.run(open_source(str(video)), max_frames=5)
        assert agent.model_version == "det-a" and agent.last_frame is not None

        def announce(path: Path, version: str, sha: str | None = None) -> None:
            ann = m.ModelAnnouncement(channel=channel, model_version=version, url=f"{served}/{path.name}",
                                      sha256=sha or sha256_hex(path.read_bytes()), ts=m.now())
            # retained, as the coordinator announces: no race with the agent's subscription
            watcher.publish(m.models_topic(channel), ann.to_json(), qos=1, retain=True).wait_for_publish()

        announce(b, "det-b")
        assert _wait(lambda: agent.model_version == "det-b")
        assert agent.detector.conf_threshold == 0.3
        agent.run(open_source(str(video)), max_frames=5)  # the new detector serves

        command = m.Command(command="rollback", ts=m.now())
        watcher.publish(m.agent_topic(institution, "cam1", "commands"), command.to_json(), qos=1).wait_for_publish()
        assert _wait(lambda: agent.model_version == "det-a")

        announce(bad, "det-rogue")  # signed by the wrong key
        announce(b, "det-b2", sha="0" * 64)  # archive hash does not match the announcement
        assert _wait(lambda: sum(e.event == "model_refused" for e in events) >= 2)
        assert agent.model_version == "det-a"
        updater.stop()
        assert publisher.wait_delivered(timeout=10)
    finally:
        publisher.stop()
        watcher.publish(m.models_topic(channel), b"", qos=1, retain=True).wait_for_publish()  # clear it
        watcher.loop_stop()
        watcher.disconnect()
    kinds = [e.event for e in events]
    assert kinds[:2] == ["model_updated", "rolled_back"]
    refused = [e.detail["error"] for e in events if e.event == "model_refused"]
    assert any("signature" in r.lower() or "key" in r.lower() for r in refused)
    assert any("SHA-256 differs" in r for r in refused)
    # a detector bundle is what load_detector accepts, and the swap kept the counter's class names
    detector, _ = load_detector(b, public_key=Path(f"{key}.pub"))
    assert agent.counter.class_names == detector.class_names
