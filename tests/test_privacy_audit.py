"""Membership inference: clearly above 0.5 without DP, near 0.5 with small ε; ε lower bound below the accountant's."""

from __future__ import annotations

import numpy as np
import torch

from consortium.models import TrainConfig, build_model, predict_scores, train_local
from consortium.privacy.audit import bce_losses, epsilon_lower_bound, loss_threshold_auc
from consortium.privacy.dpsgd import dp_sgd_train
from consortium.privacy.mechanisms import DpSgdMechanism


def _data(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(400, 20)).astype(np.float32)
    y = (X[:, 0] + 2.0 * rng.normal(size=400) > 0).astype(np.int64)  # mostly noise: overfit-prone
    return X[:200], y[:200], X[200:], y[200:]


def _attack(model: torch.nn.Module, Xm, ym, Xn, yn) -> float:  # type: ignore[no-untyped-def]
    return loss_threshold_auc(bce_losses(predict_scores(model, Xm), ym), bce_losses(predict_scores(model, Xn), yn))


def test_attack_auc_without_dp_is_high_and_with_small_epsilon_near_half() -> None:
    torch.manual_seed(0)
    Xm, ym, Xn, yn = _data(0)
    plain = build_model("mlp", 20, hidden=(64,), seed=0)
    train_local(plain, Xm, ym, config=TrainConfig(epochs=150, batch_size=32, lr=3e-3, loss="bce", seed=0))
    auc_plain = _attack(plain, Xm, ym, Xn, yn)
    mech = DpSgdMechanism.calibrated(
        target_epsilon=0.5, delta=1e-3, rounds=1, clip_norm=1.0, sampling_rate=0.2, steps_per_round=100
    )
    private = build_model("mlp", 20, hidden=(64,), seed=0)
    dp_sgd_train(private, Xm, ym, mechanism=mech, lr=0.5, seed=0)
    auc_dp = _attack(private, Xm, ym, Xn, yn)
    assert auc_plain > 0.75, auc_plain
    assert abs(auc_dp - 0.5) < 0.08, auc_dp


def test_epsilon_lower_bound_is_zero_for_indistinguishable_and_large_for_separated_scores() -> None:
    rng = np.random.default_rng(1)
    same = epsilon_lower_bound(rng.normal(size=500), rng.normal(size=500))
    apart = epsilon_lower_bound(rng.normal(5, 0.1, size=500), rng.normal(size=500))
    assert same["epsilon_lower"] < 0.5
    assert apart["epsilon_lower"] > 3.0  # 500 perfect separations: log(≈0.99 / ≈0.006)
