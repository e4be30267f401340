"""Local adaptation: threshold recalibration, last-layer personalisation, and the edge DriftMonitor hook."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from consortium.continual import (
    DriftMonitor,
    ThresholdRecalibrator,
    fine_tune_last_layer,
    precision_threshold,
)
from consortium.edge.messages import DriftReport, Event, agent_topic, parse_message
from consortium.errors import ConfigError
from consortium.models import TrainConfig, build_model, evaluate_scores, predict_scores


def test_recalibration_restores_the_target_alert_rate_after_a_score_shift() -> None:
    rng = np.random.default_rng(0)
    rec = ThresholdRecalibrator(target_alert_rate=0.01, window=5000, min_rows=1000)
    assert rec.threshold(0.5) == 0.5  # not enough data yet: the bundle's threshold
    rec.observe(rng.beta(1, 20, size=5000) * 1.5)  # scores moved up
    new = rec.recompute(0.2)
    shifted = rng.beta(1, 20, size=20_000) * 1.5
    assert abs(np.mean(shifted >= new) - 0.01) < 0.003
    assert np.mean(shifted >= 0.2) > 0.02  # the old threshold would alert far more
    assert rec.history[-1].basis == "alert_rate" and rec.summary()["recalibrations"] == 1.0


def test_precision_target_uses_labels_when_enough_exist() -> None:
    rng = np.random.default_rng(1)
    y = (rng.random(20_000) < 0.02).astype(int)
    s = np.clip(rng.normal(0.2 + 0.5 * y, 0.15), 0, 1)
    thr = precision_threshold(s, y, target_precision=0.8)
    assert np.mean(y[s >= thr]) >= 0.8
    assert np.mean(y[s >= thr - 0.02]) < 0.8 or thr == s.min()  # lowest such threshold (most recall)
    rec = ThresholdRecalibrator(target_precision=0.8, target_alert_rate=0.05, min_labelled_alerts=20)
    rec.observe_labels(s, y)
    assert rec.recompute(0.5) == pytest.approx(thr)
    assert rec.history[-1].basis == "precision"


def test_recalibrator_counts_bad_scores_and_validates_targets() -> None:
    rec = ThresholdRecalibrator(target_alert_rate=0.1, min_rows=10)
    rec.observe(np.array([0.1, np.nan, np.inf, 0.2]))
    assert rec.invalid == 2
    with pytest.raises(ConfigError, match="'target_alert_rate' parameter of ThresholdRecalibrator"):
        ThresholdRecalibrator()
    with pytest.raises(ConfigError, match="a float in \\(0, 1\\). Got 1.5"):
        ThresholdRecalibrator(target_precision=1.5)


def test_last_layer_fine_tune_changes_only_the_head_and_helps_locally() -> None:
    rng = np.random.default_rng(2)
    X = rng.normal(size=(4000, 6)).astype(np.float32)
    y = ((X[:, 0] - X[:, 1] + 0.3 * rng.normal(size=4000)) > 2.0).astype(np.int64)
    model = build_model("mlp", 6, hidden=(16, 8), seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    local = fine_tune_last_layer(model, X, y, config=TrainConfig(epochs=5, lr=1e-2, seed=0))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the shared model is untouched
    after = local.state_dict()
    changed = [k for k in after if not torch.equal(before[k], after[k])]
    assert changed == ["layers.6.weight", "layers.6.bias"]
    assert all(p.requires_grad for p in local.parameters())
    auprc_before = evaluate_scores(y, predict_scores(model, X)).auprc
    assert evaluate_scores(y, predict_scores(local, X)).auprc > auprc_before


class _Collect:
    def __init__(self, *, fail: bool = False) -> None:
        self.messages: list[Any] = []
        self.fail = fail

    def publish(self, payload: Any) -> None:
        if self.fail:
            raise ConnectionError("broker down")
        self.messages.append(payload)


def _monitor(pub: _Collect, **kw: Any) -> DriftMonitor:
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(2000, 3))
    return DriftMonitor(ref, rng.beta(1, 20, size=2000), feature_names=["amount", "hour", "n_tx"],
                        institution="bank_a", agent="edge-1", model_version="7", window=500, threshold=0.15,
                        publisher=pub, clock=lambda: 1000.0, **kw)


def test_monitor_reports_drift_and_events_as_contract_messages() -> None:
    pub = _Collect()
    mon = _monitor(pub, recalibrator=ThresholdRecalibrator(target_alert_rate=0.02, min_rows=200))
    rng = np.random.default_rng(4)
    assert mon.summary()["status"] == "unknown"
    for row, s in zip(rng.normal(size=(500, 3)), rng.beta(1, 20, size=500), strict=True):
        mon.observe(row, float(s))
    assert mon.status == "ok" and isinstance(pub.messages[0], DriftReport)
    X = rng.normal(size=(500, 3))
    X[:, 0] += 1.5
    mon.observe_batch(X, rng.beta(1, 20, size=500) + 0.1)
    assert mon.status == "drift"
    summary = mon.summary()
    assert summary["drifted_features"][0] == "amount" and summary["windows"] == 2
    events = [m for m in pub.messages if isinstance(m, Event)]
    assert "drift_detected" in [e.event for e in events]
    assert any(e.event == "recalibrated" for e in events)
    assert mon.threshold(0.15) != 0.15
    for msg in pub.messages:  # every payload passes the wire contract's own parser
        kind = "drift" if isinstance(msg, DriftReport) else "events"
        _, parsed = parse_message(agent_topic("bank_a", "edge-1", kind), msg.to_json())
        assert parsed == msg


def test_monitor_never_raises_into_the_agent() -> None:
    pub = _Collect(fail=True)
    mon = _monitor(pub)
    mon.observe(np.array([1.0, np.nan, 0.0]), 0.1)
    mon.observe(np.array([1.0, 2.0]), 0.1)
    mon.observe(np.array([1.0, 2.0, 3.0]), float("nan"))
    mon.observe("garbage", 0.1)  # type: ignore[arg-type]
    assert mon.summary()["invalid_rows"] == 4
    rng = np.random.default_rng(5)
    mon.observe_batch(rng.normal(size=(40, 3)), rng.random(40))
    assert mon.flush() is None  # 40 rows cannot be tested: counted, not raised
    assert mon.summary()["untestable_windows"] == 1 and "at least 100" in mon.summary()["last_error"]
    mon.observe_batch(rng.normal(size=(500, 3)), rng.beta(1, 20, size=500))
    assert mon.summary()["publish_errors"] >= 1  # broker down: counted, scoring goes on
    assert mon.label("unknown-tx", 1) is False and mon.summary()["labels"]["unknown_id"] == 1


def test_performance_drift_is_published_at_once() -> None:
    pub = _Collect()
    mon = _monitor(pub)
    rng = np.random.default_rng(6)
    for i in range(1200):
        missed = rng.random() < (0.3 if i < 600 else 0.9)
        mon.record(i, 0.05 if missed else 0.5, alerted=not missed)
        mon.label(i, 1)
    reports = [m for m in pub.messages if isinstance(m, DriftReport)]
    assert reports and reports[-1].status == "drift" and reports[-1].statistics["detections_miss"] >= 1
    assert mon.status == "drift" and mon.summary()["performance_drift"] is True
    mon.new_model(model_version="8", reference_features=rng.normal(size=(300, 3)),
                  reference_scores=rng.random(300), threshold=0.4)
    assert mon.status == "unknown" and mon.summary()["performance_drift"] is False
