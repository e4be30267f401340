"""Response shapes of the dashboard's JSON API (they document the OpenAPI schema)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class Me(BaseModel):
    """Who is asking."""

    user: str
    institution: str | None = Field(description="None: a consortium operator who sees every institution.")
    auth: bool = Field(description="Whether this dashboard requires a token.")


class RunSummary(BaseModel):
    """One federated run."""

    run_id: str
    name: str
    status: str
    created_at: str
    finished_at: str | None
    institutions: list[str]
    rounds_completed: int


class RoundView(BaseModel):
    """One completed round: who took part, global metrics, disclosed per-institution metrics."""

    round: int
    started_at: str
    finished_at: str
    duration_s: float
    participants: list[str]
    dropped: list[str]
    global_metrics: dict[str, float | None]
    institution_metrics: dict[str, dict[str, float | None]] = Field(
        description="Test-split metrics of the institutions that disclosed them (own institution only for "
                    "institution users)."
    )


class BaselineView(BaseModel):
    """A reference result (``local_only`` per institution, ``centralized``)."""

    kind: str
    institution: str | None
    metrics: dict[str, float | None]


class RunRounds(BaseModel):
    """Everything the federation panel plots for one run."""

    run: RunSummary
    rounds: list[RoundView]
    baselines: list[BaselineView]


class PrivacyCharge(BaseModel):
    """One privacy-ledger charge (ε is cumulative for the institution and data set after it)."""

    run_id: str
    institution: str
    data_id: str
    round: int
    mechanism: str
    epsilon: float | None
    epsilon_rdp: float | None
    delta: float | None
    budget_epsilon: float | None
    created_at: str


class PrivacyView(BaseModel):
    """The privacy panel: ledger charges (empty when the ledger is not installed or has none)."""

    available: bool = Field(description="Whether the privacy ledger module is installed.")
    charges: list[PrivacyCharge]


class Alert(BaseModel):
    """One stored alert."""

    id: int
    msg_id: str
    institution: str
    agent: str
    transaction_id: str
    score: float
    threshold: float
    model_version: str
    ts: float
    received_at: float


class Agent(BaseModel):
    """One edge agent as last seen."""

    institution: str
    agent: str
    app: str
    state: str = Field(description="online / offline (last will) / unknown")
    stale: bool = Field(description="Nothing received for a minute.")
    model_version: str
    last_seen: float
    throughput_per_s: float | None
    alerts_per_s: float | None
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    queue_backlog: int | None
    drift_status: str
    invalid: dict[str, int]


class EventView(BaseModel):
    """An Event (kind ``events``) or DriftReport (kind ``drift``) message."""

    id: int
    msg_id: str
    kind: str
    institution: str
    agent: str
    ts: float
    name: str
    payload: dict[str, Any]


class TrafficView(BaseModel):
    """Vehicle counts of one interval of one vision agent."""

    id: int
    institution: str
    agent: str
    ts: float
    interval_s: float
    model_version: str
    counts: dict[str, Any] = Field(description="{line: {direction: {class: count}}}")
    totals: dict[str, int] = Field(description="Per-class totals over lines and directions.")


class ModelView(BaseModel):
    """A registry version (fallback shape when the model registry is not installed)."""

    model_version: str
    channel: str
    promoted: bool
