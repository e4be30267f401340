"""End to end on the real Mosquitto: edge DriftMonitors publish through the edge MqttPublisher, the
coordinator's RetrainTrigger confirms drift at 2 institutions, retrains from the current model and the
new model becomes a signed, promoted, announced bundle (the OTA path)."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from consortium.continual import (
    DriftMonitor,
    DriftVotes,
    GlobalModel,
    LocalData,
    RetrainConfig,
    RetrainingService,
    RetrainTrigger,
    TriggerDecision,
)
from consortium.continual.ota import RegistryPublisher
from consortium.edge.messages import ModelAnnouncement, models_topic, parse_payload
from consortium.edge.publisher import MqttPublisher
from consortium.models import FeatureStats, build_model, get_parameters
from consortium.registry import RunStore
from consortium.registry.registry import ModelRegistry

BROKER = "mqtt://127.0.0.1:1883"
NAMES = ["amount", "hour", "n_tx", "risk"]


def test_drift_at_two_institutions_retrains_and_publishes_a_bundle(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    run = uuid.uuid4().hex[:6]
    channel = f"drift-{run}"
    ref = rng.normal(size=(2000, 4))
    std = FeatureStats.from_data(ref).standardizer()
    start = GlobalModel(params=get_parameters(build_model("mlp", 4, hidden=(8,), seed=0)), standardizer=std,
                        threshold=0.5, hidden=(8,), version="1")
    key = Ed25519PrivateKey.generate()
    store = RunStore(f"sqlite:///{tmp_path / 'runs.db'}")
    registry = ModelRegistry(store, tmp_path / "blobs", public_key=key.public_key())
    ota = RegistryPublisher(registry, private_key=key, feature_names=NAMES, channel=channel, broker_url=BROKER,
                            base_url="http://127.0.0.1:8000")

    def collect(decision: TriggerDecision) -> dict[str, LocalData]:
        X = rng.normal(size=(1500, 4)).astype(np.float32)
        y = (X[:, 0] > 1.8).astype(np.int64)
        return {n: LocalData(X=X, y=y, X_val=X[:300], y_val=y[:300]) for n in decision.institutions}

    done = threading.Event()
    service = RetrainingService(current=start, collect=collect, config=RetrainConfig(rounds=1, seed=0),
                                publish=lambda model: (ota(model), done.set())[0])
    trigger = RetrainTrigger(BROKER, on_trigger=service, votes=DriftVotes(min_institutions=2, window_s=3600))
    announcements: list[ModelAnnouncement] = []
    listener = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=f"ota-listener-{run}")
    listener.on_message = lambda c, u, msg: (
        announcements.append(parse_payload("models", bytes(msg.payload))) if msg.payload else None)
    listener.connect("127.0.0.1", 1883)
    listener.subscribe(models_topic(channel), qos=1)
    listener.loop_start()
    publishers = []
    trigger.start()
    try:
        for i, inst in enumerate((f"bank_a{run}", f"bank_b{run}", f"bank_c{run}")):
            pub = MqttPublisher(BROKER, institution=inst, agent="edge-1", outbox_path=tmp_path / f"outbox{i}.db")
            pub.start()
            publishers.append(pub)
            mon = DriftMonitor(ref, rng.random(2000), feature_names=NAMES, institution=inst, agent="edge-1",
                               model_version="1", window=500, threshold=0.5, publisher=pub)
            X = rng.normal(size=(500, 4))
            if i < 2:  # bank_a and bank_b see their customers spend more; bank_c stays stationary
                X[:, 0] += 2.0
            mon.observe_batch(X, rng.random(500))
            assert mon.status == ("drift" if i < 2 else "ok")
        assert done.wait(60), "no retraining after drift at two institutions"
        for _ in range(100):
            if announcements:
                break
            threading.Event().wait(0.1)
    finally:
        trigger.stop()
        for pub in publishers:
            pub.stop()
        listener.publish(models_topic(channel), b"", qos=1, retain=True).wait_for_publish(5)  # clear the retained
        listener.loop_stop()
        listener.disconnect()
    decision = service.history[0].decision
    assert decision.institutions == (f"bank_a{run}", f"bank_b{run}")
    assert "feature.max_psi" in decision.reports[f"bank_a{run}"]  # statistics only, never rows
    entry = registry.promoted(channel)
    assert entry is not None and entry.model_version == "2" and service.history[0].published == "2"
    bundle = registry.verify("2")
    assert bundle.manifest.feature_names == tuple(NAMES)
    assert bundle.manifest.thresholds["default"] == pytest.approx(service.current.threshold)
    assert announcements and announcements[-1].model_version == "2" and announcements[-1].sha256 == entry.sha256
    store.close()


def test_the_edge_agent_runs_the_drift_monitor(tmp_path: Path) -> None:
    """Contract §3: the real EdgeAgent calls observe() per row, puts summary() into telemetry, uses threshold()."""
    from consortium.continual import ThresholdRecalibrator
    from consortium.edge import messages as m
    from consortium.edge.agent import EdgeAgent
    from consortium.edge.model import ActiveModel
    from consortium.edge.testing import Collector, feature_names, mlp_onnx, mlp_weights, signed_bundle
    from consortium.registry.bundle import read_bundle

    d = 6
    names = feature_names(d)
    inst = f"bank-{uuid.uuid4().hex[:8]}"
    key = Ed25519PrivateKey.generate()
    bundle = read_bundle(signed_bundle(mlp_onnx(mlp_weights(d, (8,), seed=1)), version="v1", private_key=key,
                                       names=names, threshold=0.6), public_key=key.public_key())
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(1000, d)) * 2
    pub = MqttPublisher(BROKER, institution=inst, agent="agent-1", outbox_path=tmp_path / "outbox.db").start()
    monitor = DriftMonitor(ref, rng.random(1000), feature_names=names, institution=inst, agent="agent-1",
                           model_version="v1", window=300, threshold=0.6, publisher=pub,
                           recalibrator=ThresholdRecalibrator(target_alert_rate=0.05, min_rows=200))
    sink = Collector(BROKER, m.subscription(institution=inst))
    agent = EdgeAgent(ActiveModel.from_bundle(bundle), institution=inst, agent="agent-1", publisher=pub,
                      telemetry_interval=60, monitor=monitor).start()
    try:
        X = rng.normal(size=(600, d)) * 2
        X[300:, 0] += 4.0  # the second window has shifted
        for i, x in enumerate(X):
            agent.score_row({"transaction_id": f"tx{i}", **{n: float(v) for n, v in zip(names, x, strict=True)}})
        agent.emit_telemetry()
        assert sink.wait_for(lambda s: s.of_kind(m.Telemetry) and len(s.of_kind(m.DriftReport)) >= 2)
        tel = sink.of_kind(m.Telemetry)[-1]
        assert tel.drift["status"] == "drift" and tel.drift["windows"] == 2  # type: ignore[attr-defined]
        assert "f00" in tel.drift["drifted_features"]  # type: ignore[attr-defined]
        assert tel.extra["threshold"] == monitor.threshold(0.6) != 0.6  # type: ignore[attr-defined]
        assert sink.wait_for(
            lambda s: "drift_detected" in [e.event for e in s.of_kind(m.Event)])  # type: ignore[attr-defined]
    finally:
        agent.stop()
        pub.stop()
        sink.close()
