"""Faults with a private Mosquitto (never the shared one): broker restart mid-stream, agent SIGKILL + restart.

Both check the issue's promise: every alert arrives, and exactly once after de-duplication by msg_id.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from consortium.edge import messages as m
from consortium.edge.agent import EdgeAgent
from consortium.edge.model import ActiveModel
from consortium.edge.publisher import MqttPublisher
from consortium.edge.testing import Collector, MosquittoProcess, feature_names, mlp_onnx, mlp_weights, signed_bundle
from consortium.registry.signing import generate_signing_key, load_private_key

D = 8
NAMES = feature_names(D)
ONNX = mlp_onnx(mlp_weights(D, (16,), seed=4))
THRESHOLD = 0.5


def _rows(n: int, seed: int) -> tuple[list[dict[str, Any]], set[str]]:
    X = np.random.default_rng(seed).normal(size=(n, D)).astype(np.float32) * 2
    scores = ort.InferenceSession(ONNX, providers=["CPUExecutionProvider"]).run(None, {"input": X})[0]
    rows = [{"transaction_id": f"t{seed}-{i}", **{k: float(v) for k, v in zip(NAMES, x, strict=True)}}
            for i, x in enumerate(X)]
    return rows, {r["transaction_id"] for r, s in zip(rows, scores, strict=True) if s > THRESHOLD}


def _exactly_once(sink: Collector, expected: set[str]) -> dict[str, int]:
    alerts = sink.of_kind(m.Alert)
    unique = {a.msg_id: a for a in alerts}  # type: ignore[attr-defined]
    tx = [a.transaction_id for a in unique.values()]  # type: ignore[attr-defined]
    assert sorted(tx) == sorted(expected)  # every alert, each transaction once after de-dup
    return {"received": len(alerts), "unique": len(unique), "duplicates": len(alerts) - len(unique)}


def test_broker_restart_mid_stream_loses_nothing(tmp_path: Path) -> None:
    inst = f"bank-{uuid.uuid4().hex[:6]}"
    rows, expected = _rows(3000, seed=1)
    with MosquittoProcess(tmp_path / "broker") as broker:
        sink = Collector(broker.url, m.subscription("alerts", institution=inst), client_id=f"sink-{inst}",
                         persistent=True)
        pub = MqttPublisher(broker.url, institution=inst, agent="a1", outbox_path=tmp_path / "outbox.db").start()
        agent = EdgeAgent(ActiveModel.from_onnx(ONNX, feature_names=NAMES, threshold=THRESHOLD, version="1"),
                          institution=inst, agent="a1", publisher=pub, telemetry_interval=60)
        assert Collector.wait_for(sink, lambda s: pub.connected, timeout=10)
        outage = threading.Event()

        def restart() -> None:
            broker.stop()
            outage.set()
            time.sleep(1.5)  # the agent keeps scoring meanwhile
            broker.start()

        backlog_in_outage = 0
        try:
            for i, row in enumerate(rows):
                agent.score_row(row)
                if outage.is_set() and not pub.connected:
                    backlog_in_outage = max(backlog_in_outage, pub.backlog)
                if i == 1000:
                    threading.Thread(target=restart, daemon=True).start()
                    assert outage.wait(10)
                if i % 100 == 0:
                    time.sleep(0.05)  # a stream, not one burst: part of it lands during the outage
            assert pub.wait_delivered(timeout=30)
            assert sink.wait_for(lambda s: len({a.msg_id for a in s.of_kind(m.Alert)}) >= len(expected), timeout=30)
            counts = _exactly_once(sink, expected)
            assert pub.stats().reconnects >= 1 and backlog_in_outage > 100  # really queued during the outage
            print("broker restart:", counts, pub.stats())
        finally:
            agent.stop()
            pub.stop()
            sink.close()


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "consortium.cli", "edge", "run", *args]


def _queued_alerts(outbox: Path) -> int:
    if not outbox.exists():
        return 0
    with sqlite3.connect(f"file:{outbox}?mode=ro", uri=True) as db:
        try:
            return int(db.execute("SELECT COUNT(*) FROM outbox WHERE topic LIKE '%/alerts'").fetchone()[0])
        except sqlite3.OperationalError:
            return 0


@pytest.mark.slow
def test_agent_killed_while_offline_delivers_queued_alerts_after_restart(tmp_path: Path) -> None:
    inst = f"bank-{uuid.uuid4().hex[:6]}"
    rows, expected = _rows(500, seed=2)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "empty.jsonl").write_text("")
    key = generate_signing_key(tmp_path / "coord.key")
    (tmp_path / "model.bundle").write_bytes(
        signed_bundle(ONNX, version="v1", private_key=load_private_key(key), names=NAMES, threshold=THRESHOLD))
    broker = MosquittoProcess(tmp_path / "broker")  # configured, NOT started: the agent is offline
    outbox = tmp_path / "outbox.db"
    common = ["--bundle", str(tmp_path / "model.bundle"), "--public-key", f"{key}.pub", "--broker", broker.url,
              "--institution", inst, "--outbox", str(outbox)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    first = subprocess.Popen(_cli(*common, "--input", str(tmp_path / "in.jsonl"), "--drain-timeout", "120"),
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while _queued_alerts(outbox) < len(expected) and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.05)
    assert _queued_alerts(outbox) == len(expected), first.stderr.read() if first.poll() is not None else ""
    os.kill(first.pid, signal.SIGKILL)
    first.wait()

    with broker:
        sink = Collector(broker.url, m.subscription("alerts", institution=inst))
        try:
            second = subprocess.run(_cli(*common, "--input", str(tmp_path / "empty.jsonl"), "--drain-timeout", "30"),
                                    env=env, capture_output=True, timeout=120)
            assert second.returncode == 0, second.stderr.decode()
            assert json.loads(second.stdout.decode().strip().splitlines()[-1])["backlog"] == 0
            assert sink.wait_for(lambda s: len(s.of_kind(m.Alert)) >= len(expected))
            _exactly_once(sink, expected)
        finally:
            sink.close()
