"""Run the MQTT publisher in its own process, so its threads never take the GIL from the scoring thread.

:class:`MqttPublisher` does its work (JSON encoding, outbox commits, paho's
packet handling) in two background threads.  On an idle machine they cost the
scoring thread nothing, but on a loaded one a background thread that holds the
GIL and is descheduled by the OS stalls the next transaction for milliseconds:
measured on the shared 2-core machines, the agent's p99 went from ~18 µs without
a publisher to ~400 µs with one, at 1 % alerts.  :class:`ProcessPublisher` has
the same interface but keeps the publisher in a child process: an alert costs
the scoring process one pickle and one pipe write.

The child exits when the parent's pipe closes (including when the parent is
killed); everything it had committed stays in the outbox for the next start.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import threading
from dataclasses import fields
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from consortium.edge import messages as m
from consortium.edge.publisher import MessageHandler, PublisherStats
from consortium.errors import ConfigError, param_error
from consortium.mqtt_url import parse_broker_url

logger = logging.getLogger(__name__)


def _child_main(options: dict[str, Any], commands: Connection, events: Connection) -> None:
    """The child process: one MqttPublisher driven by the parent's commands."""
    from consortium.edge.publisher import MqttPublisher  # noqa: PLC0415

    nice = int(options.pop("nice"))
    if nice:
        try:
            os.nice(nice)  # on a busy machine the scorer, not the publisher, should win the CPU on a wake-up
        except OSError:
            pass
    logging.basicConfig(level=options.pop("log_level"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    publisher = MqttPublisher(**options).start()
    events.send(("ready", None, None))

    def forward(topic: str, payload: bytes) -> None:
        events.send(("message", topic, payload))

    drain = 0.0
    try:
        while True:
            try:
                op, arg, token = commands.recv()
            except (EOFError, OSError):
                break  # the parent is gone: keep what is committed, stop quickly
            if op == "pub":
                kind, values = arg
                publisher.publish(m.PAYLOADS[kind](**values))
            elif op == "sub":
                publisher.subscribe(arg, forward)
            elif op == "version":
                publisher.set_model_version(arg)
            elif op == "flush":
                events.send(("reply", token, publisher.flush(timeout=arg)))
            elif op == "delivered":
                events.send(("reply", token, publisher.wait_delivered(timeout=arg)))
            elif op == "stats":
                events.send(("reply", token, publisher.stats()))
            elif op == "stop":
                drain = float(arg)
                break
    finally:
        publisher.stop(drain_timeout=drain)
        try:
            events.send(("stopped", None, publisher.stats()))
        except OSError:
            pass


class ProcessPublisher:
    """:class:`~consortium.edge.publisher.MqttPublisher` in a child process; same constructor and methods.

    ``publish`` pickles the message's fields and writes them to a pipe (a few µs,
    alerts only); ``flush``, ``wait_delivered``, ``backlog`` and ``stats`` ask the
    child and wait for its answer.  Subscription handlers run in a reader thread
    of this process that wakes only when a message arrives.  ``nice`` lowers the
    child's CPU priority (0 keeps it), so that on a busy machine waking it for an
    alert is less likely to preempt the scoring thread.
    """

    def __init__(self, broker_url: str, *, institution: str, agent: str, outbox_path: str | Path,
                 nice: int = 5, **options: Any) -> None:
        parse_broker_url(broker_url, owner="ProcessPublisher")  # fail here, not in the child
        self.institution = m.check_name(institution, what="institution")
        self.agent = m.check_name(agent, what="agent")
        self._options = {"broker_url": broker_url, "institution": institution, "agent": agent,
                         "outbox_path": str(outbox_path), **options, "nice": nice,
                         "log_level": logging.getLogger("consortium").getEffectiveLevel()}
        self._ctx = multiprocessing.get_context("spawn")
        self._commands: Connection | None = None
        self._process: Any = None
        self._reader: threading.Thread | None = None
        self._handlers: list[tuple[str, MessageHandler]] = []
        self._tokens = itertools.count(1)
        self._replies: dict[int, Any] = {}
        self._cond = threading.Condition()
        self._ready = threading.Event()
        self._final: PublisherStats | None = None
        self._send_lock = threading.Lock()
        self.model_version = ""

    def start(self) -> ProcessPublisher:
        """Start the child process (and its broker connection) and wait until it runs."""
        if self._process is not None:
            return self
        self._ready.clear()
        cmd_recv, cmd_send = self._ctx.Pipe(duplex=False)
        evt_recv, evt_send = self._ctx.Pipe(duplex=False)
        self._process = self._ctx.Process(target=_child_main, args=(dict(self._options), cmd_recv, evt_send),
                                          name=f"mqtt-{self.agent}", daemon=True)
        self._process.start()
        cmd_recv.close()
        evt_send.close()
        self._commands = cmd_send
        self._reader = threading.Thread(target=self._read_events, args=(evt_recv,), name="mqtt-events",
                                        daemon=True)
        self._reader.start()
        if not self._ready.wait(60):
            raise ConfigError("The MQTT publisher process did not start within 60 s.")
        return self

    def _send(self, message: tuple[str, Any, int]) -> None:
        if self._commands is None:
            raise ConfigError("The publisher is not running (call start() first).")
        with self._send_lock:
            try:
                self._commands.send(message)
            except OSError:
                # The child died (killed, out of memory): what it committed is in the outbox, so a
                # new child carries on from there.  Only messages not yet committed are lost.
                logger.error("The MQTT publisher process is gone (exit code %s); starting a new one",
                             getattr(self._process, "exitcode", None))
                self._respawn()
                assert self._commands is not None
                self._commands.send(message)

    def _respawn(self) -> None:
        old = self._process
        if old is not None and old.is_alive():
            old.terminate()
        if old is not None:
            old.join(timeout=10)
        if self._commands is not None:
            self._commands.close()
        self._process = None
        self._final = None
        self.start()
        assert self._commands is not None
        for topic_filter, _ in self._handlers:
            self._commands.send(("sub", topic_filter, 0))
        if self.model_version:
            self._commands.send(("version", self.model_version, 0))

    def _ask(self, op: str, arg: Any, *, timeout: float) -> Any:
        token = next(self._tokens)
        self._send((op, arg, token))
        with self._cond:
            if not self._cond.wait_for(lambda: token in self._replies, timeout=timeout + 5):
                return None
            return self._replies.pop(token)

    def _read_events(self, events: Connection) -> None:
        while True:
            try:
                kind, a, b = events.recv()
            except (EOFError, OSError):
                return
            if kind == "ready":
                self._ready.set()
            elif kind == "message":
                for topic_filter, handler in self._handlers:
                    if _matches(topic_filter, a):
                        try:
                            handler(a, b)
                        except Exception:
                            logger.exception("Handler for %s failed", a)
            elif kind == "reply":
                with self._cond:
                    self._replies[a] = b
                    self._cond.notify_all()
            elif kind == "stopped":
                self._final = b

    # ------------------------------------------------------------------ the MqttPublisher interface

    def publish(self, payload: Any) -> None:
        """Queue one message (see :meth:`MqttPublisher.publish`)."""
        kind = getattr(payload, "KIND", None)
        if kind not in m.KINDS:
            raise param_error("payload", "ProcessPublisher.publish", f"a message of a kind in {m.KINDS}", payload)
        self._send(("pub", (kind, {f.name: getattr(payload, f.name) for f in fields(payload)}), 0))

    def subscribe(self, topic_filter: str, handler: MessageHandler) -> None:
        """Receive messages on ``topic_filter``; ``handler`` runs in this process's reader thread."""
        self._handlers.append((topic_filter, handler))
        self._send(("sub", topic_filter, 0))

    def set_model_version(self, version: str) -> None:
        """Name ``version`` in the retained Status."""
        self.model_version = version
        self._send(("version", version, 0))

    def flush(self, *, timeout: float = 10.0) -> bool:
        """Wait until every message published so far is committed to the outbox."""
        return bool(self._ask("flush", timeout, timeout=timeout))

    def wait_delivered(self, *, timeout: float = 10.0) -> bool:
        """Wait until the broker has acknowledged everything."""
        return bool(self._ask("delivered", timeout, timeout=timeout))

    def stats(self) -> PublisherStats:
        """The child's counters (the final ones after :meth:`stop`)."""
        if self._final is not None:
            return self._final
        stats = self._ask("stats", None, timeout=5.0)
        if stats is None:
            raise ConfigError("The MQTT publisher process does not answer.")
        return stats  # type: ignore[no-any-return]

    @property
    def backlog(self) -> int:
        """Messages published but not yet acknowledged by the broker."""
        return self.stats().backlog

    @property
    def connected(self) -> bool:
        """Whether the child is connected to the broker."""
        return self.stats().connected

    def stop(self, *, drain_timeout: float = 2.0) -> None:
        """Let the child commit, try ``drain_timeout`` s to deliver, go offline and exit."""
        if self._process is None:
            return
        try:
            self._send(("stop", drain_timeout, 0))
        except (OSError, ConfigError):
            pass
        self._process.join(timeout=drain_timeout + 30)
        if self._process.is_alive():
            self._process.terminate()
        if self._reader is not None:
            self._reader.join(timeout=5)
        if self._commands is not None:
            self._commands.close()
        self._process = None
        self._commands = None

    def __enter__(self) -> ProcessPublisher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _matches(topic_filter: str, topic: str) -> bool:
    import paho.mqtt.client as mqtt  # noqa: PLC0415

    return bool(mqtt.topic_matches_sub(topic_filter, topic))

