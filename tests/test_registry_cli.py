"""``consortium registry ...`` and ``consortium simulate --bundle-key``: the operator's path end to end."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import onnxruntime as ort
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
    for path in [tmp_path / "runs.db", *sorted((tmp_path / "reg").iterdir())]:
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


@pytest.mark.slow
def test_simulate_publishes_a_bundle_that_scores_like_the_run(tmp_path: Path) -> None:
    key = tmp_path / "signing.pem"
    assert run("registry", "keygen", str(key))[0] == 0
    store_url = f"sqlite:///{tmp_path}/runs.db"
    code, out = run(
        "simulate", "--institutions", "3", "--transactions", "3000", "--rounds", "1", "--no-secure-aggregation",
        "--no-baselines", "--store", store_url, "--bundle-key", str(key), "--registry", str(tmp_path / "reg"),
    )
    assert code == 0, out
    assert "signed and registered" in out
    with RunStore(store_url) as store:
        run_record = store.list_runs()[0]
        from consortium.registry.registry import ModelRegistry

        registry = ModelRegistry(store, tmp_path / "reg", public_key=load_public_key(Path(f"{key}.pub")))
        entry = registry.promoted()
        assert entry is not None and entry.run_id == run_record.run_id
        bundle = read_bundle(entry.path, public_key=registry.public_key)  # type: ignore[arg-type]
        manifest = bundle.manifest
        assert manifest.feature_names == tuple(run_record.config["feature-names"])
        assert "auprc" in manifest.metrics and 0 < manifest.threshold < 1
        session = ort.InferenceSession(bundle.onnx_bytes, providers=["CPUExecutionProvider"])
        rows = np.random.default_rng(0).standard_normal((100, len(manifest.features))).astype(np.float32)
        scores = session.run(None, {manifest.input_name: rows})[0]
        assert scores.shape == (100,) and np.all((scores >= 0) & (scores <= 1))
