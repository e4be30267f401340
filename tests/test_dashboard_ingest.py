"""Dashboard ingest against the real Mosquitto at 127.0.0.1:1883 on SQLite and PostgreSQL.

Each test uses its own random institution name and subscribes to it only, so tests
sharing the broker never see each other's messages.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Iterator

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from consortium.dashboard.hub import EventHub
from consortium.dashboard.ingest import AlertIngestor, count_stored_alerts
from consortium.dashboard.views import read_alerts, read_events, read_fleet, read_traffic
from consortium.edge import messages as m
from consortium.errors import ConfigError
from consortium.registry import RunStore

BROKER = "mqtt://127.0.0.1:1883"


@pytest.fixture
def inst() -> str:
    return f"bank-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def publisher() -> Iterator[mqtt.Client]:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-pub-{uuid.uuid4().hex[:8]}",
                         protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", 1883)
    client.loop_start()
    yield client
    client.disconnect()
    client.loop_stop()


def _publish(client: mqtt.Client, payload: m._Payload, *, kind: str, inst: str, agent: str = "a1",
             retain: bool = False) -> None:
    client.publish(m.agent_topic(inst, agent, kind), payload.to_json(), qos=1, retain=retain).wait_for_publish(5)


def _alert(inst: str, seq: int, *, agent: str = "a1") -> m.Alert:
    return m.Alert(m.make_msg_id(inst, agent, seq), inst, agent, f"tx-{seq}", 0.9, 0.5, "v1", m.now())


def _wait(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def _read(store: RunStore, fn: Callable[..., list[dict[str, object]]], inst: str) -> list[dict[str, object]]:
    return store.run_transaction(lambda s: fn(s, institution=inst), action="test read")


def test_each_alert_is_stored_once_and_pushed_once(run_store: RunStore, inst: str, publisher: mqtt.Client) -> None:
    pushed: list[dict[str, object]] = []
    with AlertIngestor(run_store, BROKER, institution=inst, on_batch=pushed.extend) as ingestor:
        for seq in range(20):
            _publish(publisher, _alert(inst, seq), kind="alerts", inst=inst)
        for seq in (3, 7, 3):  # agent outbox re-sends after a reconnect
            _publish(publisher, _alert(inst, seq), kind="alerts", inst=inst)
        assert _wait(lambda: ingestor.stats().received == 23)
        assert ingestor.wait_idle()
        stats = ingestor.stats()
    assert count_stored_alerts(run_store, institution=inst) == 20
    assert stats.alerts_stored == 20 and stats.duplicates == 3
    assert sorted(a["transaction_id"] for a in pushed) == sorted(f"tx-{i}" for i in range(20))  # type: ignore[type-var]
    rows = _read(run_store, read_alerts, inst)
    assert len({r["msg_id"] for r in rows}) == 20 and all(r["model_version"] == "v1" for r in rows)


def test_restart_with_same_session_loses_nothing(store_url: object, inst: str, publisher: mqtt.Client) -> None:
    """Alerts published while the dashboard is down are delivered to its persistent session on restart."""
    client_id = f"dash-{uuid.uuid4().hex[:8]}"
    store = store_url.open()  # type: ignore[attr-defined]
    try:
        with AlertIngestor(store, BROKER, institution=inst, client_id=client_id) as ingestor:
            for seq in range(10):
                _publish(publisher, _alert(inst, seq), kind="alerts", inst=inst)
            assert _wait(lambda: ingestor.stats().alerts_stored == 10)
        for seq in range(10, 60):  # dashboard down
            _publish(publisher, _alert(inst, seq), kind="alerts", inst=inst)
        with AlertIngestor(store, BROKER, institution=inst, client_id=client_id) as ingestor:
            assert _wait(lambda: count_stored_alerts(store, institution=inst) == 60)
            assert ingestor.wait_idle()
        assert count_stored_alerts(store, institution=inst) == 60
    finally:
        store.close()


def test_fleet_telemetry_status_last_will_events_and_counts(run_store: RunStore, inst: str,
                                                            publisher: mqtt.Client) -> None:
    hub = EventHub()
    with AlertIngestor(run_store, BROKER, institution=inst, hub=hub) as ingestor:
        _publish(publisher, m.Status(inst, "a1", "online", m.now(), "v3"), kind="status", inst=inst)
        tel = m.Telemetry(m.make_msg_id(inst, "a1", 1), inst, "a1", m.now(), 5.0, "v3", scored=500, alerts=5,
                          latency_us={"p50": 250.0, "p99": 2000.0}, queue_backlog=4, drift={"status": "warning"})
        _publish(publisher, tel, kind="telemetry", inst=inst)
        _publish(publisher, m.Event(m.make_msg_id(inst, "a1", 2), inst, "a1", m.now(), "model_updated",
                                    {"previous": "v2"}), kind="events", inst=inst)
        _publish(publisher, m.DriftReport(m.make_msg_id(inst, "a1", 3), inst, "a1", m.now(), "v3", "drift",
                                          {"psi_max": 0.4}), kind="drift", inst=inst)
        counts = {"north": {"in": {"car": 4, "bus": 1}}, "south": {"out": {"car": 2}}}
        _publish(publisher, m.TrafficCounts(m.make_msg_id(inst, "cam", 1), inst, "cam", m.now(), 10.0, "d1", counts),
                 kind="counts", inst=inst, agent="cam")
        assert _wait(lambda: ingestor.stats().received >= 5) and ingestor.wait_idle()
        fleet = {a["agent"]: a for a in _read(run_store, read_fleet, inst)}
        a1 = fleet["a1"]
        assert (a1["state"], a1["model_version"], a1["queue_backlog"], a1["drift_status"]) == (
            "online", "v3", 4, "warning")
        assert a1["throughput_per_s"] == pytest.approx(100.0) and a1["alerts_per_s"] == pytest.approx(1.0)
        assert a1["latency_p50_ms"] == pytest.approx(0.25) and a1["latency_p99_ms"] == pytest.approx(2.0)
        # The broker's last will for an agent that died: a retained offline status.
        _publish(publisher, m.Status(inst, "a1", "offline", m.now()), kind="status", inst=inst)
        assert _wait(lambda: {a["agent"]: a for a in _read(run_store, read_fleet, inst)}["a1"]["state"] == "offline")
        events = _read(run_store, read_events, inst)
        assert {(e["kind"], e["name"]) for e in events} == {("events", "model_updated"), ("drift", "drift")}
        traffic = _read(run_store, read_traffic, inst)
        assert len(traffic) == 1 and traffic[0]["totals"] == {"car": 6, "bus": 1}
    # Clear the retained status this test left on the shared broker.
    publisher.publish(m.agent_topic(inst, "a1", "status"), b"", qos=1, retain=True).wait_for_publish(5)


def test_malformed_messages_are_counted_and_do_not_block(run_store: RunStore, inst: str,
                                                         publisher: mqtt.Client) -> None:
    with AlertIngestor(run_store, BROKER, institution=inst) as ingestor:
        topic = m.agent_topic(inst, "a1", "alerts")
        for payload in (b"{not json", b"[]", b'{"msg_id": "x"}',
                        _alert("other-bank", 1).to_json()):  # claims another institution than its topic
            publisher.publish(topic, payload, qos=1).wait_for_publish(5)
        _publish(publisher, _alert(inst, 1), kind="alerts", inst=inst)
        assert _wait(lambda: ingestor.stats().alerts_stored == 1)
        assert ingestor.stats().invalid == 4
    assert count_stored_alerts(run_store, institution=inst) == 1


def test_broker_url_errors_name_the_problem(run_store: RunStore) -> None:
    for bad in ("http://127.0.0.1:1883", "127.0.0.1:1883", "mqtt://host:99999"):
        expected = rf"'broker_url' parameter of AlertIngestor .* Got '{re.escape(bad)}' instead"
        with pytest.raises(ConfigError, match=expected):
            AlertIngestor(run_store, bad)
    with pytest.raises(ConfigError, match="batch_size"):
        AlertIngestor(run_store, BROKER, batch_size=0)
