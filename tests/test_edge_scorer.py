"""The ONNX scorer: the pre-bound single-row path equals a plain InferenceSession.run, row after row."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from consortium.edge.scorer import OnnxScorer
from consortium.edge.testing import feature_names, mlp_onnx, mlp_weights
from consortium.errors import ConfigError

D = 30


@pytest.fixture(scope="module")
def model() -> bytes:
    return mlp_onnx(mlp_weights(D, (64, 32), seed=1))


def test_single_row_path_equals_session_run(model: bytes) -> None:
    scorer = OnnxScorer(model, feature_names=feature_names(D))
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    X = np.random.default_rng(0).normal(size=(500, D)).astype(np.float32) * 3
    expected = session.run(None, {"input": X})[0]
    got = np.array([scorer.score_values(list(map(float, row))) for row in X], dtype=np.float32)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(scorer.score_batch(X), expected, rtol=1e-6, atol=1e-7)
    assert len(set(np.round(got, 4))) > 100  # rows really differ: the bound buffer is re-read each run
    np.testing.assert_array_equal(scorer.row[0], X[-1])


def test_width_and_names_are_checked(model: bytes) -> None:
    with pytest.raises(ConfigError, match="takes 30 features, but 29"):
        OnnxScorer(model, feature_names=feature_names(D - 1))
    with pytest.raises(ConfigError, match="'input_name' parameter of OnnxScorer"):
        OnnxScorer(model, feature_names=feature_names(D), input_name="nope")
    with pytest.raises(ConfigError, match="cannot load the model"):
        OnnxScorer(b"not onnx", feature_names=feature_names(D))
    scorer = OnnxScorer(model, feature_names=feature_names(D))
    with pytest.raises(ConfigError, match=r"shape \[n, 30\]"):
        scorer.score_batch(np.zeros((2, 3)))
