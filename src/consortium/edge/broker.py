"""A small in-process MQTT 3.1.1 broker, so ``consortium demo`` runs on a machine with nothing installed.

Why not amqtt: its 0.12 release pins ``typer>=0.24`` (Flower 1.42 pins an older
typer) and ``websockets==15.0.1`` and pulls five more packages; installed with
``--no-deps`` it does not import.  The demo needs far less than a production
broker, so this module implements exactly that, on asyncio, in one thread:

* CONNECT (MQTT 3.1.1; clean and persistent sessions, username/password accepted
  but not checked, last will), CONNACK with session-present;
* PUBLISH QoS 0, 1 and 2 in (PUBACK / PUBREC-PUBREL-PUBCOMP), QoS 0 and 1 out with
  PUBACK tracking and re-delivery (DUP) to persistent sessions after a reconnect;
  messages for an offline persistent session are queued;
* SUBSCRIBE / UNSUBSCRIBE with ``+`` and ``#`` wildcards (``$`` topics are not matched
  by a leading wildcard), retained messages (an empty retained payload clears);
* PINGREQ, DISCONNECT, keep-alive timeout (1.5 x keep-alive), session takeover.

It is not for production: no TLS, no authentication, no persistence across
broker restarts, no MQTT 5.  Use Mosquitto for anything real.
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


@dataclass
class _Session:
    client_id: str
    clean: bool
    subscriptions: dict[str, int] = field(default_factory=dict)
    queued: collections.deque[_Message] = field(default_factory=lambda: collections.deque(maxlen=MAX_QUEUED))
    inflight: dict[int, _Message] = field(default_factory=dict)
    next_id: int = 0
    connection: _Connection | None = None

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


class _Connection:
    """One client's TCP connection."""

    def __init__(self, broker: EmbeddedBroker, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.broker = broker
        self.reader = reader
        self.writer = writer
        self.session: _Session | None = None
        self.will: _Message | None = None
        self.keepalive = 0
        self.incoming_qos2: set[int] = set()

    def send(self, packet_type: int, flags: int, body: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(bytes([(packet_type << 4) | flags]) + _encode_length(len(body)) + body)

    def send_publish(self, msg: _Message, *, qos: int, packet_id: int = 0, dup: bool = False,
                     retain: bool = False) -> None:
        flags = (8 if dup else 0) | (qos << 1) | (1 if retain else 0)
        body = _mqtt_string(msg.topic) + (struct.pack("!H", packet_id) if qos else b"") + msg.payload
        self.send(PUBLISH, flags, body)

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
        clean_exit = False
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
                    clean_exit = True
                    return
                self._handle(ptype, flags, body)
                await self.writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError, ProtocolError) as exc:
            logger.debug("Connection closed: %s", exc)
        finally:
            self.broker._disconnected(self, publish_will=not clean_exit)
            self.writer.close()

    def _connect(self, body: bytes) -> bool:
        name, pos = _string(body, 0)
        if pos + 4 > len(body):
            raise ProtocolError("truncated CONNECT")
        level, flags = body[pos], body[pos + 1]
        (self.keepalive,) = struct.unpack_from("!H", body, pos + 2)
        pos += 4
        if name != b"MQTT" or level != 4:
            self.send(CONNACK, 0, b"\x00\x01")  # unacceptable protocol version
            return False
        raw_id, pos = _string(body, pos)
        client_id = raw_id.decode(errors="replace")
        clean = bool(flags & 0x02)
        if not client_id:
            if not clean:
                self.send(CONNACK, 0, b"\x00\x02")  # identifier rejected
                return False
            client_id = f"anon-{id(self)}"
        if flags & 0x04:
            topic, pos = _string(body, pos)
            payload, pos = _string(body, pos)
            self.will = _Message(topic.decode(), payload, (flags >> 3) & 3, bool(flags & 0x20))
        present = self.broker._attach(self, client_id, clean=clean)
        self.send(CONNACK, 0, bytes([1 if present else 0, 0]))
        assert self.session is not None
        for pid, msg in list(self.session.inflight.items()):
            self.send_publish(msg, qos=1, packet_id=pid, dup=True)
        while self.session.queued:
            self.broker._deliver_to(self.session, self.session.queued.popleft(), qos=1)
        return True

    def _handle(self, ptype: int, flags: int, body: bytes) -> None:
        session = self.session
        assert session is not None
        if ptype == PUBLISH:
            qos = (flags >> 1) & 3
            topic, pos = _string(body, 0)
            packet_id = 0
            if qos:
                (packet_id,) = struct.unpack_from("!H", body, pos)
                pos += 2
            msg = _Message(topic.decode(errors="replace"), body[pos:], qos, bool(flags & 1))
            if "+" in msg.topic or "#" in msg.topic:
                raise ProtocolError("wildcard in a PUBLISH topic")
            if qos == 2:
                if packet_id not in self.incoming_qos2:
                    self.incoming_qos2.add(packet_id)
                    self.broker._route(msg)
                self.send(PUBREC, 0, struct.pack("!H", packet_id))
                return
            self.broker._route(msg)
            if qos == 1:
                self.send(PUBACK, 0, struct.pack("!H", packet_id))
        elif ptype == PUBACK:
            session.inflight.pop(struct.unpack_from("!H", body)[0], None)
        elif ptype == PUBREL:
            pid = struct.unpack_from("!H", body)[0]
            self.incoming_qos2.discard(pid)
            self.send(PUBCOMP, 0, struct.pack("!H", pid))
        elif ptype in (PUBREC, PUBCOMP):
            pass  # we never send QoS 2
        elif ptype == SUBSCRIBE:
            (pid,) = struct.unpack_from("!H", body)
            pos, granted, filters = 2, bytearray(), []
            while pos < len(body):
                raw, pos = _string(body, pos)
                if pos >= len(body):
                    raise ProtocolError("truncated SUBSCRIBE")
                qos = min(body[pos] & 3, 1)
                pos += 1
                session.subscriptions[raw.decode(errors="replace")] = qos
                granted.append(qos)
                filters.append((raw.decode(errors="replace"), qos))
            self.send(SUBACK, 0, struct.pack("!H", pid) + bytes(granted))
            for topic_filter, qos in filters:
                for msg in list(self.broker.retained.values()):
                    if topic_matches(topic_filter, msg.topic):
                        self.broker._deliver_to(session, msg, qos=min(qos, msg.qos), retain=True)
        elif ptype == UNSUBSCRIBE:
            (pid,) = struct.unpack_from("!H", body)
            pos = 2
            while pos < len(body):
                raw, pos = _string(body, pos)
                session.subscriptions.pop(raw.decode(errors="replace"), None)
            self.send(UNSUBACK, 0, struct.pack("!H", pid))
        elif ptype == PINGREQ:
            self.send(PINGRESP, 0, b"")
        else:
            raise ProtocolError(f"unexpected packet type {ptype}")


class EmbeddedBroker:
    """An MQTT 3.1.1 broker running in a background thread of this process.

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

    def _attach(self, conn: _Connection, client_id: str, *, clean: bool) -> bool:
        old = self.sessions.get(client_id)
        if old is not None and old.connection is not None:
            old.connection.will = None
            old.connection.writer.close()  # session takeover
            old.connection = None
        present = old is not None and not clean and not old.clean
        session = old if present and old is not None else _Session(client_id, clean)
        session.clean = clean
        session.connection = conn
        conn.session = session
        self.sessions[client_id] = session
        return present

    def _disconnected(self, conn: _Connection, *, publish_will: bool) -> None:
        session = conn.session
        if session is None or session.connection is not conn:
            return
        session.connection = None
        if session.clean:
            self.sessions.pop(session.client_id, None)
        if publish_will and conn.will is not None:
            self._route(conn.will)

    def _route(self, msg: _Message) -> None:
        if msg.retain:
            if msg.payload:
                self.retained[msg.topic] = msg
            else:
                self.retained.pop(msg.topic, None)
        for session in list(self.sessions.values()):
            granted = max((q for f, q in session.subscriptions.items() if topic_matches(f, msg.topic)), default=-1)
            if granted >= 0:
                self._deliver_to(session, msg, qos=min(granted, msg.qos))

    def _deliver_to(self, session: _Session, msg: _Message, *, qos: int, retain: bool = False) -> None:
        qos = min(qos, 1)
        conn = session.connection
        if conn is None:
            if qos and not session.clean:
                session.queued.append(msg)
            return
        if qos == 0:
            conn.send_publish(msg, qos=0, retain=retain)
            return
        pid = session.packet_id()
        session.inflight[pid] = msg
        conn.send_publish(msg, qos=1, packet_id=pid, retain=retain)
