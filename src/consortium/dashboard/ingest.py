"""MQTT → run store → live page: the dashboard's ingest path.

:class:`AlertIngestor` subscribes (QoS 1, persistent MQTT v5 session) to every
agent message kind of the wire contract (:mod:`consortium.edge.messages`):

1. **paho network thread** — checks each message with
   :func:`~consortium.edge.messages.parse_message` and puts it on a bounded queue
   (a full queue blocks the network thread, which pushes back on the broker
   instead of dropping anything); malformed messages are counted, logged and
   acknowledged.
2. **writer thread** — drains the queue in batches and writes each batch in one
   transaction with ``INSERT ... ON CONFLICT (msg_id) DO NOTHING`` (SQLite and
   PostgreSQL), so a redelivered message is stored once.  Only *after* the
   commit does it send the MQTT acknowledgements (``manual_ack``): a dashboard
   killed mid-batch has not acknowledged those messages, the broker redelivers
   them to the same persistent session, and the unique ``msg_id`` drops whatever
   was already stored.  Nothing is lost and nothing is doubled.
3. **push** — rows that were actually new go to the :class:`EventHub`, which
   fans them out to the connected pages.

A failed write is retried (with backoff) without acknowledging, so a store that
is briefly unreachable delays alerts but does not lose them.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from consortium.dashboard.hub import EventHub
from consortium.dashboard.schema import AgentRow, AlertRow, EventRow, TelemetryRow, TrafficRow, ensure_tables
from consortium.dashboard.views import agent_view, count_alerts, traffic_view
from consortium.edge.messages import (
    KINDS,
    Alert,
    DriftReport,
    Event,
    MessageError,
    Status,
    Telemetry,
    TopicParts,
    TrafficCounts,
    check_name,
    parse_message,
    subscription,
)
from consortium.errors import ConfigError, ConsortiumError, param_error
from consortium.mqtt_url import parse_broker_url
from consortium.registry.store import RunStore

logger = logging.getLogger(__name__)

SESSION_EXPIRY_S = 7 * 24 * 3600
"""How long the broker keeps the dashboard's session (and queues its messages) while it is down."""
RECEIVE_MAXIMUM = 65535
"""Unacknowledged QoS 1 messages the broker may have in flight to the dashboard (MQTT v5 Receive Maximum).

The largest allowed: Mosquitto queues at most ``max_queued_messages`` (default 1000) more per client and
drops QoS 1 messages beyond that, so a dashboard that falls behind should hold as many in flight as it can
(they are acknowledged only after they are stored)."""


INVALID_WARNINGS = 20
"""Malformed messages logged as warnings one by one; after that every 1000th (the rest at debug level)."""


@dataclass(frozen=True)
class IngestStats:
    """Counters since :meth:`AlertIngestor.start` (a snapshot).

    Attributes
    ----------
    received : int
        Messages that arrived and passed the schema check.
    invalid : int
        Messages refused by the schema check (acknowledged, not stored).
    stored : int
        Messages written for the first time (alerts, telemetry, events, drift, counts; status updates).
    duplicates : int
        Messages whose ``msg_id`` was already stored (redeliveries, agent re-sends).
    alerts_stored : int
        New alerts among ``stored``.
    batches : int
        Committed write transactions.
    write_errors : int
        Failed write attempts (each retried).
    queued : int
        Messages received but not yet written.
    """

    received: int = 0
    invalid: int = 0
    stored: int = 0
    duplicates: int = 0
    alerts_stored: int = 0
    batches: int = 0
    write_errors: int = 0
    queued: int = 0


@dataclass(frozen=True)
class _Incoming:
    mid: int
    qos: int
    parts: TopicParts
    message: Any
    received_at: float


class AlertIngestor:
    """Subscribe to the agents' MQTT messages, store them once, push new ones live.

    Parameters
    ----------
    store : RunStore
        Where the messages are stored (the dashboard's tables are created if missing).
    broker_url : str
        ``mqtt://HOST:PORT`` or ``mqtts://HOST:PORT``.
    hub : EventHub, optional
        Receives every newly stored alert, agent update, event and traffic interval.
    institution : str, optional
        Subscribe to this institution's agents only (default: all).
    client_id : str, optional
        MQTT client id; the broker keeps this session's queue while the dashboard
        is down, so give a stable id to a long-running dashboard (default: a fresh
        random id, i.e. no history across restarts beyond what is stored).
    username, password : str, optional
        Broker credentials (never logged).
    tls_ca : str, optional
        CA certificate file for ``mqtts://``.
    batch_size : int, default 1000
        Most messages written per transaction.
    queue_size : int, default 20000
        Messages buffered between the network and writer threads.
    on_batch : callable, optional
        Called with the list of newly stored alert dicts after each commit (tests, benchmarks).

    Raises
    ------
    ConfigError
        For a malformed broker URL or option.
    """

    def __init__(
        self,
        store: RunStore,
        broker_url: str,
        *,
        hub: EventHub | None = None,
        institution: str | None = None,
        client_id: str | None = None,
        username: str | None = None,
        password: str | None = None,
        tls_ca: str | None = None,
        batch_size: int = 1000,
        queue_size: int = 20_000,
        on_batch: Callable[[list[dict[str, Any]]], None] | None = None,
    ) -> None:
        owner = "AlertIngestor"
        self._address = parse_broker_url(broker_url, owner="AlertIngestor")
        if institution is not None:
            check_name(institution, what="institution")
        for name, value in (("batch_size", batch_size), ("queue_size", queue_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise param_error(name, owner, "an int >= 1", value)
        self._store = store
        self._hub = hub
        self._institution = institution
        self._batch_size = batch_size
        self._on_batch = on_batch
        self._queue: queue.Queue[_Incoming] = queue.Queue(queue_size)
        self._counters: dict[str, int] = {
            f.name: 0 for f in dataclasses.fields(IngestStats) if f.name != "queued"
        }
        self._stats_lock = threading.Lock()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._writer: threading.Thread | None = None
        self._client_id = client_id or f"consortium-dashboard-{uuid.uuid4().hex[:12]}"
        self._insert = postgresql.insert if store.engine.dialect.name == "postgresql" else sqlite.insert
        if store.engine.dialect.name not in ("postgresql", "sqlite"):
            raise ConfigError(f"The dashboard stores messages on SQLite or PostgreSQL. Got {store.url_masked}.")

        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self._client_id, protocol=mqtt.MQTTv5, manual_ack=True
        )
        if username is not None:
            client.username_pw_set(username, password)
        if self._address.tls:
            client.tls_set(ca_certs=tls_ca, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.reconnect_delay_set(min_delay=1, max_delay=10)
        self._client = client

    # ------------------------------------------------------------------ lifecycle

    @property
    def broker(self) -> str:
        """The broker's address (no credentials)."""
        scheme = "mqtts" if self._address.tls else "mqtt"
        return f"{scheme}://{self._address.host}:{self._address.port}"

    @property
    def connected(self) -> bool:
        """Whether the MQTT session is up and subscribed."""
        return self._connected.is_set()

    def start(self, *, wait: float = 10.0) -> AlertIngestor:
        """Create the tables, start the writer thread and connect (waiting up to ``wait`` s for the session).

        A broker that is unreachable at start is not an error once tables and threads
        are up: paho keeps reconnecting and :attr:`connected` turns true later.  It
        is reported as a warning after ``wait`` seconds.
        """
        ensure_tables(self._store)
        self._stop.clear()
        self._writer = threading.Thread(target=self._write_loop, name="dashboard-ingest-writer", daemon=True)
        self._writer.start()
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        props.ReceiveMaximum = RECEIVE_MAXIMUM
        try:
            self._client.connect_async(
                self._address.host, self._address.port, keepalive=30, clean_start=False, properties=props
            )
        except (OSError, ValueError) as exc:
            self._stop.set()
            raise ConfigError(f"Cannot connect to the MQTT broker at {self.broker}: {exc}") from exc
        self._client.loop_start()
        if wait > 0 and not self._connected.wait(wait):
            logger.warning("Dashboard ingest: MQTT broker %s not reachable yet; retrying in the background",
                           self.broker)
        return self

    def stop(self, *, timeout: float = 10.0) -> None:
        """Stop receiving, write and acknowledge everything already received, disconnect.

        The writer drains the queue first so that its acknowledgements still reach the
        broker; anything left unacknowledged is redelivered to this session later.
        """
        self._stop.set()
        self.wait_idle(timeout)
        self._client.disconnect()
        self._client.loop_stop()
        if self._writer is not None:
            self._writer.join(timeout)
            if self._writer.is_alive():
                logger.warning("Dashboard ingest: writer still busy after %.0f s; %d messages unwritten "
                               "(the broker redelivers them to this session)", timeout, self._queue.qsize())
            self._writer = None
        self._connected.clear()

    def __enter__(self) -> AlertIngestor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stats(self) -> IngestStats:
        """Counters so far."""
        with self._stats_lock:
            return IngestStats(**self._counters, queued=self._queue.qsize())

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until every received message is written (tests, benchmarks); False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._queue.unfinished_tasks == 0:
                return True
            time.sleep(0.01)
        return False

    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            for key, value in deltas.items():
                self._counters[key] += value

    # ------------------------------------------------------------------ MQTT thread

    def _on_connect(self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            logger.warning("Dashboard ingest: broker %s refused the connection: %s", self.broker, reason)
            return
        institution = self._institution or "+"
        client.subscribe([(subscription(kind, institution=institution), 1) for kind in KINDS])
        logger.info("Dashboard ingest: subscribed to %s for %s institution(s)", self.broker, institution)

    def _on_subscribe(self, _client: mqtt.Client, _userdata: Any, _mid: int, reasons: Any, _props: Any) -> None:
        failed = [r for r in reasons if r.is_failure]
        if failed:
            logger.error("Dashboard ingest: broker %s refused the subscription: %s", self.broker, failed)
            return
        self._connected.set()  # only now: messages published from here on reach this session

    def _on_disconnect(self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        self._connected.clear()
        if not self._stop.is_set():
            logger.warning("Dashboard ingest: lost the broker %s (%s); reconnecting", self.broker, reason)

    def _on_message(self, client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            parts, message = parse_message(msg.topic, bytes(msg.payload))
        except MessageError as exc:
            self._count(invalid=1)
            invalid = self._counters["invalid"]
            if invalid <= INVALID_WARNINGS or invalid % 1000 == 0:  # a broken agent must not flood the log
                logger.warning("Dashboard ingest: dropped malformed message #%d: %s", invalid, exc)
            else:
                logger.debug("Dashboard ingest: dropped a malformed message: %s", exc)
            if msg.qos > 0:
                client.ack(msg.mid, msg.qos)
            return
        self._count(received=1)
        # Blocks when the writer is behind: back-pressure to the broker instead of loss.
        self._queue.put(_Incoming(msg.mid, msg.qos, parts, message, time.time()))

    # ------------------------------------------------------------------ writer thread

    def _write_loop(self) -> None:
        wait = 0.05
        pending: list[_Incoming] = []
        while True:
            if not pending:
                try:
                    pending.append(self._queue.get(timeout=0.1))
                except queue.Empty:
                    if self._stop.is_set():
                        return
                    continue
                while len(pending) < self._batch_size:
                    try:
                        pending.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
            try:
                self._write_batch(pending)
            except ConsortiumError as exc:
                self._count(write_errors=1)
                logger.warning("Dashboard ingest: could not store %d messages (%s); retrying in %.2f s",
                               len(pending), exc, wait)
                if self._stop.wait(wait) and wait >= 1.0:
                    logger.error("Dashboard ingest: stopping with %d messages unwritten and unacknowledged "
                                 "(the broker redelivers them)", len(pending))
                    return
                wait = min(wait * 2, 5.0)
                continue
            wait = 0.05
            for item in pending:
                if item.qos > 0:
                    self._client.ack(item.mid, item.qos)
                self._queue.task_done()
            pending = []

    def _write_batch(self, batch: Sequence[_Incoming]) -> None:
        new_alerts, agents, events, traffic, stored, duplicates = self._store.run_transaction(
            lambda session: self._write(session, batch), action=f"store {len(batch)} dashboard messages"
        )
        self._count(stored=stored, duplicates=duplicates, alerts_stored=len(new_alerts), batches=1)
        if self._hub is not None:
            if new_alerts:
                self._hub.publish("alerts", new_alerts, last_id=max(a["id"] for a in new_alerts))
            self._hub.publish("fleet", agents)
            self._hub.publish("events", events)
            self._hub.publish("traffic", traffic)
        if self._on_batch is not None and new_alerts:
            self._on_batch(new_alerts)

    def _insert_new(self, session: Session, table: Any, rows: list[dict[str, Any]]) -> list[Any]:
        """Insert rows whose msg_id is not stored yet; return the inserted (id, msg_id) pairs."""
        if not rows:
            return []
        unique = list({r["msg_id"]: r for r in rows}.values())
        # executemany of one cached statement (SQLAlchemy's "insertmanyvalues" batches it with RETURNING):
        # ~10x cheaper than compiling a fresh multi-row VALUES statement for every batch.
        stmt = self._insert(table).on_conflict_do_nothing(index_elements=["msg_id"]).returning(table.id, table.msg_id)
        return list(session.execute(stmt, unique).all())

    def _write(
        self, session: Session, batch: Sequence[_Incoming]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], int, int]:
        alerts: list[dict[str, Any]] = []
        telemetry: list[dict[str, Any]] = []
        events: list[dict[str, Any]] = []
        traffic: list[dict[str, Any]] = []
        statuses: list[Status] = []
        seen: dict[tuple[str, str], float] = {}
        for item in batch:
            m, p = item.message, item.parts
            key = (p.institution, p.agent)
            ts = float(getattr(m, "ts", 0.0))
            seen[key] = max(seen.get(key, 0.0), item.received_at)
            if isinstance(m, Alert):
                alerts.append({
                    "msg_id": m.msg_id, "institution": m.institution, "agent": m.agent,
                    "transaction_id": m.transaction_id, "score": m.score, "threshold": m.threshold,
                    "model_version": m.model_version, "ts": ts, "received_at": item.received_at,
                })
            elif isinstance(m, Telemetry):
                telemetry.append({"msg_id": m.msg_id, "institution": m.institution, "agent": m.agent, "ts": ts,
                                  "payload": _as_dict(m)})
            elif isinstance(m, Status):
                statuses.append(m)
            elif isinstance(m, Event):
                events.append({"msg_id": m.msg_id, "kind": "events", "institution": m.institution, "agent": m.agent,
                               "ts": ts, "name": m.event[:64], "payload": _as_dict(m)})
            elif isinstance(m, DriftReport):
                events.append({"msg_id": m.msg_id, "kind": "drift", "institution": m.institution, "agent": m.agent,
                               "ts": ts, "name": m.status[:64], "payload": _as_dict(m)})
            elif isinstance(m, TrafficCounts):
                traffic.append({"msg_id": m.msg_id, "institution": m.institution, "agent": m.agent, "ts": ts,
                                "interval_s": m.interval_s, "model_version": m.model_version, "counts": m.counts})

        new_alert_ids = dict((mid, rid) for rid, mid in self._insert_new(session, AlertRow, alerts))
        new_tel = {mid for _, mid in self._insert_new(session, TelemetryRow, telemetry)}
        new_events = dict((mid, rid) for rid, mid in self._insert_new(session, EventRow, events))
        new_traffic = dict((mid, rid) for rid, mid in self._insert_new(session, TrafficRow, traffic))

        pushed_alerts = [{"id": new_alert_ids[a["msg_id"]], **a} for a in alerts if a["msg_id"] in new_alert_ids]
        # Several copies of one msg_id in one batch: only the first is "new".
        pushed_alerts = list({a["id"]: a for a in pushed_alerts}.values())
        pushed_events = list({new_events[e["msg_id"]]: {"id": new_events[e["msg_id"]], **e}
                              for e in events if e["msg_id"] in new_events}.values())
        pushed_traffic = []
        for t in traffic:
            if t["msg_id"] in new_traffic:
                pushed_traffic.append(traffic_view(TrafficRow(id=new_traffic.pop(t["msg_id"]), **t)))

        latest_tel: dict[tuple[str, str], dict[str, Any]] = {}
        for t in telemetry:
            if t["msg_id"] in new_tel:
                key = (t["institution"], t["agent"])
                if key not in latest_tel or t["ts"] >= latest_tel[key]["ts"]:
                    latest_tel[key] = t
        latest_status: dict[tuple[str, str], Status] = {}
        for s in statuses:
            key = (s.institution, s.agent)
            if key not in latest_status or s.ts >= latest_status[key].ts:
                latest_status[key] = s

        agents: list[dict[str, Any]] = []
        for key, last_seen in seen.items():
            agent_row = session.get(AgentRow, key)
            if agent_row is None:
                agent_row = AgentRow(institution=key[0], agent=key[1], app="fraud", state="unknown", state_ts=0.0,
                               model_version="", last_seen=0.0, telemetry_ts=0.0, telemetry={})
                session.add(agent_row)
            agent_row.last_seen = max(agent_row.last_seen or 0.0, last_seen)
            status = latest_status.get(key)
            if status is not None and status.ts >= (agent_row.state_ts or 0.0):
                agent_row.state, agent_row.state_ts, agent_row.app = status.state, status.ts, status.app
                if status.model_version:
                    agent_row.model_version = status.model_version
            tel = latest_tel.get(key)
            if tel is not None and tel["ts"] >= (agent_row.telemetry_ts or 0.0):
                agent_row.telemetry, agent_row.telemetry_ts = tel["payload"], tel["ts"]
                agent_row.app = tel["payload"].get("app", agent_row.app)
                if tel["payload"].get("model_version"):
                    agent_row.model_version = tel["payload"]["model_version"]
                if agent_row.state == "unknown":
                    agent_row.state = "online"
            agents.append(agent_view(agent_row))

        stored = len(new_alert_ids) + len(new_tel) + len(new_events) + len(pushed_traffic) + len(statuses)
        duplicates = len(batch) - stored
        return pushed_alerts, agents, pushed_events, pushed_traffic, stored, duplicates


def _as_dict(message: Any) -> dict[str, Any]:
    return dataclasses.asdict(message)


def count_stored_alerts(store: RunStore, *, institution: str | None = None) -> int:
    """How many distinct alerts the dashboard has stored (load tests count end-to-end delivery with it)."""
    ensure_tables(store)
    return store.run_transaction(lambda s: count_alerts(s, institution=institution), action="count alerts")


__all__ = ["AlertIngestor", "IngestStats", "count_stored_alerts"]
