"""Tables of the run store, on one declarative :class:`Base` shared by every concern.

The run store's own tables live here: runs, their completed rounds, one
checkpoint per round, per-institution evaluation metrics and baseline results.
Later concerns (privacy ledger, model registry, edge alerts) add their own module
with classes deriving from the same :class:`Base`; importing that module before
opening a :class:`~consortium.registry.store.RunStore` (or calling
``RunStore.create_missing_tables()`` afterwards) creates their tables in the same
database and schema.  Child tables reference ``runs.run_id`` with
``ondelete="CASCADE"`` so that deleting a run removes everything it owns.

Two column types carry the store's encoding rules so that no caller has to:

* :class:`UTCDateTime` stores instants in UTC and always returns timezone-aware
  UTC datetimes, also on SQLite, which has no time zone support.
* :class:`MetricsJSON` stores ``{name: float}`` maps as JSON while keeping NaN and
  infinities, which JSON (and PostgreSQL's ``json`` type) cannot hold, as the
  strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
"""Deterministic constraint names, so that later migrations can address them."""

RUN_ID_LENGTH = 64
NAME_LENGTH = 200

_NON_FINITE_TO_TEXT = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
_TEXT_TO_NON_FINITE = {text: float(key) for key, text in _NON_FINITE_TO_TEXT.items()}


class Base(DeclarativeBase):
    """Declarative base of every consortium table (one ``MetaData`` for the whole store)."""

    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)


class UTCDateTime(sa.TypeDecorator[datetime]):
    """A timezone-aware UTC instant on every backend.

    Naive datetimes are refused at bind time: guessing their zone would silently
    shift round timings by hours.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"Timestamps must be timezone-aware. Got naive {value!r} instead.")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":  # SQLite stores text without an offset: always UTC here
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def encode_metric_value(value: float) -> float | str:
    """JSON-safe form of one metric value: finite floats as numbers, others as text."""
    if math.isfinite(value):
        return float(value)
    return _NON_FINITE_TO_TEXT[repr(float(value))]


def decode_metric_value(value: float | int | str) -> float:
    """Inverse of :func:`encode_metric_value`."""
    if isinstance(value, str):
        return _TEXT_TO_NON_FINITE[value]
    return float(value)


class MetricsJSON(sa.TypeDecorator[dict[str, float]]):
    """A ``{name: float}`` map stored as JSON, NaN and infinities included."""

    impl = sa.JSON
    cache_ok = True

    def process_bind_param(
        self, value: Mapping[str, float] | None, dialect: Dialect
    ) -> dict[str, float | str] | None:
        if value is None:
            return None
        return {str(name): encode_metric_value(metric) for name, metric in value.items()}

    def process_result_value(
        self, value: Mapping[str, Any] | None, dialect: Dialect
    ) -> dict[str, float] | None:
        if value is None:
            return None
        return {name: decode_metric_value(metric) for name, metric in value.items()}


def _run_fk() -> sa.ForeignKey:
    return sa.ForeignKey("runs.run_id", ondelete="CASCADE")


class RunRow(Base):
    """One federated run: what was asked (config, institutions) and how it ended."""

    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(sa.String(RUN_ID_LENGTH), unique=True)
    name: Mapped[str] = mapped_column(sa.String(NAME_LENGTH))
    status: Mapped[str] = mapped_column(sa.String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    config: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    institutions: Mapped[list[str]] = mapped_column(sa.JSON)
    message: Mapped[str | None] = mapped_column(sa.Text, nullable=True)


class RoundRow(Base):
    """One completed round of a run; ``(run_id, round)`` is unique by construction."""

    __tablename__ = "rounds"

    run_id: Mapped[str] = mapped_column(sa.String(RUN_ID_LENGTH), _run_fk(), primary_key=True)
    round: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime] = mapped_column(UTCDateTime)
    duration_s: Mapped[float] = mapped_column(sa.Float)
    participants: Mapped[list[str]] = mapped_column(sa.JSON)
    dropped: Mapped[list[str]] = mapped_column(sa.JSON)
    train_metrics: Mapped[dict[str, float]] = mapped_column(MetricsJSON)
    global_metrics: Mapped[dict[str, float]] = mapped_column(MetricsJSON)


class CheckpointRow(Base):
    """The global model's arrays after a round; a checkpoint cannot exist without its round."""

    __tablename__ = "checkpoints"
    __table_args__ = (
        sa.ForeignKeyConstraint(
            ["run_id", "round"], ["rounds.run_id", "rounds.round"], ondelete="CASCADE"
        ),
    )

    run_id: Mapped[str] = mapped_column(sa.String(RUN_ID_LENGTH), primary_key=True)
    round: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    n_arrays: Mapped[int] = mapped_column(sa.Integer)
    n_bytes: Mapped[int] = mapped_column(sa.BigInteger)
    arrays_npz: Mapped[bytes] = mapped_column(sa.LargeBinary)
    extra: Mapped[dict[str, Any]] = mapped_column(sa.JSON)


class InstitutionMetricRow(Base):
    """Evaluation metrics one institution chose to disclose for one round and data split."""

    __tablename__ = "institution_metrics"
    __table_args__ = (sa.UniqueConstraint("run_id", "round", "institution", "split"),)

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(sa.String(RUN_ID_LENGTH), _run_fk(), index=True)
    round: Mapped[int] = mapped_column(sa.Integer)
    institution: Mapped[str] = mapped_column(sa.String(NAME_LENGTH))
    split: Mapped[str] = mapped_column(sa.String(NAME_LENGTH))
    metrics: Mapped[dict[str, float]] = mapped_column(MetricsJSON)


class BaselineRow(Base):
    """A reference result for a run: local-only per institution, or centralized (no institution)."""

    __tablename__ = "baselines"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(sa.String(RUN_ID_LENGTH), _run_fk(), index=True)
    kind: Mapped[str] = mapped_column(sa.String(NAME_LENGTH))
    institution: Mapped[str | None] = mapped_column(sa.String(NAME_LENGTH), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    metrics: Mapped[dict[str, float]] = mapped_column(MetricsJSON)
