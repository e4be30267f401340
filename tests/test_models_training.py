"""Tests for consortium.models.training: local training, FedProx, scoring."""
# ruff: noqa: N806  (X, X_val: the conventional names of feature matrices)

from __future__ import annotations

import numpy as np
import pytest
import torch

from consortium.errors import ConfigError, DataError
from consortium.models import (
    TrainConfig,
    build_model,
    evaluate_scores,
    get_parameters,
    predict_scores,
    train_local,
)

torch.set_num_threads(1)

N_FEATURES = 10


def fraud_data(
    n: int = 4000, *, rate: float = 0.02, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Imbalanced rows where fraud shifts the first three features by 1.5."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < rate).astype(np.int64)
    X = rng.normal(size=(n, N_FEATURES)).astype(np.float32)
    X[y == 1, :3] += 1.5
    return X, y


def anomaly_data(
    n: int = 1500, *, rate: float = 0.05, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Normal rows on a 3-d subspace (plus small noise); anomalies fill all 10 dims."""
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(99).normal(size=(3, N_FEATURES)) / np.sqrt(3)
    y = (rng.random(n) < rate).astype(np.int64)
    X = rng.normal(size=(n, 3)) @ basis + 0.05 * rng.normal(size=(n, N_FEATURES))
    X[y == 1] = rng.normal(size=(int(y.sum()), N_FEATURES))
    return X.astype(np.float32), y


def distance(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(np.sqrt(sum(((x - z) ** 2).sum() for x, z in zip(a, b, strict=True))))


FAST = TrainConfig(epochs=5, batch_size=128, lr=3e-3)


def train_and_evaluate(config: TrainConfig, *, seed: int = 0):  # noqa: ANN201
    X, y = fraud_data(seed=0)
    X_val, y_val = fraud_data(seed=1)
    model = build_model("mlp", N_FEATURES, seed=seed)
    train_local(model, X, y, config=config)
    return model, evaluate_scores(y_val, predict_scores(model, X_val), threshold=0.5)


def test_mlp_learns_an_imbalanced_problem() -> None:
    _, metrics = train_and_evaluate(FAST)
    positive_rate = metrics.positives / metrics.n
    assert positive_rate < 0.03
    assert metrics.auprc > 5 * positive_rate
    assert metrics.roc_auc > 0.85


def test_weighted_bce_flags_more_fraud_than_plain_bce_and_ranks_no_worse() -> None:
    _, weighted = train_and_evaluate(FAST)
    _, plain = train_and_evaluate(TrainConfig(epochs=5, batch_size=128, lr=3e-3, loss="bce"))
    # Plain BCE on 2 % positives rarely pushes a fraud probability above 0.5.
    assert weighted.recall_at_threshold > plain.recall_at_threshold + 0.2
    assert weighted.auprc >= 0.9 * plain.auprc


def test_focal_loss_trains() -> None:
    _, metrics = train_and_evaluate(TrainConfig(epochs=5, batch_size=128, lr=3e-3, loss="focal"))
    assert metrics.auprc > 5 * metrics.positives / metrics.n


def test_pos_weight_comes_from_the_given_positive_rate() -> None:
    X, y = fraud_data(n=600)
    config = TrainConfig(epochs=1, batch_size=64)
    balanced = build_model("mlp", N_FEATURES)
    # A consortium-wide rate of 0.5 means pos_weight 1, i.e. plain BCE.
    train_local(balanced, X, y, config=config, positive_rate=0.5)
    plain = build_model("mlp", N_FEATURES)
    train_local(plain, X, y, config=TrainConfig(epochs=1, batch_size=64, loss="bce"))
    local = build_model("mlp", N_FEATURES)
    train_local(local, X, y, config=config)  # local rate ~2 % -> pos_weight ~49
    for a, b in zip(get_parameters(balanced), get_parameters(plain), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert distance(get_parameters(balanced), get_parameters(local)) > 1e-2


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_fedprox_keeps_weights_near_the_global_model(optimizer: str) -> None:
    X, y = fraud_data(n=1000)
    lr = 1e-2 if optimizer == "adam" else 0.05
    moved = {}
    for mu in (0.0, 10.0):
        model = build_model("mlp", N_FEATURES)
        start = get_parameters(model)
        config = TrainConfig(epochs=3, batch_size=64, lr=lr, proximal_mu=mu, optimizer=optimizer)
        train_local(model, X, y, config=config, global_params=start)
        moved[mu] = distance(get_parameters(model), start)
    assert moved[10.0] < 0.25 * moved[0.0]


def test_fedprox_anchor_defaults_to_the_starting_weights() -> None:
    X, y = fraud_data(n=500)
    config = TrainConfig(epochs=1, batch_size=64, proximal_mu=1.0)
    explicit = build_model("mlp", N_FEATURES)
    train_local(explicit, X, y, config=config, global_params=get_parameters(explicit))
    implicit = build_model("mlp", N_FEATURES)
    train_local(implicit, X, y, config=config)
    for a, b in zip(get_parameters(explicit), get_parameters(implicit), strict=True):
        np.testing.assert_array_equal(a, b)
    # Anchoring to other weights changes the outcome.
    other = build_model("mlp", N_FEATURES)
    train_local(
        other, X, y, config=config, global_params=get_parameters(build_model("mlp", 10, seed=5))
    )
    assert distance(get_parameters(other), get_parameters(implicit)) > 1e-3


def test_global_params_are_validated() -> None:
    X, y = fraud_data(n=100)
    model = build_model("mlp", N_FEATURES)
    config = TrainConfig(proximal_mu=0.1)
    with pytest.raises(DataError, match="'global_params' parameter of train_local must hold 6"):
        train_local(model, X, y, config=config, global_params=get_parameters(model)[:2])
    wrong = get_parameters(model)
    wrong[0] = wrong[0][:, :3]
    with pytest.raises(DataError, match=r"layer 'layers\.0\.weight'"):
        train_local(model, X, y, config=config, global_params=wrong)
    poisoned = get_parameters(model)
    poisoned[1][0] = np.nan
    with pytest.raises(DataError, match=r"finite numbers for layer 'layers\.0\.bias'"):
        train_local(model, X, y, config=config, global_params=poisoned)


def test_autoencoder_trained_on_normal_rows_scores_anomalies_higher() -> None:
    X, y = anomaly_data(seed=0)
    X_test, y_test = anomaly_data(seed=1)
    model = build_model("autoencoder", N_FEATURES, hidden=(16, 3))
    result = train_local(model, X, y, config=TrainConfig(epochs=10, batch_size=64, lr=5e-3))
    assert result.num_examples == int((y == 0).sum())
    scores = predict_scores(model, X_test)
    assert scores.dtype == np.float64 and np.all(scores >= 0)
    assert evaluate_scores(y_test, scores).roc_auc > 0.7


def test_autoencoder_without_labels_uses_all_rows() -> None:
    X, _ = anomaly_data(n=300)
    model = build_model("autoencoder", N_FEATURES)
    result = train_local(model, X, None, config=TrainConfig(batch_size=100))
    assert result.num_examples == 300 and result.steps == 3


def test_autoencoder_needs_a_normal_row() -> None:
    X, _ = anomaly_data(n=20)
    with pytest.raises(DataError, match="at least one normal row"):
        train_local(build_model("autoencoder", N_FEATURES), X, np.ones(20, np.int64), config=FAST)


def test_training_is_deterministic_by_seed_and_leaves_global_rng_alone() -> None:
    X, y = fraud_data(n=800)

    def run(seed: int) -> tuple[list[np.ndarray], float]:
        model = build_model("mlp", N_FEATURES)  # dropout 0.1: exercises the RNG
        result = train_local(model, X, y, config=TrainConfig(epochs=2, batch_size=64, seed=seed))
        return get_parameters(model), result.mean_loss

    torch.manual_seed(7)
    expected_draw = torch.rand(2)
    torch.manual_seed(7)
    first, loss_first = run(0)
    torch.testing.assert_close(torch.rand(2), expected_draw)
    second, loss_second = run(0)
    other, _ = run(1)
    assert loss_first == loss_second
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert distance(first, other) > 1e-4


def test_train_result_counts_steps_and_respects_max_steps() -> None:
    X, y = fraud_data(n=1000)
    model = build_model("mlp", N_FEATURES)
    result = train_local(model, X, y, config=TrainConfig(epochs=2, batch_size=300))
    assert (result.num_examples, result.steps) == (1000, 8)  # 4 batches per epoch
    assert np.isfinite(result.mean_loss) and result.mean_loss > 0
    capped = train_local(model, X, y, config=TrainConfig(epochs=5, batch_size=300, max_steps=6))
    assert capped.steps == 6


@pytest.mark.parametrize(
    ("n_rows", "lr", "symptom"),
    [(1000, 1e30, "the loss is nan"), (200, 1e38, "the weights hold NaN/inf")],
)
def test_divergence_is_reported_and_weights_are_restored(
    n_rows: int, lr: float, symptom: str
) -> None:
    X, y = fraud_data(n=n_rows)
    model = build_model("mlp", N_FEATURES)
    start = get_parameters(model)
    config = TrainConfig(lr=lr, optimizer="sgd")
    with pytest.raises(DataError, match=rf"diverged.*{symptom}.*'lr' parameter of TrainConfig"):
        train_local(model, X * 1e3, y, config=config)
    assert all(np.array_equal(a, b) for a, b in zip(start, get_parameters(model), strict=True))


def test_train_local_validates_data() -> None:
    X, y = fraud_data(n=50)
    model = build_model("mlp", N_FEATURES)
    with pytest.raises(DataError, match="at least one row"):
        train_local(model, X[:0], y[:0], config=FAST)
    with pytest.raises(DataError, match="must have 10 columns. Got 4"):
        train_local(model, X[:, :4], y, config=FAST)
    bad = X.copy()
    bad[3, 0] = np.inf
    with pytest.raises(DataError, match="first row index 3"):
        train_local(model, bad, y, config=FAST)
    with pytest.raises(DataError, match=r"'y' parameter of train_local must have shape \(50,\)"):
        train_local(model, X, y[:10], config=FAST)
    with pytest.raises(ConfigError, match="'y' parameter of train_local"):
        train_local(model, X, None, config=FAST)
    with pytest.raises(ConfigError, match="'positive_rate'"):
        train_local(model, X, y, config=FAST, positive_rate=2.0)
    with pytest.raises(ConfigError, match="'config'"):
        train_local(model, X, y, config={"epochs": 1})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("epochs", 0),
        ("epochs", 1.5),
        ("batch_size", 0),
        ("lr", 0.0),
        ("lr", float("nan")),
        ("weight_decay", -1e-4),
        ("loss", "hinge"),
        ("pos_weight", 0.0),
        ("focal_gamma", -1.0),
        ("proximal_mu", -0.1),
        ("optimizer", "rmsprop"),
        ("seed", -1),
        ("max_steps", 0),
    ],
)
def test_train_config_validates_every_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"'{field}' parameter of TrainConfig"):
        TrainConfig(**{field: value})  # type: ignore[arg-type]


def test_train_config_refuses_pos_weight_with_plain_bce() -> None:
    with pytest.raises(ConfigError, match="'pos_weight'.*'bce'"):
        TrainConfig(loss="bce", pos_weight=3.0)


def test_predict_scores_is_batch_independent_and_restores_mode() -> None:
    X, _ = fraud_data(n=300)
    model = build_model("mlp", N_FEATURES)
    assert model.training
    big = predict_scores(model, X)
    small = predict_scores(model, X, batch_size=7)
    assert model.training  # eval only while scoring
    np.testing.assert_allclose(big, small, rtol=1e-6)
    assert big.shape == (300,) and big.dtype == np.float64
    assert np.all((big > 0) & (big < 1))
    assert predict_scores(model, X[:0]).shape == (0,)
    with pytest.raises(ConfigError, match="'batch_size' parameter of predict_scores"):
        predict_scores(model, X, batch_size=0)
