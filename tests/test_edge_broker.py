"""The embedded MQTT broker, tested with paho-mqtt (the client every consortium component uses)."""

from __future__ import annotations

import socket
import struct
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

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


def _client5(broker: EmbeddedBroker, *, client_id: str, clean_start: bool = True, expiry: int = 0,
             receive_maximum: int | None = None, manual_ack: bool = False) -> tuple[mqtt.Client, list, list]:
    """An MQTT 5 paho client; returns it, the messages it got and the CONNACK session-present flags."""
    got: list[mqtt.MQTTMessage] = []
    present: list[bool] = []
    c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                    protocol=mqtt.MQTTv5, manual_ack=manual_ack)
    c.on_message = lambda _c, _u, msg: got.append(msg)
    c.on_connect = lambda _c, _u, flags, reason, _p: present.append(flags.session_present) \
        if not reason.is_failure else None
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = expiry
    if receive_maximum is not None:
        props.ReceiveMaximum = receive_maximum
    c.connect("127.0.0.1", broker.port, keepalive=5, clean_start=clean_start, properties=props)
    c.loop_start()
    assert _wait(lambda: len(present) == 1)
    return c, got, present


def _close(*clients: mqtt.Client) -> None:
    for c in clients:
        c.disconnect()
        c.loop_stop()


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
    v6 = _raw_connect(broker.port, will_topic="wills/v6", will=b"x", level=6)
    assert v6.recv(4) == b"\x20\x02\x00\x01"  # unacceptable protocol version
    v6.close()
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
        got = sink.wait_for(lambda s: len(s.of_kind(m.Alert)) >= 200)
        alerts = [a.transaction_id for a in sink.of_kind(m.Alert)]
        assert got, f"{len(alerts)} of 200 arrived; missing {sorted(set(map(str, range(200))) - set(alerts))[:20]}"
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
        assert sink.wait_for(lambda s: len(s.of_kind(m.Alert)) >= 100), f"{len(sink.of_kind(m.Alert))} of 100 arrived"
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


def test_process_publisher_replaces_a_dead_child(broker: EmbeddedBroker, tmp_path: Path) -> None:
    from consortium.edge.isolated import ProcessPublisher  # noqa: PLC0415
    from consortium.edge.testing import Collector  # noqa: PLC0415

    sink = Collector(broker.url, m.subscription("alerts", institution="bank-k"))
    pub = ProcessPublisher(broker.url, institution="bank-k", agent="a1", outbox_path=tmp_path / "o.db").start()

    def alert(i: int) -> m.Alert:
        return m.Alert(msg_id="", institution="bank-k", agent="a1", transaction_id=str(i), score=0.9,
                       threshold=0.5, model_version="1", ts=m.now())

    try:
        for i in range(10):
            pub.publish(alert(i))
        assert pub.wait_delivered(timeout=20)
        pub._process.kill()  # the child dies (e.g. killed by the OOM killer)
        pub._process.join(10)
        for i in range(10, 20):
            pub.publish(alert(i))  # the first send finds the pipe broken and starts a new child
        assert pub.wait_delivered(timeout=20)
        got = sink.wait_for(lambda s: len(s.of_kind(m.Alert)) == 20)
        ids = [a.msg_id for a in sink.of_kind(m.Alert)]  # type: ignore[attr-defined]
        assert got, f"{len(ids)} alerts, {len(set(ids))} distinct: {ids}"
        assert len(set(ids)) == 20 and ids[-1] == "bank-k/a1/20"  # sequence numbers continue from the outbox
    finally:
        pub.stop()
        sink.close()


def test_mqtt5_and_311_clients_talk_to_each_other(broker: EmbeddedBroker) -> None:
    sub5, got5, present = _client5(broker, client_id="s5")
    assert present == [False]
    sub3, got3 = _client(broker)
    sub5.subscribe("x/#", 1)
    sub3.subscribe("x/#", 1)
    time.sleep(0.1)
    pub3, _ = _client(broker)
    pub3.publish("x/from311", b"a", qos=1).wait_for_publish(5)
    pub5, _, _ = _client5(broker, client_id="p5")
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = [("trace", "42")]
    props.ContentType = "application/json"
    pub5.publish("x/from5", b"b", qos=1, properties=props).wait_for_publish(5)
    assert _wait(lambda: len(got5) == 2 and len(got3) == 2)
    assert [x.payload for x in got5] == [b"a", b"b"] == [x.payload for x in got3]
    forwarded = got5[1].properties
    assert forwarded.UserProperty == [("trace", "42")] and forwarded.ContentType == "application/json"
    _close(sub5, sub3, pub3, pub5)


def test_mqtt5_persistent_session_and_qos1_redelivery(broker: EmbeddedBroker) -> None:
    cid = f"p5-{uuid.uuid4().hex[:6]}"
    # Manual acks: the first subscriber receives but never acknowledges, as a dashboard killed mid-batch.
    sub, got, present = _client5(broker, client_id=cid, clean_start=False, expiry=300, manual_ack=True)
    assert present == [False]
    sub.subscribe("r/#", 1)
    time.sleep(0.1)
    pub, _ = _client(broker)
    for i in range(3):
        pub.publish("r/x", str(i).encode(), qos=1).wait_for_publish(5)
    assert _wait(lambda: len(got) == 3)
    _close(sub)
    for i in range(3, 6):  # while offline: queued for the session
        pub.publish("r/x", str(i).encode(), qos=1).wait_for_publish(5)
    again, got2, present = _client5(broker, client_id=cid, clean_start=False, expiry=300)
    assert present == [True]
    assert _wait(lambda: len(got2) == 6)
    assert [x.payload for x in got2] == [str(i).encode() for i in range(6)]
    assert [x.dup for x in got2] == [True] * 3 + [False] * 3  # the unacknowledged three are re-sent
    assert _wait(lambda: not broker.sessions[cid].inflight)  # paho acknowledges after on_message returns
    _close(again)
    # Everything acknowledged now: a third connection gets nothing more; clean start drops the session.
    third, got3, present = _client5(broker, client_id=cid, clean_start=False, expiry=300)
    time.sleep(0.2)
    assert present == [True] and got3 == []
    _close(third)
    fresh, _, present = _client5(broker, client_id=cid, clean_start=True, expiry=0)
    assert present == [False]
    _close(fresh)
    assert _wait(lambda: cid not in broker.sessions)  # expiry 0: the session ends with the connection
    _close(pub)


def test_mqtt5_session_expiry_interval_is_kept(broker: EmbeddedBroker) -> None:
    cid = f"e5-{uuid.uuid4().hex[:6]}"
    c, _, _ = _client5(broker, client_id=cid, clean_start=False, expiry=1)
    c.subscribe("e/#", 1)
    time.sleep(0.1)
    _close(c)
    assert _wait(lambda: broker.sessions[cid].connection is None)
    assert _wait(lambda: cid not in broker.sessions, timeout=3)
    again, _, present = _client5(broker, client_id=cid, clean_start=False, expiry=1)
    assert present == [False]
    _close(again)


def test_mqtt5_receive_maximum_is_honoured(broker: EmbeddedBroker) -> None:
    sub, got, _ = _client5(broker, client_id="rm", receive_maximum=2, manual_ack=True)
    sub.subscribe("m/#", 1)
    time.sleep(0.1)
    pub, _ = _client(broker)
    for i in range(6):
        pub.publish("m/x", str(i).encode(), qos=1).wait_for_publish(5)
    assert _wait(lambda: len(got) == 2)
    time.sleep(0.2)
    assert len(got) == 2  # no more than two unacknowledged messages in flight
    for step in range(2):
        for msg in list(got[-2:]):
            sub.ack(msg.mid, msg.qos)
        assert _wait(lambda n=step: len(got) == 4 + 2 * n)
    assert [x.payload for x in got] == [str(i).encode() for i in range(6)]  # in order
    _close(sub, pub)


def test_mqtt5_subscription_options_and_will_on_disconnect_reason(broker: EmbeddedBroker) -> None:
    pub, _, _ = _client5(broker, client_id="opts")
    pub.publish("o/retained", b"r", qos=1, retain=True).wait_for_publish(5)
    got: list[mqtt.MQTTMessage] = []
    pub.on_message = lambda _c, _u, msg: got.append(msg)
    pub.subscribe("o/#", options=SubscribeOptions(qos=1, noLocal=True, retainAsPublished=True, retainHandling=2))
    time.sleep(0.1)
    pub.publish("o/own", b"own", qos=1).wait_for_publish(5)  # no-local: not sent back to its publisher
    other, _ = _client(broker)
    other.publish("o/other", b"other", qos=1, retain=True).wait_for_publish(5)
    assert _wait(lambda: len(got) == 1)
    time.sleep(0.1)
    assert [(x.payload, x.retain) for x in got] == [(b"other", True)]  # retain handling 2: no retained on subscribe
    watcher, wills = _client(broker)
    watcher.subscribe("w/#", 1)
    time.sleep(0.1)
    leaver = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="leaver",
                         protocol=mqtt.MQTTv5)
    leaver.will_set("w/leaver", b"gone", qos=1)
    leaver.connect("127.0.0.1", broker.port)
    leaver.loop_start()
    assert _wait(leaver.is_connected)
    leaver.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, identifier=0x04))  # "with will message"
    leaver.loop_stop()
    assert _wait(lambda: [x.payload for x in wills] == [b"gone"])
    _close(pub, other, watcher)


def test_dashboard_ingest_through_embedded_broker(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """The dashboard's MQTT 5 ingest (manual acks, persistent session) stores what a 3.1.1 agent publishes."""
    from consortium.dashboard.ingest import AlertIngestor, count_stored_alerts  # noqa: PLC0415
    from consortium.registry import RunStore  # noqa: PLC0415

    store = RunStore(f"sqlite:///{tmp_path / 'store.db'}")
    pub = MqttPublisher(broker.url, institution="bank-d", agent="a1", outbox_path=tmp_path / "o.db").start()
    try:
        def send(lo: int, hi: int) -> None:
            for i in range(lo, hi):
                pub.publish(m.Alert(msg_id="", institution="bank-d", agent="a1", transaction_id=str(i), score=0.9,
                                    threshold=0.5, model_version="1", ts=m.now()))
            assert pub.wait_delivered(timeout=20)

        with AlertIngestor(store, broker.url, client_id="dash") as ingestor:
            assert ingestor.connected
            send(0, 50)
            assert _wait(lambda: ingestor.stats().alerts_stored == 50, timeout=10)
        send(50, 80)  # dashboard down: its persistent session keeps them
        with AlertIngestor(store, broker.url, client_id="dash") as ingestor:
            assert _wait(lambda: count_stored_alerts(store) == 80, timeout=10)
            assert ingestor.wait_idle() and ingestor.stats().duplicates == 0
    finally:
        pub.stop()
        store.close()
