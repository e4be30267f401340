"""The demo's edge step: an agent scores the holdout stream with the run's signed bundle over MQTT.

Without a broker URL an :class:`~consortium.edge.broker.EmbeddedBroker` is started
in-process, so ``consortium demo`` needs nothing installed.  A subscriber in the
same process plays the dashboard: it counts the alerts that actually arrive.
"""

from __future__ import annotations

import logging
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from consortium.edge import messages as m
from consortium.edge.agent import EdgeAgent
from consortium.edge.model import ActiveModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EdgeDemoResult:
    """What the demo's edge agent did."""

    broker: str
    embedded_broker: bool
    model_version: str
    threshold: float
    scored: int
    alerts: int
    alerts_received: int
    frauds_in_stream: int
    frauds_alerted: int
    invalid: dict[str, int]
    telemetry_received: int
    latency_p50_us: float
    latency_p99_us: float

    def to_json(self) -> dict[str, Any]:
        """Plain dict for the demo's JSON result."""
        return asdict(self)


def run_edge_demo(
    bundle_path: str | Path,
    *,
    public_key: Any,
    X: np.ndarray,
    y: np.ndarray,
    feature_names: list[str],
    broker_url: str | None = None,
    institution: str = "demo-bank",
    outbox_dir: str | Path | None = None,
    timeout: float = 30.0,
    embedded: bool | None = None,
) -> EdgeDemoResult:
    """Score ``X`` row by row as transactions through a real agent, publisher and broker.

    Parameters
    ----------
    bundle_path : path
        The run's signed bundle.
    public_key : Ed25519PublicKey
        Key that verifies it.
    X, y : np.ndarray
        The holdout stream (raw, unstandardised features) and its labels (labels only
        count how many frauds were alerted; they never leave this function).
    feature_names : list of str
        Column names of ``X``.
    broker_url : str, optional
        ``mqtt://host:port``; None starts the embedded broker.
    embedded : bool, optional
        Whether ``broker_url`` is an embedded broker the caller started (reported only;
        default: ``broker_url is None``).
    """
    from consortium.edge.broker import EmbeddedBroker  # noqa: PLC0415
    from consortium.edge.publisher import MqttPublisher  # noqa: PLC0415
    from consortium.edge.testing import Collector  # noqa: PLC0415
    from consortium.registry.bundle import read_bundle  # noqa: PLC0415

    model = ActiveModel.from_bundle(read_bundle(Path(bundle_path), public_key=public_key))
    with ExitStack() as stack:
        if embedded is None:
            embedded = broker_url is None
        if broker_url is None:
            broker_url = stack.enter_context(EmbeddedBroker()).url
        tmp = Path(outbox_dir) if outbox_dir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        sink = Collector(broker_url, m.subscription(institution=institution))
        stack.callback(sink.close)
        publisher = MqttPublisher(broker_url, institution=institution, agent="demo-agent",
                                  outbox_path=tmp / "edge-outbox.db").start()
        agent = EdgeAgent(model, institution=institution, agent="demo-agent", publisher=publisher,
                          telemetry_interval=3600).start()
        alerted_frauds = 0
        columns = list(feature_names)
        for i, (row, label) in enumerate(zip(X.tolist(), y.tolist(), strict=True)):
            transaction = dict(zip(columns, row, strict=True))
            transaction["transaction_id"] = f"holdout-{i}"
            score = agent.score_row(transaction)
            if score is not None and score > agent.threshold and label == 1:
                alerted_frauds += 1
        agent.stop()  # publishes the last telemetry window
        totals = agent.totals()
        publisher.wait_delivered(timeout=timeout)
        deadline = time.monotonic() + timeout
        while len(sink.of_kind(m.Alert)) < totals.alerts and time.monotonic() < deadline:
            time.sleep(0.02)
        sink.wait_for(lambda s: bool(s.of_kind(m.Telemetry)), timeout=5)
        publisher.stop()
        telemetry = sink.of_kind(m.Telemetry)
        latency = telemetry[-1].latency_us if telemetry else {}  # type: ignore[attr-defined]
        return EdgeDemoResult(
            broker=broker_url, embedded_broker=embedded, model_version=model.version, threshold=model.threshold,
            scored=totals.scored, alerts=totals.alerts,
            alerts_received=len({a.msg_id for a in sink.of_kind(m.Alert)}),  # type: ignore[attr-defined]
            frauds_in_stream=int(np.sum(y == 1)), frauds_alerted=alerted_frauds, invalid=totals.invalid,
            telemetry_received=len(telemetry), latency_p50_us=float(latency.get("p50", float("nan"))),
            latency_p99_us=float(latency.get("p99", float("nan"))),
        )
