"""The edge agent: score every transaction locally, alert above threshold, report aggregates, update itself.

Threads
-------
* the caller's thread scores (:meth:`EdgeAgent.score_row`, :meth:`EdgeAgent.run_lines`): parse, score,
  compare, and — for an alert only — put an :class:`~consortium.edge.messages.Alert` on the publisher's
  in-memory queue.  Nothing on this path touches the disk or the network;
* the publisher's writer thread commits messages to the durable outbox and sends them
  (:mod:`consortium.edge.publisher`);
* a telemetry thread publishes one :class:`~consortium.edge.messages.Telemetry` per window;
* a control thread handles model announcements and operator commands: download, verify
  signature/hashes/schema, shadow-score recent traffic, swap, roll back.

The active model is one immutable :class:`~consortium.edge.model.ActiveModel` read once per transaction,
so a swap happens *between* two transactions and never inside one.
"""

from __future__ import annotations

import collections
import csv
import hashlib
import json
import logging
import queue
import threading
import time
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from consortium.edge import messages as m
from consortium.edge.inputs import InvalidInputError
from consortium.edge.model import ActiveModel
from consortium.errors import ConsortiumError, param_error

logger = logging.getLogger(__name__)

MAX_BUNDLE_BYTES = 512 * 1024 * 1024


class Monitor(Protocol):
    """Drift monitor / recalibrator hook (the continual-learning team provides the real one)."""

    def observe(self, features: np.ndarray, score: float) -> None:
        """See one scored row (``features`` is a reused ``[1, d]`` buffer: copy it to keep it)."""

    def summary(self) -> dict[str, Any]:
        """Drift summary for ``Telemetry.drift``; at least ``{"status": ...}``."""

    def threshold(self, default: float) -> float:
        """Decision threshold to use given the model's ``default`` (read once per telemetry window)."""


class NullMonitor:
    """The default monitor: observes nothing, reports ``{"status": "unknown"}``, keeps the threshold."""

    def observe(self, features: np.ndarray, score: float) -> None:
        """Do nothing."""

    def summary(self) -> dict[str, Any]:
        """No drift statistics."""
        return {"status": "unknown"}

    def threshold(self, default: float) -> float:
        """The model's own threshold."""
        return default


class Publisher(Protocol):
    """What the agent needs of :class:`~consortium.edge.publisher.MqttPublisher`."""

    def publish(self, payload: Any) -> None: ...  # noqa: D102
    def subscribe(self, topic_filter: str, handler: Any) -> None: ...  # noqa: D102
    def set_model_version(self, version: str) -> None: ...  # noqa: D102
    @property
    def backlog(self) -> int: ...  # noqa: D102


@dataclass
class _Window:
    """Aggregates of the current telemetry window (guarded by the agent's lock)."""

    started: float
    scored: int = 0
    alerts: int = 0
    invalid: collections.Counter[str] = field(default_factory=collections.Counter)
    scores: list[float] = field(default_factory=list)
    latency_ns: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class AgentTotals:
    """Counts since the agent started."""

    scored: int
    alerts: int
    invalid: dict[str, int]
    model_version: str
    updates: int
    rollbacks: int
    refused: int


class EdgeAgent:
    """Scores transactions with the active model and reports over a publisher.

    Parameters
    ----------
    model : ActiveModel
        The model to serve first.
    institution, agent : str
        Who this agent is (topic segments).
    publisher : Publisher, optional
        Usually an :class:`~consortium.edge.publisher.MqttPublisher`; None scores silently (benchmarks).
    telemetry_interval : float
        Seconds between telemetry messages.
    monitor : Monitor, optional
        Drift monitor / recalibrator; default :class:`NullMonitor` (not called per row).
    public_key : Ed25519PublicKey, optional
        Key that signs bundles; without it every over-the-air update is refused.
    channel : str
        Model channel to follow on ``consortium/models/<channel>``.
    shadow_rows : int
        Recent transactions kept to shadow-score a new model before it goes live.
    app : str
        Application name in telemetry.
    """

    def __init__(
        self,
        model: ActiveModel,
        *,
        institution: str,
        agent: str,
        publisher: Publisher | None = None,
        telemetry_interval: float = 5.0,
        monitor: Monitor | None = None,
        public_key: Any = None,
        channel: str = "default",
        shadow_rows: int = 256,
        app: str = "fraud",
    ) -> None:
        if telemetry_interval <= 0:
            raise param_error("telemetry_interval", "EdgeAgent", "a positive number of seconds", telemetry_interval)
        if shadow_rows < 1:
            raise param_error("shadow_rows", "EdgeAgent", "an integer >= 1", shadow_rows)
        self.institution = m.check_name(institution, what="institution")
        self.agent = m.check_name(agent, what="agent")
        self.channel = m.check_name(channel, what="channel")
        self.publisher = publisher
        self.telemetry_interval = float(telemetry_interval)
        self.monitor: Monitor = monitor if monitor is not None else NullMonitor()
        self._observe = None if monitor is None else monitor.observe
        self.public_key = public_key
        self.app = app
        self._active = model
        self._previous: ActiveModel | None = None
        self._threshold = self.monitor.threshold(model.threshold)
        self._recent: collections.deque[list[float]] = collections.deque(maxlen=shadow_rows)
        self._lock = threading.Lock()
        self._window = _Window(time.monotonic())
        self._totals = collections.Counter[str]()
        self._invalid_total = collections.Counter[str]()
        self._declined: set[str] = set()
        self._control: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ properties

    @property
    def model(self) -> ActiveModel:
        """The model serving right now."""
        return self._active

    @property
    def threshold(self) -> float:
        """The decision threshold in force (the model's, possibly moved by the monitor)."""
        return self._threshold

    def totals(self) -> AgentTotals:
        """Counts since start (including the current window)."""
        with self._lock:
            w = self._window
            return AgentTotals(
                scored=self._totals["scored"] + w.scored, alerts=self._totals["alerts"] + w.alerts,
                invalid=dict(self._invalid_total + w.invalid), model_version=self._active.version,
                updates=self._totals["updates"], rollbacks=self._totals["rollbacks"],
                refused=self._totals["refused"],
            )

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> EdgeAgent:
        """Subscribe to model announcements and commands; start the telemetry and control threads."""
        if self._threads:
            return self
        self._stop.clear()
        if self.publisher is not None:
            self.publisher.set_model_version(self._active.version)
            self.publisher.subscribe(m.models_topic(self.channel), self._on_announcement)
            self.publisher.subscribe(m.agent_topic(self.institution, self.agent, "commands"), self._on_command)
        for target, name in ((self._telemetry_loop, "telemetry"), (self._control_loop, "control")):
            t = threading.Thread(target=target, name=f"{name}-{self.agent}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        """Publish a last telemetry window and stop the agent's threads (the publisher is the caller's)."""
        self._stop.set()
        self._control.put(("stop", None))
        for t in self._threads:
            t.join(timeout=10)
        self._threads = []
        self.emit_telemetry()

    def __enter__(self) -> EdgeAgent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ scoring (hot path)

    def score_row(self, row: Mapping[str, Any]) -> float | None:
        """Score one decoded transaction; alert if above threshold.  None if refused (counted)."""
        t0 = time.perf_counter_ns()
        active = self._active
        try:
            tx = active.parser.parse_mapping(row)
        except InvalidInputError as exc:
            self._count_invalid(exc.reason)
            return None
        try:
            score = active.scorer.score_values(tx.values)
        except Exception as exc:  # a model that fails at run time is rolled back
            self._model_failed(active, f"scoring raised {type(exc).__name__}: {exc}")
            return None
        if score != score:  # NaN from the model (never from finite input to a sound model)
            self._model_failed(active, "the model returned NaN")
            return None
        if self._observe is not None:
            self._observe(active.scorer.row, score)
        self._recent.append(tx.values)
        alert = score > self._threshold
        elapsed = time.perf_counter_ns() - t0
        with self._lock:
            w = self._window
            w.scored += 1
            w.scores.append(score)
            w.latency_ns.append(elapsed)
            if alert:
                w.alerts += 1
        if alert and self.publisher is not None:
            self.publisher.publish(m.Alert(
                msg_id="", institution=self.institution, agent=self.agent, transaction_id=tx.transaction_id,
                score=score, threshold=self._threshold, model_version=active.version, ts=time.time(),
            ))
        return score

    def score_line(self, line: bytes | str) -> float | None:
        """Score one JSON line (bad JSON counted by reason, never raised)."""
        if len(line) > m.MAX_PAYLOAD_BYTES:
            self._count_invalid("oversized")
            return None
        try:
            row = json.loads(line)
        except (UnicodeDecodeError, ValueError, RecursionError):
            self._count_invalid("malformed_json")
            return None
        if not isinstance(row, dict):
            self._count_invalid("not_object")
            return None
        return self.score_row(row)

    def run_lines(self, lines: Iterable[bytes | str]) -> int:
        """Score a stream of JSON lines until it ends or :meth:`stop` is called; returns lines read."""
        n = 0
        for line in lines:
            if self._stop.is_set():
                break
            n += 1
            if line.strip():
                self.score_line(line)
        return n

    def run_csv(self, text: Iterable[str]) -> int:
        """Score CSV rows (header line first) until the stream ends; returns rows read."""
        n = 0
        for row in csv.DictReader(text):
            if self._stop.is_set():
                break
            n += 1
            try:
                tx = self._active.parser.parse_csv_row(row)
            except InvalidInputError as exc:
                self._count_invalid(exc.reason)
                continue
            self.score_row(_as_row(self._active.parser, tx))
        return n

    def _count_invalid(self, reason: str) -> None:
        with self._lock:
            self._window.invalid[reason] += 1

    # ------------------------------------------------------------------ telemetry

    def emit_telemetry(self) -> m.Telemetry:
        """Close the current window, publish its Telemetry (if a publisher is set) and return it."""
        now = time.monotonic()
        with self._lock:
            w, self._window = self._window, _Window(now)
            self._totals["scored"] += w.scored
            self._totals["alerts"] += w.alerts
            self._invalid_total.update(w.invalid)
        self._threshold = self.monitor.threshold(self._active.threshold)
        latency: dict[str, float] = {}
        if w.latency_ns:
            lat = np.asarray(w.latency_ns, dtype=np.float64) / 1000.0
            latency = {f"p{q}": float(np.percentile(lat, q)) for q in (50, 90, 99)}
            latency["max"] = float(lat.max())
        histogram: dict[str, list[float]] = {}
        if w.scores:
            scores = np.asarray(w.scores, dtype=np.float64)
            lo, hi = (0.0, 1.0) if scores.min() >= 0.0 and scores.max() <= 1.0 else (scores.min(), scores.max())
            counts, edges = np.histogram(scores, bins=10, range=(lo, hi if hi > lo else lo + 1.0))
            histogram = {"edges": [float(e) for e in edges], "counts": [float(c) for c in counts]}
        drift = self.monitor.summary()
        tel = m.Telemetry(
            msg_id="", institution=self.institution, agent=self.agent, ts=time.time(), window_s=now - w.started,
            model_version=self._active.version, scored=w.scored, alerts=w.alerts, invalid=dict(w.invalid),
            latency_us=latency, score_histogram=histogram,
            queue_backlog=self.publisher.backlog if self.publisher is not None else 0,
            drift=drift, app=self.app, extra={"threshold": self._threshold},
        )
        if self.publisher is not None:
            self.publisher.publish(tel)
        return tel

    def _telemetry_loop(self) -> None:
        while not self._stop.wait(self.telemetry_interval):
            try:
                self.emit_telemetry()
            except Exception:
                logger.exception("Telemetry failed")

    # ------------------------------------------------------------------ model updates

    def _event(self, event: str, **detail: Any) -> None:
        logger.info("%s: %s", event, detail)
        if self.publisher is not None:
            self.publisher.publish(m.Event(
                msg_id="", institution=self.institution, agent=self.agent, ts=time.time(), event=event,
                detail=detail,
            ))

    def _on_announcement(self, topic: str, payload: bytes) -> None:
        self._control.put(("announcement", payload))

    def _on_command(self, topic: str, payload: bytes) -> None:
        self._control.put(("command", payload))

    def _control_loop(self) -> None:
        while True:
            kind, payload = self._control.get()
            if kind == "stop":
                return
            try:
                if kind == "announcement":
                    ann = m.parse_payload("models", payload)
                    if ann.model_version == self._active.version or ann.model_version in self._declined:
                        continue
                    self.update_from_url(ann.url, expected_sha256=ann.sha256)
                elif kind == "command":
                    self.handle_command(m.parse_payload("commands", payload))
            except m.MessageError as exc:
                self._event("message_refused", error=str(exc))
            except Exception as exc:
                logger.exception("Control message failed")
                self._event("control_failed", error=f"{type(exc).__name__}: {exc}")

    def handle_command(self, command: m.Command) -> bool:
        """Carry out an operator command (``rollback``, ``update`` with ``args.url``/``args.sha256``)."""
        if command.command == "rollback":
            return self.rollback(reason="command")
        if command.command == "update":
            url = command.args.get("url")
            if not isinstance(url, str):
                self._event("command_refused", command="update", error="args.url (a string) is required")
                return False
            sha = command.args.get("sha256")
            self._declined.discard(str(command.args.get("model_version", "")))
            return self.update_from_url(url, expected_sha256=sha if isinstance(sha, str) else None)
        self._event("command_refused", command=command.command, error="unknown command; known: rollback, update")
        return False

    def update_from_url(self, url: str, *, expected_sha256: str | None = None) -> bool:
        """Download a bundle and :meth:`offer_bundle` it; a download failure is refused like a bad bundle."""
        try:
            with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 - http(s) from our coordinator
                data = response.read(MAX_BUNDLE_BYTES + 1)
        except Exception as exc:
            self._refuse(f"download of {url} failed: {exc}", version=None)
            return False
        if len(data) > MAX_BUNDLE_BYTES:
            self._refuse(f"bundle at {url} exceeds {MAX_BUNDLE_BYTES} bytes", version=None)
            return False
        return self.offer_bundle(data, expected_sha256=expected_sha256, source=url)

    def offer_bundle(self, data: bytes, *, expected_sha256: str | None = None, source: str = "") -> bool:
        """Verify, shadow-score and activate a bundle; on any failure keep serving the current model.

        Steps: archive hash against the announcement, signature and file hashes
        (``read_bundle``), schema compatibility with the active model (``check_compatible``),
        loading in ONNX Runtime, shadow scoring of recent traffic (every score finite).
        Returns whether the new model is now active.
        """
        from consortium.registry.bundle import check_compatible, read_bundle  # noqa: PLC0415

        if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
            self._refuse(f"archive SHA-256 differs from the announced {expected_sha256}", version=None, source=source)
            return False
        if self.public_key is None:
            self._refuse("no bundle-signing public key is configured", version=None, source=source)
            return False
        try:
            bundle = read_bundle(data, public_key=self.public_key)
            version = str(bundle.manifest.model_version)
            if self._active.manifest is not None:
                check_compatible(self._active.manifest, bundle.manifest)
            candidate = ActiveModel.from_bundle(bundle)
            if self._active.manifest is None and candidate.parser.feature_names != self._active.parser.feature_names:
                raise ConsortiumError("the new model's features differ from the serving model's")
        except ConsortiumError as exc:
            self._refuse(str(exc), version=None, source=source)
            return False
        shadow = self._shadow(candidate)
        if "error" in shadow:
            self._refuse(str(shadow["error"]), version=version, source=source)
            return False
        self._activate(candidate, shadow=shadow)
        return True

    def _shadow(self, candidate: ActiveModel) -> dict[str, Any]:
        """Score recent traffic with both models; report agreement, or an error if the candidate fails."""
        rows = self._recent.copy()
        if not rows:
            return {"rows": 0}
        X = np.asarray(list(rows), dtype=np.float32)
        try:
            new = candidate.scorer.score_batch(X)
        except Exception as exc:
            return {"error": f"shadow scoring failed: {type(exc).__name__}: {exc}"}
        if not np.isfinite(new).all():
            return {"error": f"shadow scoring gave {int((~np.isfinite(new)).sum())} non-finite scores"}
        old = self._active.scorer.score_batch(X) if self._active.scorer is not candidate.scorer else new
        return {
            "rows": int(len(X)),
            "mean_abs_diff": float(np.abs(new - old).mean()),
            "alert_rate_old": float((old > self._active.threshold).mean()),
            "alert_rate_new": float((new > candidate.threshold).mean()),
        }

    def _activate(self, candidate: ActiveModel, *, shadow: dict[str, Any]) -> None:
        old = self._active
        self._previous = old
        self._active = candidate  # one reference assignment: the swap falls between two transactions
        self._threshold = self.monitor.threshold(candidate.threshold)
        self._totals["updates"] += 1
        if self.publisher is not None:
            self.publisher.set_model_version(candidate.version)
        self._event("model_updated", model_version=candidate.version, previous=old.version, shadow=shadow)

    def _refuse(self, error: str, *, version: str | None, source: str = "") -> None:
        if version:
            self._declined.add(version)
        self._totals["refused"] += 1
        logger.warning("Refused a model bundle%s: %s", f" from {source}" if source else "", error)
        self._event("model_refused", error=error, source=source, serving=self._active.version)

    def rollback(self, *, reason: str) -> bool:
        """Go back to the previous model (kept after every update); False if there is none."""
        previous, current = self._previous, self._active
        if previous is None:
            self._event("rollback_refused", reason=reason, error="no previous model", serving=current.version)
            return False
        self._active, self._previous = previous, None
        self._threshold = self.monitor.threshold(previous.threshold)
        self._declined.add(current.version)
        self._totals["rollbacks"] += 1
        if self.publisher is not None:
            self.publisher.set_model_version(previous.version)
        self._event("rolled_back", model_version=previous.version, from_version=current.version, reason=reason)
        return True

    def _model_failed(self, active: ActiveModel, error: str) -> None:
        self._count_invalid("model_error")
        if active is self._active and self._previous is not None:
            self.rollback(reason=f"failure: {error}")


def _as_row(parser: Any, tx: Any) -> dict[str, Any]:
    """A checked transaction back as a row (CSV/line paths; the hot path takes rows directly)."""
    row = dict(zip(parser.feature_names, tx.values, strict=True))
    row[parser.id_field] = tx.transaction_id
    return row
