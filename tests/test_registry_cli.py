"""``consortium registry ...`` and ``consortium simulate --bundle-key``: the operator's path end to end."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from consortium.cli import main
from consortium.registry import RunStore
from consortium.registry.bundle import read_bundle
from consortium.registry.signing import load_public_key
from consortium.registry.testing import record_run


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


@pytest.mark.parametrize("sub", ["keygen", "publish", "add", "list", "show", "promote", "export", "verify", "serve"])
def test_help(sub: str) -> None:
    code, output = run("registry", sub, "--help")
    assert code == 0 and "Usage" in output


def test_registry_commands(tmp_path: Path) -> None:
    store_url = f"sqlite:///{tmp_path}/runs.db"
    with RunStore(store_url) as store:
        run1, _ = record_run(store)
        run2, _ = record_run(store)
    key = tmp_path / "signing.pem"
    common = ["--store", store_url, "--registry", str(tmp_path / "reg")]

    code, out = run("registry", "keygen", str(key))
    assert code == 0 and "fingerprint" in out and stat.S_IMODE(key.stat().st_mode) == 0o600
    code, out = run("registry", "keygen", str(key))
    assert code == 2 and "Refusing to overwrite" in out

    os.chmod(key, 0o644)
    code, out = run("registry", "publish", "--bundle-key", str(key), *common)
    assert code == 2 and "chmod 600" in out and "PRIVATE" not in out
    os.chmod(key, 0o600)

    code, out = run("registry", "publish", "--bundle-key", str(key), "--run-id", run1, *common)
    assert code == 0, out
    v1 = f"simulate-synthetic-{run1[:8]}-r2"
    code, out = run("registry", "publish", "--bundle-key", str(key), "--round", "3", *common)  # newest run
    assert code == 0, out
    v2 = f"simulate-synthetic-{run2[:8]}-r3"

    code, out = run("registry", "list", *common)
    assert code == 0 and out.index(v1) < out.index(v2) and f"* {v2}" in out
    code, out = run("registry", "list", "--json", *common)
    assert [e["model_version"] for e in json.loads(out)] == [v1, v2]
    code, out = run("registry", "show", v2, *common)
    assert json.loads(out)["parent_version"] == v1

    code, out = run("registry", "promote", v1, *common)  # roll back
    assert code == 0 and f"* {v1}" in out
    code, out = run("registry", "list", *common)
    assert f"* {v1}" in out and f"  {v2}" in out

    pub = f"{key}.pub"
    code, out = run("registry", "verify", v1, "--public-key", pub, *common)
    assert code == 0 and out.startswith(f"OK {v1}")
    code, out = run("registry", "export", v1, str(tmp_path), *common)
    exported = Path(out.strip())
    assert code == 0 and exported == tmp_path / f"{v1}.bundle"
    code, out = run("registry", "verify", "--file", str(exported), "--public-key", pub)
    assert code == 0 and "OK" in out

    # No key material in the run store, the registry's files or the bundles.
    body = "".join(line for line in key.read_text().splitlines() if not line.startswith("-----"))
    raw = __import__("base64").b64decode(body)
    for path in [*sorted(tmp_path.glob("runs.db*")), *sorted((tmp_path / "reg").iterdir())]:
        data = path.read_bytes()
        assert body.encode() not in data and raw not in data and raw[-32:] not in data, path

    # A bundle from elsewhere: added to another registry, checked against the key.
    other = ["--store", f"sqlite:///{tmp_path}/other.db", "--registry", str(tmp_path / "reg2")]
    code, out = run("registry", "add", str(exported), "--channel", "canary", "--promote", "--public-key", pub, *other)
    assert code == 0 and f"* {v1}" in out and "canary" in out

    # Tampering and wrong keys end in one line naming the problem, exit 2.
    exported.write_bytes(exported.read_bytes()[:-10])
    code, out = run("registry", "verify", "--file", str(exported), "--public-key", pub)
    assert code == 2 and out.startswith("error:") and "not a bundle archive" in out
    run("registry", "keygen", str(tmp_path / "other.pem"))
    code, out = run("registry", "verify", v1, "--public-key", str(tmp_path / "other.pem.pub"), *common)
    assert code == 2 and "wrong key" in out
    code, out = run("registry", "show", "nope", *common)
    assert code == 2 and "not in the registry" in out
    code, out = run("registry", "promote", v1, "--broker", "mqtt://127.0.0.1:1883", *common)
    assert code == 2 and "--registry-url" in out


def test_registry_serve_runs_as_a_process(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    store_url = f"sqlite:///{tmp_path}/runs.db"
    key = tmp_path / "k.pem"
    assert run("registry", "keygen", str(key))[0] == 0
    with RunStore(store_url) as store:
        record_run(store)
    common = ["--store", store_url, "--registry", str(tmp_path / "reg")]
    assert run("registry", "publish", "--bundle-key", str(key), *common)[0] == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "consortium.cli", "registry", "serve", "--port", str(port), *common],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/models", timeout=5) as r:  # noqa: S310
                    models = json.loads(r.read())["models"]
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
                time.sleep(0.2)
        version = models[0]["model_version"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/models/{version}/bundle", timeout=5) as r:  # noqa: S310
            data = r.read()
        assert read_bundle(data, public_key=load_public_key(Path(f"{key}.pub"))).manifest.model_version == version
    finally:
        proc.terminate()
        proc.wait(timeout=20)
