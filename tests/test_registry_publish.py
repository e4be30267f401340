"""From a finished run in the store to a signed, registered, announced and downloadable bundle.

Uses the real Mosquitto at 127.0.0.1:1883 and a real HTTP server (uvicorn) on a free port.
"""

from __future__ import annotations

import socket
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import paho.mqtt.client as mqtt
import pytest
import uvicorn
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient

from consortium.edge.messages import ModelAnnouncement, models_topic, parse_payload
from consortium.models import build_model, predict_scores, set_parameters
from consortium.registry import RunStore
from consortium.registry.announce import AnnounceError, announce_bundle
from consortium.registry.bundle import read_bundle
from consortium.registry.http import create_registry_app
from consortium.registry.publish import publish_run_model, selected_round
from consortium.registry.registry import ModelRegistry
from consortium.registry.testing import FEATURES, record_run

KEY = Ed25519PrivateKey.generate()
BROKER = "mqtt://127.0.0.1:1883"


@pytest.fixture
def registry(run_store: RunStore, tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(run_store, tmp_path / "blobs", public_key=KEY.public_key())


@pytest.mark.parametrize("kind", ["mlp", "autoencoder"])
def test_publish_exports_the_selected_round(run_store: RunStore, registry: ModelRegistry, kind: str) -> None:
    run_id, X = record_run(run_store, kind=kind)
    published = publish_run_model(run_store, registry=registry, private_key=KEY, run_id=run_id)
    assert published.round == 2 and not published.announced
    entry = published.entry
    assert entry.promoted and entry.model_version == f"simulate-synthetic-{run_id[:8]}-r2"
    assert entry.metrics == {"val-auprc": pytest.approx(0.2), "auprc": pytest.approx(0.4)}  # NaN, threshold dropped
    bundle = registry.verify(entry.model_version)
    assert bundle.manifest.kind == kind and bundle.manifest.threshold == pytest.approx(0.27)
    assert bundle.manifest.feature_names == FEATURES and bundle.manifest.run_id == run_id
    # The bundle scores raw rows exactly like the checkpointed PyTorch model on standardised rows.
    ckpt = run_store.load_checkpoint(run_id, round=2)
    n = ckpt.extra["n_params"]
    model = build_model(kind, len(FEATURES), hidden=ckpt.extra["hidden"])
    set_parameters(model, ckpt.arrays[:n])
    expected = predict_scores(model, (X - ckpt.arrays[n]) / ckpt.arrays[n + 1])
    session = ort.InferenceSession(bundle.onnx_bytes, providers=["CPUExecutionProvider"])
    got = session.run(None, {bundle.manifest.input_name: X})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # A second run's model names the first as its parent.
    run2, _ = record_run(run_store, kind=kind)
    second = publish_run_model(run_store, registry=registry, private_key=KEY)  # newest completed run
    assert second.entry.run_id == run2 and second.entry.parent_version == entry.model_version
    assert registry.promoted().model_version == second.entry.model_version  # type: ignore[union-attr]


def test_selected_round_falls_back_to_best_validation(run_store: RunStore) -> None:
    run_id, _ = record_run(run_store, rounds=3)
    run_store.finish_run(run_id, status="completed", message=None)
    assert selected_round(run_store, run_id) == 3


def test_unfinished_run_is_not_published(run_store: RunStore, registry: ModelRegistry) -> None:
    run_id, _ = record_run(run_store)
    run_store.finish_run(run_id, status="failed", message="boom")
    with pytest.raises(Exception, match="is failed, not completed"):
        publish_run_model(run_store, registry=registry, private_key=KEY, run_id=run_id)
    assert registry.list() == []


def test_http_router(run_store: RunStore, registry: ModelRegistry) -> None:
    run_id, _ = record_run(run_store)
    entry = publish_run_model(run_store, registry=registry, private_key=KEY, run_id=run_id).entry
    client = TestClient(create_registry_app(registry))
    listing = client.get("/api/models").json()["models"]
    assert [(m["model_version"], m["promoted"], m["channel"]) for m in listing] == [
        (entry.model_version, True, "default")
    ]
    assert client.get("/api/models", params={"channel": "canary"}).json() == {"models": []}
    assert client.get("/api/models", params={"channel": "a/b"}).status_code == 400
    shown = client.get(f"/api/models/{entry.model_version}").json()
    assert shown["manifest"]["model_version"] == entry.model_version and shown["sha256"] == entry.sha256
    response = client.get(f"/api/models/{entry.model_version}/bundle")
    assert response.status_code == 200 and response.headers["x-bundle-sha256"] == entry.sha256
    assert read_bundle(response.content, public_key=KEY.public_key()).sha256 == entry.sha256
    assert client.get("/api/channels/default").json()["model_version"] == entry.model_version
    assert client.get("/api/channels/canary").status_code == 404
    missing = client.get("/api/models/nope/bundle")
    assert missing.status_code == 404 and "not in the registry" in missing.json()["detail"]
    entry.path.write_bytes(entry.path.read_bytes()[:-1])  # corrupted on disk: never served
    corrupt = client.get(f"/api/models/{entry.model_version}/bundle")
    assert corrupt.status_code == 409 and "tampered" in corrupt.json()["detail"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def http_server(registry: ModelRegistry) -> Iterator[str]:
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_registry_app(registry), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def _retained(channel: str, timeout: float = 10.0) -> bytes:
    got: list[bytes] = []
    done = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)

    def on_message(_c, _u, msg):  # type: ignore[no-untyped-def]
        got.append(msg.payload)
        done.set()

    client.on_message = on_message
    client.on_connect = lambda c, *_: c.subscribe(models_topic(channel), qos=1)
    client.connect("127.0.0.1", 1883)
    client.loop_start()
    try:
        assert done.wait(timeout), "no retained announcement"
    finally:
        client.disconnect()
        client.loop_stop()
    return got[0]


def _clear_retained(channel: str) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.connect("127.0.0.1", 1883)
    client.loop_start()
    client.publish(models_topic(channel), b"", qos=1, retain=True).wait_for_publish(5)
    client.disconnect()
    client.loop_stop()


def test_publish_announces_and_agents_can_download(
    run_store: RunStore, registry: ModelRegistry, http_server: str
) -> None:
    channel = f"test-{uuid.uuid4().hex[:10]}"
    run_id, _ = record_run(run_store)
    try:
        published = publish_run_model(run_store, registry=registry, private_key=KEY, run_id=run_id,
                                      channel=channel, broker_url=BROKER, base_url=http_server)
        assert published.announced
        announcement = parse_payload("models", _retained(channel))
        assert isinstance(announcement, ModelAnnouncement)
        assert announcement.model_version == published.entry.model_version
        assert announcement.sha256 == published.entry.sha256 and announcement.channel == channel
        # What an agent does: download from the announced URL and verify.
        with urllib.request.urlopen(announcement.url, timeout=10) as response:  # noqa: S310
            data = response.read()
        bundle = read_bundle(data, public_key=KEY.public_key())
        assert bundle.sha256 == announcement.sha256
    finally:
        _clear_retained(channel)


def test_announce_to_an_unreachable_broker_is_a_clear_error() -> None:
    port = _free_port()
    announcement = ModelAnnouncement(channel="x", model_version="m-1", url="http://h/x", sha256="0" * 64, ts=0.0)
    with pytest.raises(AnnounceError, match=f"broker 127.0.0.1:{port} unreachable"):
        announce_bundle(f"mqtt://127.0.0.1:{port}", announcement, timeout=2)
    with pytest.raises(Exception, match="broker URL"):
        announce_bundle("http://127.0.0.1:1883", announcement)


def test_demo_publication_keeps_one_key(run_store: RunStore, tmp_path: Path) -> None:
    from consortium.registry.publish import publish_demo_model
    from consortium.registry.signing import load_public_key

    first, _ = record_run(run_store)
    second, _ = record_run(run_store)
    a = publish_demo_model(run_store, out_dir=tmp_path, run_id=first)
    b = publish_demo_model(run_store, out_dir=tmp_path, run_id=second)
    key_file = tmp_path / "keys" / "bundle-signing.pem"
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    public = load_public_key(tmp_path / "keys" / "bundle-signing.pem.pub")
    assert read_bundle(a.entry.path, public_key=public).key_id == read_bundle(b.entry.path, public_key=public).key_id
    assert b.entry.parent_version == a.entry.model_version and b.entry.promoted
    assert a.entry.path.parent == tmp_path / "registry"
