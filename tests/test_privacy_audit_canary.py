"""Canary audit: the empirical ε lower bound is > 0 without DP and never above the accountant's ε with DP."""

from __future__ import annotations

import numpy as np
import pytest

from consortium.errors import ConsortiumError
from consortium.privacy.audit_canary import canary_audit, make_canaries
from consortium.privacy.inprocess import InProcessConfig


def _parts(n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        X = rng.normal(size=(200, 20)).astype(np.float32)
        out.append((X, (X[:, 0] + 0.5 * rng.normal(size=200) > 1.0).astype(np.int64)))
    return out


_PLAIN = InProcessConfig(mode="none", hidden=(64,), local_epochs=30, rounds=5, batch_size=32)
_EPS = 0.2  # the accountant's claim under DP; the non-private run on the same canaries exceeds it


def test_canaries_are_majority_rows_with_the_minority_label() -> None:
    X, y = _parts(1)[0]
    cx, cy = make_canaries(X, y, 10, jitter=0.5, rng=np.random.default_rng(0))
    assert cx.shape == (10, 20) and set(cy.tolist()) == {1} and y.mean() < 0.5
    with pytest.raises(ConsortiumError, match="n_canaries"):
        canary_audit([(X, y)], _PLAIN, n_canaries=2)


def test_canary_bound_is_positive_without_dp_and_detects_an_accountant_claiming_small_epsilon() -> None:
    # One institution holding the canaries, trained without noise: what a mechanism that forgot
    # its noise would release. Its bound exceeds _EPS, so an accountant claiming _EPS would be caught.
    solo = canary_audit(_parts(1), _PLAIN, n_canaries=200)
    assert solo.auc > 0.75, solo
    assert solo.epsilon_lower > _EPS, solo
    assert not solo.consistent or solo.epsilon_accountant == float("inf")
    # Canaries in one of two institutions (FedAvg dilutes them): still clearly detected, though one run's
    # 95 % bound is then too loose to stay above 0 for every threshold split.
    two = canary_audit(
        _parts(2), InProcessConfig(mode="none", hidden=(64,), local_epochs=5, rounds=40, batch_size=32), n_canaries=200
    )
    assert two.auc > 0.65, two


def test_canary_bound_stays_below_the_accountants_epsilon_under_dp_sgd() -> None:
    cfg = InProcessConfig(
        mode="dpsgd", target_epsilon=_EPS, delta=1e-3, hidden=(64,), rounds=5, local_steps=20, sampling_rate=0.2
    )
    res = canary_audit(_parts(1), cfg, n_canaries=200)
    assert res.epsilon_accountant == pytest.approx(_EPS, rel=0.02)
    assert res.consistent and res.epsilon_lower <= res.epsilon_accountant, res
    assert abs(res.auc - 0.5) < 0.1, res
