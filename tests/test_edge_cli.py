"""``consortium edge run`` end to end (CSV file, HTTP), the demo's edge step, and clear CLI errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from consortium.cli import main
from consortium.edge import messages as m
from consortium.edge.demo import run_edge_demo
from consortium.edge.testing import Collector, feature_names, mlp_onnx, mlp_weights, signed_bundle
from consortium.registry.signing import generate_signing_key, load_private_key, load_public_key

D = 5
NAMES = feature_names(D)
BROKER = "mqtt://127.0.0.1:1883"


@pytest.fixture
def bundle(tmp_path: Path) -> tuple[Path, Path]:
    key = generate_signing_key(tmp_path / "coord.key")
    path = tmp_path / "m.bundle"
    path.write_bytes(signed_bundle(mlp_onnx(mlp_weights(D, (8,), seed=3)), version="v7",
                                   private_key=load_private_key(key), names=NAMES, threshold=0.5))
    return path, Path(f"{key}.pub")


def test_csv_input_scores_and_reports(tmp_path: Path, bundle: tuple[Path, Path]) -> None:
    inst = f"bank-{uuid.uuid4().hex[:6]}"
    X = np.random.default_rng(0).normal(size=(50, D)) * 3
    lines = ["transaction_id," + ",".join(NAMES)] + [f"t{i}," + ",".join(f"{v:.5f}" for v in x) for i, x in
                                                     enumerate(X)]
    lines += ["bad1,x,1,2,3,4", "bad2,1,2,3,4"]  # wrong type; missing cell
    (tmp_path / "in.csv").write_text("\n".join(lines) + "\n")
    sink = Collector(BROKER, m.subscription(institution=inst))
    try:
        result = CliRunner().invoke(main, [
            "edge", "run", "--bundle", str(bundle[0]), "--public-key", str(bundle[1]), "--broker", BROKER,
            "--institution", inst, "--input", str(tmp_path / "in.csv"), "--outbox", str(tmp_path / "o.db"),
        ])
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout.strip().splitlines()[-1])
        assert summary["scored"] == 50 and summary["model_version"] == "v7" and summary["backlog"] == 0
        assert summary["invalid"] == {"wrong_type": 1, "missing_field": 1}
        assert sink.wait_for(lambda s: len(s.of_kind(m.Alert)) == summary["alerts"] and s.of_kind(m.Telemetry))
    finally:
        sink.close()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--input", "-", "--http", "0"], "exactly one of --input"),
        (["--input", "-", "--broker", "http://x"], "mqtt://HOST:PORT"),
    ],
)
def test_clear_errors(tmp_path: Path, bundle: tuple[Path, Path], args: list[str], needle: str) -> None:
    result = CliRunner().invoke(main, ["edge", "run", "--bundle", str(bundle[0]), "--public-key", str(bundle[1]),
                                       "--institution", "b", "--outbox", str(tmp_path / "o.db"), *args])
    assert result.exit_code == 2 and needle in result.output


def test_wrong_key_is_refused_at_start(tmp_path: Path, bundle: tuple[Path, Path]) -> None:
    other = generate_signing_key(tmp_path / "other.key")
    result = CliRunner().invoke(main, ["edge", "run", "--bundle", str(bundle[0]), "--public-key", f"{other}.pub",
                                       "--institution", "b", "--input", "-", "--outbox", str(tmp_path / "o.db")])
    assert result.exit_code == 2 and "error:" in result.output and "wrong key" in result.output


def test_http_input(tmp_path: Path, bundle: tuple[Path, Path]) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "consortium.cli", "edge", "run", "--bundle", str(bundle[0]), "--public-key",
         str(bundle[1]), "--broker", BROKER, "--institution", f"bank-{uuid.uuid4().hex[:6]}", "--http", "0",
         "--outbox", str(tmp_path / "o.db")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        url = ""
        for _ in range(20):
            line = proc.stderr.readline()
            if "Listening on" in line:
                url = line.split("Listening on ")[1].strip()
                break
        assert url, "the agent did not start its HTTP server"

        def post(body: bytes) -> tuple[int, dict[str, object]]:
            try:
                with urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST"), timeout=10) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as exc:
                return exc.code, json.loads(exc.read())

        good = {"transaction_id": "h1", **{n: 0.5 for n in NAMES}}
        status, body = post(json.dumps(good).encode())
        assert status == 200 and 0 <= body["score"] <= 1 and body["model_version"] == "v7"  # type: ignore[operator]
        status, body = post(b"{broken")
        assert status == 400 and body["reason"] == "malformed_json"
        status, body = post(json.dumps({**good, "f00": "x"}).encode())
        assert status == 400 and body["reason"] == "wrong_type"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["scored"] == 1 and summary["invalid"] == {"malformed_json": 1, "wrong_type": 1}


def test_demo_edge_step_with_the_embedded_broker(tmp_path: Path, bundle: tuple[Path, Path]) -> None:
    X = np.random.default_rng(1).normal(size=(300, D)) * 3
    y = (np.arange(300) % 10 == 0).astype(np.int64)
    res = run_edge_demo(bundle[0], public_key=load_public_key(bundle[1]), X=X, y=y, feature_names=NAMES,
                        outbox_dir=tmp_path)
    assert res.embedded_broker and res.scored == 300 and res.model_version == "v7"
    assert res.alerts > 0 and res.alerts_received == res.alerts  # every alert went through the broker
    assert res.telemetry_received >= 1 and res.frauds_in_stream == 30


def test_registry_url_loads_the_promoted_bundle(tmp_path: Path, bundle: tuple[Path, Path]) -> None:
    import threading  # noqa: PLC0415

    import uvicorn  # noqa: PLC0415

    from consortium.edge.testing import free_port, wait_for_port  # noqa: PLC0415
    from consortium.registry import RunStore  # noqa: PLC0415
    from consortium.registry.http import create_registry_app  # noqa: PLC0415
    from consortium.registry.registry import ModelRegistry  # noqa: PLC0415

    store = RunStore(f"sqlite:///{tmp_path / 'reg.db'}")
    registry = ModelRegistry(store, tmp_path / "blobs")
    registry.add(bundle[0], promote=True)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_registry_app(registry), host="127.0.0.1", port=port,
                                           log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for_port(port)
        (tmp_path / "one.jsonl").write_text(json.dumps({"transaction_id": "r1", **{n: 0.1 for n in NAMES}}) + "\n")
        result = CliRunner().invoke(main, [
            "edge", "run", "--registry", f"http://127.0.0.1:{port}", "--public-key", str(bundle[1]),
            "--broker", BROKER, "--institution", "bank-r", "--input", str(tmp_path / "one.jsonl"),
            "--outbox", str(tmp_path / "o.db"),
        ])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout.strip().splitlines()[-1])["model_version"] == "v7"
        missing = CliRunner().invoke(main, [
            "edge", "run", "--registry", f"http://127.0.0.1:{port}", "--channel", "nothing", "--public-key",
            str(bundle[1]), "--institution", "bank-r", "--input", "-", "--outbox", str(tmp_path / "o2.db")])
        assert missing.exit_code == 2 and "promoted model of channel 'nothing'" in missing.output
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        store.close()
