"""Accountant and mechanisms: ε equals an independent dp-accounting computation; calibration never overshoots."""

from __future__ import annotations

import math

import numpy as np
import pytest
from dp_accounting import dp_event as dpe
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from consortium.errors import ConfigError
from consortium.privacy.accounting import (
    check_delta,
    compose,
    dpsgd_event,
    epsilon_pld,
    estimate,
    event_from_dict,
    event_to_dict,
)
from consortium.privacy.mechanisms import (
    DpFedAvgMechanism,
    DpSgdMechanism,
    Mechanism,
    SkellamMechanism,
    create_mechanism,
    known_mechanisms,
)


def _sig3(x: float) -> str:
    return f"{x:.3g}"


def test_reported_epsilon_equals_independent_dp_accounting_to_3_digits() -> None:
    sigma, q, steps, delta = 1.1, 0.01, 2000, 1e-5
    mech = DpSgdMechanism(noise_multiplier=sigma, clip_norm=1.0, sampling_rate=q, steps_per_round=100)
    ours = estimate(mech.event(20), delta)
    # Independent: build the event by hand and ask dp-accounting directly.
    acc = pld_privacy_accountant.PLDAccountant()
    acc.compose(dpe.PoissonSampledDpEvent(q, dpe.GaussianDpEvent(sigma)), steps)
    rdp = rdp_privacy_accountant.RdpAccountant()
    rdp.compose(dpe.PoissonSampledDpEvent(q, dpe.GaussianDpEvent(sigma)), steps)
    assert _sig3(ours.epsilon) == _sig3(acc.get_epsilon(delta))
    assert _sig3(ours.epsilon_rdp) == _sig3(rdp.get_epsilon(delta))
    assert ours.epsilon <= ours.epsilon_rdp


@pytest.mark.parametrize("target", [0.5, 2.0])
def test_calibration_never_overshoots_and_is_tight(target: float) -> None:
    params = {"clip_norm": 1.0, "sampling_rate": 0.02, "steps_per_round": 50}
    mech = create_mechanism("dpsgd", target_epsilon=target, delta=1e-5, rounds=10, params=params)
    assert isinstance(mech, DpSgdMechanism)
    eps = epsilon_pld(mech.event(10), 1e-5)
    assert eps <= target
    # 1 % less noise would overshoot: the calibration is tight, not just safe.
    looser = DpSgdMechanism(noise_multiplier=mech.noise_multiplier * 0.99, **params)  # type: ignore[arg-type]
    assert epsilon_pld(looser.event(10), 1e-5) > target * 0.995


def test_compose_k_equals_k_single_composes() -> None:
    ev = dpsgd_event(noise_multiplier=2.0, sampling_rate=0.1, steps=5)
    k = 4
    assert math.isclose(
        epsilon_pld(dpe.SelfComposedDpEvent(ev, k), 1e-5), epsilon_pld(compose([ev] * k), 1e-5), rel_tol=1e-3
    )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"noise_multiplier": 0.0, "clip_norm": 1.0, "sampling_rate": 0.1, "steps_per_round": 1}, "noise_multiplier"),
        ({"noise_multiplier": -1.0, "clip_norm": 1.0, "sampling_rate": 0.1, "steps_per_round": 1}, "noise_multiplier"),
        ({"noise_multiplier": 1.0, "clip_norm": 0.0, "sampling_rate": 0.1, "steps_per_round": 1}, "clip_norm"),
        ({"noise_multiplier": 1.0, "clip_norm": 1.0, "sampling_rate": 0.0, "steps_per_round": 1}, "sampling_rate"),
        ({"noise_multiplier": 1.0, "clip_norm": 1.0, "sampling_rate": 1.5, "steps_per_round": 1}, "sampling_rate"),
        ({"noise_multiplier": 1.0, "clip_norm": 1.0, "sampling_rate": 0.1, "steps_per_round": 0}, "steps_per_round"),
    ],
)
def test_bad_parameters_are_refused_by_name(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(ConfigError, match=f"'{field}'"):
        DpSgdMechanism(**kwargs)  # type: ignore[arg-type]


def test_delta_range_and_one_over_n() -> None:
    with pytest.raises(ConfigError, match="'delta'"):
        check_delta(0.0, "t")
    with pytest.raises(ConfigError, match="'delta'"):
        check_delta(1.0, "t")
    with pytest.raises(ConfigError, match=r"1/n"):
        check_delta(1e-3, "t", n_protected=1000)
    assert check_delta(1e-4, "t", n_protected=1000) == 1e-4


def test_unreachable_target_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="'target_epsilon'.*reachable"):
        create_mechanism(
            "dpsgd",
            target_epsilon=1e-6,
            delta=1e-5,
            rounds=10,
            params={"clip_norm": 1.0, "sampling_rate": 1.0, "steps_per_round": 1000},
        )


def test_unknown_mechanism_lists_known_ones() -> None:
    with pytest.raises(ConfigError, match="dpfedavg"):
        create_mechanism("laplace-yolo", params={})
    assert {"dpsgd", "dpfedavg", "skellam"} <= set(known_mechanisms())


@pytest.mark.parametrize(
    "mech",
    [
        DpSgdMechanism(noise_multiplier=1.5, clip_norm=1.0, sampling_rate=0.05, steps_per_round=10),
        DpFedAvgMechanism(noise_multiplier=3.0, clip_norm=0.5, adaptive=True),
        DpFedAvgMechanism(noise_multiplier=3.0, clip_norm=0.5, sampling_rate=0.2),
        SkellamMechanism(noise_multiplier=3.0, clip_norm=1.0, scale=1e3, dimension=100, expected_participants=10),
    ],
)
def test_mechanism_contract(mech: Mechanism) -> None:
    """Every mechanism: serialisable events, monotone in rounds, k rounds = k single rounds."""
    ev = mech.round_event()
    assert event_from_dict(event_to_dict(ev)) == ev
    e1, e3 = epsilon_pld(mech.event(1), 1e-5), epsilon_pld(mech.event(3), 1e-5)
    assert 0 < e1 < e3
    assert math.isclose(e3, epsilon_pld(compose([ev] * 3), 1e-5), rel_tol=1e-3)
    assert mech.params()


def test_skellam_dropout_is_charged_with_the_noise_actually_present() -> None:
    mech = SkellamMechanism(noise_multiplier=3.0, clip_norm=1.0, scale=1e3, dimension=100, expected_participants=10)
    full = epsilon_pld(mech.round_event(), 1e-5)
    short = epsilon_pld(mech.round_event(survivors=5), 1e-5)
    assert short > full
    rng = np.random.default_rng(0)
    shares = np.stack([mech.noise_fn("update", (20_000,), 1e3, rng) for _ in range(10)])  # type: ignore[misc]
    total = shares.sum(axis=0)
    assert total.dtype == np.int64
    assert math.isclose(float(total.var()), mech.total_variance(), rel_tol=0.05)  # measured noise level
    assert mech.noise_fn("weight", (3,), 1e3, rng) is None


def test_adaptive_clipping_cost_is_accounted() -> None:
    fixed = DpFedAvgMechanism(noise_multiplier=3.0, clip_norm=1.0)
    adaptive = DpFedAvgMechanism(noise_multiplier=3.0, clip_norm=1.0, adaptive=True, count_noise_multiplier=5.0)
    assert epsilon_pld(adaptive.event(5), 1e-5) > epsilon_pld(fixed.event(5), 1e-5)
    assert adaptive.next_clip(0.9).clip_norm > adaptive.clip_norm  # most updates clipped: bound grows


def test_skellam_through_the_secagg_encoding_with_dropouts() -> None:
    """Unmasked-sum noise equals the survivors' Skellam shares; the round is charged with that variance."""
    from consortium.secagg.quantize import QuantizationPlan, SegmentSpec

    n, d, clip, sigma = 10, 4000, 1.0, 2.0
    plan = QuantizationPlan.create([SegmentSpec("update", d, bound=clip, headroom=12 * sigma * clip)], n_participants=n)
    scale = plan.segment("update").scale
    mech = SkellamMechanism(noise_multiplier=sigma, clip_norm=clip, scale=scale, dimension=d, expected_participants=n)
    rng = np.random.default_rng(0)
    survivors = 6
    values = [rng.uniform(-0.01, 0.01, size=d) for _ in range(survivors)]
    total = np.zeros(d, dtype=np.uint64)
    for v in values:
        enc = plan.encode({"update": v.copy()}, rng=rng, noise_fn=mech.noise_fn)
        total = (total + enc.values.astype(np.uint64)) % plan.modulus
    noise = plan.decode(total.astype(np.uint32))["update"] - np.sum(values, axis=0)
    expected_var = (sigma * clip) ** 2 * survivors / n
    assert math.isclose(float(noise.var()), expected_var, rel_tol=0.1)
    assert epsilon_pld(mech.round_event(survivors=survivors), 1e-5) > epsilon_pld(mech.round_event(), 1e-5)
