"""The MQTT wire contract between edge agents, the coordinator and the dashboard.

Every message is one UTF-8 JSON object of at most :data:`MAX_PAYLOAD_BYTES`,
published at QoS 1 under a topic that names who sent it::

    consortium/<institution>/<agent>/<kind>     kind in KINDS (agent → world)
    consortium/<institution>/<agent>/commands   world → one agent (e.g. rollback)
    consortium/models/<channel>                 coordinator → agents (retained)

Messages an agent may send twice (store-and-forward after a reconnect) carry a
``msg_id`` of the form ``"<institution>/<agent>/<seq>"`` with a per-agent
sequence number that survives agent restarts, so a receiver drops duplicates by
``msg_id`` alone.  No message carries raw features or customer identifiers:
alerts carry a transaction id, everything else aggregates.

The schema is checked field by field (:func:`parse_message`): a malformed
payload raises :class:`MessageError` naming the topic, the field, what was
expected and what arrived, so a receiver can count it and carry on.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, ClassVar, Literal

from consortium.errors import DataError

PREFIX = "consortium"
MAX_PAYLOAD_BYTES = 64 * 1024
"""Larger payloads are refused before JSON parsing (a receiver must not be made to parse megabytes)."""

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
"""Institution, agent and channel names: no MQTT wildcards or separators."""

KINDS = ("alerts", "telemetry", "status", "events", "drift", "counts")
"""Topic kinds an agent publishes."""


class MessageError(DataError):
    """A payload or topic does not follow the wire contract."""


def check_name(value: str, *, what: str) -> str:
    """Return ``value`` if it is a valid topic segment, else raise :class:`MessageError`."""
    if not isinstance(value, str) or not NAME_PATTERN.match(value):
        raise MessageError(
            f"The {what} name must match {NAME_PATTERN.pattern} (letters, digits, '_', '.', '-'; "
            f"no '/', '+' or '#'). Got {value!r} instead."
        )
    return value


def agent_topic(institution: str, agent: str, kind: str) -> str:
    """Topic on which ``agent`` of ``institution`` publishes messages of ``kind``."""
    if kind not in (*KINDS, "commands"):
        raise MessageError(f"The message kind must be one of {(*KINDS, 'commands')}. Got {kind!r} instead.")
    return f"{PREFIX}/{check_name(institution, what='institution')}/{check_name(agent, what='agent')}/{kind}"


def models_topic(channel: str) -> str:
    """Retained topic on which the coordinator announces the current bundle of ``channel``."""
    return f"{PREFIX}/models/{check_name(channel, what='channel')}"


def subscription(kind: str = "+", *, institution: str = "+") -> str:
    """MQTT subscription filter for ``kind`` messages of every agent (of one institution if given)."""
    return f"{PREFIX}/{institution}/+/{kind}"


@dataclass(frozen=True)
class TopicParts:
    """What a topic says about its sender."""

    institution: str
    agent: str
    kind: str


def parse_topic(topic: str) -> TopicParts:
    """Split an agent topic into institution, agent and kind; raise :class:`MessageError` otherwise."""
    parts = topic.split("/")
    if len(parts) != 4 or parts[0] != PREFIX or parts[3] not in (*KINDS, "commands"):
        raise MessageError(
            f"Topic {topic!r} is not of the form {PREFIX}/<institution>/<agent>/<kind> with kind in {KINDS}."
        )
    return TopicParts(check_name(parts[1], what="institution"), check_name(parts[2], what="agent"), parts[3])


def make_msg_id(institution: str, agent: str, seq: int) -> str:
    """The de-duplication key of an agent's ``seq``-th message."""
    return f"{institution}/{agent}/{int(seq)}"


# --------------------------------------------------------------------------- payloads


@dataclass(frozen=True)
class _Payload:
    """Common behaviour: JSON encoding and field-checked decoding."""

    KIND: ClassVar[str] = ""

    def to_json(self) -> bytes:
        """Encode as compact UTF-8 JSON (NaN/inf refused: JSON cannot carry them)."""
        data = json.dumps(asdict(self), separators=(",", ":"), allow_nan=False).encode()
        if len(data) > MAX_PAYLOAD_BYTES:
            raise MessageError(f"A {self.KIND} message is {len(data)} bytes; the limit is {MAX_PAYLOAD_BYTES}.")
        return data

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, where: str = "") -> Any:
        """Build from a decoded JSON object, checking every field's presence and type."""
        where = where or cls.KIND
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in raw:
                if f.default is not MISSING or f.default_factory is not MISSING:
                    continue
                raise MessageError(f"{where}: field {f.name!r} is missing.")
            kwargs[f.name] = _check_type(raw[f.name], _TYPES[cls.__name__][f.name], where=where, name=f.name)
        extra = set(raw) - {f.name for f in fields(cls)}
        if extra:
            raise MessageError(f"{where}: unexpected field(s) {sorted(extra)}.")
        return cls(**kwargs)


@dataclass(frozen=True)
class Alert(_Payload):
    """One transaction scored above the decision threshold."""

    KIND: ClassVar[str] = "alerts"
    msg_id: str
    institution: str
    agent: str
    transaction_id: str
    score: float
    threshold: float
    model_version: str
    ts: float
    """Seconds since the epoch when the transaction was scored."""


@dataclass(frozen=True)
class Telemetry(_Payload):
    """Aggregates of one reporting window (a few seconds) of one agent."""

    KIND: ClassVar[str] = "telemetry"
    msg_id: str
    institution: str
    agent: str
    ts: float
    window_s: float
    model_version: str
    scored: int
    alerts: int
    invalid: dict[str, int] = field(default_factory=dict)
    """Rejected inputs in the window by reason (``"missing_field"``, ``"nan"``, ...)."""
    latency_us: dict[str, float] = field(default_factory=dict)
    """Scoring latency quantiles, keys ``"p50"``, ``"p99"`` (and others if wanted)."""
    score_histogram: dict[str, list[float]] = field(default_factory=dict)
    """``{"edges": [...], "counts": [...]}`` of the window's scores."""
    queue_backlog: int = 0
    """Messages waiting in the agent's durable outbox."""
    drift: dict[str, Any] = field(default_factory=dict)
    """Drift summary, at least ``{"status": "ok" | "warning" | "drift" | "unknown"}``."""
    app: str = "fraud"
    """Which edge application sent it (``"fraud"`` or ``"vision"``)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Application-specific aggregates (e.g. per-stage latency of the vision agent)."""


@dataclass(frozen=True)
class Status(_Payload):
    """Online/offline state (retained; ``"offline"`` is also the MQTT last will)."""

    KIND: ClassVar[str] = "status"
    institution: str
    agent: str
    state: Literal["online", "offline"]
    ts: float
    model_version: str = ""
    app: str = "fraud"


@dataclass(frozen=True)
class Event(_Payload):
    """Something an operator should see: model update, rollback, refused bundle, drift, recalibration."""

    KIND: ClassVar[str] = "events"
    msg_id: str
    institution: str
    agent: str
    ts: float
    event: str
    """E.g. ``"model_updated"``, ``"model_refused"``, ``"rolled_back"``, ``"drift_detected"``, ``"recalibrated"``."""
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DriftReport(_Payload):
    """Drift statistics of one window (statistics only, never rows)."""

    KIND: ClassVar[str] = "drift"
    msg_id: str
    institution: str
    agent: str
    ts: float
    model_version: str
    status: str
    """``"ok"``, ``"warning"`` or ``"drift"``."""
    statistics: dict[str, float] = field(default_factory=dict)
    """E.g. per-feature PSI, score-distribution test statistic, performance detector values."""


@dataclass(frozen=True)
class TrafficCounts(_Payload):
    """Vehicle line/zone crossings of one interval (vision agent; never frames)."""

    KIND: ClassVar[str] = "counts"
    msg_id: str
    institution: str
    agent: str
    ts: float
    interval_s: float
    model_version: str
    counts: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    """``{line: {direction: {class: count}}}`` for the interval."""


@dataclass(frozen=True)
class ModelAnnouncement(_Payload):
    """The coordinator's current bundle of a channel (retained on :func:`models_topic`)."""

    KIND: ClassVar[str] = "models"
    channel: str
    model_version: str
    url: str
    """Where the bundle can be downloaded (HTTP(S) URL of the coordinator's registry API)."""
    sha256: str
    """SHA-256 of the downloaded bundle archive."""
    ts: float


@dataclass(frozen=True)
class Command(_Payload):
    """An operator's instruction to one agent."""

    KIND: ClassVar[str] = "commands"
    command: str
    """``"rollback"`` or ``"update"`` (others are refused by the agent)."""
    ts: float
    args: dict[str, Any] = field(default_factory=dict)


PAYLOADS: dict[str, type[_Payload]] = {
    cls.KIND: cls for cls in (Alert, Telemetry, Status, Event, DriftReport, TrafficCounts, ModelAnnouncement, Command)
}

_TYPES: dict[str, dict[str, Any]] = {
    cls.__name__: {f.name: f.type for f in fields(cls)} for cls in PAYLOADS.values()
}


def _check_type(value: Any, annotation: str, *, where: str, name: str) -> Any:
    """Check one decoded JSON value against the field's (string) annotation."""
    ann = str(annotation)
    got = f"Got {type(value).__name__} {value!r:.60} instead."

    def bad(expected: str) -> str:
        # Not str.format: the value and the topic in `where` are untrusted and may hold braces.
        return f"{where}: field {name!r} must be {expected}. {got}"

    if ann == "str" or ann.startswith("Literal"):
        if not isinstance(value, str):
            raise MessageError(bad("a string"))
        if ann.startswith("Literal"):
            allowed = re.findall(r"'([^']*)'", ann)
            if value not in allowed:
                raise MessageError(bad(f"one of {allowed}"))
        return value
    if ann == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise MessageError(bad("an integer"))
        return value
    if ann == "float":
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise MessageError(bad("a finite number"))
        return float(value)
    if ann.startswith("dict"):
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise MessageError(bad("a JSON object"))
        return value
    raise AssertionError(f"unhandled annotation {ann}")  # pragma: no cover - schema bug


def decode_json(payload: bytes | str, *, where: str) -> dict[str, Any]:
    """Decode one payload into a JSON object, refusing oversized, non-UTF-8 or non-object input."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise MessageError(f"{where}: payload of {len(payload)} bytes exceeds the {MAX_PAYLOAD_BYTES}-byte limit.")
    try:
        raw = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MessageError(f"{where}: payload is not valid UTF-8 JSON ({exc}).") from None
    if not isinstance(raw, dict):
        raise MessageError(f"{where}: payload must be a JSON object. Got {type(raw).__name__} instead.")
    return raw


def parse_payload(kind: str, payload: bytes | str, *, where: str = "") -> Any:
    """Decode and check a payload of a known ``kind`` (see :data:`PAYLOADS`)."""
    if kind not in PAYLOADS:
        raise MessageError(f"Unknown message kind {kind!r}; known: {sorted(PAYLOADS)}.")
    where = where or kind
    return PAYLOADS[kind].from_dict(decode_json(payload, where=where), where=where)


def parse_message(topic: str, payload: bytes | str) -> tuple[TopicParts, Any]:
    """Parse an agent message and check that it names the same institution and agent as its topic.

    A payload claiming another institution than its topic is refused: per-institution
    access rules on the broker are written per topic, so the topic is what was authorised.
    """
    parts = parse_topic(topic)
    message = parse_payload(parts.kind, payload, where=f"{parts.kind} message on {topic!r}")
    for attr in ("institution", "agent"):
        if hasattr(message, attr) and getattr(message, attr) != getattr(parts, attr):
            raise MessageError(
                f"{parts.kind} message on {topic!r}: field {attr!r} is {getattr(message, attr)!r}, "
                f"but the topic names {getattr(parts, attr)!r}."
            )
    return parts, message


def now() -> float:
    """Seconds since the epoch (the ``ts`` of every message)."""
    return time.time()
