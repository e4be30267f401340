"""Record-level DP-SGD with noise shares under secure aggregation (``dpsgd-secagg``).

The claims checked: the released sum is exactly a central DP-SGD step over the
union of the institutions' rows (clipped sum + noise of std σ·C); the ledger event
is the central sampled Gaussian, equal to an independent dp-accounting computation;
dropouts and collusion are charged with the noise actually left, never with σ.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from dp_accounting import dp_event as dpe
from dp_accounting.pld import pld_privacy_accountant

from consortium.errors import ConfigError
from consortium.models import build_model
from consortium.privacy.accounting import compose, epsilon_pld, estimate
from consortium.privacy.distributed_dpsgd import apply_noisy_sum, institution_share
from consortium.privacy.dpsgd import clip_and_sum, per_row_gradients
from consortium.privacy.inprocess import InProcessConfig, train_private_federated
from consortium.privacy.mechanisms import (
    DistributedDpSgdMechanism,
    DpSgdMechanism,
    create_mechanism,
    known_mechanisms,
)

PARAMS = {"clip_norm": 1.0, "sampling_rate": 0.05, "steps_per_round": 1}


def _mech(sigma: float = 2.0, k: int = 5, **over: float) -> DistributedDpSgdMechanism:
    return DistributedDpSgdMechanism(noise_multiplier=sigma, participants=k, **{**PARAMS, **over})  # type: ignore[arg-type]


def test_full_round_is_the_central_sampled_gaussian_and_matches_dp_accounting() -> None:
    mech = _mech(sigma=1.7)
    ours = estimate(mech.event(100), 1e-5).epsilon
    acc = pld_privacy_accountant.PLDAccountant()
    acc.compose(dpe.PoissonSampledDpEvent(0.05, dpe.GaussianDpEvent(1.7)), 100)
    assert f"{ours:.3g}" == f"{acc.get_epsilon(1e-5):.3g}"
    central = DpSgdMechanism(noise_multiplier=1.7, **PARAMS)  # type: ignore[arg-type]
    assert ours == pytest.approx(estimate(central.event(100), 1e-5).epsilon, rel=1e-9)


def test_dropouts_and_collusion_are_charged_with_the_noise_left() -> None:
    mech = _mech(sigma=2.0, k=5)
    full = epsilon_pld(mech.round_event(), 1e-5)
    dropped = epsilon_pld(mech.round_event(survivors=3), 1e-5)
    colluding = epsilon_pld(mech.round_event(colluders=1), 1e-5)
    assert full < colluding < dropped  # 4/5 of the variance left < 3/5
    assert mech.effective_noise_multiplier(survivors=3) == pytest.approx(2.0 * math.sqrt(3 / 5))
    assert mech.effective_noise_multiplier(survivors=4, colluders=2) == pytest.approx(2.0 * math.sqrt(2 / 5))
    same = DpSgdMechanism(noise_multiplier=2.0 * math.sqrt(3 / 5), **PARAMS)  # type: ignore[arg-type]
    assert dropped == pytest.approx(epsilon_pld(same.round_event(), 1e-5), rel=1e-9)
    assert epsilon_pld(mech.collusion_event(10, colluders=1), 1e-5) > epsilon_pld(mech.event(10), 1e-5)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"survivors": 0}, "survivors"), ({"survivors": 6}, "survivors"), ({"colluders": 5}, "colluders")],
)
def test_impossible_rounds_are_refused_by_name(kwargs: dict[str, int], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        _mech(k=5).round_event(**kwargs)


def test_bad_participants_refused_and_registered_by_name() -> None:
    with pytest.raises(ConfigError, match="participants"):
        _mech(k=0)
    assert "dpsgd-secagg" in known_mechanisms()
    mech = create_mechanism(
        "dpsgd-secagg", target_epsilon=1.0, delta=1e-5, rounds=50, params={**PARAMS, "participants": 4}
    )
    assert isinstance(mech, DistributedDpSgdMechanism)
    assert epsilon_pld(mech.event(50), 1e-5) <= 1.0
    assert mech.share_std() == pytest.approx(mech.noise_multiplier * mech.clip_norm / 2.0)


def _institutions(k: int, n: int, d: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    rng = np.random.default_rng(seed)
    return [
        (
            torch.as_tensor(rng.normal(size=(n, d)).astype(np.float32)),
            torch.as_tensor((rng.random(n) < 0.2).astype(np.float32)),
        )
        for _ in range(k)
    ]


def test_sum_of_shares_is_the_clipped_sum_over_the_union_plus_noise_of_std_sigma_c() -> None:
    model = build_model("mlp", 6, hidden=(4,), seed=0)
    model.eval()
    mech = _mech(sigma=3.0, k=4, sampling_rate=1.0, clip_norm=0.5)  # every row, so the union is known
    data = _institutions(4, 40, 6)
    fn = per_row_gradients(model)
    params = {k: p.detach() for k, p in model.named_parameters()}
    X = torch.cat([x for x, _ in data])  # noqa: N806
    y = torch.cat([t for _, t in data])
    central, _ = clip_and_sum(fn(params, X, y), torch.full((X.shape[0],), 0.5))
    names = [k for k, _ in model.named_parameters()]
    noises = []
    for trial in range(300):
        gens = [torch.Generator().manual_seed(1000 * trial + i) for i in range(4)]
        shares = [
            institution_share(model, x, t, mechanism=mech, negative_ratio=1.0, generator=g, per_row_grad=fn)
            for (x, t), g in zip(data, gens, strict=True)
        ]
        total = [torch.stack(s).sum(0) for s in zip(*shares, strict=True)]
        noises.append(torch.cat([(t - central[k]).reshape(-1) for t, k in zip(total, names, strict=True)]))
    noise = torch.stack(noises)
    # Mean zero (so the signal is the central clipped sum) and std σ·C = 1.5 (each share σ·C/2).
    assert abs(float(noise.mean())) < 0.05
    assert float(noise.std()) == pytest.approx(1.5, rel=0.03)


def test_a_share_alone_carries_only_its_part_of_the_noise() -> None:
    model = build_model("mlp", 6, hidden=(4,), seed=0)
    model.eval()
    mech = _mech(sigma=3.0, k=4, sampling_rate=1.0, clip_norm=0.5)
    (x, t), = _institutions(1, 40, 6)
    fn = per_row_gradients(model)
    params = {k: p.detach() for k, p in model.named_parameters()}
    clean, _ = clip_and_sum(fn(params, x, t), torch.full((40,), 0.5))
    diffs = []
    for trial in range(300):
        share = institution_share(
            model, x, t, mechanism=mech, negative_ratio=1.0, generator=torch.Generator().manual_seed(trial)
        )
        diffs.append(torch.cat([(s - clean[k]).reshape(-1) for s, k in zip(share, clean, strict=True)]))
    assert float(torch.stack(diffs).std()) == pytest.approx(0.75, rel=0.03)  # σ·C/sqrt(k)


def test_apply_noisy_sum_refuses_a_bad_batch_size() -> None:
    model = build_model("mlp", 3, hidden=(), seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with pytest.raises(ConfigError, match="expected_batch"):
        apply_noisy_sum(opt, list(model.parameters()), [torch.zeros_like(p) for p in model.parameters()],
                        expected_batch=0.0)


def _separable(k: int, n: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    parts = []
    for _ in range(k):
        y = (rng.random(n) < 0.1).astype(np.float64)
        X = rng.normal(size=(n, 5)) * 0.3 + y[:, None] * 0.6  # noqa: N806
        parts.append((np.clip(X, -1, 1), y))
    return parts


def test_in_process_run_spends_at_most_the_target_and_states_the_collusion_epsilon() -> None:
    parts = _separable(4, 800, 0)
    cfg = InProcessConfig(
        mode="dpsgd-secagg", target_epsilon=1.0, rounds=30, hidden=(), sampling_rate=0.1, local_steps=1,
        clip_norm=1.0, lr=2.0, negative_clip_power=0.0,
    )
    res = train_private_federated(parts, cfg)
    assert isinstance(res.mechanism, DistributedDpSgdMechanism)
    assert res.mechanism.participants == 4
    assert res.epsilon <= 1.0
    assert res.accounting["epsilon_if_one_colludes"] > res.epsilon
    # The statement's ε is the composition of the statistics and the steps, recomputed here.
    recomputed = estimate(compose([cfg.stats.event(), res.mechanism.event(cfg.rounds)]), cfg.delta).epsilon
    assert res.epsilon == pytest.approx(recomputed, rel=1e-9)
    X = np.concatenate([p[0] for p in parts])  # noqa: N806
    y = np.concatenate([p[1] for p in parts])
    scores = res.scores(X)
    assert float(np.mean(scores[y == 1])) > float(np.mean(scores[y == 0]))  # it learnt the signal
