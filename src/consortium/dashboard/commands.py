"""``consortium dashboard``: serve the live dashboard until Ctrl-C."""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

import click

from consortium.errors import ConsortiumError


@click.command("dashboard")
@click.option("--store", "store_url", default="sqlite:///consortium.db", show_default=True,
              help="Run store URL (SQLite file or postgresql+psycopg://...).")
@click.option("--broker", "broker_url", default=None,
              help="MQTT broker of the edge agents, mqtt://HOST:PORT or mqtts://HOST:PORT (omit: no live edge data).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8050, show_default=True, help="0 picks a free port.")
@click.option("--auth-token", default=None, envvar="CONSORTIUM_DASHBOARD_TOKEN", show_envvar=True,
              help="Require this operator token (at least 16 characters; prefer the environment variable).")
@click.option("--users", "users_file", type=click.Path(dir_okay=False), default=None,
              help="JSON users file with per-institution tokens (see docs/dashboard.md).")
@click.option("--registry", "registry_dir", type=click.Path(file_okay=False), default=None,
              help="Model registry blob directory (models panel).")
@click.option("--mqtt-client-id", default="consortium-dashboard", show_default=True,
              help="Stable MQTT session id: the broker keeps alerts for it while the dashboard restarts.")
@click.option("--mqtt-username", default=None)
@click.option("--mqtt-password", default=None, envvar="CONSORTIUM_MQTT_PASSWORD", show_envvar=True)
@click.option("--mqtt-ca", "mqtt_tls_ca", type=click.Path(dir_okay=False, exists=True), default=None,
              help="CA certificate for mqtts://.")
@click.option("--access-log/--no-access-log", default=False, show_default=True)
def dashboard(store_url: str, broker_url: str | None, host: str, port: int, auth_token: str | None,
              users_file: str | None, registry_dir: str | None, mqtt_client_id: str, mqtt_username: str | None,
              mqtt_password: str | None, mqtt_tls_ca: str | None, access_log: bool) -> None:
    """Serve the live dashboard: federation, privacy, models, edge fleet and alerts on one page."""
    from consortium.dashboard.server import start_dashboard  # noqa: PLC0415 - keep `consortium --help` fast

    try:
        handle = start_dashboard(
            store_url, broker_url=broker_url, host=host, port=port, auth_token=auth_token, users_file=users_file,
            registry_dir=registry_dir, mqtt_client_id=mqtt_client_id, mqtt_username=mqtt_username,
            mqtt_password=mqtt_password, mqtt_tls_ca=mqtt_tls_ca, access_log=access_log,
        )
    except ConsortiumError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    stop = threading.Event()

    def on_signal(_sig: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    click.echo(f"Dashboard: {handle.url}  (store {handle.store.url_masked}; "
               f"broker {handle.ingestor.broker if handle.ingestor else 'none'}; pid {os.getpid()})")
    try:
        while not stop.wait(0.5):
            pass
    finally:
        click.echo("Stopping the dashboard...")
        handle.stop()
