"""Membership inference (loss threshold and LiRA): clearly above 0.5 without DP, near 0.5 at small ε;
ε lower bounds below the accountant's."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from consortium.errors import ConsortiumError
from consortium.models import TrainConfig, build_model, predict_scores, train_local
from consortium.privacy.audit import (
    attack_auc,
    bce_losses,
    epsilon_lower_bound,
    epsilon_lower_bound_at,
    lira_offline_scores,
    logit_confidence,
    loss_threshold_auc,
    shadow_out_confidences,
)
from consortium.privacy.dpsgd import dp_sgd_train
from consortium.privacy.mechanisms import DpSgdMechanism

Scorer = Callable[[np.ndarray], np.ndarray]


def _data(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(800, 20)).astype(np.float32)
    y = (X[:, 0] + 2.0 * rng.normal(size=800) > 0).astype(np.int64)  # mostly noise: overfit-prone
    return X, y


def _train_plain(X: np.ndarray, y: np.ndarray, seed: int) -> Scorer:  # noqa: N803
    torch.set_num_threads(1)  # tiny model: threads only contend
    torch.manual_seed(seed)
    model = build_model("mlp", 20, hidden=(64,), seed=seed)
    train_local(model, X, y, config=TrainConfig(epochs=100, batch_size=32, lr=3e-3, loss="bce", seed=seed))
    return lambda Z: predict_scores(model, Z)


_MECH = DpSgdMechanism.calibrated(
    target_epsilon=0.5, delta=1e-3, rounds=1, clip_norm=1.0, sampling_rate=0.2, steps_per_round=100
)


def _train_dp(X: np.ndarray, y: np.ndarray, seed: int) -> Scorer:  # noqa: N803
    model = build_model("mlp", 20, hidden=(64,), seed=seed)
    dp_sgd_train(model, X, y, mechanism=_MECH, lr=0.5, seed=seed)
    return lambda Z: predict_scores(model, Z)


@pytest.mark.parametrize(("train", "private"), [(_train_plain, False), (_train_dp, True)], ids=["no-dp", "eps0.5"])
def test_loss_threshold_and_lira_auc_high_without_dp_and_near_half_at_small_epsilon(
    train: Callable[[np.ndarray, np.ndarray, int], Scorer], private: bool
) -> None:
    X, y = _data(0)
    Xm, ym, Xn, yn, Xp, yp = X[:200], y[:200], X[200:400], y[200:400], X[400:], y[400:]
    target = train(Xm, ym, 0)
    sm, sn = target(Xm), target(Xn)
    auc_loss = loss_threshold_auc(bce_losses(sm, ym), bce_losses(sn, yn))
    # Offline LiRA: 4 shadows trained with the same recipe on public rows, none of them audited.
    Xt, yt = np.concatenate([Xm, Xn]), np.concatenate([ym, yn])
    shadows = shadow_out_confidences(train, Xp, yp, Xt, yt, n_shadows=4, seed=0)
    lira = lira_offline_scores(logit_confidence(np.concatenate([sm, sn]), yt), shadows)
    auc_lira = attack_auc(lira[:200], lira[200:])
    if private:
        assert abs(auc_loss - 0.5) < 0.08, auc_loss
        assert abs(auc_lira - 0.5) < 0.08, auc_lira
    else:
        assert auc_loss > 0.75, auc_loss
        assert auc_lira > 0.75, auc_lira


def test_lira_scores_follow_the_out_gaussian_and_reject_bad_shapes() -> None:
    rng = np.random.default_rng(3)
    out = rng.normal(0.0, 1.0, size=(20, 5)) + np.arange(5)  # per-row means 0..4
    scores = lira_offline_scores(np.arange(5, dtype=float), out)  # each row at its OUT mean: P ≈ 1/2
    assert np.allclose(np.exp(scores), 0.5, atol=0.2)
    assert lira_offline_scores(np.full(5, 10.0), out).min() > scores.max()  # above OUT ⇒ more member-like
    with pytest.raises(ConsortiumError, match="shadow_out_confidence"):
        lira_offline_scores(np.zeros(4), out)
    with pytest.raises(ConsortiumError, match="at least 2 shadow"):
        lira_offline_scores(np.zeros(5), out[:1])


def test_epsilon_lower_bound_is_zero_for_indistinguishable_and_large_for_separated_scores() -> None:
    rng = np.random.default_rng(1)
    same = epsilon_lower_bound(rng.normal(size=500), rng.normal(size=500))
    apart = epsilon_lower_bound(rng.normal(5, 0.1, size=500), rng.normal(size=500))
    assert same["epsilon_lower"] < 0.5
    assert apart["epsilon_lower"] > 3.0  # 500 perfect separations: log(≈0.99 / ≈0.006)
    fixed = epsilon_lower_bound_at(rng.normal(5, 0.1, size=500), rng.normal(size=500), threshold=3.0)
    assert fixed["tpr"] == 1.0 and fixed["fpr"] < 0.01
    # One-sided 95 % Clopper-Pearson: TPR_lo = 0.05^(1/500), FPR_hi = 1 - 0.05^(1/500) when FPR = 0.
    lo = 0.05 ** (1 / 500)
    if fixed["fpr"] == 0.0:
        assert fixed["epsilon_lower"] == pytest.approx(np.log(lo / (1 - lo)), rel=1e-6)
