"""Helpers for tests and benchmarks of the edge agent: a small ONNX MLP and a private Mosquitto.

Nothing here is used by the agent itself.  :class:`MosquittoProcess` starts the
``mosquitto`` binary on a free loopback port with its own configuration and
persistence directory, so fault tests can stop and restart *their* broker
without touching the shared one.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from consortium.errors import ConfigError


def mlp_weights(n_features: int = 30, hidden: tuple[int, ...] = (64, 32), *, seed: int = 0) -> list[np.ndarray]:
    """Random weights ``[W1, b1, W2, b2, ...]`` of an MLP ``n_features → hidden → 1`` (float32)."""
    rng = np.random.default_rng(seed)
    sizes = (n_features, *hidden, 1)
    out: list[np.ndarray] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        out.append((rng.normal(size=(a, b)) / np.sqrt(a)).astype(np.float32))
        out.append((rng.normal(size=(b,)) * 0.1).astype(np.float32))
    return out


def mlp_onnx(weights: list[np.ndarray], *, input_name: str = "input", output_name: str = "score") -> bytes:
    """An ONNX MLP (ReLU hidden layers, sigmoid score of shape ``[N]``) with the given weights."""
    nodes, inits = [], []
    current = input_name
    layers = len(weights) // 2
    for i in range(layers):
        w, b = f"W{i}", f"b{i}"
        inits += [numpy_helper.from_array(weights[2 * i], w), numpy_helper.from_array(weights[2 * i + 1], b)]
        nodes.append(helper.make_node("Gemm", [current, w, b], [f"z{i}"]))
        current = f"z{i}"
        if i < layers - 1:
            nodes.append(helper.make_node("Relu", [current], [f"h{i}"]))
            current = f"h{i}"
    nodes.append(helper.make_node("Sigmoid", [current], ["p"]))
    nodes.append(helper.make_node("Reshape", ["p", "flat"], [output_name]))
    inits.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), "flat"))
    d = weights[0].shape[0]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", d])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["N"])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, *, timeout: float = 10.0) -> None:
    """Block until something listens on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"Nothing listens on 127.0.0.1:{port} after {timeout} s.")


class MosquittoProcess:
    """A private Mosquitto broker on a free loopback port, with persistence, restartable.

    Parameters
    ----------
    directory : Path
        Where its configuration, persistence file and log go.
    port : int, optional
        Port to listen on (default: a free one, kept across restarts).
    """

    def __init__(self, directory: Path, *, port: int | None = None) -> None:
        binary = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
        if binary is None:
            raise ConfigError("The 'mosquitto' binary is not installed (apt-get install mosquitto).")
        self.binary = binary
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.config = self.directory / "mosquitto.conf"
        # Run as root, mosquitto switches to the 'mosquitto' user and then cannot write its
        # persistence file in a private temporary directory: keep the current user.
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name}\n" if os.geteuid() == 0 else ""
        self.config.write_text(
            f"{user}listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {self.directory}/\nautosave_interval 1\n"
            f"max_queued_messages 100000\nlog_dest file {self.directory}/mosquitto.log\n"
        )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``mqtt://127.0.0.1:<port>``."""
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> MosquittoProcess:
        """Start the broker and wait until it accepts connections."""
        self.process = subprocess.Popen([self.binary, "-c", str(self.config)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        """Stop the broker gracefully (SIGTERM: it saves its persistent state)."""
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

    def __enter__(self) -> MosquittoProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def feature_names(n_features: int) -> list[str]:
    """``["f00", "f01", ...]``: the feature names the test models use."""
    return [f"f{i:02d}" for i in range(n_features)]


def signed_bundle(
    onnx_model: bytes, *, version: str, private_key: object, names: list[str], threshold: float = 0.5,
    parent: str | None = None,
) -> bytes:
    """A signed bundle (archive bytes) of ``onnx_model`` with a minimal manifest."""
    from consortium.registry.bundle import BundleManifest, FeatureSpec, bundle_bytes  # noqa: PLC0415

    manifest = BundleManifest(
        model_version=version, parent_version=parent, kind="mlp",
        features=tuple(FeatureSpec(n) for n in names), thresholds={"default": threshold},
    )
    return bundle_bytes(onnx_model=onnx_model, manifest=manifest, private_key=private_key)  # type: ignore[arg-type]


class Collector:
    """A paho subscriber that keeps every (topic, parsed message) it receives, for assertions.

    Parameters
    ----------
    broker_url : str
        ``mqtt://host:port``.
    topic_filter : str
        What to subscribe to (QoS 1).
    client_id : str, optional
        Give one with ``persistent=True`` so the broker keeps the session across a broker restart.
    """

    def __init__(self, broker_url: str, topic_filter: str, *, client_id: str = "", persistent: bool = False) -> None:
        import threading  # noqa: PLC0415

        import paho.mqtt.client as mqtt  # noqa: PLC0415

        from consortium.mqtt_url import parse_broker_url  # noqa: PLC0415

        address = parse_broker_url(broker_url, owner="Collector")
        self.messages: list[tuple[str, object]] = []
        self.raw: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
            clean_session=not persistent, protocol=mqtt.MQTTv311,
        )
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        self.client.on_connect = lambda c, *_: c.subscribe(topic_filter, qos=1)
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect_async(address.host, address.port, keepalive=10)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise TimeoutError(f"Could not subscribe to {topic_filter} on {broker_url}.")

    def _on_message(self, _c: object, _u: object, msg: object) -> None:
        from consortium.edge import messages as m  # noqa: PLC0415

        topic, payload = msg.topic, bytes(msg.payload)  # type: ignore[attr-defined]
        with self._lock:
            self.raw.append((topic, payload))
            try:
                if topic.startswith(f"{m.PREFIX}/models/"):
                    self.messages.append((topic, m.parse_payload("models", payload)))
                else:
                    self.messages.append((topic, m.parse_message(topic, payload)[1]))
            except m.MessageError as exc:
                self.messages.append((topic, exc))

    def of_kind(self, cls: type) -> list[object]:
        """Messages of one payload class, in arrival order."""
        with self._lock:
            return [msg for _, msg in self.messages if isinstance(msg, cls)]

    def wait_for(self, predicate: object, *, timeout: float = 20.0) -> bool:
        """Poll ``predicate(self)`` until true or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self):  # type: ignore[operator]
                return True
            time.sleep(0.02)
        return bool(predicate(self))  # type: ignore[operator]

    def close(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()
