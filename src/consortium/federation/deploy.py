"""Run the consortium's Flower apps as real processes: SuperLink, SuperNodes, ``flwr run``.

A deployed federation in Flower 1.42 has three kinds of process:

* the coordinator's **SuperLink** (``flower-superlink``). In 1.42 it serves its
  Fleet API (SuperNodes connect here), Control API (``flwr run``/``ls``/``log``)
  and Runtime API (the ServerApp process it spawns) over HTTPS on **one**
  ``--host``/``--port``; the former separate gRPC ports 9091/9092/9093 are gone.
  With the default ``--isolation subprocess`` it starts a ``flower-superexec``
  that launches one ``flwr-serverapp`` process per run;
* one **SuperNode** per institution (``flower-supernode``), which dials the
  SuperLink, verifies its certificate against the consortium CA and runs the
  ClientApp in a ``flwr-clientapp`` subprocess. Its ``--node-config`` becomes
  ``context.node_config`` (``data-path``, ``institution``);
* the operator's **``flwr run``**, which builds a Flower App Bundle (FAB) from an
  app directory, submits it with run-config overrides (``context.run_config``)
  and returns a run id; ``flwr log`` and ``flwr ls`` follow the run.

This module starts and stops these processes with the executables of the
running Python environment, keeps Flower's console output in log files (and
out of our stdout), gives every process its own ``FLWR_HOME`` under a work
directory so runs never share state, and turns failures into
:class:`~consortium.errors.FederationError` messages that quote the end of the
relevant log. See ``docs/deployment.md`` for the equivalent shell commands.

SuperNode authentication: ``node_auth=True`` in :func:`start_coordinator` adds
``--enable-supernode-auth``, ``auth_key`` in :func:`start_node` adds
``--auth-supernode-private-key``; :mod:`consortium.federation.enroll` makes the
keys and registers them (``flwr supernode register``). See docs/reliability.md.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from consortium.errors import ConfigError, DataError, FederationError, param_error
from consortium.federation.certs import CertificatePaths
from consortium.federation.enroll import load_node_private_key, node_was_refused, refusal_on_node
from consortium.keyfiles import check_private_key_file

logger = logging.getLogger(__name__)

CONSORTIUM_APP_DIR: Path = Path(__file__).with_name("fab")
"""The Flower App directory whose components are the consortium's ServerApp and ClientApp."""

CONNECTION_NAME = "consortium"
"""Name of the SuperLink connection written to the ``flwr`` CLI's config.toml."""

RUN_COMPLETED = "finished:completed"
"""``flwr ls`` status of a run whose ServerApp returned normally."""

ConfigValue = str | int | float | bool

_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_NODE_ID_LINE = re.compile(r"SuperNode ID: (\d+)")
"""What ``flower-supernode`` 1.42 logs once the SuperLink accepted it."""
_CONFIG_KEY = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_POLL_SECONDS = 0.2
_CLI_CALL_TIMEOUT = 120.0

_FORCED_ENV = {
    # A consortium of banks never phones home: no telemetry, no update check.
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    # Children log through pipes/files; unbuffered output keeps the logs current
    # (readiness checks read them).
    "PYTHONUNBUFFERED": "1",
    # `flwr --format json` prints through rich; never wrap its output.
    "COLUMNS": "100000",
}


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CoordinatorAddresses:
    """Where the coordinator's Flower APIs listen, as ``host:port``.

    Flower 1.42 serves the Fleet, Control and Runtime ("ServerAppIo") APIs on
    one HTTPS port, so the three fields are equal; they are kept apart so that
    callers say which API they mean.

    Attributes
    ----------
    fleet : str
        Address SuperNodes dial (``flower-supernode --superlink``).
    control : str
        Address of the Control API (``address`` of the ``flwr`` CLI connection).
    serverappio : str
        Address the ServerApp process talks to (SuperLink-internal).
    """

    fleet: str
    control: str
    serverappio: str


@dataclass(frozen=True)
class RunOutcome:
    """The result of one run submitted with :func:`submit_run`.

    Attributes
    ----------
    run_id : int
        Flower's run id (``flwr ls --run-id``).
    status : str
        Final ``flwr ls`` status: ``finished:completed``, ``finished:failed`` or
        ``finished:stopped``.
    details : str
        Flower's status details (the ServerApp's exception for failed runs).
    log : str
        The ServerApp's log as streamed by ``flwr log`` (ANSI colours removed).
    log_file : Path or None
        Where the log was also written, if the submission had a work directory.
    """

    run_id: int
    status: str
    details: str
    log: str
    log_file: Path | None = None

    @property
    def succeeded(self) -> bool:
        """Whether the ServerApp finished without raising."""
        return self.status == RUN_COMPLETED

    def raise_for_status(self) -> None:
        """Raise :class:`FederationError` unless the run completed.

        The message carries Flower's status details and the end of the log, so
        a CLI can print it without a traceback.
        """
        if not self.succeeded:
            raise FederationError(
                f"Flower run {self.run_id} ended with status '{self.status}': {self.details}\n"
                f"Last lines of the run log:\n{_tail(self.log, 30)}"
            )


# --------------------------------------------------------------------------------------
# Managed processes
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ProcessId:
    """A PID plus its start time, so a recycled PID is never mistaken for ours."""

    pid: int
    start_time: int


class FlowerProcess:
    """A Flower daemon this module started, with its log file and process tree.

    Flower daemons start helpers (``flower-superexec``, and through it
    ``flwr-serverapp``/``flwr-clientapp``), some in a new session, so stopping
    only the main PID or its process group can leave them behind.
    :meth:`stop` therefore records the whole process tree first, asks the main
    process to shut down (SIGTERM, which Flower handles gracefully), then
    terminates and finally kills whatever of the recorded tree is still alive.

    Use it as a context manager, or call :meth:`stop`.
    """

    def __init__(
        self,
        *,
        name: str,
        popen: subprocess.Popen[bytes],
        log_file: Path,
        log_offset: int,
        work_dir: Path,
    ) -> None:
        self._name = name
        self._popen = popen
        self._log_file = log_file
        self._log_offset = log_offset
        self._work_dir = work_dir
        self._identity = _process_id(popen.pid)
        self._known: list[_ProcessId] = []

    @property
    def name(self) -> str:
        """Human-readable name used in messages (e.g. ``SuperNode 'bank_a'``)."""
        return self._name

    @property
    def pid(self) -> int:
        """PID of the main Flower process."""
        return self._popen.pid

    @property
    def log_file(self) -> Path:
        """File receiving the process's stdout and stderr."""
        return self._log_file

    @property
    def work_dir(self) -> Path:
        """Directory holding this process's ``FLWR_HOME``, config and log files."""
        return self._work_dir

    @property
    def returncode(self) -> int | None:
        """Exit code, or ``None`` while the process runs."""
        return self._popen.poll()

    def is_running(self) -> bool:
        """Whether the main process is still alive."""
        return self._popen.poll() is None

    def log_text(self) -> str:
        """What the process has logged since it started, without ANSI colours."""
        try:
            with self._log_file.open("rb") as handle:
                handle.seek(self._log_offset)
                data = handle.read()
        except OSError:
            return ""
        return _strip_ansi(data.decode("utf-8", errors="replace"))

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of :meth:`log_text`."""
        return _tail(self.log_text(), lines)

    def process_ids(self) -> tuple[int, ...]:
        """PIDs of the main process and of its live descendants (helpers, apps)."""
        return tuple(p.pid for p in self._live_tree())

    def stop(self, *, timeout: float = 10.0) -> int | None:
        """Shut the process and every helper it started down; return the exit code.

        Parameters
        ----------
        timeout : float
            Seconds the main process gets to exit after SIGTERM before SIGKILL.
        """
        tree = self._live_tree() + self._known
        if self._popen.poll() is None:
            self._popen.send_signal(signal.SIGTERM)
            try:
                self._popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "%s did not exit %.0f s after SIGTERM; killing it", self._name, timeout
                )
                self._popen.kill()
                self._popen.wait()
        # Helpers started after the snapshot are children of snapshot members.
        leftovers = [
            p for p in _unique(tree + _descendants(tree)) if p != self._identity and _alive(p)
        ]
        _terminate_all(leftovers, grace=min(timeout, 3.0))
        logger.debug("%s stopped with exit code %s", self._name, self._popen.returncode)
        return self._popen.returncode

    def __enter__(self) -> FlowerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _live_tree(self) -> list[_ProcessId]:
        """Main process and live descendants; every helper seen is remembered.

        A helper whose parent already died is no longer its descendant, so
        :meth:`stop` also checks the helpers remembered from earlier calls.
        """
        roots = [self._identity] if _alive(self._identity) else []
        tree = roots + _descendants(roots)
        self._known = _unique(self._known + tree)
        return tree

    def raise_if_exited(self, when: str = "unexpectedly") -> None:
        """Raise :class:`FederationError` with the log's tail if the process has exited.

        Parameters
        ----------
        when : str
            Completes the message "<name> exited with code N <when>".
        """
        code = self._popen.poll()
        if code is not None:
            raise FederationError(
                f"{self._name} exited with code {code} {when}. "
                f"Last lines of {self._log_file}:\n{self.log_tail()}"
            )


class CoordinatorProcess(FlowerProcess):
    """A running ``flower-superlink``: the consortium's coordinator.

    Attributes
    ----------
    addresses : CoordinatorAddresses
        Where its APIs listen.
    ca_cert : Path or None
        CA certificate clients verify it with (``None`` when insecure).
    insecure : bool
        Whether it serves plain HTTP.
    node_auth : bool
        Whether only enrolled SuperNodes may join.
    """

    def __init__(
        self,
        *,
        popen: subprocess.Popen[bytes],
        log_file: Path,
        log_offset: int,
        work_dir: Path,
        addresses: CoordinatorAddresses,
        ca_cert: Path | None,
        insecure: bool,
        node_auth: bool = False,
    ) -> None:
        super().__init__(
            name=f"SuperLink at {addresses.fleet}",
            popen=popen,
            log_file=log_file,
            log_offset=log_offset,
            work_dir=work_dir,
        )
        self.addresses = addresses
        self.ca_cert = ca_cert
        self.insecure = insecure
        self.node_auth = node_auth

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the SuperLink answers its health check over TLS.

        The check verifies the server certificate against :attr:`ca_cert`,
        so a certificate that does not cover the address fails here, early.

        Raises
        ------
        FederationError
            If the process exits, TLS verification fails, or ``timeout``
            seconds pass; the message quotes the end of the log.
        """
        scheme = "http" if self.insecure else "https"
        url = f"{scheme}://{self.addresses.control}/health"
        context = None if self.insecure else ssl.create_default_context(cafile=str(self.ca_cert))
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )
        deadline = time.monotonic() + timeout
        last_error: object = None
        while True:
            self._live_tree()
            self.raise_if_exited("before it was ready")
            try:
                with opener.open(url, timeout=2.0) as response:
                    if response.status == 200:
                        logger.info("%s is ready (log: %s)", self.name, self.log_file)
                        return
                    last_error = f"HTTP {response.status}"
            except urllib.error.URLError as err:
                if isinstance(err.reason, ssl.SSLCertVerificationError):
                    raise _tls_error(self, err.reason) from err
                last_error = err.reason
            except ssl.SSLCertVerificationError as err:
                raise _tls_error(self, err) from err
            except OSError as err:  # reset or refused while uvicorn starts
                last_error = err
            if time.monotonic() > deadline:
                raise FederationError(
                    f"{self.name} was not ready after {timeout:.0f} s (last error: {last_error}). "
                    f"Last lines of {self.log_file}:\n{self.log_tail()}"
                )
            time.sleep(_POLL_SECONDS)

    def __enter__(self) -> CoordinatorProcess:
        return self


class NodeProcess(FlowerProcess):
    """A running ``flower-supernode`` for one institution.

    Attributes
    ----------
    institution : str
        The institution's name (``context.node_config["institution"]``).
    fleet_address : str
        The coordinator address it dials.
    """

    def __init__(
        self,
        *,
        popen: subprocess.Popen[bytes],
        log_file: Path,
        log_offset: int,
        work_dir: Path,
        institution: str,
        fleet_address: str,
        auth_key: Path | None = None,
    ) -> None:
        super().__init__(
            name=f"SuperNode '{institution}'",
            popen=popen,
            log_file=log_file,
            log_offset=log_offset,
            work_dir=work_dir,
        )
        self.institution = institution
        self.fleet_address = fleet_address
        self.auth_key = auth_key
        self._node_id: int | None = None

    @property
    def node_id(self) -> int | None:
        """Flower's id for this node once :meth:`wait_ready` returned, else ``None``."""
        return self._node_id

    def wait_ready(self, timeout: float = 30.0) -> int:
        """Block until the SuperLink has accepted this node; return its node id.

        A TLS failure (unknown CA, certificate not matching the address) makes
        ``flower-supernode`` exit at once with Flower's exit code 305, which
        is reported here with the log's explanation.

        Raises
        ------
        FederationError
            If the process exits first or ``timeout`` seconds pass (e.g. the
            coordinator is unreachable and the node keeps retrying).
        """
        deadline = time.monotonic() + timeout
        while True:
            self._live_tree()
            match = _NODE_ID_LINE.search(self.log_text())
            if match:
                self._node_id = int(match.group(1))
                logger.info(
                    "%s connected to %s as node %s", self.name, self.fleet_address, self._node_id
                )
                return self._node_id
            if not self.is_running() and node_was_refused(self.log_text()):
                raise refusal_on_node(self.institution, self.auth_key, self.log_tail())
            self.raise_if_exited(f"before connecting to the coordinator at {self.fleet_address}")
            if time.monotonic() > deadline:
                raise FederationError(
                    f"{self.name} did not connect to the coordinator at {self.fleet_address} "
                    f"within {timeout:.0f} s. Last lines of {self.log_file}:\n{self.log_tail()}"
                )
            time.sleep(_POLL_SECONDS)

    def exit_explanation(self) -> str:
        """Why the node stopped, for a node that exited (refused, revoked or failed)."""
        code = self.returncode
        log = self.log_text()
        if node_was_refused(log):
            return str(refusal_on_node(self.institution, self.auth_key, self.log_tail()))
        if self._node_id is not None and self.auth_key is not None and code == 0:
            return (
                f"{self.name} (node {self._node_id}) left the federation: the coordinator at "
                f"{self.fleet_address} stopped accepting its requests. Its key was revoked, or the "
                "coordinator was reset; restart the node, and if it is refused ask the operator "
                "to enrol its key again."
            )
        return f"{self.name} exited with code {code}. Last lines of {self.log_file}:\n{self.log_tail()}"

    def __enter__(self) -> NodeProcess:
        return self


# --------------------------------------------------------------------------------------
# Starting processes
# --------------------------------------------------------------------------------------


def build_superlink_command(
    *,
    host: str,
    port: int,
    certs: CertificatePaths | None,
    database: Path | None = None,
    node_auth: bool = False,
) -> list[str]:
    """The ``flower-superlink`` command line for a coordinator.

    Parameters
    ----------
    host, port : str, int
        Where the single HTTPS port of all three APIs listens.
    certs : CertificatePaths or None
        TLS files; ``None`` adds ``--insecure``.
    database : Path or None
        SQLite file for the SuperLink's state; ``None`` keeps it in memory.
    node_auth : bool
        Accept only SuperNodes whose public key was registered
        (``--enable-supernode-auth``; needs TLS).
    """
    command = [str(flower_executable("flower-superlink")), "--host", host, "--port", str(port)]
    if certs is None:
        command.append("--insecure")
    else:
        command += [
            "--ssl-ca-certfile", str(certs.ca_cert),
            "--ssl-certfile", str(certs.server_cert),
            "--ssl-keyfile", str(certs.server_key),
        ]  # fmt: skip
    if database is not None:
        command += ["--database", str(database)]
    if node_auth:
        command.append("--enable-supernode-auth")
    # The consortium package is already installed; never `uv sync` app dependencies.
    command.append("--disable-runtime-dependency-installation")
    return command


def build_supernode_command(
    *,
    fleet_address: str,
    ca_cert: Path | None,
    insecure: bool,
    node_config_file: Path,
    runtime_host: str,
    runtime_port: int,
    auth_key: Path | None = None,
) -> list[str]:
    """The ``flower-supernode`` command line for one institution.

    Parameters
    ----------
    fleet_address : str
        The coordinator's Fleet API ``host:port``.
    ca_cert : Path or None
        CA to verify the coordinator with; ``None`` uses the system trust store.
    insecure : bool
        Dial without TLS.
    node_config_file : Path
        TOML file with the node config (``--node-config`` accepts a ``.toml`` path,
        which avoids quoting problems with paths and names).
    runtime_host, runtime_port : str, int
        Where this SuperNode serves the Runtime API its ClientApp processes use.
        Every SuperNode on one machine needs its own port.
    auth_key : Path or None
        The institution's enrolment private key
        (``--auth-supernode-private-key``), for a coordinator with node auth.
    """
    command = [str(flower_executable("flower-supernode")), "--superlink", fleet_address]
    if insecure:
        command.append("--insecure")
    elif ca_cert is not None:
        command += ["--root-certificates", str(ca_cert)]
    command += [
        "--node-config", str(node_config_file),
        "--host", runtime_host,
        "--port", str(runtime_port),
    ]  # fmt: skip
    if auth_key is not None:
        command += ["--auth-supernode-private-key", str(auth_key)]
    return command


def start_coordinator(
    *,
    certs: CertificatePaths | None,
    insecure: bool = False,
    fleet_address: str = "127.0.0.1:0",
    work_dir: str | Path,
    log_file: str | Path | None = None,
    database: str | Path | None = None,
    node_auth: bool = False,
) -> CoordinatorProcess:
    """Start a SuperLink serving the consortium over TLS.

    Parameters
    ----------
    certs : CertificatePaths or None
        CA certificate, server certificate and key (see
        :func:`consortium.federation.certs.make_local_ca`). The server
        certificate must list ``127.0.0.1`` too: the SuperLink's own
        SuperExec dials it there.
    insecure : bool
        Serve plain HTTP instead; only for experiments, logs a warning.
        Exactly one of ``certs`` and ``insecure=True`` must be given.
    fleet_address : str
        ``host:port`` to listen on; port ``0`` picks a free port.
    work_dir : str or Path
        Directory for the SuperLink's ``FLWR_HOME``, the ``flwr`` CLI config
        and logs; created if missing. One per coordinator.
    log_file : str or Path or None
        Where the SuperLink's output goes; default ``work_dir/superlink.log``.
    database : str or Path or None
        SQLite file that keeps runs across restarts; default in memory.
    node_auth : bool
        Only enrolled institutions may join: SuperNodes must sign their
        requests with a key registered through
        :func:`consortium.federation.enroll.register_nodes`. Needs TLS.
        ``consortium coordinator`` turns it on unless ``--insecure``.

    Returns
    -------
    CoordinatorProcess
        Call :meth:`CoordinatorProcess.wait_ready` before using it.
    """
    owner = "start_coordinator"
    if certs is not None and insecure:
        raise ConfigError(
            f"{owner} got both certificates and insecure=True; pass certs=None to run "
            "without TLS, or drop insecure=True."
        )
    if certs is None and not insecure:
        raise ConfigError(
            f"{owner} needs TLS certificates (create them with `consortium certs DIR`); "
            "pass insecure=True only to experiment without TLS."
        )
    if node_auth and certs is None:
        raise ConfigError(
            f"{owner} got node_auth=True without TLS certificates; node authentication needs TLS."
        )
    bind = _parse_address(fleet_address, name="fleet_address", owner=owner)
    if certs is not None:
        certs = CertificatePaths(
            ca_cert=Path(certs.ca_cert).resolve(),
            server_cert=Path(certs.server_cert).resolve(),
            server_key=Path(certs.server_key).resolve(),
        )
        certs.check_exist()
        check_private_key_file(certs.server_key, what="coordinator TLS key")
    else:
        logger.warning(
            "Starting the coordinator WITHOUT TLS: model updates and node traffic are "
            "sent in clear text. Use this only on a trusted machine for experiments."
        )
    port = bind.port or _free_port(bind.host)
    work_path = _make_dir(work_dir)
    db_path = Path(database).resolve() if database is not None else None
    command = build_superlink_command(
        host=bind.host, port=port, certs=certs, database=db_path, node_auth=node_auth
    )
    client_host = _client_host(bind.host)
    address = _format_address(client_host, port)
    popen, log_path, offset = _spawn(
        command,
        work_dir=work_path,
        log_file=Path(log_file) if log_file is not None else work_path / "superlink.log",
    )
    logger.info("Started SuperLink (pid %s) on %s; log: %s", popen.pid, address, log_path)
    return CoordinatorProcess(
        popen=popen,
        log_file=log_path,
        log_offset=offset,
        work_dir=work_path,
        addresses=CoordinatorAddresses(fleet=address, control=address, serverappio=address),
        ca_cert=certs.ca_cert if certs is not None else None,
        insecure=insecure,
        node_auth=node_auth,
    )


def start_node(
    *,
    fleet_address: str,
    ca_cert: str | Path | None,
    insecure: bool = False,
    data_path: str | Path,
    institution: str,
    work_dir: str | Path,
    extra_node_config: Mapping[str, ConfigValue] | None = None,
    runtime_address: str = "127.0.0.1:0",
    log_file: str | Path | None = None,
    auth_key: str | Path | None = None,
) -> NodeProcess:
    """Start a SuperNode for one institution.

    Parameters
    ----------
    fleet_address : str
        The coordinator's ``host:port`` (``CoordinatorProcess.addresses.fleet``).
    ca_cert : str or Path or None
        The consortium CA certificate. ``None`` trusts the system's CA store
        (right for a coordinator with a publicly issued certificate).
    insecure : bool
        Connect without TLS; only for an insecure coordinator.
    data_path : str or Path
        The institution's data; becomes ``node_config["data-path"]`` (absolute).
    institution : str
        Becomes ``node_config["institution"]``.
    work_dir : str or Path
        Directory for the node's ``FLWR_HOME``, node config and log. One per node.
    extra_node_config : mapping or None
        More ``node_config`` entries (str, int, float or bool values).
    runtime_address : str
        ``host:port`` of the node's local Runtime API; port ``0`` picks a free one.
    log_file : str or Path or None
        Where the node's output goes; default ``work_dir/supernode.log``.
    auth_key : str or Path or None
        The institution's enrolment private key (``consortium enroll``), for a
        coordinator with node authentication. It must have mode 0600.

    Returns
    -------
    NodeProcess
        Call :meth:`NodeProcess.wait_ready` to wait for the connection.
    """
    owner = "start_node"
    address = _parse_address(fleet_address, name="fleet_address", owner=owner)
    if address.port == 0:
        raise param_error("fleet_address", owner, "host:port with a non-zero port", fleet_address)
    if not isinstance(institution, str) or not institution.strip() or not institution.isprintable():
        raise param_error("institution", owner, "a non-empty printable name", institution)
    if insecure and ca_cert is not None:
        raise ConfigError(f"{owner} got a CA certificate and insecure=True; pass only one of them.")
    ca_path = None
    if ca_cert is not None:
        ca_path = Path(ca_cert).resolve()
        if not ca_path.is_file():
            raise ConfigError(f"CA certificate file not found: {ca_path} (ca_cert of {owner}).")
    key_path = None
    if auth_key is not None:
        if insecure:
            raise ConfigError(f"{owner} got auth_key with insecure=True; node authentication needs TLS.")
        key_path = load_node_private_key(auth_key, institution=institution)
    data = Path(data_path).resolve()
    if not data.exists():
        raise DataError(f"Data path of institution '{institution}' does not exist: {data}")
    node_config: dict[str, ConfigValue] = {"data-path": str(data), "institution": institution}
    for key, value in (extra_node_config or {}).items():
        if key in node_config:
            raise ConfigError(
                f"extra_node_config of {owner} may not set '{key}'; "
                f"use the {key.replace('-', '_')} parameter."
            )
        node_config[key] = value
    config_text = to_toml(node_config, owner=owner, name="extra_node_config")
    runtime = _parse_address(runtime_address, name="runtime_address", owner=owner)

    work_path = _make_dir(work_dir)
    config_file = work_path / "node-config.toml"
    config_file.write_text(config_text, encoding="utf-8")
    command = build_supernode_command(
        fleet_address=str(address),
        ca_cert=ca_path,
        insecure=insecure,
        node_config_file=config_file,
        runtime_host=runtime.host,
        runtime_port=runtime.port or _free_port(runtime.host),
        auth_key=key_path,
    )
    if not insecure and ca_path is None:
        logger.info("SuperNode '%s' verifies the coordinator with the system CA store", institution)
    popen, log_path, offset = _spawn(
        command,
        work_dir=work_path,
        log_file=Path(log_file) if log_file is not None else work_path / "supernode.log",
    )
    logger.info(
        "Started SuperNode '%s' (pid %s) for %s; log: %s", institution, popen.pid, address, log_path
    )
    return NodeProcess(
        popen=popen,
        log_file=log_path,
        log_offset=offset,
        work_dir=work_path,
        institution=institution,
        fleet_address=str(address),
        auth_key=key_path,
    )


# --------------------------------------------------------------------------------------
# Submitting runs
# --------------------------------------------------------------------------------------


def submit_run(
    coordinator: CoordinatorProcess | str,
    *,
    run_config: Mapping[str, ConfigValue] | None = None,
    app_dir: str | Path | None = None,
    stream: bool = True,
    timeout: float,
    ca_cert: str | Path | None = None,
    insecure: bool = False,
    work_dir: str | Path | None = None,
) -> RunOutcome:
    """Submit a Flower App to a coordinator with ``flwr run`` and wait for it to finish.

    Parameters
    ----------
    coordinator : CoordinatorProcess or str
        A coordinator started here, or the ``host:port`` of one elsewhere
        (then pass ``ca_cert`` or ``insecure``).
    run_config : mapping or None
        Overrides of the app's ``[tool.flwr.app.config]`` (``context.run_config``).
        Every key must be declared there; unknown keys are refused here, before
        Flower would fail the run.
    app_dir : str or Path or None
        The Flower App directory; default :data:`CONSORTIUM_APP_DIR`, whose
        components are ``consortium.federation.server_app:app`` and
        ``consortium.federation.client_app:app``.
    stream : bool
        Forward the ServerApp's log lines to this module's logger (INFO) as
        they arrive. The log is captured in the outcome either way.
    timeout : float
        Seconds to wait for the run to finish. When they pass, the run is
        stopped (``flwr stop``) and :class:`FederationError` is raised.
    ca_cert : str or Path or None
        CA certificate for an address ``coordinator``; ``None`` uses the
        system trust store (unless ``insecure``).
    insecure : bool
        Talk to an address ``coordinator`` without TLS.
    work_dir : str or Path or None
        For an address ``coordinator``: where the ``flwr`` CLI's FLWR_HOME and
        run logs go (default: a temporary directory, logs not kept on disk).
        A :class:`CoordinatorProcess` uses its own work directory.

    Returns
    -------
    RunOutcome
        Run id, final status and log; :meth:`RunOutcome.raise_for_status`
        turns a failed run into an exception.
    """
    owner = "submit_run"
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise param_error("timeout", owner, "a number of seconds > 0", timeout)
    app_path = Path(app_dir).resolve() if app_dir is not None else CONSORTIUM_APP_DIR
    overrides = dict(run_config or {})
    _check_run_config(app_path, overrides)
    run_config_text = to_toml(overrides, owner=owner, name="run_config") if overrides else None

    with _cli_home(coordinator, ca_cert=ca_cert, insecure=insecure, work_dir=work_dir) as cli:
        deadline = time.monotonic() + timeout
        command = [
            str(flower_executable("flwr")),
            "run",
            str(app_path),
            CONNECTION_NAME,
            "--format",
            "json",
        ]
        if run_config_text is not None:
            config_file = cli.home / f"run-config-{os.getpid()}-{time.monotonic_ns()}.toml"
            config_file.write_text(run_config_text, encoding="utf-8")
            command += ["--run-config", str(config_file)]
        try:
            started = _flwr_json(cli, command, what="submit the run", deadline=deadline)
        finally:
            if run_config_text is not None:
                config_file.unlink(missing_ok=True)
        run_id = int(str(started["run-id"]))
        logger.info("Submitted Flower run %s to %s (app: %s)", run_id, cli.address, app_path)

        log_file = cli.log_dir / f"run-{run_id}.log" if cli.log_dir is not None else None
        log_text, status, details = _follow_run(
            cli, run_id, stream=stream, deadline=deadline, timeout=timeout
        )
        if log_file is not None:
            log_file.write_text(log_text, encoding="utf-8")
    outcome = RunOutcome(
        run_id=run_id, status=status, details=details, log=log_text, log_file=log_file
    )
    if outcome.succeeded:
        logger.info("Flower run %s completed", run_id)
    else:
        logger.error("Flower run %s ended with status %s: %s", run_id, status, details)
    return outcome


@dataclass(frozen=True)
class _CliConnection:
    """A ``flwr`` CLI home whose config.toml names the coordinator connection."""

    home: Path
    address: str
    log_dir: Path | None


@contextmanager
def _cli_home(
    coordinator: CoordinatorProcess | str,
    *,
    ca_cert: str | Path | None,
    insecure: bool,
    work_dir: str | Path | None,
) -> Iterator[_CliConnection]:
    """Yield a FLWR_HOME for the ``flwr`` CLI with one connection to ``coordinator``."""
    owner = "submit_run"
    if isinstance(coordinator, CoordinatorProcess):
        if ca_cert is not None or insecure or work_dir is not None:
            raise ConfigError(
                f"{owner} takes ca_cert, insecure and work_dir only with an address; "
                "a CoordinatorProcess brings its own."
            )
        coordinator.raise_if_exited("before the run was submitted")
        address = coordinator.addresses.control
        ca_path, insecure = coordinator.ca_cert, coordinator.insecure
        base: Path | None = coordinator.work_dir
    elif isinstance(coordinator, str):
        address = str(_parse_address(coordinator, name="coordinator", owner=owner))
        if insecure and ca_cert is not None:
            raise ConfigError(
                f"{owner} got a CA certificate and insecure=True; pass only one of them."
            )
        ca_path = Path(ca_cert).resolve() if ca_cert is not None else None
        if ca_path is not None and not ca_path.is_file():
            raise ConfigError(f"CA certificate file not found: {ca_path} (ca_cert of {owner}).")
        base = _make_dir(work_dir) if work_dir is not None else None
    else:
        raise param_error(
            "coordinator", owner, "a CoordinatorProcess or a 'host:port' string", coordinator
        )

    connection: dict[str, ConfigValue] = {"address": address}
    if insecure:
        connection["insecure"] = True
    elif ca_path is not None:
        connection["root-certificates"] = str(ca_path)
    config_text = (
        f"[superlink]\ndefault = {_toml_string(CONNECTION_NAME)}\n\n"
        f"[superlink.{CONNECTION_NAME}]\n{to_toml(connection, owner=owner, name='connection')}"
    )
    if base is None:
        with tempfile.TemporaryDirectory(prefix="consortium-flwr-cli-") as tmp:
            home = Path(tmp)
            (home / "config.toml").write_text(config_text, encoding="utf-8")
            yield _CliConnection(home=home, address=address, log_dir=None)
    else:
        home = _make_dir(base / "flwr-cli")
        (home / "config.toml").write_text(config_text, encoding="utf-8")
        yield _CliConnection(home=home, address=address, log_dir=_make_dir(base / "runs"))


def _follow_run(
    cli: _CliConnection, run_id: int, *, stream: bool, deadline: float, timeout: float
) -> tuple[str, str, str]:
    """Stream ``flwr log`` until the run finishes; return (log, status, details).

    ``flwr log --stream`` ends when the SuperLink reports the run finished. If
    the stream breaks earlier (a network error), it is restarted; Flower
    replays the log from the start, so lines already forwarded are skipped.
    """
    forwarded = 0
    log_lines: list[str] = []
    while True:
        log_lines = _stream_log(cli, run_id, deadline=deadline, skip=forwarded if stream else None)
        forwarded = max(forwarded, len(log_lines))
        status, details = _run_status(cli, run_id, deadline=deadline)
        if status.startswith("finished"):
            return "".join(log_lines), status, details
        if time.monotonic() > deadline:
            _stop_run(cli, run_id)
            raise FederationError(
                f"Flower run {run_id} did not finish within {timeout:.0f} s (status '{status}'); "
                f"it was stopped. Last lines of its log:\n{_tail(''.join(log_lines), 30)}"
            )
        time.sleep(1.0)


def _stream_log(
    cli: _CliConnection, run_id: int, *, deadline: float, skip: int | None
) -> list[str]:
    """Run ``flwr log RUN_ID --stream`` until it ends or the deadline passes.

    ``skip`` is the number of leading lines not to forward to the logger
    (``None``: forward nothing).
    """
    command = [str(flower_executable("flwr")), "log", str(run_id), CONNECTION_NAME, "--stream"]
    lines: list[str] = []
    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=_flower_env(cli.home),
        cwd=cli.home,
    ) as proc:

        def read() -> None:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = _strip_ansi(raw.decode("utf-8", errors="replace"))
                lines.append(line)
                if skip is not None and len(lines) > skip and line.strip():
                    logger.info("[run %s] %s", run_id, line.rstrip())

        reader = threading.Thread(target=read, name=f"flwr-log-{run_id}", daemon=True)
        reader.start()
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        reader.join(timeout=5.0)
    return lines


def _run_status(cli: _CliConnection, run_id: int, *, deadline: float) -> tuple[str, str]:
    """The run's ``flwr ls`` status and status details."""
    command = [
        str(flower_executable("flwr")),
        "ls",
        CONNECTION_NAME,
        "--run-id",
        str(run_id),
        "--format",
        "json",
    ]
    listing = _flwr_json(
        cli, command, what=f"query run {run_id}", deadline=max(deadline, time.monotonic() + 30)
    )
    runs = listing.get("runs")
    if not isinstance(runs, list) or not runs or not isinstance(runs[0], dict):
        raise FederationError(f"The coordinator at {cli.address} does not know run {run_id}.")
    return str(runs[0].get("status", "")), str(runs[0].get("status-details", ""))


def _stop_run(cli: _CliConnection, run_id: int) -> None:
    """Ask the coordinator to stop a run (best effort, errors are logged)."""
    command = [
        str(flower_executable("flwr")),
        "stop",
        str(run_id),
        CONNECTION_NAME,
        "--format",
        "json",
    ]
    try:
        _flwr_json(cli, command, what=f"stop run {run_id}", deadline=time.monotonic() + 30)
    except FederationError as err:
        logger.error("Could not stop Flower run %s: %s", run_id, err)


def _flwr_json(
    cli: _CliConnection, command: Sequence[str], *, what: str, deadline: float
) -> dict[str, object]:
    """Run a ``flwr ... --format json`` command and return its JSON answer.

    In JSON mode ``flwr`` reports errors as ``{"success": false,
    "error-message": ...}``, sometimes with exit code 0, so both are checked.
    """
    call_timeout = min(max(deadline - time.monotonic(), 5.0), _CLI_CALL_TIMEOUT)
    try:
        done = subprocess.run(
            list(command),
            capture_output=True,
            stdin=subprocess.DEVNULL,
            env=_flower_env(cli.home),
            cwd=cli.home,
            timeout=call_timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        raise FederationError(
            f"`flwr` did not answer within {call_timeout:.0f} s trying to {what} at {cli.address}."
        ) from err
    stdout = _strip_ansi(done.stdout.decode("utf-8", errors="replace"))
    stderr = _strip_ansi(done.stderr.decode("utf-8", errors="replace"))
    answer = _last_json_object(stdout)
    if answer is None or answer.get("success") is not True or done.returncode != 0:
        message = str(answer.get("error-message", "")).strip() if answer else ""
        parts = [
            f"`flwr` failed to {what} at {cli.address} (exit code {done.returncode}).",
            message,
        ]
        if not message:
            parts.append(_tail(stdout, 10))
        parts.append(_tail(stderr, 10))
        raise FederationError("\n".join(p.rstrip() for p in parts if p.strip()))
    return answer


# --------------------------------------------------------------------------------------
# Helpers: run config, TOML, addresses, environment, processes
# --------------------------------------------------------------------------------------


def _check_run_config(app_dir: Path, run_config: Mapping[str, object]) -> None:
    """Refuse run-config keys the app does not declare (Flower would fail the run)."""
    pyproject = app_dir / "pyproject.toml"
    if not pyproject.is_file():
        raise ConfigError(f"Not a Flower App directory (no pyproject.toml): {app_dir}")
    try:
        with pyproject.open("rb") as handle:
            config = tomllib.load(handle)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"Invalid TOML in {pyproject}: {err}") from err
    declared = _flatten(config.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {}))
    unknown = sorted(set(run_config) - set(declared))
    if unknown:
        raise ConfigError(
            f"Run config key(s) {unknown} are not declared in [tool.flwr.app.config] "
            f"of {pyproject}. Declared keys: {sorted(declared)}."
        )


def _flatten(table: Mapping[str, object], prefix: str = "") -> dict[str, object]:
    """Flatten nested TOML tables to dotted keys, as Flower does for run configs."""
    flat: dict[str, object] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def to_toml(values: Mapping[str, ConfigValue], *, owner: str, name: str) -> str:
    """Render a flat mapping of scalars as TOML ``key = value`` lines.

    Used for ``--node-config``/``--run-config`` files and the CLI connection,
    so values with spaces, quotes or backslashes reach Flower unchanged.

    Raises
    ------
    ConfigError
        If a key is not a bare TOML key (letters, digits, ``-``, ``_``, dots)
        or a value is not a str, int, finite float or bool.
    """
    lines = []
    for key, value in values.items():
        if not isinstance(key, str) or not _CONFIG_KEY.match(key):
            raise param_error(name, owner, "keys made of letters, digits, '-', '_' and '.'", key)
        lines.append(f"{_toml_string(key)} = {_toml_value(value, owner=owner, name=name)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: object, *, owner: str, name: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise param_error(name, owner, "finite numbers", value)
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    raise param_error(name, owner, "values of type str, int, float or bool", value)


def _toml_string(text: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    out = ['"']
    for char in text:
        if char in ('"', "\\"):
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


@dataclass(frozen=True)
class _HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return _format_address(self.host, self.port)


def _parse_address(address: object, *, name: str, owner: str) -> _HostPort:
    """Parse ``host:port`` or ``[ipv6]:port``; port 0 means "pick a free one"."""
    expected = "'host:port' (IPv6 as '[addr]:port'), port in 0..65535"
    if not isinstance(address, str):
        raise param_error(name, owner, expected, address)
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([A-Za-z0-9.-]+):(\d{1,5})", address)
    if not match:
        raise param_error(name, owner, expected, address)
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if port > 65535:
        raise param_error(name, owner, expected, address)
    if match.group(1):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise param_error(name, owner, expected, address) from None
    return _HostPort(host=host, port=port)


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _client_host(bind_host: str) -> str:
    """The address local clients dial for a bind address (wildcards -> loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(bind_host, bind_host)


def _free_port(host: str) -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def flower_executable(name: str) -> Path:
    """Path of a Flower console script installed next to the running Python.

    Raises
    ------
    FederationError
        If flwr is not installed in this environment.
    """
    path = Path(sys.executable).parent / name
    if not path.is_file():
        raise FederationError(
            f"Flower's '{name}' executable was not found next to {sys.executable}; "
            "install the consortium package (it pins flwr 1.42.0) in this environment."
        )
    return path


def _flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower processes: own FLWR_HOME, venv first on PATH.

    Flower daemons start helpers by name (``flower-superexec``), so the
    environment's bin directory must come first on PATH.
    """
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["FLWR_HOME"] = str(flwr_home)
    env.update(_FORCED_ENV)
    return env


def _make_dir(path: str | Path) -> Path:
    directory = Path(path).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _spawn(
    command: list[str], *, work_dir: Path, log_file: Path
) -> tuple[subprocess.Popen[bytes], Path, int]:
    """Start a Flower daemon in its own session, output appended to ``log_file``."""
    log_path = log_file.resolve()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    flwr_home = _make_dir(work_dir / "flwr-home")
    logger.debug("Running %s", " ".join(command))
    with log_path.open("ab") as log_handle:
        offset = log_handle.tell()
        popen = subprocess.Popen(
            command,
            stdout=log_handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=_flower_env(flwr_home),
            cwd=work_dir,
            start_new_session=True,
        )
    return popen, log_path, offset


def _strip_ansi(text: str) -> str:
    return _ANSI_ESCAPE.sub("", text)


def _tail(text: str, lines: int) -> str:
    kept = text.rstrip("\n").splitlines()[-lines:]
    return "\n".join(kept) + "\n" if kept else ""


def _last_json_object(text: str) -> dict[str, object] | None:
    """The JSON object ``flwr --format json`` printed (it may follow other output)."""
    start = text.find("{")
    while start != -1:
        try:
            value = json.loads(text[start:])
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        return value if isinstance(value, dict) else None
    return None


def _tls_error(process: FlowerProcess, err: ssl.SSLCertVerificationError) -> FederationError:
    return FederationError(
        f"TLS verification of {process.name} failed: {err.verify_message or err}. "
        "The server certificate must be signed by the given CA and list the address "
        "clients dial in its SubjectAltName."
    )


# Process tree bookkeeping via /proc (Linux). Elsewhere only the main process is managed.


def _read_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of ``pid`` from /proc, or None if gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[19])


def _process_id(pid: int) -> _ProcessId:
    stat = _read_stat(pid)
    return _ProcessId(pid=pid, start_time=stat[2] if stat else -1)


def _alive(process: _ProcessId) -> bool:
    """Whether this exact process (not a recycled PID) runs and is not a zombie."""
    stat = _read_stat(process.pid)
    if stat is None:
        if not Path("/proc").is_dir():  # no /proc: fall back to a signal probe
            try:
                os.kill(process.pid, 0)
            except OSError:
                return False
            return True
        return False
    state, _, start_time = stat
    return state not in ("Z", "X") and (process.start_time in (-1, start_time))


def _descendants(roots: Sequence[_ProcessId]) -> list[_ProcessId]:
    """All live descendants of ``roots`` (children, grandchildren, ...)."""
    proc = Path("/proc")
    if not proc.is_dir() or not roots:
        return []
    children: dict[int, list[_ProcessId]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        stat = _read_stat(int(entry.name))
        if stat is None or stat[0] in ("Z", "X"):
            continue
        children.setdefault(stat[1], []).append(_ProcessId(pid=int(entry.name), start_time=stat[2]))
    found: list[_ProcessId] = []
    frontier = [r.pid for r in roots]
    while frontier:
        pid = frontier.pop()
        for child in children.get(pid, []):
            if child not in found:
                found.append(child)
                frontier.append(child.pid)
    return found


def _unique(processes: Sequence[_ProcessId]) -> list[_ProcessId]:
    seen: list[_ProcessId] = []
    for process in processes:
        if process not in seen:
            seen.append(process)
    return seen


def _terminate_all(processes: Sequence[_ProcessId], *, grace: float) -> None:
    """SIGTERM each process, wait up to ``grace`` seconds, SIGKILL the rest."""
    for process in processes:
        _signal(process, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(_alive(p) for p in processes) and time.monotonic() < deadline:
        time.sleep(0.05)
    for process in processes:
        if _alive(process):
            logger.debug("Killing leftover Flower helper process %s", process.pid)
            _signal(process, signal.SIGKILL)


def _signal(process: _ProcessId, signum: int) -> None:
    if _alive(process):
        try:
            os.kill(process.pid, signum)
        except ProcessLookupError:
            pass
