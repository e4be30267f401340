"""Store-and-forward MQTT publisher: every message is on disk before it is on the wire.

:class:`MqttPublisher` is the one MQTT client of every edge application (fraud
agent, vision agent, continual-learning monitor).  The caller's thread only puts
the message on an in-memory queue (``publish`` costs well under a microsecond
of the scoring thread); a writer thread

1. drains the queue in batches, gives each message its sequence number and
   ``msg_id`` and commits the batch to the :class:`~consortium.edge.outbox.Outbox`
   (one fsync per batch) — from then on the message is *queued* and survives a
   crash (:meth:`MqttPublisher.flush` waits for this point);
2. when connected, hands queued messages to paho-mqtt in sequence order at QoS 1;
3. deletes a message from the outbox when the broker's PUBACK arrives.

On every (re)connection everything still in the outbox is sent again from the
oldest message on, so a broker restart or agent restart loses nothing; a message
whose PUBACK was lost is sent twice, and receivers drop the copy by ``msg_id``.

The session is persistent (``clean_session=False``, a stable client id) so
commands and model announcements sent while the agent was offline are delivered
when it returns; the last will is a retained ``Status(state="offline")`` and a
retained ``"online"`` Status is published on every connect.
"""

from __future__ import annotations

import itertools
import json
import logging
import queue
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from consortium.edge import messages as m
from consortium.edge.outbox import Outbox
from consortium.errors import param_error

# BrokerAddress and parse_broker_url live in consortium.mqtt_url (shared with the dashboard,
# the retraining trigger and the registry); re-exported here, where callers have imported them.
from consortium.mqtt_url import BrokerAddress as BrokerAddress
from consortium.mqtt_url import parse_broker_url as parse_broker_url

logger = logging.getLogger(__name__)

_WAKE = object()
"""Queue token: wake the writer thread (acknowledgements arrived, connection up, stopping)."""

MessageHandler = Callable[[str, bytes], None]
"""Called with (topic, payload) for a message on a subscribed topic (in paho's network thread: be quick)."""


@dataclass(frozen=True)
class PublisherStats:
    """Counters of one publisher since start."""

    published: int
    queued: int
    sent: int
    delivered: int
    rejected: int
    backlog: int
    connected: bool
    reconnects: int


class MqttPublisher:
    """QoS-1 publisher with a durable outbox, for one agent of one institution.

    Parameters
    ----------
    broker_url : str
        ``mqtt://host:port`` or ``mqtts://host:port``.
    institution, agent : str
        Topic segments (see :mod:`consortium.edge.messages`).
    outbox_path : str or Path
        SQLite file of the durable outbox; reuse it across restarts.
    app : str
        Edge application (``"fraud"``, ``"vision"``) named in Status messages.
    tls_ca : str or Path, optional
        CA certificate to verify an ``mqtts://`` broker (system CAs if omitted).
    username, password : str, optional
        Broker credentials.
    client_id : str, optional
        MQTT client id; default ``consortium-<institution>-<agent>-<app>`` (stable, so the
        broker keeps the persistent session across restarts).
    batch_max : int
        Most messages committed to the outbox in one transaction.
    inflight_max : int
        Most messages handed to the broker and not yet acknowledged.
    synchronous : {"NORMAL", "FULL"}
        Outbox durability: ``NORMAL`` survives an agent kill, ``FULL`` also power loss
        (see :class:`~consortium.edge.outbox.Outbox`).
    """

    def __init__(
        self,
        broker_url: str,
        *,
        institution: str,
        agent: str,
        outbox_path: str | Path,
        app: str = "fraud",
        tls_ca: str | Path | None = None,
        username: str | None = None,
        password: str | None = None,
        client_id: str | None = None,
        batch_max: int = 512,
        inflight_max: int = 1000,
        synchronous: str = "NORMAL",
        keepalive: int = 30,
    ) -> None:
        self.address = parse_broker_url(broker_url, owner="MqttPublisher")
        self.broker_url = broker_url
        self.institution = m.check_name(institution, what="institution")
        self.agent = m.check_name(agent, what="agent")
        self.app = app
        if batch_max < 1:
            raise param_error("batch_max", "MqttPublisher", "an integer >= 1", batch_max)
        if inflight_max < 1:
            raise param_error("inflight_max", "MqttPublisher", "an integer >= 1", inflight_max)
        self.batch_max = batch_max
        self.inflight_max = inflight_max
        self.outbox = Outbox(outbox_path, synchronous=synchronous)
        self.model_version = ""

        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._published = itertools.count(1)
        self._n_published = 0
        self._n_queued = 0
        self._n_sent = 0
        self._n_delivered = 0
        self._n_rejected = 0
        self._reconnects = 0
        self._committed = threading.Condition()
        self._acked_mids: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._inflight: dict[int, int] = {}
        self._sent_through = 0
        self._connection = 0  # bumped by on_connect; the writer resends everything when it changes
        self._seen_connection = 0
        self._connected = threading.Event()
        self._stopping = threading.Event()
        self._handlers: list[tuple[str, MessageHandler]] = []
        self._writer: threading.Thread | None = None

        cid = client_id or f"consortium-{institution}-{agent}-{app}"
        self._client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=cid,
            clean_session=False,
            protocol=mqtt.MQTTv311,
        )
        self._client.max_inflight_messages_set(inflight_max)
        self._client.max_queued_messages_set(0)
        self._client.reconnect_delay_set(min_delay=1, max_delay=5)
        if username is not None:
            self._client.username_pw_set(username, password)
        if self.address.tls:
            self._client.tls_set(ca_certs=str(tls_ca) if tls_ca else None, cert_reqs=ssl.CERT_REQUIRED)
        self._keepalive = keepalive
        self._status_topic = m.agent_topic(self.institution, self.agent, "status")
        self._client.will_set(self._status_topic, self._status("offline"), qos=1, retain=True)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._client.on_message = self._on_message

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> MqttPublisher:
        """Start the writer thread and connect in the background (retrying until the broker answers)."""
        if self._writer is not None:
            return self
        self._writer = threading.Thread(target=self._write_loop, name=f"outbox-{self.agent}", daemon=True)
        self._writer.start()
        self._client.connect_async(self.address.host, self.address.port, keepalive=self._keepalive)
        self._client.loop_start()
        return self

    def stop(self, *, drain_timeout: float = 2.0) -> None:
        """Commit everything published, try ``drain_timeout`` seconds to deliver it, then go offline.

        Whatever the broker has not acknowledged stays in the outbox for the next start.
        """
        if self._writer is None:
            return
        deadline = time.monotonic() + drain_timeout
        self.flush(timeout=max(drain_timeout, 5.0))
        if len(self.outbox) and self._connected.wait(max(deadline - time.monotonic(), 0.0)):
            self.wait_delivered(timeout=max(deadline - time.monotonic(), 0.0))
        self._stopping.set()
        self._queue.put(_WAKE)
        self._writer.join(timeout=10)
        self._writer = None
        if self._connected.is_set():
            info = self._client.publish(self._status_topic, self._status("offline"), qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=1.0)
            except RuntimeError:
                pass
        self._client.disconnect()
        self._client.loop_stop()
        self.outbox.close()

    def __enter__(self) -> MqttPublisher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ API

    def publish(self, payload: Any) -> None:
        """Queue one message (a :mod:`~consortium.edge.messages` dataclass) for durable delivery.

        Returns at once; the message is committed to the outbox by the writer thread
        (see :meth:`flush`).  A payload with ``msg_id == ""`` gets ``institution/agent/seq``.
        """
        kind = getattr(payload, "KIND", None)
        if kind not in m.KINDS:
            raise param_error("payload", "MqttPublisher.publish", f"a message of a kind in {m.KINDS}", payload)
        self._n_published = next(self._published)
        self._queue.put(payload)

    def flush(self, *, timeout: float = 10.0) -> bool:
        """Wait until every message published so far is committed to the outbox ("queued")."""
        target = self._n_published
        deadline = time.monotonic() + timeout
        with self._committed:
            while self._n_queued + self._n_rejected < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._committed.wait(left)
        return True

    def wait_delivered(self, *, timeout: float = 10.0) -> bool:
        """Wait until the outbox is empty (everything acknowledged by the broker)."""
        if not self.flush(timeout=timeout):
            return False
        deadline = time.monotonic() + timeout
        while len(self.outbox) > 0:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def subscribe(self, topic_filter: str, handler: MessageHandler) -> None:
        """Receive messages on ``topic_filter`` (QoS 1; kept across reconnects)."""
        self._handlers.append((topic_filter, handler))
        if self._connected.is_set():
            self._client.subscribe(topic_filter, qos=1)

    def set_model_version(self, version: str) -> None:
        """Name ``version`` in Status messages and republish the retained online Status."""
        self.model_version = version
        if self._connected.is_set():
            self._client.publish(self._status_topic, self._status("online"), qos=1, retain=True)

    @property
    def backlog(self) -> int:
        """Messages published but not yet acknowledged by the broker."""
        return len(self.outbox) + max(self._n_published - self._n_queued - self._n_rejected, 0)

    @property
    def connected(self) -> bool:
        """Whether the broker connection is up right now."""
        return self._connected.is_set()

    def stats(self) -> PublisherStats:
        """Counters since start."""
        return PublisherStats(
            published=self._n_published, queued=self._n_queued, sent=self._n_sent, delivered=self._n_delivered,
            rejected=self._n_rejected, backlog=self.backlog, connected=self.connected, reconnects=self._reconnects,
        )

    # ------------------------------------------------------------------ writer thread

    def _encode(self, payload: Any, seq: int) -> bytes:
        if getattr(payload, "msg_id", None) != "":
            data: bytes = payload.to_json()
            return data
        # Fast path for the common case (flat JSON fields): no deep copy, no second dataclass.
        fields = {**vars(payload), "msg_id": m.make_msg_id(self.institution, self.agent, seq)}
        data = json.dumps(fields, separators=(",", ":"), allow_nan=False).encode()
        if len(data) > m.MAX_PAYLOAD_BYTES:
            raise m.MessageError(f"A {payload.KIND} message is {len(data)} bytes; the limit is {m.MAX_PAYLOAD_BYTES}.")
        return data

    def _write_loop(self) -> None:
        # Blocks on the queue: no idle wake-ups that would take the GIL from the scoring thread.
        while True:
            first = self._queue.get()
            batch = [] if first is _WAKE else [first]
            try:
                while len(batch) < self.batch_max:
                    item = self._queue.get_nowait()
                    if item is not _WAKE:
                        batch.append(item)
            except queue.Empty:
                pass
            if batch:
                self._commit(batch)
            self._process_acks()
            if self._connected.is_set():
                self._send_pending()
            if self._stopping.is_set() and self._queue.empty():
                self._process_acks()
                return

    def _commit(self, batch: list[Any]) -> None:
        # The writer thread is the outbox's only writer, so the next sequence numbers are known.
        seq = self.outbox.last_seq
        rows: list[tuple[str, Callable[[int], bytes], bool]] = []
        rejected = 0
        for payload in batch:
            try:
                data = self._encode(payload, seq + 1)
                topic = m.agent_topic(self.institution, self.agent, payload.KIND)
            except Exception as exc:  # a payload that cannot be encoded must not take the batch down
                logger.error("Dropping an unencodable %s message: %s", getattr(payload, "KIND", "?"), exc)
                rejected += 1
                continue
            seq += 1
            rows.append((topic, _constant(data), False))
        while True:
            try:
                self.outbox.put_many(rows)
                break
            except Exception as exc:  # disk full, locked file: keep the messages in memory and retry
                logger.error("Outbox commit failed (%s); retrying in 1 s", exc)
                time.sleep(1.0)
        with self._committed:
            self._n_queued += len(rows)
            self._n_rejected += rejected
            self._committed.notify_all()

    def _process_acks(self) -> None:
        done: list[int] = []
        try:
            while True:
                seq = self._inflight.pop(self._acked_mids.get_nowait(), None)
                if seq is not None:
                    done.append(seq)
        except queue.Empty:
            pass
        if done:
            self.outbox.ack_many(done)
            self._n_delivered += len(done)

    def _send_pending(self) -> None:
        if self._seen_connection != self._connection:
            self._seen_connection = self._connection
            self._inflight.clear()
            self._sent_through = 0
        while self._sent_through < self.outbox.last_seq and len(self._inflight) < self.inflight_max:
            items = self.outbox.pending(self.inflight_max - len(self._inflight), after=self._sent_through)
            if not items:
                self._sent_through = self.outbox.last_seq
                return
            for item in items:
                info = self._client.publish(item.topic, item.payload, qos=1, retain=item.retain)
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    return  # disconnected meanwhile: on_connect makes us start over
                self._inflight[info.mid] = item.seq
                self._sent_through = item.seq
                self._n_sent += 1

    # ------------------------------------------------------------------ paho callbacks (network thread)

    def _status(self, state: str) -> bytes:
        return m.Status(
            institution=self.institution, agent=self.agent, state=state,  # type: ignore[arg-type]
            ts=m.now(), model_version=self.model_version, app=self.app,
        ).to_json()

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any = None) -> None:
        if getattr(reason, "is_failure", False):
            logger.warning("Broker %s refused the connection: %s", self.broker_url, reason)
            return
        # Count the connection before marking it up: the writer thread sends only while connected, and
        # it must never send on this connection under the previous number, or it would start over at
        # the next wake-up and send everything in flight twice (seen as duplicated alerts in tests).
        self._connection += 1
        if self._connection > 1:
            self._reconnects += 1
        # Mark connected before the status: a set_model_version() racing with this callback then publishes
        # its own status, and the one below already carries the newest version (a retained duplicate is
        # harmless).
        self._connected.set()
        client.publish(self._status_topic, self._status("online"), qos=1, retain=True)
        for topic_filter, _ in self._handlers:
            client.subscribe(topic_filter, qos=1)
        self._queue.put(_WAKE)
        logger.info("Connected to %s", self.broker_url)

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any = None) -> None:
        if self._connected.is_set() and not self._stopping.is_set():
            logger.warning("Disconnected from %s (%s); queueing on disk", self.broker_url, reason)
        self._connected.clear()

    def _on_publish(self, _c: Any, _u: Any, mid: int, _rc: Any = None, _p: Any = None) -> None:
        self._acked_mids.put(mid)
        self._queue.put(_WAKE)

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        for topic_filter, handler in self._handlers:
            if mqtt.topic_matches_sub(topic_filter, msg.topic):
                try:
                    handler(msg.topic, bytes(msg.payload))
                except Exception:
                    logger.exception("Handler for %s failed", msg.topic)


def _constant(data: bytes) -> Callable[[int], bytes]:
    """A payload builder that ignores the sequence number (the payload already carries its msg_id)."""
    return lambda _seq: data
