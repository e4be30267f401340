"""The dashboard's own tables in the run store: what edge agents sent over MQTT.

Every agent message that carries a ``msg_id`` (alerts, telemetry, events, drift
reports, traffic counts) is stored once: the ``msg_id`` column is unique and the
ingestor inserts with ``ON CONFLICT DO NOTHING`` on SQLite and PostgreSQL alike,
so a message redelivered by the broker or re-sent by an agent's outbox is
dropped by the database itself, also across dashboard restarts.

``dashboard_agents`` holds one row per agent with its latest state (online /
offline from retained status messages and the broker's last will, model version,
latest telemetry aggregates): the fleet table is a plain read of it.

Importing this module registers the tables on
:class:`consortium.registry.store_schema.Base`; :func:`ensure_tables` creates them
in a store opened before the import.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from consortium.registry.store import RunStore
from consortium.registry.store_schema import Base

MSG_ID_LENGTH = 200
"""``<institution>/<agent>/<seq>`` with 64-character names and a decimal sequence number."""
NAME_LENGTH = 64
"""Institution and agent names (the wire contract allows at most 64 characters)."""


class AlertRow(Base):
    """One alert of one edge agent (a transaction scored above its threshold)."""

    __tablename__ = "dashboard_alerts"
    __table_args__ = (sa.Index("ix_dashboard_alerts_institution_id", "institution", "id"),)

    id: Mapped[int] = mapped_column(sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    msg_id: Mapped[str] = mapped_column(sa.String(MSG_ID_LENGTH), unique=True)
    institution: Mapped[str] = mapped_column(sa.String(NAME_LENGTH))
    agent: Mapped[str] = mapped_column(sa.String(NAME_LENGTH))
    transaction_id: Mapped[str] = mapped_column(sa.String(MSG_ID_LENGTH))
    score: Mapped[float] = mapped_column(sa.Float)
    threshold: Mapped[float] = mapped_column(sa.Float)
    model_version: Mapped[str] = mapped_column(sa.String(NAME_LENGTH))
    ts: Mapped[float] = mapped_column(sa.Float)
    """When the agent scored the transaction (seconds since the epoch, agent clock)."""
    received_at: Mapped[float] = mapped_column(sa.Float)
    """When the dashboard received the message (seconds since the epoch)."""


class AgentRow(Base):
    """Latest known state of one edge agent."""

    __tablename__ = "dashboard_agents"

    institution: Mapped[str] = mapped_column(sa.String(NAME_LENGTH), primary_key=True)
    agent: Mapped[str] = mapped_column(sa.String(NAME_LENGTH), primary_key=True)
    app: Mapped[str] = mapped_column(sa.String(NAME_LENGTH), default="fraud")
    state: Mapped[str] = mapped_column(sa.String(16), default="unknown")
    state_ts: Mapped[float] = mapped_column(sa.Float, default=0.0)
    model_version: Mapped[str] = mapped_column(sa.String(NAME_LENGTH), default="")
    last_seen: Mapped[float] = mapped_column(sa.Float, default=0.0)
    telemetry_ts: Mapped[float] = mapped_column(sa.Float, default=0.0)
    telemetry: Mapped[dict[str, Any]] = mapped_column(sa.JSON, default=dict)
    """Latest telemetry message as sent (aggregates only)."""


class TelemetryRow(Base):
    """Telemetry history (one row per reporting window of one agent)."""

    __tablename__ = "dashboard_telemetry"

    id: Mapped[int] = mapped_column(sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    msg_id: Mapped[str] = mapped_column(sa.String(MSG_ID_LENGTH), unique=True)
    institution: Mapped[str] = mapped_column(sa.String(NAME_LENGTH), index=True)
    agent: Mapped[str] = mapped_column(sa.String(NAME_LENGTH))
    ts: Mapped[float] = mapped_column(sa.Float)
    payload: Mapped[dict[str, Any]] = mapped_column(sa.JSON)


class EventRow(Base):
    """An operator-facing event: an ``Event`` message (kind ``events``) or a ``DriftReport`` (kind ``drift``)."""

    __tablename__ = "dashboard_events"

    id: Mapped[int] = mapped_column(sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    msg_id: Mapped[str] = mapped_column(sa.String(MSG_ID_LENGTH), unique=True)
    kind: Mapped[str] = mapped_column(sa.String(16))
    institution: Mapped[str] = mapped_column(sa.String(NAME_LENGTH), index=True)
    agent: Mapped[str] = mapped_column(sa.String(NAME_LENGTH))
    ts: Mapped[float] = mapped_column(sa.Float)
    name: Mapped[str] = mapped_column(sa.String(NAME_LENGTH))
    """The event name (``"model_updated"``, ...) or the drift status (``"ok"``, ``"warning"``, ``"drift"``)."""
    payload: Mapped[dict[str, Any]] = mapped_column(sa.JSON)


class TrafficRow(Base):
    """Vehicle counts of one interval of one vision agent (``TrafficCounts``)."""

    __tablename__ = "dashboard_traffic"

    id: Mapped[int] = mapped_column(sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    msg_id: Mapped[str] = mapped_column(sa.String(MSG_ID_LENGTH), unique=True)
    institution: Mapped[str] = mapped_column(sa.String(NAME_LENGTH), index=True)
    agent: Mapped[str] = mapped_column(sa.String(NAME_LENGTH))
    ts: Mapped[float] = mapped_column(sa.Float)
    interval_s: Mapped[float] = mapped_column(sa.Float)
    model_version: Mapped[str] = mapped_column(sa.String(NAME_LENGTH))
    counts: Mapped[dict[str, Any]] = mapped_column(sa.JSON)


def ensure_tables(store: RunStore) -> None:
    """Create the dashboard tables in ``store`` if they are missing (idempotent)."""
    store.create_missing_tables()


TABLES: tuple[type[Base], ...] = (AlertRow, AgentRow, TelemetryRow, EventRow, TrafficRow)
"""Every table of this module."""

__all__ = ["TABLES", "AgentRow", "AlertRow", "EventRow", "TelemetryRow", "TrafficRow", "ensure_tables"]
