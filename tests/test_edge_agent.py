"""The agent against the real Mosquitto at 127.0.0.1:1883: alerts, telemetry, OTA update, refusals, rollback."""

from __future__ import annotations

import io
import threading
import uuid
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from consortium.edge import messages as m
from consortium.edge.agent import EdgeAgent
from consortium.edge.model import ActiveModel
from consortium.edge.publisher import MqttPublisher
from consortium.edge.testing import Collector, feature_names, mlp_onnx, mlp_weights, signed_bundle
from consortium.registry.bundle import read_bundle
from consortium.registry.signing import generate_signing_key, load_private_key, load_public_key

BROKER = "mqtt://127.0.0.1:1883"
D = 8
NAMES = feature_names(D)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Any]:
    d = tmp_path_factory.mktemp("keys")
    good = generate_signing_key(d / "coord.key")
    other = generate_signing_key(d / "other.key")
    return load_private_key(good), load_public_key(Path(f"{good}.pub")), load_private_key(other)


@pytest.fixture
def names() -> Iterator[tuple[str, str]]:
    yield f"bank-{uuid.uuid4().hex[:8]}", "agent-1"


class _Files(BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}

    def do_GET(self) -> None:  # noqa: N802
        data = self.files.get(self.path)
        self.send_response(200 if data is not None else 404)
        self.end_headers()
        self.wfile.write(data or b"")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def http_files() -> Iterator[tuple[str, dict[str, bytes]]]:
    files: dict[str, bytes] = {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("H", (_Files,), {"files": files}))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", files
    server.shutdown()


def _rows(n: int, *, seed: int = 0, positive: bool = False) -> list[dict[str, Any]]:
    X = np.random.default_rng(seed).normal(size=(n, D)) * 2
    if positive:
        X[:, 0] = np.abs(X[:, 0]) + 0.1
    return [{"transaction_id": f"tx-{seed}-{i}", **{n_: float(v) for n_, v in zip(NAMES, x, strict=True)}}
            for i, x in enumerate(X)]


def _sqrt_model() -> bytes:
    """score = sqrt(f00): NaN for a negative first feature (a model that fails at run time)."""
    w = np.zeros((D, 1), np.float32)
    w[0, 0] = 1.0
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["z"]), helper.make_node("Sqrt", ["z"], ["s"]),
         helper.make_node("Reshape", ["s", "flat"], ["score"])],
        "sqrt", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", D])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([-1], np.int64), "flat")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def _agent(tmp_path: Path, keys: Any, names: tuple[str, str], *, channel: str = "default"
           ) -> tuple[EdgeAgent, MqttPublisher]:
    sk, pk, _ = keys
    bundle = read_bundle(signed_bundle(mlp_onnx(mlp_weights(D, (16,), seed=1)), version="v1", private_key=sk,
                                       names=NAMES, threshold=0.6), public_key=pk)
    pub = MqttPublisher(BROKER, institution=names[0], agent=names[1], outbox_path=tmp_path / "outbox.db").start()
    agent = EdgeAgent(ActiveModel.from_bundle(bundle), institution=names[0], agent=names[1], publisher=pub,
                      telemetry_interval=60, public_key=pk, channel=channel)
    return agent.start(), pub


def test_alerts_and_telemetry(tmp_path: Path, keys: Any, names: tuple[str, str]) -> None:
    inst, ag = names
    sink = Collector(BROKER, m.subscription(institution=inst))
    agent, pub = _agent(tmp_path, keys, names)
    try:
        rows = _rows(400)
        session = ort.InferenceSession(mlp_onnx(mlp_weights(D, (16,), seed=1)), providers=["CPUExecutionProvider"])
        scores = session.run(None, {"input": np.array([[r[n] for n in NAMES] for r in rows], np.float32)})[0]
        expected = {r["transaction_id"] for r, s in zip(rows, scores, strict=True) if s > 0.6}
        assert 0 < len(expected) < 400
        for r in rows:
            agent.score_row(r)
        for bad in (b"{oops", b"[1]", b'{"transaction_id": "x"}', b'{"transaction_id": "y", "f00": NaN}'):
            assert agent.score_line(bad) is None
        agent.score_row({**rows[0], "extra": 1.0})
        agent.emit_telemetry()
        assert sink.wait_for(lambda s: len(s.of_kind(m.Alert)) >= len(expected) and s.of_kind(m.Telemetry))
        alerts = sink.of_kind(m.Alert)
        assert {a.transaction_id for a in alerts} == expected  # type: ignore[attr-defined]
        assert len({a.msg_id for a in alerts}) == len(alerts)  # type: ignore[attr-defined]
        assert all(a.threshold == 0.6 and a.model_version == "v1" for a in alerts)  # type: ignore[attr-defined]
        raw_alert = next(p for t, p in sink.raw if t.endswith("/alerts"))
        assert b"f00" not in raw_alert  # never raw features
        tel = sink.of_kind(m.Telemetry)[-1]
        assert tel.scored == 400 and tel.alerts == len(expected)  # type: ignore[attr-defined]
        assert tel.invalid == {"malformed_json": 1, "not_object": 1,  # type: ignore[attr-defined]
                               "missing_field": 2, "extra_field": 1}
        assert set(tel.latency_us) >= {"p50", "p99"}  # type: ignore[attr-defined]
        assert sum(tel.score_histogram["counts"]) == 400  # type: ignore[attr-defined]
        assert tel.drift == {"status": "unknown"}  # type: ignore[attr-defined]
        status = [s for s in sink.of_kind(m.Status) if s.state == "online"]  # type: ignore[attr-defined]
        assert status and status[-1].model_version == "v1"  # type: ignore[attr-defined]
    finally:
        agent.stop()
        pub.stop()
        sink.close()


def test_ota_update_then_rollback_on_command(tmp_path: Path, keys: Any, names: tuple[str, str],
                                             http_files: tuple[str, dict[str, bytes]]) -> None:
    inst, ag = names
    sk, pk, _ = keys
    base, files = http_files
    channel = f"ch-{uuid.uuid4().hex[:8]}"
    sink = Collector(BROKER, m.subscription(institution=inst))
    agent, pub = _agent(tmp_path, keys, names, channel=channel)
    announcer = Collector(BROKER, "consortium/none")
    try:
        for r in _rows(100, seed=3):
            agent.score_row(r)
        v2 = signed_bundle(mlp_onnx(mlp_weights(D, (16,), seed=2)), version="v2", private_key=sk, names=NAMES,
                           threshold=0.7, parent="v1")
        files["/v2"] = v2
        ann = m.ModelAnnouncement(channel=channel, model_version="v2", url=f"{base}/v2",
                                  sha256=read_bundle(v2, public_key=pk).sha256, ts=m.now())
        announcer.client.publish(m.models_topic(channel), ann.to_json(), qos=1, retain=True).wait_for_publish(5)
        assert sink.wait_for(lambda s: agent.model.version == "v2")
        row = _rows(1, seed=9)[0]
        expected = ort.InferenceSession(mlp_onnx(mlp_weights(D, (16,), seed=2)), providers=["CPUExecutionProvider"]
                                        ).run(None, {"input": np.array([[row[n] for n in NAMES]], np.float32)})[0][0]
        assert agent.score_row(row) == pytest.approx(float(expected), rel=1e-6)
        assert agent.threshold == 0.7
        assert sink.wait_for(lambda s: any(e.event == "model_updated" for e in s.of_kind(m.Event)))  # type: ignore[attr-defined]
        updated = next(e for e in sink.of_kind(m.Event) if e.event == "model_updated")  # type: ignore[attr-defined]
        assert updated.detail["shadow"]["rows"] == 100 and updated.detail["previous"] == "v1"  # type: ignore[attr-defined]
        assert sink.wait_for(lambda s: any(x.model_version == "v2" for x in s.of_kind(m.Status)))  # type: ignore[attr-defined]

        cmd = m.Command(command="rollback", ts=m.now())
        announcer.client.publish(m.agent_topic(inst, ag, "commands"), cmd.to_json(), qos=1).wait_for_publish(5)
        assert sink.wait_for(lambda s: agent.model.version == "v1")
        assert agent.threshold == 0.6
        assert sink.wait_for(lambda s: any(e.event == "rolled_back" for e in s.of_kind(m.Event)))  # type: ignore[attr-defined]
        assert agent.totals().updates == 1 and agent.totals().rollbacks == 1
    finally:
        announcer.client.publish(m.models_topic(channel), b"", qos=1, retain=True).wait_for_publish(5)
        announcer.close()
        agent.stop()
        pub.stop()
        sink.close()


def _tamper(bundle: bytes, *, drop_signature: bool = False) -> bytes:
    src = zipfile.ZipFile(io.BytesIO(bundle))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "signature" and drop_signature:
                continue
            if info.filename == "model.onnx" and not drop_signature:
                data = mlp_onnx(mlp_weights(D, (16,), seed=66))
            dst.writestr(info, data)
    return out.getvalue()


def test_refused_bundles_keep_the_old_model_serving(tmp_path: Path, keys: Any, names: tuple[str, str]) -> None:
    sk, pk, other = keys
    inst, _ = names
    sink = Collector(BROKER, m.subscription("events", institution=inst))
    agent, pub = _agent(tmp_path, keys, names)
    good_onnx = mlp_onnx(mlp_weights(D, (16,), seed=2))
    v2 = signed_bundle(good_onnx, version="v2", private_key=sk, names=NAMES)
    cases = {
        "tampered": (_tamper(v2), None, "tampered"),
        "wrong key": (signed_bundle(good_onnx, version="v2", private_key=other, names=NAMES), None, "key"),
        "incompatible": (signed_bundle(mlp_onnx(mlp_weights(D, (16,), seed=2)), version="v2", private_key=sk,
                                       names=[f"g{i}" for i in range(D)]), None, "schema-incompatible"),
        "unsigned": (_tamper(v2, drop_signature=True), None, "unsigned"),
        "announced hash": (v2, "0" * 64, "differs from the announced"),
    }
    try:
        for label, (data, sha, _) in cases.items():
            assert agent.offer_bundle(data, expected_sha256=sha) is False, label
            assert agent.model.version == "v1", label
            assert agent.score_row(_rows(1, seed=5)[0]) is not None, label  # still serving
        assert agent.totals().refused == len(cases)
        assert sink.wait_for(lambda s: len(s.of_kind(m.Event)) >= len(cases))
        errors = [e.detail["error"] for e in sink.of_kind(m.Event)]  # type: ignore[attr-defined]
        for (_, _, needle), error in zip(cases.values(), errors, strict=True):
            assert needle in error
        assert agent.offer_bundle(v2) is True and agent.model.version == "v2"  # the good one still goes through
    finally:
        agent.stop()
        pub.stop()
        sink.close()


def test_rollback_when_the_new_model_fails_at_run_time(tmp_path: Path, keys: Any, names: tuple[str, str]) -> None:
    sk, _, _ = keys
    agent, pub = _agent(tmp_path, keys, names)
    try:
        for r in _rows(50, seed=1, positive=True):
            agent.score_row(r)
        assert agent.offer_bundle(signed_bundle(_sqrt_model(), version="v2", private_key=sk, names=NAMES))
        assert agent.model.version == "v2"  # shadow scoring on positive traffic passed
        bad = {**_rows(1, seed=2)[0], "f00": -4.0}
        assert agent.score_row(bad) is None  # NaN from the model: not an alert, not a crash
        assert agent.model.version == "v1" and agent.totals().rollbacks == 1
        assert agent.totals().invalid.get("model_error") == 1
        assert agent.score_row(bad) is not None  # the old model scores it
        # and the failed version is not re-applied when its announcement comes again
        assert "v2" in agent._declined
    finally:
        agent.stop()
        pub.stop()


def test_shadow_scoring_refuses_a_model_that_fails_on_recent_traffic(tmp_path: Path, keys: Any,
                                                                    names: tuple[str, str]) -> None:
    sk, _, _ = keys
    agent, pub = _agent(tmp_path, keys, names)
    try:
        for r in _rows(50, seed=1):  # f00 takes negative values: sqrt model gives NaN
            agent.score_row(r)
        assert agent.offer_bundle(signed_bundle(_sqrt_model(), version="v2", private_key=sk, names=NAMES)) is False
        assert agent.model.version == "v1"
    finally:
        agent.stop()
        pub.stop()
