"""A small in-process MQTT 3.1.1 and 5 broker, so ``consortium demo`` runs on a machine with nothing installed.

Why not amqtt: its 0.12 release pins ``typer>=0.24`` (Flower 1.42 pins an older
typer) and ``websockets==15.0.1`` and pulls five more packages; installed with
``--no-deps`` it does not import.  The demo needs far less than a production
broker, so this module implements exactly that, on asyncio, in one thread:

* CONNECT (MQTT 3.1.1 and 5; clean and persistent sessions, username/password accepted
  but not checked, last will), CONNACK with session-present;
* MQTT 5 as far as the dashboard's ingest needs it: properties on every packet
  (parsed, and the application ones forwarded to v5 subscribers), Session Expiry
  Interval (a session outlives its connection by that many seconds; 0 ends it with
  the connection), Receive Maximum honoured (never more unacknowledged QoS 1
  messages in flight to a client than it allows; the rest wait in order), Maximum
  Packet Size honoured (larger messages are not sent to that client), subscription
  options (no-local, retain-as-published, retain handling), reason codes in
  SUBACK/UNSUBACK, DISCONNECT with reason 0x04 publishes the will, an Assigned
  Client Identifier for an empty client id;
* PUBLISH QoS 0, 1 and 2 in (PUBACK / PUBREC-PUBREL-PUBCOMP), QoS 0 and 1 out with
  PUBACK tracking and re-delivery (DUP) to persistent sessions after a reconnect;
  messages for an offline persistent session are queued;
* SUBSCRIBE / UNSUBSCRIBE with ``+`` and ``#`` wildcards (``$`` topics are not matched
  by a leading wildcard), retained messages (an empty retained payload clears);
* PINGREQ, DISCONNECT, keep-alive timeout (1.5 x keep-alive), session takeover.

It is not for production: no TLS, no authentication, no persistence across
broker restarts; of MQTT 5 no enhanced authentication, topic aliases, shared
subscriptions, subscription identifiers, will delay or message expiry (the CONNACK
says so where MQTT 5 has a property for it).  Use Mosquitto for anything real.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import struct
import threading
from dataclasses import dataclass, field

from consortium.errors import ConfigError

logger = logging.getLogger(__name__)

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14
MAX_PACKET = 1 << 20
MAX_QUEUED = 100_000
MQTT311, MQTT5 = 4, 5
NEVER_EXPIRES = 0xFFFFFFFF
"""MQTT 5 Session Expiry Interval meaning "keep the session until the broker stops"."""

# MQTT 5 property identifiers (section 2.2.2.2) and their wire types.
PAYLOAD_FORMAT, MESSAGE_EXPIRY, CONTENT_TYPE, RESPONSE_TOPIC, CORRELATION_DATA = 0x01, 0x02, 0x03, 0x08, 0x09
SUBSCRIPTION_ID, SESSION_EXPIRY, ASSIGNED_CLIENT_ID, AUTH_METHOD = 0x0B, 0x11, 0x12, 0x15
RECEIVE_MAXIMUM, TOPIC_ALIAS, USER_PROPERTY, MAXIMUM_PACKET_SIZE = 0x21, 0x23, 0x26, 0x27
SUBSCRIPTION_ID_AVAILABLE, SHARED_SUBSCRIPTION_AVAILABLE = 0x29, 0x2A
_BYTE, _TWO, _FOUR, _VARINT, _STRING, _BINARY, _PAIR = range(7)
_PROPERTY_TYPES = {
    0x01: _BYTE, 0x02: _FOUR, 0x03: _STRING, 0x08: _STRING, 0x09: _BINARY, 0x0B: _VARINT, 0x11: _FOUR,
    0x12: _STRING, 0x13: _TWO, 0x15: _STRING, 0x16: _BINARY, 0x17: _BYTE, 0x18: _FOUR, 0x19: _BYTE,
    0x1A: _STRING, 0x1C: _STRING, 0x1F: _STRING, 0x21: _TWO, 0x22: _TWO, 0x23: _TWO, 0x24: _BYTE, 0x25: _BYTE,
    0x26: _PAIR, 0x27: _FOUR, 0x28: _BYTE, 0x29: _BYTE, 0x2A: _BYTE,
}
_FORWARDED = {PAYLOAD_FORMAT, MESSAGE_EXPIRY, CONTENT_TYPE, RESPONSE_TOPIC, CORRELATION_DATA, USER_PROPERTY}
"""PUBLISH properties a broker passes on to subscribers unchanged (MQTT 5, 3.3.2.3)."""


class ProtocolError(Exception):
    """A client broke the protocol; its connection is closed."""


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic-filter matching with ``+`` (one level) and ``#`` (the rest)."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    f_parts, t_parts = topic_filter.split("/"), topic.split("/")
    for i, f in enumerate(f_parts):
        if f == "#":
            return True
        if i >= len(t_parts) or (f != "+" and f != t_parts[i]):
            return False
    return len(f_parts) == len(t_parts)


@dataclass
class _Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool = False
    properties: bytes = b""
    """Encoded MQTT 5 properties to forward (without their length prefix); empty for 3.1.1 publishers."""
    origin: _Connection | None = None


@dataclass
class _Subscription:
    qos: int
    no_local: bool = False
    retain_as_published: bool = False


@dataclass
class _Session:
    client_id: str
    expiry: int
    """Seconds the session outlives its connection: 0 ends it with the connection (3.1.1 clean session)."""
    subscriptions: dict[str, _Subscription] = field(default_factory=dict)
    queued: collections.deque[_Message] = field(default_factory=lambda: collections.deque(maxlen=MAX_QUEUED))
    inflight: dict[int, _Message] = field(default_factory=dict)
    next_id: int = 0
    connection: _Connection | None = None
    generation: int = 0
    """Bumped on every attach, so that an expiry timer of an older disconnect does nothing."""

    def packet_id(self) -> int:
        for _ in range(65535):
            self.next_id = self.next_id % 65535 + 1
            if self.next_id not in self.inflight:
                return self.next_id
        raise ProtocolError("no free packet id")


def _encode_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _decode_varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    for _ in range(4):
        if pos >= len(data):
            raise ProtocolError("truncated variable byte integer")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos
    raise ProtocolError("malformed variable byte integer")


def _string(data: bytes, pos: int) -> tuple[bytes, int]:
    if pos + 2 > len(data):
        raise ProtocolError("truncated string")
    (n,) = struct.unpack_from("!H", data, pos)
    if pos + 2 + n > len(data):
        raise ProtocolError("truncated string")
    return data[pos + 2: pos + 2 + n], pos + 2 + n


def _mqtt_string(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def _properties(data: bytes, pos: int) -> tuple[dict[int, int | bytes], bytes, int]:
    """Parse an MQTT 5 property block at ``pos``.

    Returns the values by identifier (numbers as int, strings and binary data as
    bytes; user properties and subscription ids are not kept there), the encoded
    properties a broker forwards with a PUBLISH, and the position after the block.
    """
    length, pos = _decode_varint(data, pos)
    end = pos + length
    if end > len(data):
        raise ProtocolError("truncated properties")
    values: dict[int, int | bytes] = {}
    forward = bytearray()
    while pos < end:
        start = pos
        prop, pos = _decode_varint(data, pos)
        kind = _PROPERTY_TYPES.get(prop)
        if kind is None:
            raise ProtocolError(f"unknown MQTT 5 property 0x{prop:02x}")
        value: int | bytes
        if kind == _BYTE:
            value, pos = data[pos], pos + 1
        elif kind == _TWO:
            (value,) = struct.unpack_from("!H", data, pos)
            pos += 2
        elif kind == _FOUR:
            (value,) = struct.unpack_from("!I", data, pos)
            pos += 4
        elif kind == _VARINT:
            value, pos = _decode_varint(data, pos)
        elif kind == _PAIR:
            _, pos = _string(data, pos)
            value, pos = _string(data, pos)
        else:
            value, pos = _string(data, pos)
        if pos > end:
            raise ProtocolError("truncated properties")
        if prop in _FORWARDED:
            forward += data[start:pos]
        if prop not in (USER_PROPERTY, SUBSCRIPTION_ID):
            values[prop] = value
    return values, bytes(forward), end


def _property_block(encoded: bytes = b"") -> bytes:
    return _encode_length(len(encoded)) + encoded


class _Connection:
    """One client's TCP connection."""

    def __init__(self, broker: EmbeddedBroker, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.broker = broker
        self.reader = reader
        self.writer = writer
        self.session: _Session | None = None
        self.will: _Message | None = None
        self.keepalive = 0
        self.version = MQTT311
        self.receive_maximum = 65535
        self.maximum_packet_size = 0  # 0: no limit announced
        self.session_expiry = 0
        self.incoming_qos2: set[int] = set()

    @property
    def v5(self) -> bool:
        return self.version == MQTT5

    def send(self, packet_type: int, flags: int, body: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(bytes([(packet_type << 4) | flags]) + _encode_length(len(body)) + body)

    def send_publish(self, msg: _Message, *, qos: int, packet_id: int = 0, dup: bool = False,
                     retain: bool = False) -> bool:
        """Send ``msg``; False (nothing sent) when it exceeds the client's Maximum Packet Size."""
        flags = (8 if dup else 0) | (qos << 1) | (1 if retain else 0)
        body = (_mqtt_string(msg.topic) + (struct.pack("!H", packet_id) if qos else b"")
                + (_property_block(msg.properties) if self.v5 else b"") + msg.payload)
        if self.maximum_packet_size and 1 + len(_encode_length(len(body))) + len(body) > self.maximum_packet_size:
            logger.debug("Not sent to %s: %d bytes exceed its maximum packet size", msg.topic, len(body))
            return False
        self.send(PUBLISH, flags, body)
        return True

    async def read_packet(self) -> tuple[int, int, bytes]:
        first = await self.reader.readexactly(1)
        length, shift = 0, 0
        for _ in range(4):
            (byte,) = await self.reader.readexactly(1)
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        else:
            raise ProtocolError("malformed remaining length")
        if length > MAX_PACKET:
            raise ProtocolError(f"packet of {length} bytes exceeds {MAX_PACKET}")
        body = await self.reader.readexactly(length) if length else b""
        return first[0] >> 4, first[0] & 0x0F, body

    async def run(self) -> None:
        publish_will = True
        try:
            ptype, _, body = await asyncio.wait_for(self.read_packet(), timeout=10)
            if ptype != CONNECT:
                raise ProtocolError("first packet must be CONNECT")
            if not self._connect(body):
                return
            while True:
                timeout = self.keepalive * 1.5 if self.keepalive else None
                ptype, flags, body = await asyncio.wait_for(self.read_packet(), timeout=timeout)
                if ptype == DISCONNECT:
                    publish_will = self._disconnect(body)
                    return
                self._handle(ptype, flags, body)
                await self.writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError, ProtocolError, struct.error) as exc:
            logger.debug("Connection closed: %s", exc)
        finally:
            self.broker._disconnected(self, publish_will=publish_will)
            self.writer.close()

    def _disconnect(self, body: bytes) -> bool:
        """A client's DISCONNECT; True when its will is still to be published (MQTT 5 reason 0x04)."""
        if not self.v5 or not body:
            return False
        reason = body[0]
        if len(body) > 1:
            values, _, _ = _properties(body, 1)
            expiry = values.get(SESSION_EXPIRY)
            if isinstance(expiry, int) and self.session is not None:
                self.session.expiry = expiry
        return reason == 0x04

    def _connack(self, code: int, *, present: bool = False, properties: bytes = b"") -> None:
        body = bytes([1 if present else 0, code])
        self.send(CONNACK, 0, body + (_property_block(properties) if self.v5 else b""))

    def _connect(self, body: bytes) -> bool:
        name, pos = _string(body, 0)
        if pos + 4 > len(body):
            raise ProtocolError("truncated CONNECT")
        level, flags = body[pos], body[pos + 1]
        (self.keepalive,) = struct.unpack_from("!H", body, pos + 2)
        pos += 4
        if name != b"MQTT" or level not in (MQTT311, MQTT5):
            self.send(CONNACK, 0, b"\x00\x01")  # 3.1.1 "unacceptable protocol version", understood by all
            return False
        self.version = level
        values: dict[int, int | bytes] = {}
        if self.v5:
            values, _, pos = _properties(body, pos)
            if AUTH_METHOD in values:
                self._connack(0x8C)  # bad authentication method: no enhanced authentication here
                return False
            receive_maximum = values.get(RECEIVE_MAXIMUM, 65535)
            if receive_maximum == 0:
                raise ProtocolError("Receive Maximum of 0")
            self.receive_maximum = int(receive_maximum)
            self.maximum_packet_size = int(values.get(MAXIMUM_PACKET_SIZE, 0))
        raw_id, pos = _string(body, pos)
        client_id = raw_id.decode(errors="replace")
        clean = bool(flags & 0x02)
        # 3.1.1: a persistent session never expires; MQTT 5: as long as the client asked (default 0).
        expiry = int(values.get(SESSION_EXPIRY, 0)) if self.v5 else (0 if clean else NEVER_EXPIRES)
        assigned = b""
        if not client_id:
            if not clean and not self.v5:
                self.send(CONNACK, 0, b"\x00\x02")  # identifier rejected
                return False
            client_id = f"anon-{id(self)}"
            assigned = bytes([ASSIGNED_CLIENT_ID]) + _mqtt_string(client_id)
        if flags & 0x04:
            will_props = b""
            if self.v5:
                _, will_props, pos = _properties(body, pos)
            topic, pos = _string(body, pos)
            payload, pos = _string(body, pos)
            self.will = _Message(topic.decode(), payload, (flags >> 3) & 3, bool(flags & 0x20), will_props)
        present = self.broker._attach(self, client_id, clean=clean, expiry=expiry)
        # We support neither subscription identifiers nor shared subscriptions: say so (MQTT 5, 3.2.2.3).
        self._connack(0, present=present, properties=assigned + bytes([SUBSCRIPTION_ID_AVAILABLE, 0,
                                                                       SHARED_SUBSCRIPTION_AVAILABLE, 0]))
        session = self.session
        assert session is not None
        for pid, msg in list(session.inflight.items()):
            self.send_publish(msg, qos=1, packet_id=pid, dup=True)
        self.broker._drain(session)
        return True

    def _handle(self, ptype: int, flags: int, body: bytes) -> None:
        session = self.session
        assert session is not None
        if ptype == PUBLISH:
            self._publish(flags, body)
        elif ptype == PUBACK:
            session.inflight.pop(struct.unpack_from("!H", body)[0], None)
            self.broker._drain(session)
        elif ptype == PUBREL:
            pid = struct.unpack_from("!H", body)[0]
            self.incoming_qos2.discard(pid)
            self.send(PUBCOMP, 0, struct.pack("!H", pid))
        elif ptype in (PUBREC, PUBCOMP):
            pass  # we never send QoS 2
        elif ptype == SUBSCRIBE:
            self._subscribe(session, body)
        elif ptype == UNSUBSCRIBE:
            (pid,) = struct.unpack_from("!H", body)
            pos = 2
            if self.v5:
                _, _, pos = _properties(body, pos)
            codes = bytearray()
            while pos < len(body):
                raw, pos = _string(body, pos)
                existed = session.subscriptions.pop(raw.decode(errors="replace"), None) is not None
                codes.append(0x00 if existed else 0x11)  # success / no subscription existed
            self.send(UNSUBACK, 0, struct.pack("!H", pid) + (_property_block() + bytes(codes) if self.v5 else b""))
        elif ptype == PINGREQ:
            self.send(PINGRESP, 0, b"")
        else:
            raise ProtocolError(f"unexpected packet type {ptype}")

    def _publish(self, flags: int, body: bytes) -> None:
        qos = (flags >> 1) & 3
        if qos == 3:
            raise ProtocolError("PUBLISH with QoS 3")
        topic, pos = _string(body, 0)
        packet_id = 0
        if qos:
            (packet_id,) = struct.unpack_from("!H", body, pos)
            pos += 2
        forward = b""
        if self.v5:
            values, forward, pos = _properties(body, pos)
            if TOPIC_ALIAS in values:
                raise ProtocolError("topic alias, but the CONNACK allowed none")
        msg = _Message(topic.decode(errors="replace"), body[pos:], qos, bool(flags & 1), forward, origin=self)
        if "+" in msg.topic or "#" in msg.topic or not msg.topic:
            raise ProtocolError("wildcard or empty topic in a PUBLISH")
        if qos == 2:
            if packet_id not in self.incoming_qos2:
                self.incoming_qos2.add(packet_id)
                self.broker._route(msg)
            self.send(PUBREC, 0, struct.pack("!H", packet_id))
            return
        self.broker._route(msg)
        if qos == 1:
            self.send(PUBACK, 0, struct.pack("!H", packet_id))

    def _subscribe(self, session: _Session, body: bytes) -> None:
        (pid,) = struct.unpack_from("!H", body)
        pos = 2
        if self.v5:
            _, _, pos = _properties(body, pos)
        granted, filters = bytearray(), []
        while pos < len(body):
            raw, pos = _string(body, pos)
            if pos >= len(body):
                raise ProtocolError("truncated SUBSCRIBE")
            options = body[pos]
            pos += 1
            topic_filter = raw.decode(errors="replace")
            if self.v5 and topic_filter.startswith("$share/"):
                granted.append(0x9E)  # shared subscriptions not supported
                continue
            qos = min(options & 3, 1)
            sub = _Subscription(qos, no_local=self.v5 and bool(options & 0x04),
                                retain_as_published=self.v5 and bool(options & 0x08))
            retain_handling = (options >> 4) & 3 if self.v5 else 0
            is_new = topic_filter not in session.subscriptions
            session.subscriptions[topic_filter] = sub
            granted.append(qos)
            if retain_handling == 0 or (retain_handling == 1 and is_new):
                filters.append((topic_filter, qos))
        self.send(SUBACK, 0, struct.pack("!H", pid) + (_property_block() if self.v5 else b"") + bytes(granted))
        for topic_filter, qos in filters:
            for msg in list(self.broker.retained.values()):
                if topic_matches(topic_filter, msg.topic):
                    self.broker._deliver_to(session, msg, qos=min(qos, msg.qos), retain=True)


class EmbeddedBroker:
    """An MQTT 3.1.1 and 5 broker running in a background thread of this process.

    Parameters
    ----------
    host : str
        Address to listen on (loopback by default: the demo needs nothing else).
    port : int
        Port; 0 picks a free one (see :attr:`url` after :meth:`start`).

    Examples
    --------
    >>> with EmbeddedBroker() as broker:          # doctest: +SKIP
    ...     print(broker.url)
    mqtt://127.0.0.1:43121
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.sessions: dict[str, _Session] = {}
        self.retained: dict[str, _Message] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        """``mqtt://host:port`` of the running broker."""
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> EmbeddedBroker:
        """Start listening (returns once connections are accepted)."""
        self._thread = threading.Thread(target=self._run, name="embedded-mqtt", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise ConfigError(f"The embedded MQTT broker cannot listen on {self.host}:{self.port}: {self._error}")
        return self

    def stop(self) -> None:
        """Close every connection and stop the thread."""
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._shutdown)
            self._thread.join(timeout=10)
        self._thread = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ event loop

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._accept, self.host, self.port, reuse_address=True)
            )
        except OSError as exc:
            self._error = exc
            self._ready.set()
            return
        self.port = int(self._server.sockets[0].getsockname()[1])
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    def _shutdown(self) -> None:
        assert self._server is not None and self._loop is not None
        self._server.close()
        for session in self.sessions.values():
            if session.connection is not None:
                session.connection.writer.close()
        self._loop.call_later(0.05, self._loop.stop)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _Connection(self, reader, writer).run()

    # ------------------------------------------------------------------ sessions and routing

    def _attach(self, conn: _Connection, client_id: str, *, clean: bool, expiry: int) -> bool:
        old = self.sessions.get(client_id)
        if old is not None and old.connection is not None:
            old.connection.will = None
            old.connection.writer.close()  # session takeover
            old.connection = None
        present = old is not None and not clean
        session = old if present and old is not None else _Session(client_id, expiry)
        session.expiry = expiry
        session.connection = conn
        session.generation += 1
        conn.session = session
        self.sessions[client_id] = session
        return present

    def _disconnected(self, conn: _Connection, *, publish_will: bool) -> None:
        session = conn.session
        if session is None or session.connection is not conn:
            return
        session.connection = None
        if session.expiry == 0:
            self.sessions.pop(session.client_id, None)
        elif session.expiry != NEVER_EXPIRES and self._loop is not None:
            self._loop.call_later(session.expiry, self._expire, session, session.generation)
        if publish_will and conn.will is not None:
            self._route(conn.will)

    def _expire(self, session: _Session, generation: int) -> None:
        if session.connection is None and session.generation == generation \
                and self.sessions.get(session.client_id) is session:
            self.sessions.pop(session.client_id, None)

    def _route(self, msg: _Message) -> None:
        if msg.retain:
            if msg.payload:
                self.retained[msg.topic] = _Message(msg.topic, msg.payload, msg.qos, True, msg.properties)
            else:
                self.retained.pop(msg.topic, None)
        for session in list(self.sessions.values()):
            matching = [s for f, s in session.subscriptions.items() if topic_matches(f, msg.topic)
                        and not (s.no_local and msg.origin is not None and msg.origin is session.connection)]
            if matching:
                self._deliver_to(session, msg, qos=min(max(s.qos for s in matching), msg.qos),
                                 retain=msg.retain and any(s.retain_as_published for s in matching))

    def _deliver_to(self, session: _Session, msg: _Message, *, qos: int, retain: bool = False) -> None:
        qos = min(qos, 1)
        conn = session.connection
        if qos == 0:
            if conn is not None:
                conn.send_publish(msg, qos=0, retain=retain)
            return
        if conn is None or session.queued or len(session.inflight) >= conn.receive_maximum:
            # Offline persistent session, or the client's Receive Maximum is reached: wait, in order.
            session.queued.append(_Message(msg.topic, msg.payload, 1, retain, msg.properties))
            return
        self._send_qos1(session, conn, msg, retain=retain)

    def _send_qos1(self, session: _Session, conn: _Connection, msg: _Message, *, retain: bool) -> None:
        pid = session.packet_id()
        if conn.send_publish(msg, qos=1, packet_id=pid, retain=retain):
            session.inflight[pid] = msg

    def _drain(self, session: _Session) -> None:
        """Send queued QoS 1 messages while the client's Receive Maximum allows."""
        conn = session.connection
        while conn is not None and session.queued and len(session.inflight) < conn.receive_maximum:
            msg = session.queued.popleft()
            self._send_qos1(session, conn, msg, retain=msg.retain)
