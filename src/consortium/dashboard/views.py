"""Reads of the dashboard tables as JSON-ready dicts, shared by the API and the live stream.

One function per panel; each takes an optional ``institution`` so that an
institution's token never reads another institution's rows.
"""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from consortium.dashboard.schema import AgentRow, AlertRow, EventRow, TrafficRow

STALE_AFTER_S = 60.0
"""An agent that sent nothing for this long is shown as stale even if its last status said online."""


def alert_view(row: AlertRow) -> dict[str, Any]:
    """One alert as the API and the page see it."""
    return {
        "id": row.id,
        "msg_id": row.msg_id,
        "institution": row.institution,
        "agent": row.agent,
        "transaction_id": row.transaction_id,
        "score": row.score,
        "threshold": row.threshold,
        "model_version": row.model_version,
        "ts": row.ts,
        "received_at": row.received_at,
    }


def agent_view(row: AgentRow, *, now: float | None = None) -> dict[str, Any]:
    """One fleet row: state, model version and the latest telemetry window's rates."""
    now = time.time() if now is None else now
    tel = row.telemetry or {}
    window = float(tel.get("window_s") or 0.0)
    latency = tel.get("latency_us") or {}
    drift = tel.get("drift") or {}
    return {
        "institution": row.institution,
        "agent": row.agent,
        "app": row.app,
        "state": row.state,
        "stale": bool(row.last_seen) and now - row.last_seen > STALE_AFTER_S,
        "model_version": row.model_version,
        "last_seen": row.last_seen,
        "throughput_per_s": (tel.get("scored", 0) / window) if window > 0 else None,
        "alerts_per_s": (tel.get("alerts", 0) / window) if window > 0 else None,
        "latency_p50_ms": _ms(latency.get("p50")),
        "latency_p99_ms": _ms(latency.get("p99")),
        "queue_backlog": tel.get("queue_backlog"),
        "drift_status": drift.get("status", "unknown") if tel else "unknown",
        "invalid": tel.get("invalid", {}),
    }


def _ms(us: Any) -> float | None:
    return float(us) / 1000.0 if isinstance(us, int | float) else None


def event_view(row: EventRow) -> dict[str, Any]:
    """One event or drift report."""
    return {
        "id": row.id,
        "msg_id": row.msg_id,
        "kind": row.kind,
        "institution": row.institution,
        "agent": row.agent,
        "ts": row.ts,
        "name": row.name,
        "payload": row.payload,
    }


def traffic_view(row: TrafficRow) -> dict[str, Any]:
    """One interval of vehicle counts, plus per-class totals over lines and directions."""
    totals: dict[str, int] = {}
    for directions in (row.counts or {}).values():
        for classes in (directions or {}).values():
            for cls, n in (classes or {}).items():
                totals[cls] = totals.get(cls, 0) + int(n)
    return {
        "id": row.id,
        "institution": row.institution,
        "agent": row.agent,
        "ts": row.ts,
        "interval_s": row.interval_s,
        "model_version": row.model_version,
        "counts": row.counts,
        "totals": totals,
    }


def _scoped(query: Any, column: Any, institution: str | None) -> Any:
    return query if institution is None else query.where(column == institution)


def read_alerts(
    session: Session, *, institution: str | None = None, after_id: int | None = None, limit: int = 200
) -> list[dict[str, Any]]:
    """Alerts, newest first; with ``after_id`` the ones stored after it, oldest first (for replay)."""
    query = _scoped(sa.select(AlertRow), AlertRow.institution, institution)
    if after_id is not None:
        query = query.where(AlertRow.id > after_id).order_by(AlertRow.id)
    else:
        query = query.order_by(AlertRow.id.desc())
    return [alert_view(r) for r in session.scalars(query.limit(limit))]


def count_alerts(session: Session, *, institution: str | None = None) -> int:
    """How many distinct alerts are stored."""
    query = _scoped(sa.select(sa.func.count(AlertRow.id)), AlertRow.institution, institution)
    return int(session.scalar(query) or 0)


def read_fleet(session: Session, *, institution: str | None = None) -> list[dict[str, Any]]:
    """Every agent seen, ordered by institution and name."""
    query = _scoped(sa.select(AgentRow), AgentRow.institution, institution)
    now = time.time()
    return [agent_view(r, now=now) for r in session.scalars(query.order_by(AgentRow.institution, AgentRow.agent))]


def read_events(session: Session, *, institution: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
    """Events and drift reports, newest first."""
    query = _scoped(sa.select(EventRow), EventRow.institution, institution).order_by(EventRow.id.desc())
    return [event_view(r) for r in session.scalars(query.limit(limit))]


def read_traffic(
    session: Session, *, institution: str | None = None, since: float | None = None, limit: int = 2000
) -> list[dict[str, Any]]:
    """Traffic count intervals, oldest first (the most recent ``limit``)."""
    query = _scoped(sa.select(TrafficRow), TrafficRow.institution, institution)
    if since is not None:
        query = query.where(TrafficRow.ts >= since)
    rows = list(session.scalars(query.order_by(TrafficRow.id.desc()).limit(limit)))
    return [traffic_view(r) for r in reversed(rows)]
