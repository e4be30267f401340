"""``consortium edge run``: the edge agent as a command.

    consortium edge run --bundle model.bundle --public-key coordinator.pub \\
        --broker mqtt://127.0.0.1:1883 --institution bank-a --input transactions.jsonl

Input is JSON lines (``-`` for stdin, ``*.jsonl``), CSV (``*.csv``) or HTTP
(``--http PORT``: ``POST /score`` with one JSON transaction per request).  When a
finite input ends the agent publishes its last telemetry, waits up to
``--drain-timeout`` seconds for the broker to acknowledge everything and exits;
what is not acknowledged stays in the outbox for the next start.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from consortium.edge import messages as m
from consortium.errors import ConfigError, ConsortiumError

if TYPE_CHECKING:
    from consortium.edge.agent import EdgeAgent
    from consortium.edge.model import ActiveModel

logger = logging.getLogger(__name__)


@click.group()
def edge() -> None:
    """Score transactions at an institution with the consortium's model (ONNX, offline-first)."""


def load_model(*, bundle: str | None, registry: str | None, channel: str, public_key: Any) -> ActiveModel:
    """Load and verify the bundle from a file or from the coordinator's registry (promoted on ``channel``)."""
    from consortium.edge.model import ActiveModel  # noqa: PLC0415
    from consortium.registry.bundle import read_bundle  # noqa: PLC0415

    if bundle is not None:
        data = Path(bundle).read_bytes()
        source = bundle
    elif registry is not None:
        source = registry.rstrip("/")
        data = _download_promoted(source, channel)
    else:
        raise ConfigError("Give the model with --bundle PATH or --registry URL.")
    verified = read_bundle(data, public_key=public_key)
    logger.info("Loaded model %s from %s", verified.manifest.model_version, source)
    return ActiveModel.from_bundle(verified)


def _download_promoted(base: str, channel: str) -> bytes:
    """Fetch the promoted bundle of ``channel`` from a registry's HTTP API."""
    try:
        with urllib.request.urlopen(f"{base}/api/models", timeout=30) as r:  # noqa: S310
            listing = json.loads(r.read())
    except Exception as exc:
        raise ConfigError(f"Cannot read the model list at {base}/api/models: {exc}") from None
    entries = listing.get("models", listing) if isinstance(listing, dict) else listing
    promoted = [
        e for e in entries if isinstance(e, dict) and e.get("promoted") and e.get("channel", "default") == channel
    ]
    if not promoted:
        raise ConfigError(f"The registry at {base} has no promoted model on channel {channel!r}.")
    version = promoted[-1]["model_version"]
    try:
        with urllib.request.urlopen(f"{base}/api/models/{version}/bundle", timeout=60) as r:  # noqa: S310
            return bytes(r.read())
    except Exception as exc:
        raise ConfigError(f"Cannot download bundle {version} from {base}: {exc}") from None


class _ScoreHandler(BaseHTTPRequestHandler):
    """``POST /score`` with one JSON transaction → ``{"score": ..., "alert": ...}`` or 400 naming the problem."""

    agent: EdgeAgent

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        if self.path != "/score":
            self._reply(404, {"error": "POST transactions to /score"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > m.MAX_PAYLOAD_BYTES:
            self.agent.score_line(b" " * (m.MAX_PAYLOAD_BYTES + 1))  # counted as oversized
            self._reply(413, {"error": f"body exceeds {m.MAX_PAYLOAD_BYTES} bytes"})
            return
        before = self.agent.totals().invalid
        score = self.agent.score_line(self.rfile.read(length))
        if score is None:
            after = self.agent.totals().invalid
            reasons = [k for k in after if after[k] != before.get(k, 0)]
            self._reply(400, {"error": "transaction refused", "reason": reasons[0] if reasons else "invalid"})
            return
        self._reply(200, {"score": score, "alert": score > self.agent.threshold,
                          "model_version": self.agent.model.version})

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        logger.debug(format, *args)


@edge.command("run")
@click.option("--bundle", type=click.Path(exists=True, dir_okay=False), help="Signed model bundle file.")
@click.option("--registry", "registry_url", help="Coordinator registry URL; the promoted bundle is downloaded.")
@click.option("--channel", default="default", show_default=True, help="Model channel to follow for updates.")
@click.option("--public-key", type=click.Path(exists=True, dir_okay=False), required=True,
              help="Coordinator's bundle-signing public key (PEM).")
@click.option("--broker", default="mqtt://127.0.0.1:1883", show_default=True, help="mqtt://HOST:PORT or mqtts://.")
@click.option("--institution", required=True)
@click.option("--agent", "agent_name", default="agent-1", show_default=True)
@click.option("--input", "input_path", default=None, help="'-' (stdin), FILE.jsonl or FILE.csv.")
@click.option("--http", "http_port", type=click.IntRange(0, 65535), default=None, help="Serve POST /score here.")
@click.option("--outbox", "outbox_path", type=click.Path(dir_okay=False), default=None,
              help="Durable outbox file (default: edge-outbox-INSTITUTION-AGENT.db).")
@click.option("--telemetry-interval", type=click.FloatRange(0.1), default=5.0, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=1, show_default=True, help="ONNX Runtime intra-op threads.")
@click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--username", default=None)
@click.option("--password", envvar="CONSORTIUM_MQTT_PASSWORD", default=None,
              help="Broker password (or $CONSORTIUM_MQTT_PASSWORD).")
@click.option("--drain-timeout", type=click.FloatRange(0), default=10.0, show_default=True,
              help="Seconds to wait for the broker to acknowledge the backlog when the input ends.")
def edge_run(bundle: str | None, registry_url: str | None, channel: str, public_key: str, broker: str,
             institution: str, agent_name: str, input_path: str | None, http_port: int | None,
             outbox_path: str | None, telemetry_interval: float, threads: int, tls_ca: str | None,
             username: str | None, password: str | None, drain_timeout: float) -> None:
    """Score transactions locally; alerts and telemetry go to the broker (queued on disk while it is away)."""
    from consortium.edge.agent import EdgeAgent  # noqa: PLC0415
    from consortium.edge.publisher import MqttPublisher  # noqa: PLC0415
    from consortium.registry.signing import load_public_key  # noqa: PLC0415

    try:
        if (input_path is None) == (http_port is None):
            raise ConfigError("Give exactly one of --input (- | FILE.jsonl | FILE.csv) or --http PORT.")
        key = load_public_key(Path(public_key))
        model = load_model(bundle=bundle, registry=registry_url, channel=channel, public_key=key)
        publisher = MqttPublisher(
            broker, institution=institution, agent=agent_name,
            outbox_path=outbox_path or f"edge-outbox-{institution}-{agent_name}.db",
            tls_ca=tls_ca, username=username, password=password,
        )
    except ConsortiumError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    agent = EdgeAgent(model, institution=institution, agent=agent_name, publisher=publisher,
                      telemetry_interval=telemetry_interval, public_key=key, channel=channel)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, _interrupt)
    publisher.start()
    agent.start()
    click.echo(f"Serving model {model.version} for {institution}/{agent_name}; broker {broker}", err=True)
    try:
        if http_port is not None:
            _serve_http(agent, http_port, stop)
        elif input_path == "-":
            agent.run_lines(sys.stdin.buffer)
        elif input_path is not None and input_path.endswith(".csv"):
            with open(input_path, newline="") as fh:
                agent.run_csv(fh)
        elif input_path is not None:
            with open(input_path, "rb") as fh:
                agent.run_lines(fh)
    except KeyboardInterrupt:
        pass
    finally:
        agent.stop()
        publisher.stop(drain_timeout=drain_timeout)
    totals = agent.totals()
    click.echo(json.dumps({"scored": totals.scored, "alerts": totals.alerts, "invalid": totals.invalid,
                           "model_version": totals.model_version, "backlog": publisher.backlog}))


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def _serve_http(agent: EdgeAgent, port: int, stop: threading.Event) -> None:
    handler = type("Handler", (_ScoreHandler,), {"agent": agent})
    server = HTTPServer(("127.0.0.1", port), handler)  # one thread: the scorer is not thread-safe
    click.echo(f"Listening on http://127.0.0.1:{server.server_address[1]}/score", err=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    stop.wait()
    server.shutdown()
