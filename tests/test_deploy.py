"""Deployed federation: local CA, SuperLink + SuperNodes as processes, `flwr run`.

The end-to-end tests start real Flower 1.42 processes on 127.0.0.1 (free ports
picked at run time) and submit a small toy Flower App written into a temporary
directory, so they do not depend on the consortium ServerApp/ClientApp.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from consortium.errors import ConfigError, DataError, FederationError
from consortium.federation.certs import CertificatePaths, make_local_ca
from consortium.federation.deploy import (
    CONSORTIUM_APP_DIR,
    CoordinatorProcess,
    FlowerProcess,
    start_coordinator,
    start_node,
    submit_run,
    to_toml,
)

# ----------------------------------------------------------------------------------
# The toy Flower App: 3 rounds of "train" messages carrying a numpy ArrayRecord; the
# ServerApp averages the replies and writes what it saw to `result-path`.
# ----------------------------------------------------------------------------------

TOY_PYPROJECT = """\
[project]
name = "toyapp"
version = "1.0.0"
description = "Toy app for consortium deployment tests"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "consortium-tests"

[tool.flwr.app.components]
serverapp = "toy_server:app"
clientapp = "toy_client:app"

[tool.flwr.app.config]
num-rounds = 1
min-nodes = 1
result-path = ""
"""

TOY_SERVER = """\
import json
import time

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    num_rounds = int(context.run_config["num-rounds"])
    min_nodes = int(context.run_config["min-nodes"])
    deadline = time.monotonic() + 60
    while len(list(grid.get_node_ids())) < min_nodes:
        if time.monotonic() > deadline:
            raise RuntimeError(f"fewer than {min_nodes} nodes connected")
        time.sleep(0.2)
    node_ids = sorted(grid.get_node_ids())
    weights = np.zeros(4)
    rounds = []
    for server_round in range(1, num_rounds + 1):
        content = RecordDict(
            {"arrays": ArrayRecord([weights]), "config": ConfigRecord({"round": server_round})}
        )
        messages = [
            Message(content, dst_node_id=node, message_type="train", group_id=str(server_round))
            for node in node_ids
        ]
        replies = list(grid.send_and_receive(messages, timeout=60))
        good = [m for m in replies if m.has_content()]
        if not good:
            raise RuntimeError(f"no replies in round {server_round}")
        weights = np.mean([m.content["arrays"].to_numpy_ndarrays()[0] for m in good], axis=0)
        rounds.append(
            {
                "round": server_round,
                "replies": [
                    {
                        "node-id": m.metadata.src_node_id,
                        "institution": m.content["config"]["institution"],
                        "data-path": m.content["config"]["data-path"],
                        "round": m.content["config"]["round"],
                    }
                    for m in good
                ],
                "errors": [str(m.error) for m in replies if m.has_error()],
            }
        )
        print(f"toy round {server_round}: {len(good)} replies", flush=True)
    with open(context.run_config["result-path"], "w") as handle:
        json.dump({"rounds": rounds, "weights": weights.tolist()}, handle)
"""

TOY_CLIENT = """\
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    weights = msg.content["arrays"].to_numpy_ndarrays()[0]
    config = ConfigRecord(
        {
            "institution": str(context.node_config["institution"]),
            "data-path": str(context.node_config["data-path"]),
            "round": int(msg.content["config"]["round"]),
        }
    )
    content = RecordDict({"arrays": ArrayRecord([weights + 1.0]), "config": config})
    return Message(content, reply_to=msg)
"""


@pytest.fixture(scope="module")
def toy_app(tmp_path_factory: pytest.TempPathFactory) -> Path:
    app_dir = tmp_path_factory.mktemp("toy") / "toyapp"
    app_dir.mkdir()
    (app_dir / "pyproject.toml").write_text(TOY_PYPROJECT)
    (app_dir / "toy_server.py").write_text(TOY_SERVER)
    (app_dir / "toy_client.py").write_text(TOY_CLIENT)
    return app_dir


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertificatePaths:
    return make_local_ca(tmp_path_factory.mktemp("certs"))


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live (non-zombie) process."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


# ----------------------------------------------------------------------------------
# certs
# ----------------------------------------------------------------------------------


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_server_certificate_chains_to_the_ca_and_names_the_hosts(tmp_path: Path) -> None:
    paths = make_local_ca(
        tmp_path / "pki", hosts=("127.0.0.1", "localhost", "coord.example", "::1"), days=30
    )
    ca, server = _load(paths.ca_cert), _load(paths.server_cert)

    server.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "coord.example"}
    lifetime = server.not_valid_after_utc - server.not_valid_before_utc
    assert dt.timedelta(days=30) <= lifetime <= dt.timedelta(days=30, hours=1)


def test_tls_handshake_to_127_0_0_1_verifies_against_the_ca(tmp_path: Path) -> None:
    paths = make_local_ca(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(paths.server_cert, paths.server_key)
    client_ctx = ssl.create_default_context(cafile=str(paths.ca_cert))
    other_ctx = ssl.create_default_context(cafile=str(make_local_ca(tmp_path / "other").ca_cert))

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(2)
        port = listener.getsockname()[1]

        def serve() -> None:
            for _ in range(2):
                conn, _ = listener.accept()
                try:
                    with server_ctx.wrap_socket(conn, server_side=True) as tls:
                        tls.sendall(b"ok")
                except (ssl.SSLError, OSError):
                    pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with client_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                assert tls.recv(2) == b"ok"
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with pytest.raises(ssl.SSLCertVerificationError):
                other_ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        thread.join(timeout=5)


def test_private_key_is_readable_by_owner_only(tmp_path: Path) -> None:
    paths = make_local_ca(tmp_path)
    assert stat.S_IMODE(paths.server_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(paths.ca_cert.stat().st_mode) & 0o077 == 0o044
    assert b"PRIVATE KEY" in paths.server_key.read_bytes()
    assert not list(tmp_path.glob("ca.key")), "the CA key must not be kept"


def test_existing_files_are_not_overwritten_unless_asked(tmp_path: Path) -> None:
    first = make_local_ca(tmp_path)
    original = first.ca_cert.read_bytes()
    with pytest.raises(ConfigError, match="Refusing to overwrite .*ca.crt"):
        make_local_ca(tmp_path)
    assert first.ca_cert.read_bytes() == original

    second = make_local_ca(tmp_path, overwrite=True)
    assert second.ca_cert.read_bytes() != original
    assert stat.S_IMODE(second.server_key.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"days": 0}, "'days' parameter of make_local_ca"),
        ({"hosts": ()}, "'hosts' parameter"),
        ({"hosts": "127.0.0.1"}, "'hosts' parameter"),
        ({"hosts": ("bad host",)}, "Got 'bad host'"),
    ],
)
def test_invalid_arguments_are_refused(
    tmp_path: Path, kwargs: dict[str, object], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        make_local_ca(tmp_path, **kwargs)  # type: ignore[arg-type]
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------------
# deploy: validation without processes
# ----------------------------------------------------------------------------------


def test_consortium_app_template_declares_every_federation_config_key() -> None:
    from consortium.federation.config import FederationConfig

    with (CONSORTIUM_APP_DIR / "pyproject.toml").open("rb") as handle:
        app = tomllib.load(handle)["tool"]["flwr"]["app"]
    assert app["components"] == {
        "serverapp": "consortium.federation.server_app:app",
        "clientapp": "consortium.federation.client_app:app",
    }
    from consortium.models.gbdt import GBDTParams  # noqa: PLC0415

    assert app["config"] == {**FederationConfig().to_run_config(), **GBDTParams().to_config()}


def test_to_toml_round_trips_awkward_values() -> None:
    values: dict[str, str | int | float | bool] = {
        "data-path": 'C:\\data\\bank "a"\n/x\'s',
        "institution": "Crédit Agricole",
        "ratio": 1e-5,
        "rounds": 3,
        "flag": False,
        "nested.key": "x",
    }
    assert tomllib.loads(to_toml(values, owner="t", name="cfg")) == {
        "data-path": values["data-path"],
        "institution": "Crédit Agricole",
        "ratio": 1e-5,
        "rounds": 3,
        "flag": False,
        "nested.key": "x",
    }
    with pytest.raises(ConfigError, match="finite"):
        to_toml({"x": float("nan")}, owner="t", name="cfg")
    with pytest.raises(ConfigError, match="keys made of"):
        to_toml({"bad key": 1}, owner="t", name="cfg")
    with pytest.raises(ConfigError, match="str, int, float or bool"):
        to_toml({"x": [1, 2]}, owner="t", name="cfg")  # type: ignore[dict-item]


def test_submit_run_refuses_keys_the_app_does_not_declare(toy_app: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"\['num-round'\] are not declared .*Declared keys: \['min-nodes'"
    ):
        submit_run(
            "127.0.0.1:1", run_config={"num-round": 3}, app_dir=toy_app, timeout=10, insecure=True
        )
    with pytest.raises(ConfigError, match="no pyproject.toml"):
        submit_run("127.0.0.1:1", app_dir=toy_app.parent, timeout=10, insecure=True)


def test_coordinator_needs_certificates_or_explicit_insecure(
    tmp_path: Path, certs: CertificatePaths
) -> None:
    with pytest.raises(ConfigError, match="needs TLS certificates"):
        start_coordinator(certs=None, work_dir=tmp_path)
    with pytest.raises(ConfigError, match="both certificates and insecure"):
        start_coordinator(certs=certs, insecure=True, work_dir=tmp_path)
    missing = CertificatePaths.in_directory(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="not found: .*nowhere/ca.crt"):
        start_coordinator(certs=missing, work_dir=tmp_path)
    with pytest.raises(ConfigError, match="'fleet_address' parameter of start_coordinator"):
        start_coordinator(certs=certs, fleet_address="127.0.0.1", work_dir=tmp_path)


def test_node_arguments_are_checked_before_starting(
    tmp_path: Path, certs: CertificatePaths
) -> None:
    common = {"fleet_address": "127.0.0.1:9", "ca_cert": certs.ca_cert, "work_dir": tmp_path}
    with pytest.raises(DataError, match="bank_a.*does not exist: .*missing.csv"):
        start_node(data_path=tmp_path / "missing.csv", institution="bank_a", **common)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="may not set 'institution'"):
        start_node(
            data_path=tmp_path,
            institution="bank_a",
            extra_node_config={"institution": "x"},
            **common,  # type: ignore[arg-type]
        )
    with pytest.raises(ConfigError, match="'institution' parameter"):
        start_node(data_path=tmp_path, institution="  ", **common)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="CA certificate file not found"):
        start_node(
            fleet_address="127.0.0.1:9",
            ca_cert=tmp_path / "nope.crt",
            data_path=tmp_path,
            institution="bank_a",
            work_dir=tmp_path,
        )


def test_stop_also_ends_helpers_that_outlive_their_parent(tmp_path: Path) -> None:
    # A daemon that starts a helper in a new session (as flower-superlink does with
    # flower-superexec); the helper ignores its parent's death.
    script = (
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'],"
        " start_new_session=True)\n"
        "print('helper started', flush=True)\n"
        "time.sleep(120)\n"
    )
    log_file = tmp_path / "daemon.log"
    with log_file.open("ab") as log:
        popen = subprocess.Popen(
            [sys.executable, "-c", script], stdout=log, stderr=subprocess.STDOUT
        )
    process = FlowerProcess(
        name="daemon", popen=popen, log_file=log_file, log_offset=0, work_dir=tmp_path
    )
    deadline = time.monotonic() + 30
    while len(process.process_ids()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    pids = process.process_ids()
    assert len(pids) == 2 and pids[0] == popen.pid

    assert process.stop(timeout=5) == -signal.SIGTERM
    assert [pid for pid in pids if _running(pid)] == []
    assert "helper started" in process.log_text()


# ----------------------------------------------------------------------------------
# deploy: real processes
# ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_three_nodes_complete_three_rounds_over_tls(
    tmp_path: Path, certs: CertificatePaths, toy_app: Path
) -> None:
    institutions = ("bank-a", "bank-b", "bank-c")
    data_paths = {}
    for name in institutions:
        data_paths[name] = tmp_path / "data" / f"{name}.csv"
        data_paths[name].parent.mkdir(exist_ok=True)
        data_paths[name].write_text("amount,label\n1.0,0\n")
    result_path = tmp_path / "result.json"
    seen_pids: set[int] = set()

    coordinator = start_coordinator(certs=certs, work_dir=tmp_path / "coordinator")
    nodes: list[FlowerProcess] = []
    with coordinator:
        coordinator.wait_ready(timeout=60)
        assert coordinator.addresses.fleet.startswith("127.0.0.1:")
        assert not coordinator.addresses.fleet.endswith(":0")
        try:
            for name in institutions:
                nodes.append(
                    start_node(
                        fleet_address=coordinator.addresses.fleet,
                        ca_cert=certs.ca_cert,
                        data_path=data_paths[name],
                        institution=name,
                        work_dir=tmp_path / name,
                        extra_node_config={"disclose-eval": True},
                    )
                )
            node_ids = {node.institution: node.wait_ready(timeout=60) for node in nodes}  # type: ignore[attr-defined]
            outcome = submit_run(
                coordinator,
                run_config={"num-rounds": 3, "min-nodes": 3, "result-path": str(result_path)},
                app_dir=toy_app,
                timeout=150,
            )
            seen_pids.update(coordinator.process_ids())
            for node in nodes:
                seen_pids.update(node.process_ids())
        finally:
            for node in nodes:
                node.stop()

    outcome.raise_for_status()
    assert outcome.succeeded and outcome.status == "finished:completed"
    assert outcome.log_file is not None and outcome.log_file.read_text() == outcome.log
    assert "toy round 3: 3 replies" in outcome.log

    result = json.loads(result_path.read_text())
    assert [r["round"] for r in result["rounds"]] == [1, 2, 3]
    for server_round in result["rounds"]:
        assert server_round["errors"] == []
        replies = server_round["replies"]
        assert sorted(r["institution"] for r in replies) == list(institutions)
        assert {r["round"] for r in replies} == {server_round["round"]}
        for reply in replies:
            assert reply["node-id"] == node_ids[reply["institution"]]
            assert reply["data-path"] == str(data_paths[reply["institution"]].resolve())
    assert result["weights"] == [3.0, 3.0, 3.0, 3.0]  # three averaged rounds of +1

    # SuperLink, 3 SuperNodes and their SuperExec helpers were all tracked ...
    assert {coordinator.pid, *(node.pid for node in nodes)} <= seen_pids
    assert len(seen_pids) >= 2 * (1 + len(nodes))
    # ... and none of them is left running.
    assert [pid for pid in seen_pids if _running(pid)] == []
    assert not coordinator.is_running() and all(not node.is_running() for node in nodes)


@pytest.fixture(scope="module")
def tls_coordinator(
    tmp_path_factory: pytest.TempPathFactory, certs: CertificatePaths
) -> Iterator[CoordinatorProcess]:
    with start_coordinator(certs=certs, work_dir=tmp_path_factory.mktemp("coord")) as coordinator:
        coordinator.wait_ready(timeout=60)
        yield coordinator


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("trust", ["wrong-ca", "system-store"])
def test_node_that_cannot_verify_the_coordinator_fails_fast_and_clearly(
    tmp_path: Path, tls_coordinator: CoordinatorProcess, trust: str
) -> None:
    ca_cert = make_local_ca(tmp_path / "other-ca").ca_cert if trust == "wrong-ca" else None
    node = start_node(
        fleet_address=tls_coordinator.addresses.fleet,
        ca_cert=ca_cert,
        data_path=tmp_path,
        institution="mallory",
        work_dir=tmp_path / "node",
    )
    with node:
        # A generous bound: the failure must come from TLS, not from the bound running out.
        with pytest.raises(FederationError) as excinfo:
            node.wait_ready(timeout=60)
    message = str(excinfo.value)
    assert "SuperNode 'mallory' exited with code 1 before connecting" in message
    assert "CERTIFICATE_VERIFY_FAILED" in message
    assert "Failed to initialize the connection to the SuperLink" in message
    assert not node.is_running()
    assert tls_coordinator.is_running()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_coordinator_that_cannot_bind_reports_its_log(
    tmp_path: Path, certs: CertificatePaths
) -> None:
    with socket.socket() as occupied:
        occupied.bind(("127.0.0.1", 0))
        occupied.listen(1)
        port = occupied.getsockname()[1]
        with start_coordinator(
            certs=certs, fleet_address=f"127.0.0.1:{port}", work_dir=tmp_path
        ) as coordinator:
            with pytest.raises(
                FederationError,
                match=r"(?s)exited with code \d+ before it was ready.*address already in use",
            ):
                coordinator.wait_ready(timeout=60)
    assert (tmp_path / "superlink.log").is_file()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_insecure_coordinator_only_when_asked_and_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="consortium.federation.deploy"):
        coordinator = start_coordinator(certs=None, insecure=True, work_dir=tmp_path)
    with coordinator:
        coordinator.wait_ready(timeout=60)
        assert coordinator.ca_cert is None
    assert any("WITHOUT TLS" in r.getMessage() for r in caplog.records)
    assert not coordinator.is_running()
