"""The embedded MQTT broker, tested with paho-mqtt (the client every consortium component uses)."""

from __future__ import annotations

import socket
import struct
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from consortium.edge import messages as m
from consortium.edge.broker import EmbeddedBroker, topic_matches
from consortium.edge.publisher import MqttPublisher
from consortium.errors import ConfigError


@pytest.fixture
def broker() -> EmbeddedBroker:
    with EmbeddedBroker() as b:
        yield b  # type: ignore[misc]


@pytest.mark.parametrize(
    ("flt", "topic", "ok"),
    [("a/b", "a/b", True), ("a/+", "a/b", True), ("a/+", "a/b/c", False), ("a/#", "a", True),
     ("a/#", "a/b/c", True), ("#", "$SYS/x", False), ("+/+/x", "a/b/x", True), ("a/b", "a/c", False),
     ("consortium/+/+/alerts", "consortium/bank/agent/alerts", True)],
)
def test_topic_matching(flt: str, topic: str, ok: bool) -> None:
    assert topic_matches(flt, topic) is ok
    assert mqtt.topic_matches_sub(flt, topic) is ok  # same answers as paho's reference


def _client(broker: EmbeddedBroker, *, client_id: str = "", clean: bool = True) -> tuple[mqtt.Client, list]:
    got: list[mqtt.MQTTMessage] = []
    c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                    clean_session=clean, protocol=mqtt.MQTTv311)
    c.on_message = lambda _c, _u, msg: got.append(msg)
    c.connect("127.0.0.1", broker.port, keepalive=5)
    c.loop_start()
    return c, got


def _wait(cond, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not cond():
        time.sleep(0.01)
    return bool(cond())


def test_publish_subscribe_qos_and_retained(broker: EmbeddedBroker) -> None:
    pub, _ = _client(broker)
    pub.publish("models/default", b"v1", qos=1, retain=True).wait_for_publish(5)
    sub, got = _client(broker)
    sub.subscribe([("a/+", 1), ("models/#", 0)])
    assert _wait(lambda: [x.payload for x in got] == [b"v1"]) and got[0].retain
    for qos in (0, 1, 2):
        pub.publish("a/b", f"q{qos}".encode(), qos=qos).wait_for_publish(5)
    pub.publish("a/b/c", b"not matched", qos=1).wait_for_publish(5)
    assert _wait(lambda: len(got) == 4)
    assert [x.payload for x in got[1:]] == [b"q0", b"q1", b"q2"]
    assert [x.qos for x in got[1:]] == [0, 1, 1]  # QoS 2 is granted as 1
    pub.publish("models/default", b"", qos=1, retain=True).wait_for_publish(5)  # clears the retained message
    late, late_got = _client(broker)
    late.subscribe("models/#", 1)
    time.sleep(0.2)
    assert late_got == []
    for c in (pub, sub, late):
        c.disconnect()
        c.loop_stop()


def test_persistent_session_gets_what_was_sent_while_offline(broker: EmbeddedBroker) -> None:
    cid = f"p-{uuid.uuid4().hex[:6]}"
    sub, _ = _client(broker, client_id=cid, clean=False)
    sub.subscribe("q/#", 1)
    time.sleep(0.1)
    sub.disconnect()
    sub.loop_stop()
    pub, _ = _client(broker)
    for i in range(5):
        pub.publish("q/x", str(i).encode(), qos=1).wait_for_publish(5)
    again, got = _client(broker, client_id=cid, clean=False)
    assert _wait(lambda: len(got) == 5)
    assert [x.payload for x in got] == [b"0", b"1", b"2", b"3", b"4"]
    for c in (pub, again):
        c.disconnect()
        c.loop_stop()


def _raw_connect(port: int, *, will_topic: str, will: bytes, level: int = 4) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    body = (struct.pack("!H", 4) + b"MQTT" + bytes([level, 0x02 | 0x04 | 0x08 | 0x20]) + struct.pack("!H", 30)
            + struct.pack("!H", 3) + b"raw" + struct.pack("!H", len(will_topic)) + will_topic.encode()
            + struct.pack("!H", len(will)) + will)
    s.sendall(bytes([0x10, len(body)]) + body)
    return s


def test_last_will_on_abrupt_disconnect_and_bad_protocol_refused(broker: EmbeddedBroker) -> None:
    sub, got = _client(broker)
    sub.subscribe("wills/#", 1)
    time.sleep(0.1)
    s = _raw_connect(broker.port, will_topic="wills/raw", will=b"offline")
    assert s.recv(4) == b"\x20\x02\x00\x00"  # CONNACK accepted
    s.close()  # no DISCONNECT: the will is published
    assert _wait(lambda: [x.payload for x in got] == [b"offline"])
    v5 = _raw_connect(broker.port, will_topic="wills/v5", will=b"x", level=5)
    assert v5.recv(4) == b"\x20\x02\x00\x01"  # unacceptable protocol version
    v5.close()
    garbage = socket.create_connection(("127.0.0.1", broker.port))
    garbage.sendall(b"\xff" * 10)  # not MQTT: connection closed, broker unharmed
    garbage.close()
    sub.disconnect()
    sub.loop_stop()


def test_publisher_through_embedded_broker(broker: EmbeddedBroker, tmp_path: Path) -> None:
    from consortium.edge.testing import Collector  # noqa: PLC0415

    sink = Collector(broker.url, m.subscription(institution="bank-e"))
    pub = MqttPublisher(broker.url, institution="bank-e", agent="a1", outbox_path=tmp_path / "o.db").start()
    try:
        for i in range(200):
            pub.publish(m.Alert(msg_id="", institution="bank-e", agent="a1", transaction_id=str(i), score=0.9,
                                threshold=0.5, model_version="1", ts=m.now()))
        assert pub.wait_delivered(timeout=20)
        assert sink.wait_for(lambda s: len(s.of_kind(m.Alert)) == 200)
        assert [a.transaction_id for a in sink.of_kind(m.Alert)] == [str(i) for i in range(200)]  # in order
        assert any(s.state == "online" for s in sink.of_kind(m.Status))  # type: ignore[attr-defined]
    finally:
        pub.stop()
        sink.close()


def test_process_publisher_keeps_the_publisher_contract(broker: EmbeddedBroker, tmp_path: Path) -> None:
    from consortium.edge.isolated import ProcessPublisher  # noqa: PLC0415
    from consortium.edge.testing import Collector  # noqa: PLC0415

    sink = Collector(broker.url, m.subscription(institution="bank-p"))
    commands: list[bytes] = []
    pub = ProcessPublisher(broker.url, institution="bank-p", agent="a1", outbox_path=tmp_path / "o.db").start()
    try:
        pub.subscribe(m.agent_topic("bank-p", "a1", "commands"), lambda _t, p: commands.append(p))
        pub.set_model_version("v9")
        for i in range(100):
            pub.publish(m.Alert(msg_id="", institution="bank-p", agent="a1", transaction_id=str(i), score=0.9,
                                threshold=0.5, model_version="v9", ts=m.now()))
        assert pub.flush(timeout=10) and pub.wait_delivered(timeout=20)
        assert pub.backlog == 0 and pub.stats().delivered == 100 and pub.connected
        assert sink.wait_for(lambda s: len(s.of_kind(m.Alert)) == 100)
        assert [a.msg_id for a in sink.of_kind(m.Alert)] == [f"bank-p/a1/{i}" for i in range(1, 101)]
        assert sink.wait_for(lambda s: any(x.model_version == "v9" for x in s.of_kind(m.Status)))
        sink.client.publish(m.agent_topic("bank-p", "a1", "commands"), m.Command(command="rollback", ts=1.0).to_json(),
                            qos=1)
        assert sink.wait_for(lambda s: len(commands) == 1)
        with pytest.raises(ConfigError, match="'payload' parameter"):
            pub.publish(m.Command(command="x", ts=1.0))
    finally:
        pub.stop()
        sink.close()
    assert pub.stats().delivered == 100  # final counters survive the child
