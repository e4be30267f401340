"""The coordinator's side: confirm drift across institutions, then start retraining.

Edge agents and nodes publish :class:`~consortium.edge.messages.DriftReport`
messages (statistics only) on ``consortium/<institution>/<agent>/drift``.
:class:`DriftVotes` keeps, per institution, the time of its latest ``"drift"``
report and decides when drift is *confirmed*: at least ``min_institutions``
different institutions reported drift within ``window_s`` seconds.  One
institution alone (a local promotion, a holiday) adapts locally by
recalibration; a pattern seen at several is worth a federated round set.
After a trigger, votes older than the trigger are discarded (``cooldown_s``
also blocks re-triggering while the round set runs).

:class:`RetrainTrigger` feeds the votes from a real MQTT broker (paho-mqtt,
QoS 1) and calls ``on_trigger`` in a worker thread, so that a long retraining
never blocks the network loop.  Malformed messages are counted and skipped.
"""

from __future__ import annotations

import logging
import queue
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt

from consortium.edge.messages import DriftReport, MessageError, parse_message, subscription
from consortium.errors import ConfigError, param_error
from consortium.mqtt_url import parse_broker_url

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TriggerDecision:
    """Drift confirmed: which institutions reported it, and when."""

    institutions: tuple[str, ...]
    ts: float
    reports: dict[str, dict[str, float]] = field(default_factory=dict)
    """Each institution's latest drift statistics."""


class DriftVotes:
    """Count drift reports per institution and confirm drift at ``min_institutions``.

    Parameters
    ----------
    min_institutions : int
        Distinct institutions that must report drift (k >= 1).
    window_s : float
        Reports older than this (relative to the newest) no longer count.
    cooldown_s : float
        After a trigger, no new trigger for this long.
    """

    def __init__(self, *, min_institutions: int = 2, window_s: float = 7 * 86_400.0, cooldown_s: float = 0.0) -> None:
        owner = "DriftVotes"
        if isinstance(min_institutions, bool) or not isinstance(min_institutions, int) or min_institutions < 1:
            raise param_error("min_institutions", owner, "an int >= 1", min_institutions)
        if not isinstance(window_s, int | float) or not window_s > 0:
            raise param_error("window_s", owner, "a number > 0", window_s)
        if not isinstance(cooldown_s, int | float) or cooldown_s < 0:
            raise param_error("cooldown_s", owner, "a number >= 0", cooldown_s)
        self.min_institutions = min_institutions
        self.window_s = float(window_s)
        self.cooldown_s = float(cooldown_s)
        self._latest: dict[str, tuple[float, dict[str, float]]] = {}
        self._last_trigger = -float("inf")
        self.decisions: list[TriggerDecision] = []

    def add(self, report: DriftReport) -> TriggerDecision | None:
        """Register one report; return a decision when it confirms drift."""
        if report.status != "drift":
            # A later "ok" from the same institution withdraws its vote.
            if report.status == "ok":
                self._latest.pop(report.institution, None)
            return None
        if report.ts <= self._last_trigger:
            return None  # a report from before the last trigger was already acted on
        self._latest[report.institution] = (report.ts, dict(report.statistics))
        now = max(ts for ts, _ in self._latest.values())
        live = {k: v for k, v in self._latest.items() if now - v[0] <= self.window_s}
        if len(live) < self.min_institutions or now - self._last_trigger < self.cooldown_s:
            return None
        decision = TriggerDecision(institutions=tuple(sorted(live)), ts=now,
                                   reports={k: v[1] for k, v in live.items()})
        self._last_trigger = now
        self._latest.clear()
        self.decisions.append(decision)
        logger.info("drift confirmed at %d institutions %s", len(live), list(decision.institutions))
        return decision

    def voting(self) -> tuple[str, ...]:
        """Institutions whose drift vote currently stands."""
        return tuple(sorted(self._latest))


class RetrainTrigger:
    """Subscribe to drift reports over MQTT and call ``on_trigger`` when drift is confirmed.

    Parameters
    ----------
    broker_url : str
        ``mqtt://host:port`` or ``mqtts://host:port``.
    on_trigger : callable
        Called (in a worker thread) with each :class:`TriggerDecision`.
    votes : DriftVotes, optional
        The confirmation rule (default: 2 institutions within 7 days).
    tls_ca, username, password : optional
        TLS CA file and credentials for the broker.
    client_id : str, optional
        MQTT client id (default: random ``consortium-trigger-...``).
    """

    def __init__(
        self,
        broker_url: str,
        *,
        on_trigger: Callable[[TriggerDecision], None],
        votes: DriftVotes | None = None,
        tls_ca: str | None = None,
        username: str | None = None,
        password: str | None = None,
        client_id: str | None = None,
    ) -> None:
        address = parse_broker_url(broker_url, owner="RetrainTrigger")
        self.host, self.port, tls = address.host, address.port, address.tls
        self.votes = votes or DriftVotes()
        self.on_trigger = on_trigger
        self.received = 0
        self.invalid = 0
        self.trigger_errors = 0
        self._lock = threading.Lock()
        self._queue: queue.Queue[TriggerDecision | None] = queue.Queue()
        self._connected = threading.Event()
        self._worker: threading.Thread | None = None
        self._client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id or f"consortium-trigger-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv311,
        )
        if tls:
            self._client.tls_set(ca_certs=tls_ca)
        if username is not None:
            self._client.username_pw_set(username, password)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, reason: object,
                    properties: object = None) -> None:
        client.subscribe(subscription("drift"), qos=1)
        self._connected.set()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        try:
            _, report = parse_message(msg.topic, bytes(msg.payload))
        except MessageError as exc:
            with self._lock:
                self.invalid += 1
            logger.warning("ignored malformed drift report: %s", exc)
            return
        assert isinstance(report, DriftReport)
        with self._lock:
            self.received += 1
            decision = self.votes.add(report)
        if decision is not None:
            self._queue.put(decision)

    def _work(self) -> None:
        while True:
            decision = self._queue.get()
            if decision is None:
                return
            try:
                self.on_trigger(decision)
            except Exception:  # noqa: BLE001 - a failed retraining is logged; the trigger keeps listening
                self.trigger_errors += 1
                logger.exception("retraining after drift at %s failed", list(decision.institutions))

    def start(self, *, timeout: float = 10.0) -> RetrainTrigger:
        """Connect, subscribe and start listening; raises ConfigError if the broker is unreachable."""
        self._worker = threading.Thread(target=self._work, name="retrain-trigger", daemon=True)
        self._worker.start()
        try:
            self._client.connect(self.host, self.port, keepalive=30)
        except OSError as exc:
            self._queue.put(None)
            raise ConfigError(f"RetrainTrigger: cannot reach the MQTT broker at {self.host}:{self.port} ({exc}).") \
                from exc
        self._client.loop_start()
        if not self._connected.wait(timeout):
            self.stop()
            raise ConfigError(f"RetrainTrigger: no CONNACK from {self.host}:{self.port} within {timeout} s.")
        return self

    def stop(self, *, timeout: float = 30.0) -> None:
        """Disconnect and wait for a running retraining to return."""
        self._client.disconnect()
        self._client.loop_stop()
        self._queue.put(None)
        if self._worker is not None:
            self._worker.join(timeout)
