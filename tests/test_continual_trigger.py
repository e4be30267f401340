"""Drift-triggered retraining: k institutions vote over a real Mosquitto; a round set starts from the current model."""

from __future__ import annotations

import threading
import time
import uuid

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from consortium.continual import (
    DriftVotes,
    GlobalModel,
    LocalData,
    RehearsalBuffer,
    RetrainConfig,
    RetrainingService,
    RetrainTrigger,
    TriggerDecision,
    federated_retrain,
)
from consortium.edge.messages import DriftReport, agent_topic
from consortium.errors import ConfigError
from consortium.models import FeatureStats, build_model, evaluate_scores, get_parameters

BROKER = "mqtt://127.0.0.1:1883"


def _report(inst: str, status: str, ts: float) -> DriftReport:
    return DriftReport(msg_id=f"{inst}/edge-1/{int(ts)}", institution=inst, agent="edge-1", ts=ts,
                       model_version="1", status=status, statistics={"max_psi": 0.4})


def test_votes_need_k_distinct_institutions_within_the_window() -> None:
    votes = DriftVotes(min_institutions=2, window_s=100.0)
    assert votes.add(_report("a", "drift", 0.0)) is None
    assert votes.add(_report("a", "drift", 10.0)) is None  # the same institution twice is one vote
    assert votes.add(_report("b", "drift", 200.0)) is None  # a's vote expired
    decision = votes.add(_report("c", "drift", 250.0))
    assert decision is not None and decision.institutions == ("b", "c")
    assert votes.add(_report("d", "drift", 240.0)) is None  # older than the trigger: already acted on
    assert votes.voting() == ()
    votes.add(_report("e", "drift", 300.0))
    votes.add(_report("e", "ok", 301.0))  # e withdraws
    assert votes.add(_report("f", "drift", 302.0)) is None
    with pytest.raises(ConfigError, match="'min_institutions' parameter of DriftVotes"):
        DriftVotes(min_institutions=0)


def _toy(n: int, rng: np.random.Generator, *, new_pattern: bool) -> tuple[np.ndarray, np.ndarray]:
    X = rng.normal(size=(n, 4)).astype(np.float32)
    y = (X[:, 0] > 2.0).astype(np.int64)  # the old fraud pattern
    if new_pattern:
        new = rng.random(n) < 0.03
        X[new, 1] = rng.normal(3.5, 0.3, size=int(new.sum()))
        y[new] = 1
    return X, y


def _start_model(rng: np.random.Generator) -> GlobalModel:
    X, y = _toy(6000, rng, new_pattern=False)
    std = FeatureStats.from_data(X).standardizer()
    model = build_model("mlp", 4, hidden=(16,), seed=0)
    start = GlobalModel(params=get_parameters(model), standardizer=std, threshold=0.5, hidden=(16,), version="1")
    data = {"a": LocalData(X=X, y=y, X_val=X[:1000], y_val=y[:1000])}
    cfg = RetrainConfig(rounds=3, local_epochs=3, lr=1e-2, proximal_mu=0.0, rehearsal=False)
    return federated_retrain(data, start=start, config=cfg, version="1").model


def test_retraining_learns_the_new_pattern_and_rehearsal_keeps_the_old() -> None:
    rng = np.random.default_rng(0)
    start = _start_model(rng)
    Xo, yo = _toy(4000, rng, new_pattern=False)
    Xn, yn = _toy(4000, rng, new_pattern=True)
    new_only = yn.astype(bool) & (Xn[:, 0] <= 2.0)
    old_auprc = evaluate_scores(yo, start.scores(Xo)).auprc
    assert evaluate_scores(yn, start.scores(Xn)).auprc < 0.6
    institutions = {}
    for name in ("a", "b"):
        X, y = _toy(3000, rng, new_pattern=True)
        X, y = X[(y == 0) | (X[:, 0] <= 2.0)], y[(y == 0) | (X[:, 0] <= 2.0)]  # recent rows: only the new fraud
        buf = RehearsalBuffer(4, fraud_capacity=500, legit_capacity=2000, legit_sample_rate=0.5, seed=1)
        buf.add(*_toy(6000, rng, new_pattern=False))
        institutions[name] = LocalData(X=X, y=y, X_val=X[-500:], y_val=y[-500:], rehearsal=buf)
    cfg = RetrainConfig(rounds=5, local_epochs=3, lr=1e-2, proximal_mu=0.01, seed=0)
    kept = federated_retrain(institutions, start=start, config=cfg, version="2")
    assert kept.model.version == "2" and kept.examples["a"] > 2000  # rehearsal rows were mixed in
    assert evaluate_scores(new_only[(yn == 0) | new_only].astype(int),
                           kept.model.scores(Xn[(yn == 0) | new_only])).auprc > 0.8
    assert evaluate_scores(yo, kept.model.scores(Xo)).auprc > 0.9 * old_auprc
    # The ablation forgets: recent rows hold no old fraud, so without rehearsal/proximal it is unlearned.
    forgot = federated_retrain(institutions, start=start, config=cfg.without_anti_forgetting(), version="2b")
    assert evaluate_scores(yo, forgot.model.scores(Xo)).auprc < 0.5 * old_auprc


def test_trigger_over_mosquitto_starts_retraining_once_k_institutions_report() -> None:
    rng = np.random.default_rng(1)
    start = _start_model(rng)
    collected: list[TriggerDecision] = []

    def collect(decision: TriggerDecision) -> dict[str, LocalData]:
        collected.append(decision)
        X, y = _toy(2000, rng, new_pattern=True)
        return {n: LocalData(X=X, y=y, X_val=X[:400], y_val=y[:400]) for n in ("bank_a", "bank_b", "bank_c")}

    published: list[GlobalModel] = []
    done = threading.Event()

    def publish(model: GlobalModel) -> str:
        published.append(model)
        done.set()
        return f"bundle-{model.version}"

    service = RetrainingService(current=start, collect=collect, publish=publish,
                                config=RetrainConfig(rounds=1, local_epochs=1, lr=1e-3, seed=0))
    run = uuid.uuid4().hex[:6]
    insts = [f"bank_a{run}", f"bank_b{run}"]
    trigger = RetrainTrigger(BROKER, on_trigger=service, votes=DriftVotes(min_institutions=2, window_s=3600))
    trigger.start()
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-agent-{run}")
    client.connect("127.0.0.1", 1883)
    client.loop_start()
    try:
        now = time.time()
        client.publish(agent_topic(insts[0], "edge-1", "drift"), _report(insts[0], "drift", now).to_json(), qos=1)
        client.publish(agent_topic(insts[0], "edge-1", "drift"), b"{not json", qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 20
        while trigger.received + trigger.invalid < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not done.is_set() and trigger.votes.voting() == (insts[0],)  # one institution is not enough
        client.publish(agent_topic(insts[1], "edge-1", "drift"), _report(insts[1], "drift", now + 1).to_json(),
                       qos=1).wait_for_publish(5)
        assert done.wait(60), "retraining was not triggered"
    finally:
        client.loop_stop()
        client.disconnect()
        trigger.stop()
    assert trigger.invalid == 1 and trigger.received == 2
    assert collected[0].institutions == tuple(sorted(insts))
    assert published[0].version == "2" and service.current is published[0]
    assert service.history[0].published == "bundle-2"
    assert any(not np.array_equal(a, b) for a, b in zip(published[0].params, start.params, strict=True))


def test_trigger_refuses_bad_broker_urls_and_unreachable_brokers() -> None:
    with pytest.raises(ConfigError, match="mqtt://HOST:PORT"):
        RetrainTrigger("http://x:1", on_trigger=lambda d: None)
    with pytest.raises(ConfigError, match="cannot reach the MQTT broker"):
        RetrainTrigger("mqtt://127.0.0.1:1", on_trigger=lambda d: None).start(timeout=2)


def test_coordinator_round_set_starts_from_the_deployed_model(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The real Coordinator (over the in-process Grid and the real ClientApp) continues from given weights."""
    from consortium.data import FEATURE_NAMES, federate_institutions, generate_federation, save_split
    from consortium.federation.client_app import build_client_app
    from consortium.federation.config import FederationConfig
    from consortium.federation.coordinator import Coordinator
    from consortium.models import Standardizer
    from consortium.registry import RunStore
    from consortium.secagg.inprocess import InProcessGrid

    fed = generate_federation(2, transactions_per_institution=1_500, seed=5, n_days=30)
    split = federate_institutions({k: v.dataset for k, v in fed.items()}, seed=5)
    root = save_split(split, tmp_path / "inst")
    dirs = {node: {"data-path": str(root / name), "institution": name}
            for node, name in zip((11, 22), split.names(), strict=True)}
    d = len(FEATURE_NAMES)
    deployed = get_parameters(build_model("mlp", d, hidden=(8,), seed=42))
    std = Standardizer(mean=np.full(d, 0.5), std=np.full(d, 2.0))
    cfg = FederationConfig(num_rounds=1, hidden=(8,), min_nodes=2, secure_aggregation=False, server_lr=1e-6,
                           round_timeout=30, store_url=f"sqlite:///{tmp_path}/runs.db")
    grid = InProcessGrid(build_client_app(disclose_eval_default=True), node_ids=[11, 22], node_configs=dirs,
                         policy=lambda node, label: "deliver")
    store = RunStore(cfg.store_url)
    try:
        result = Coordinator(cfg, store=store, initial_parameters=deployed, initial_standardizer=std).run(grid)
    finally:
        store.close()
    fresh = get_parameters(build_model("mlp", d, hidden=(8,), seed=cfg.seed))
    assert all(np.allclose(a, b, atol=1e-4) for a, b in zip(result.params, deployed, strict=True))
    assert not all(np.allclose(a, b, atol=1e-4) for a, b in zip(result.params, fresh, strict=True))
    assert np.array_equal(result.standardizer.mean, std.mean)
