"""ONNX export: the graph (with preprocessing) scores like the PyTorch model to 1e-5 on 10k rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from torch import nn

from consortium.errors import ConfigError
from consortium.models import FeatureStats, build_model, predict_scores
from consortium.registry.bundle import read_bundle
from consortium.registry.export import export_bundle, export_onnx, feature_specs

N_ROWS = 10_000
D = 12


def _session(onnx_bytes: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def raw_data() -> np.ndarray:
    rng = np.random.default_rng(7)
    # Raw, unstandardised columns of very different scales, as transactions have.
    scales = np.geomspace(0.01, 5_000.0, D)
    offsets = np.linspace(-50, 3_000, D)
    return (rng.standard_normal((N_ROWS, D)) * scales + offsets).astype(np.float32)


def _trained_like(kind: str, seed: int) -> nn.Module:
    model = build_model(kind, D, hidden=(64, 32) if kind == "mlp" else (16, 4), seed=seed)
    with torch.no_grad():  # non-trivial weights, as after training
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("kind", ["mlp", "autoencoder"])
def test_onnx_scores_equal_pytorch_on_10k_rows(kind: str, raw_data: np.ndarray) -> None:
    standardizer = FeatureStats.from_data(raw_data).standardizer()
    model = _trained_like(kind, seed=3)
    expected = predict_scores(model, standardizer.transform(raw_data))
    got = _session(export_onnx(model, standardizer)).run(["score"], {"input": raw_data})[0]
    assert got.shape == (N_ROWS,) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    if kind == "mlp":
        assert np.all((got >= 0) & (got <= 1))
        assert expected.std() > 0.05  # scores are spread out, not all saturated
    else:
        assert np.all(got >= 0)


@pytest.mark.parametrize("kind", ["mlp", "autoencoder"])
def test_missing_values_score_as_the_training_mean(kind: str, raw_data: np.ndarray) -> None:
    standardizer = FeatureStats.from_data(raw_data).standardizer()
    model = _trained_like(kind, seed=5)
    rows = raw_data[:50].copy()
    missing = np.zeros_like(rows, dtype=bool)
    missing[:, [1, 4]] = True
    missing[::3, 7] = True
    rows_with_nan = np.where(missing, np.nan, rows).astype(np.float32)
    rows_with_nan[0, 2] = np.inf
    imputed = np.where(missing, standardizer.mean, rows).astype(np.float32)
    imputed[0, 2] = standardizer.mean[2]
    expected = predict_scores(model, standardizer.transform(imputed))
    got = _session(export_onnx(model, standardizer)).run(None, {"input": rows_with_nan})[0]
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_export_bundle_manifest_has_every_field(tmp_path: Path, raw_data: np.ndarray) -> None:
    stats = FeatureStats.from_data(raw_data)
    standardizer = stats.standardizer()
    key = Ed25519PrivateKey.generate()
    names = [f"f{i}" for i in range(D)]
    path = export_bundle(
        tmp_path / "m.bundle",
        model=_trained_like("mlp", seed=1),
        standardizer=standardizer,
        feature_names=names,
        threshold=0.42,
        model_version="fraud-r7",
        parent_version="fraud-r6",
        run_id="abc123",
        metrics={"auprc": 0.8, "roc-auc": float("nan")},
        privacy={"epsilon": 2.5, "delta": 1e-5, "mechanism": "dp-sgd"},
        private_key=key,
    )
    manifest = read_bundle(path, public_key=key.public_key()).manifest
    data = manifest.to_dict()
    for field in ("format_version", "model_version", "parent_version", "kind", "features", "input_name",
                  "output_name", "thresholds", "run_id", "metrics", "privacy", "created_at", "files", "extra"):
        assert data[field] not in (None, {}, [], ""), field
    assert manifest.kind == "mlp" and manifest.threshold == pytest.approx(0.42)
    assert manifest.feature_names == tuple(names)
    assert manifest.metrics == {"auprc": 0.8}  # NaN left out
    # Ranges come from the federated statistics (mean ± 4 std of the pooled data).
    mean = stats.sum / stats.count
    std = np.sqrt(stats.sumsq / stats.count - mean**2)
    for spec, m, s in zip(manifest.features, mean, std, strict=True):
        assert spec.min == pytest.approx(m - 4 * s, rel=1e-4, abs=1e-4)
        assert spec.max == pytest.approx(m + 4 * s, rel=1e-4, abs=1e-4)


def test_unsupported_layers_and_mismatches_are_refused(raw_data: np.ndarray) -> None:
    standardizer = FeatureStats.from_data(raw_data).standardizer()

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.Sequential(nn.Linear(D, 4), nn.Tanh(), nn.Linear(4, 1))

    with pytest.raises(ConfigError, match="Tanh is not supported"):
        export_onnx(Odd(), standardizer)
    with pytest.raises(ConfigError, match="expects 5 inputs"):
        export_onnx(build_model("mlp", 5), standardizer)
    with pytest.raises(ConfigError, match="feature_names"):
        feature_specs(["a"], standardizer)
