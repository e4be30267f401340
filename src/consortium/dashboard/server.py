"""Run the dashboard: store, MQTT ingest, change watcher and uvicorn, started and stopped together.

:func:`start_dashboard` returns a :class:`DashboardHandle` whose :meth:`~DashboardHandle.stop`
shuts everything down in order (ingest drains and acknowledges what it received,
live streams end, the HTTP server exits).  ``consortium dashboard`` blocks on
it; ``consortium demo`` starts one next to the training and stops it at the end.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

from consortium.dashboard.app import DashboardContext, create_app
from consortium.dashboard.auth import Authenticator
from consortium.dashboard.hub import EventHub
from consortium.dashboard.ingest import AlertIngestor
from consortium.dashboard.schema import ensure_tables
from consortium.dashboard.sources import OptionalSources, store_fingerprint
from consortium.errors import ConfigError, ConsortiumError, param_error
from consortium.registry.store import RunStore

logger = logging.getLogger(__name__)

WATCH_INTERVAL_S = 1.0
"""How often the store is checked for new rounds, baselines, privacy charges and model versions."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class DashboardHandle:
    """A running dashboard.

    Attributes
    ----------
    url : str
        Where the page is served, e.g. ``http://127.0.0.1:8050/``.
    store : RunStore
    ingestor : AlertIngestor or None
        None when no broker was given (store panels only).
    hub : EventHub
    """

    url: str
    store: RunStore
    ingestor: AlertIngestor | None
    hub: EventHub
    _server: uvicorn.Server
    _threads: list[threading.Thread]
    _stop: threading.Event = field(default_factory=threading.Event)
    _owns_store: bool = True

    def stop(self) -> None:
        """Stop ingest (after writing what it received), end the live streams and the HTTP server."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self.ingestor is not None:
            self.ingestor.stop()
        self.hub.close()
        self._server.should_exit = True
        for t in self._threads:
            t.join(10)
        if self._owns_store:
            self.store.close()
        logger.info("Dashboard at %s stopped", self.url)

    def wait_for_alerts(self, count: int, *, timeout: float = 10.0) -> int:
        """Wait until ingest has stored ``count`` new alerts and written all it received; return how many it stored.

        ``consortium demo`` calls it before stopping the dashboard, so that every alert
        the edge agent delivered is on the page (and in the store) when the demo ends.
        """
        if self.ingestor is None:
            return 0
        deadline = time.monotonic() + timeout
        while self.ingestor.stats().alerts_stored < count and time.monotonic() < deadline:
            time.sleep(0.05)
        self.ingestor.wait_idle(max(0.0, deadline - time.monotonic()))
        return self.ingestor.stats().alerts_stored

    def wait(self) -> None:
        """Block until the HTTP server exits (Ctrl-C in ``consortium dashboard``)."""
        while not self._stop.is_set() and self._threads[0].is_alive():
            self._threads[0].join(0.5)

    def __enter__(self) -> DashboardHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_dashboard(
    store: str | RunStore,
    *,
    broker_url: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8050,
    auth_token: str | None = None,
    users_file: str | Path | None = None,
    registry_dir: str | Path | None = None,
    mqtt_client_id: str | None = None,
    mqtt_username: str | None = None,
    mqtt_password: str | None = None,
    mqtt_tls_ca: str | None = None,
    store_schema: str | None = None,
    access_log: bool = False,
    ready_timeout: float = 20.0,
) -> DashboardHandle:
    """Start the dashboard in background threads and return once it answers HTTP.

    Parameters
    ----------
    store : str or RunStore
        Run store URL (opened and closed by the dashboard) or an open store (left open).
    broker_url : str, optional
        ``mqtt://HOST:PORT``: subscribe to the edge agents' messages.  Without it only
        the store-backed panels (federation, privacy, models, stored alerts) show data.
    host, port : str, int
        Where to listen; 127.0.0.1 by default (only this machine).  ``port=0`` picks a free port.
    auth_token, users_file :
        Require a token (see :mod:`consortium.dashboard.auth`); both may be given.
    registry_dir : path, optional
        Blob directory of the model registry for the models panel.
    mqtt_client_id : str, optional
        Stable MQTT session id, so the broker queues alerts while the dashboard restarts.
    access_log : bool, default False
        uvicorn's per-request log (off: tokens never travel in URLs anyway, but keep logs small).

    Raises
    ------
    ConfigError
        Bad options, or the port is taken.
    StoreError
        The store cannot be opened.
    """
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise param_error("port", "start_dashboard", "an int in [0, 65535]", port)
    auth = Authenticator.from_options(token=auth_token, users_file=users_file)
    if host not in ("127.0.0.1", "localhost", "::1") and not auth.enabled:
        logger.warning("Dashboard listens on %s without authentication: anyone who can reach it sees "
                       "everything (give --auth-token or --users)", host)
    owns = isinstance(store, str)
    run_store = RunStore(store, schema=store_schema) if isinstance(store, str) else store
    try:
        ensure_tables(run_store)
        hub = EventHub()
        ingestor = None
        if broker_url is not None:
            ingestor = AlertIngestor(run_store, broker_url, hub=hub, client_id=mqtt_client_id,
                                     username=mqtt_username, password=mqtt_password, tls_ca=mqtt_tls_ca)
        sources = OptionalSources(Path(registry_dir) if registry_dir is not None else None, run_store)
        app = create_app(DashboardContext(store=run_store, hub=hub, auth=auth, sources=sources))
        # Bind here, not in uvicorn's thread: a taken port is then a clear ConfigError, and port 0 has no race.
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise ConfigError(f"The dashboard cannot listen on {host}:{port}: {exc.strerror or exc}.") from None
        port = sock.getsockname()[1]
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=access_log,
                                timeout_graceful_shutdown=3, lifespan="on")
        server = uvicorn.Server(config)
        http_thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="dashboard-http",
                                       daemon=True)
        stop = threading.Event()
        watcher = threading.Thread(target=_watch_store, args=(run_store, hub, stop), name="dashboard-watch",
                                   daemon=True)
        http_thread.start()
        deadline = time.monotonic() + ready_timeout
        while not server.started:
            if not http_thread.is_alive():
                raise ConfigError(f"The dashboard could not listen on {host}:{port} (port taken or not allowed).")
            if time.monotonic() > deadline:
                server.should_exit = True
                raise ConfigError(f"The dashboard did not start on {host}:{port} within {ready_timeout:.0f} s.")
            time.sleep(0.02)
        watcher.start()
        if ingestor is not None:
            ingestor.start(wait=5.0)
    except BaseException:
        if owns:
            run_store.close()
        raise
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/"
    logger.info("Dashboard serving %s (store %s, broker %s, auth %s)", url, run_store.url_masked,
                ingestor.broker if ingestor else "none", "on" if auth.enabled else "off")
    return DashboardHandle(url=url, store=run_store, ingestor=ingestor, hub=hub, _server=server,
                           _threads=[http_thread, watcher], _stop=stop, _owns_store=owns)


def _watch_store(store: RunStore, hub: EventHub, stop: threading.Event) -> None:
    """Tell the pages to refetch when the store records something new (rounds, charges, models)."""
    last: tuple[int, ...] | None = None
    while not stop.wait(WATCH_INTERVAL_S):
        try:
            now = store_fingerprint(store)
        except ConsortiumError as exc:
            logger.debug("Dashboard: store check failed: %s", exc)
            continue
        if last is not None and now != last:
            hub.publish("store", [{"changed": True}])
        last = now


def start_demo_dashboard(
    out_dir: str | Path, *, store_url: str | None = None, broker_url: str | None = None, port: int = 8050
) -> DashboardHandle | None:
    """The dashboard next to ``consortium demo``: same store, the demo's registry, port 8050 or a free one.

    Never fails the demo: a dashboard that cannot start is a warning and None.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    url = store_url or f"sqlite:///{(out / 'consortium.db').resolve()}"
    for candidate in dict.fromkeys((port, 0)):
        try:
            return start_dashboard(url, broker_url=broker_url, port=candidate, registry_dir=out / "registry")
        except ConfigError as exc:
            logger.info("Demo dashboard: %s", exc)
        except ConsortiumError as exc:
            logger.warning("Demo dashboard not started: %s", exc)
            return None
    logger.warning("Demo dashboard not started: no free port")
    return None
