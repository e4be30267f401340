"""Security by default: key files 0600, node enrolment, unenrolled/revoked nodes refused (real processes)."""

from __future__ import annotations

import logging
import os
import stat
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from consortium.cli import main
from consortium.errors import ConfigError, FederationError
from consortium.federation.certs import make_local_ca
from consortium.federation.deploy import build_superlink_command, build_supernode_command, start_coordinator, start_node
from consortium.federation.enroll import (
    RefusalWatcher,
    generate_node_key,
    load_enrolled_keys,
    load_node_private_key,
    refusals_in_superlink_log,
    register_nodes,
    revoke_node,
)
from consortium.keyfiles import check_private_key_file, read_private_key_file, write_private_key_file

# ------------------------------------------------------------------ key files


def test_private_key_files_are_written_0600_and_looser_modes_are_refused(tmp_path: Path) -> None:
    path = write_private_key_file(tmp_path / "sub" / "k.pem", b"secret")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_private_key_file(path) == b"secret"
    with pytest.raises(ConfigError, match="already exists"):
        write_private_key_file(path, b"other")
    for mode in (0o640, 0o604, 0o644, 0o660):
        os.chmod(path, mode)
        with pytest.raises(ConfigError, match=rf"mode 0600\). Got mode {mode:04o} instead. Run `chmod 600"):
            check_private_key_file(path, what="test key")
    os.chmod(path, 0o400)
    assert check_private_key_file(path) == path
    with pytest.raises(ConfigError, match="does not exist"):
        check_private_key_file(tmp_path / "missing")
    with pytest.raises(ConfigError, match="regular file"):
        check_private_key_file(tmp_path)


def test_enroll_writes_a_nist_key_pair_and_enrolment_directory_is_checked(tmp_path: Path) -> None:
    key = generate_node_key(tmp_path / "keys", "bank_a")
    assert stat.S_IMODE(key.private_key.stat().st_mode) == 0o600
    assert key.public_key.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert key.fingerprint.startswith("SHA256:")
    assert load_node_private_key(key.private_key) == key.private_key
    with pytest.raises(ConfigError, match="already exists"):
        generate_node_key(tmp_path / "keys", "bank_a")
    with pytest.raises(ConfigError, match="'institution' parameter of generate_node_key"):
        generate_node_key(tmp_path, "../evil")
    # Key material never appears in what is printed for the operator.
    result = CliRunner().invoke(main, ["enroll", "bank_b", "--out", str(tmp_path / "keys")])
    assert result.exit_code == 0, result.output
    private_text = (tmp_path / "keys" / "bank_b.key").read_text()
    assert "PRIVATE KEY" not in result.output and private_text.splitlines()[1] not in result.output
    assert "Fingerprint: SHA256:" in result.output

    enrolled_dir = tmp_path / "enrolled"
    enrolled_dir.mkdir()
    with pytest.raises(ConfigError, match=r"holds no '<institution>.pub' file"):
        load_enrolled_keys(enrolled_dir)
    (enrolled_dir / "bank_a.pub").write_bytes(key.public_key.read_bytes())
    assert load_enrolled_keys(enrolled_dir) == {"bank_a": enrolled_dir / "bank_a.pub"}
    (enrolled_dir / "bank_c.pub").write_bytes(key.public_key.read_bytes())
    with pytest.raises(ConfigError, match="enrolled as both 'bank_a' and 'bank_c'"):
        load_enrolled_keys(enrolled_dir)
    (enrolled_dir / "bank_c.pub").write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ+bad\n")
    with pytest.raises(ConfigError, match="bank_c.pub must hold one OpenSSH public key"):
        load_enrolled_keys(enrolled_dir)


def test_world_readable_node_key_is_refused_before_any_process_starts(tmp_path: Path) -> None:
    key = generate_node_key(tmp_path, "bank_a")
    os.chmod(key.private_key, 0o644)
    ca = make_local_ca(tmp_path / "certs").ca_cert
    with pytest.raises(ConfigError, match="mode 0600"):
        start_node(fleet_address="127.0.0.1:9", ca_cert=ca, data_path=tmp_path, institution="bank_a",
                   work_dir=tmp_path / "n", auth_key=key.private_key)
    assert not (tmp_path / "n").exists()
    certs = make_local_ca(tmp_path / "certs2")
    os.chmod(certs.server_key, 0o644)
    with pytest.raises(ConfigError, match="coordinator TLS key"):
        start_coordinator(certs=certs, work_dir=tmp_path / "c")


def test_auth_flags_reach_flower_and_need_tls(tmp_path: Path) -> None:
    certs = make_local_ca(tmp_path / "certs")
    assert "--enable-supernode-auth" in build_superlink_command(host="h", port=1, certs=certs, node_auth=True)
    assert "--enable-supernode-auth" not in build_superlink_command(host="h", port=1, certs=certs)
    cmd = build_supernode_command(fleet_address="h:1", ca_cert=certs.ca_cert, insecure=False,
                                  node_config_file=tmp_path / "c.toml", runtime_host="127.0.0.1",
                                  runtime_port=2, auth_key=tmp_path / "k")
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(tmp_path / "k")
    with pytest.raises(ConfigError, match="node authentication needs TLS"):
        start_coordinator(certs=None, insecure=True, node_auth=True, work_dir=tmp_path)


def test_cli_is_secure_by_default_and_insecure_warns(tmp_path: Path) -> None:
    certs = make_local_ca(tmp_path / "certs")
    runner = CliRunner()
    result = runner.invoke(main, ["coordinator", "--certs", str(certs.ca_cert.parent)])
    assert result.exit_code == 2 and "--enrolled DIR" in result.output
    result = runner.invoke(main, ["node", "--data", str(tmp_path), "--institution", "bank_a",
                                  "--ca-cert", str(certs.ca_cert)])
    assert result.exit_code == 2 and "Give --key" in result.output
    result = runner.invoke(main, ["node", "--data", str(tmp_path), "--institution", "bank_a", "--insecure",
                                  "--ca-cert", str(certs.ca_cert)])
    assert "WARNING: --insecure" in result.output


def test_refusals_are_read_from_the_superlink_log() -> None:
    log = (
        "ERROR :     [/v1/fleet/activate-node][ApiError:2004] Attempted to register SuperNode with public key: "
        "b'-----BEGIN PUBLIC KEY-----\\nnot a key\\n-----END PUBLIC KEY-----\\n', exception: No SuperNode\n"
        '2026 INFO [uvicorn.access] 127.0.0.1:1 - "POST /v1/fleet/pull-messages HTTP/1.1" 401\n'
        '2026 INFO [uvicorn.access] 127.0.0.1:1 - "POST /v1/fleet/deactivate-node HTTP/1.1" 401\n'
        '2026 INFO [uvicorn.access] 127.0.0.1:1 - "POST /v1/fleet/pull-messages HTTP/1.1" 200\n'
    )
    assert refusals_in_superlink_log(log) == [
        "Refused a node: public key unreadable key is not enrolled (or was revoked).",
        "Refused a node request (/v1/fleet/pull-messages): its key is not or no longer enrolled "
        "(revoked while connected).",
    ]


# ------------------------------------------------------------------ real processes


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_only_enrolled_nodes_join_and_a_revoked_node_is_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="consortium.federation.enroll")
    certs = make_local_ca(tmp_path / "certs")
    enrolled_key = generate_node_key(tmp_path / "keys", "bank_a")
    stranger_key = generate_node_key(tmp_path / "keys", "bank_b")
    with start_coordinator(certs=certs, work_dir=tmp_path / "coord", node_auth=True) as coordinator:
        coordinator.wait_ready(timeout=60)
        ids = register_nodes(coordinator, {"bank_a": enrolled_key.public_key})
        common = {"fleet_address": coordinator.addresses.fleet, "ca_cert": certs.ca_cert, "data_path": tmp_path}
        with RefusalWatcher(coordinator, interval=0.2) as watcher, \
                start_node(institution="bank_a", work_dir=tmp_path / "a", auth_key=enrolled_key.private_key,
                           **common) as node_a, \
                start_node(institution="bank_b", work_dir=tmp_path / "b", auth_key=stranger_key.private_key,
                           **common) as node_b:
            assert node_a.wait_ready(timeout=60) == ids["bank_a"]
            # The unenrolled node: refused, with its fingerprint on both sides.
            with pytest.raises(FederationError, match="refused institution 'bank_b'") as refused:
                node_b.wait_ready(timeout=60)
            assert stranger_key.fingerprint in str(refused.value)
            deadline = time.monotonic() + 20
            while not any(stranger_key.fingerprint in r for r in watcher.refusals) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert any(stranger_key.fingerprint in r and "not enrolled" in r for r in watcher.refusals)
            # Revoking the enrolled node: its next request is refused and it leaves.
            revoke_node(coordinator, ids["bank_a"], institution="bank_a")
            deadline = time.monotonic() + 30
            while node_a.is_running() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not node_a.is_running()
            assert "left the federation" in node_a.exit_explanation()
            deadline = time.monotonic() + 10
            while not any("revoked while connected" in r for r in watcher.refusals) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert any("revoked while connected" in r for r in watcher.refusals)
            # Restarted with the revoked key, the node is refused at once.
            with start_node(institution="bank_a", work_dir=tmp_path / "a2", auth_key=enrolled_key.private_key,
                            **common) as again, pytest.raises(FederationError, match="not enrolled or was revoked"):
                again.wait_ready(timeout=60)
    assert "Refused a node: public key " + stranger_key.fingerprint in caplog.text
    # No key material in the logs.
    for path in (coordinator.log_file, tmp_path / "a" / "supernode.log"):
        assert "PRIVATE KEY" not in path.read_text()
    assert "PRIVATE KEY" not in caplog.text
