"""A real coordinator run (real ClientApp, in-process Grid) published as a bundle that scores like its model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from consortium.cli import main
from consortium.data import federate_institutions, generate_federation, save_split
from consortium.federation.client_app import build_client_app
from consortium.federation.config import FederationConfig
from consortium.federation.coordinator import Coordinator
from consortium.models import build_model, predict_scores, set_parameters
from consortium.registry import RunStore
from consortium.registry.publish import publish_run_model
from consortium.registry.registry import ModelRegistry
from consortium.secagg.inprocess import InProcessGrid

NODES = [11, 22, 33]


@pytest.mark.parametrize("kind", ["mlp", "autoencoder"])
def test_published_bundle_scores_like_the_runs_kept_model(tmp_path: Path, kind: str) -> None:
    fed = generate_federation(3, transactions_per_institution=1_500, seed=5, n_days=30)
    split = federate_institutions({k: v.dataset for k, v in fed.items()}, seed=5)
    root = Path(save_split(split, tmp_path / "inst"))
    dirs = {node: {"data-path": str(root / name), "institution": name}
            for node, name in zip(NODES, split.names(), strict=True)}
    config = FederationConfig(num_rounds=2, min_nodes=3, secure_aggregation=False, model=kind,  # type: ignore[arg-type]
                              store_url=f"sqlite:///{tmp_path}/runs.db", batch_size=128, run_name="real")
    grid = InProcessGrid(build_client_app(disclose_eval_default=True), node_ids=NODES, node_configs=dirs)
    key = Ed25519PrivateKey.generate()
    with RunStore(config.store_url) as store:
        result = Coordinator(config, store=store, holdout=split.holdout).run(grid)
        registry = ModelRegistry(store, tmp_path / "reg", public_key=key.public_key())
        published = publish_run_model(store, registry=registry, private_key=key)
        bundle = registry.verify(published.entry.model_version)
    manifest = bundle.manifest
    assert published.round == result.selected_round and manifest.run_id == result.run_id
    assert manifest.kind == kind and manifest.threshold == pytest.approx(result.threshold)
    assert manifest.feature_names == tuple(result.feature_names)
    assert manifest.metrics["auprc"] == pytest.approx(result.selected.global_metrics["auprc"])
    # Raw holdout rows through the bundle == the run's kept PyTorch model on standardised rows.
    model = build_model(kind, len(result.feature_names), hidden=config.hidden, seed=config.seed)
    set_parameters(model, result.params)
    X = split.holdout.X.astype(np.float32)
    expected = predict_scores(model, result.standardizer.transform(X))
    session = ort.InferenceSession(bundle.onnx_bytes, providers=["CPUExecutionProvider"])
    got = session.run(None, {manifest.input_name: X})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_simulate_and_coordinator_take_the_publish_options() -> None:
    for command in ("simulate", "coordinator"):
        result = CliRunner().invoke(main, [command, "--help"])
        for option in ("--bundle-key", "--registry", "--channel", "--broker", "--registry-url"):
            assert option in result.output, (command, option)

@pytest.mark.parametrize("command", ["simulate", "coordinator"])
def test_bad_publish_options_fail_before_the_run(command: str, tmp_path: Path) -> None:
    extra = ["--insecure"] if command == "coordinator" else []
    result = CliRunner().invoke(main, [command, *extra, "--broker", "mqtt://127.0.0.1:1883"])
    assert result.exit_code == 2 and "--bundle-key" in result.output
    key = tmp_path / "k.pem"
    assert CliRunner().invoke(main, ["registry", "keygen", str(key)]).exit_code == 0
    key.chmod(0o644)
    result = CliRunner().invoke(main, [command, *extra, "--bundle-key", str(key)])
    assert result.exit_code == 2 and "chmod 600" in result.output
    key.chmod(0o600)
    result = CliRunner().invoke(main, [command, *extra, "--bundle-key", str(key), "--broker", "mqtt://h:1"])
    assert result.exit_code == 2 and "--registry-url" in result.output
