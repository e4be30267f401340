"""Unit tests of the coordinator's pure parts: config, server optimisers, thresholds, sums."""

from __future__ import annotations

import numpy as np
import pytest

from consortium.errors import ConfigError, FederationError
from consortium.federation.aggregation import AggregateResult, weighted_sum
from consortium.federation.config import FederationConfig
from consortium.federation.server_optimizers import FedAdam, FedAvg, create_server_optimizer
from consortium.federation.thresholds import (
    from_unit_interval,
    score_histograms,
    threshold_from_histograms,
    to_unit_interval,
)


def test_config_round_trips_through_flower_run_config() -> None:
    cfg = FederationConfig(num_rounds=3, strategy="fedadam", hidden=(16, 8), secure_aggregation=False, lr=0.01)
    rc = cfg.to_run_config()
    assert rc["num-rounds"] == 3 and rc["hidden"] == "16,8" and rc["secure-aggregation"] is False
    back = FederationConfig.from_run_config(rc)
    assert back == cfg


def test_config_from_strings_as_flwr_cli_gives_them() -> None:
    cfg = FederationConfig.from_run_config(
        {"num-rounds": "4", "secure-aggregation": "false", "hidden": "8", "unknown-key": 1}
    )
    assert cfg.num_rounds == 4 and cfg.secure_aggregation is False and cfg.hidden == (8,)
    assert cfg.extra == {"unknown-key": 1}


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"num_rounds": 0}, "'num_rounds' parameter of FederationConfig must be an int >= 1. Got 0"),
        ({"strategy": "fedsgd"}, "'strategy'"),
        ({"fraction_train": 0.0}, "'fraction_train'"),
        ({"lr": -1.0}, "'lr'"),
        ({"hidden": (8, 0)}, "'hidden'"),
        ({"max_fpr": 1.5}, "'max_fpr'"),
    ],
)
def test_config_rejects_bad_values_with_named_parameter(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        FederationConfig(**kwargs)


def test_run_config_with_wrong_type_names_the_key() -> None:
    with pytest.raises(ConfigError, match="'num_rounds'.*Got 'many'"):
        FederationConfig.from_run_config({"num-rounds": "many"})


def test_fedavg_moves_by_mean_delta_and_keeps_dtype() -> None:
    params = [np.ones((2, 2), dtype=np.float32), np.zeros(3, dtype=np.float32)]
    delta = [np.full((2, 2), 0.5), np.full(3, -1.0)]
    new = FedAvg(server_lr=1.0).step(params, delta)
    assert new[0].dtype == np.float32
    np.testing.assert_allclose(new[0], 1.5)
    np.testing.assert_allclose(new[1], -1.0)


def test_fedadam_first_step_is_lr_times_sign() -> None:
    opt = FedAdam(server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-9)
    params = [np.zeros(4, dtype=np.float32)]
    new = opt.step(params, [np.array([1.0, -2.0, 0.5, 0.0])])
    # m = 0.1 d, v = 0.01 d^2 -> m / sqrt(v) = sign(d)
    np.testing.assert_allclose(new[0], [0.1, -0.1, 0.1, 0.0], atol=1e-6)
    state = opt.state_arrays()
    clone = FedAdam(server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-9)
    clone.load_state_arrays(state)
    np.testing.assert_allclose(clone.step(new, [np.ones(4)])[0], opt.step(new, [np.ones(4)])[0])


def test_optimizer_rejects_mismatched_shapes() -> None:
    with pytest.raises(ConfigError, match=r"shape \(3,\); expected \(2,\)"):
        FedAvg().step([np.zeros(2)], [np.zeros(3)])


def test_strategy_registry_builds_each_strategy() -> None:
    assert isinstance(create_server_optimizer(FederationConfig(strategy="fedavg")), FedAvg)
    assert isinstance(create_server_optimizer(FederationConfig(strategy="fedprox")), FedAvg)
    assert isinstance(create_server_optimizer(FederationConfig(strategy="fedadam")), FedAdam)
    assert FederationConfig(strategy="fedprox").effective_proximal_mu > 0
    assert FederationConfig(strategy="fedavg").effective_proximal_mu == 0


def test_weighted_sum_and_mean_update() -> None:
    ref = [np.zeros(2, dtype=np.float32)]
    result = weighted_sum(
        [("a", [np.array([1.0, 1.0])], 1.0, {"loss": 2.0}), ("b", [np.array([4.0, 0.0])], 3.0, {"loss": 1.0})],
        reference=ref,
        dropped=["c"],
    )
    np.testing.assert_allclose(result.mean_update()[0], [13 / 4, 1 / 4])
    assert result.mean_metrics() == pytest.approx({"loss": 5 / 4})
    assert result.participants == ("a", "b") and result.dropped == ("c",)
    assert result.update_sum[0].dtype == np.float32


def test_mean_update_of_empty_round_is_an_error() -> None:
    with pytest.raises(FederationError, match="total weight 0"):
        AggregateResult(update_sum=[np.zeros(1)], weight_total=0.0).mean_update()


def test_threshold_from_summed_histograms_matches_pooled_choice() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random(20_000) < 0.05).astype(np.int64)
    scores = np.clip(rng.normal(0.3 + 0.4 * y, 0.1), 0, 1)
    # Two institutions' histograms summed == pooled histogram.
    n1, p1 = score_histograms(scores[:8000], y[:8000], bins=1000)
    n2, p2 = score_histograms(scores[8000:], y[8000:], bins=1000)
    choice = threshold_from_histograms(n1 + n2, p1 + p2, max_fpr=0.01)
    fpr = np.mean(scores[y == 0] >= choice.unit_threshold)
    recall = np.mean(scores[y == 1] >= choice.unit_threshold)
    assert fpr <= 0.01
    assert choice.fpr == pytest.approx(fpr, abs=1e-9)
    assert choice.recall == pytest.approx(recall, abs=1e-9)
    # One bin lower would break the FPR target (the choice is the lowest feasible edge).
    lower = choice.unit_threshold - 1 / 1000
    assert np.mean(scores[y == 0] >= lower) > 0.01


def test_unit_interval_mapping_inverts_for_reconstruction_errors() -> None:
    errs = np.array([0.0, 0.5, 3.0, 100.0])
    u = to_unit_interval(errs, kind="autoencoder")
    assert np.all((u >= 0) & (u < 1))
    for e, ui in zip(errs, u, strict=True):
        assert from_unit_interval(float(ui), kind="autoencoder") == pytest.approx(e, rel=1e-9)


def test_auprc_from_histograms_equals_average_precision_of_binned_scores() -> None:
    from sklearn.metrics import average_precision_score

    from consortium.federation.thresholds import auprc_from_histograms

    rng = np.random.default_rng(1)
    y = (rng.random(5000) < 0.03).astype(np.int64)
    scores = np.clip(rng.normal(0.4 + 0.2 * y, 0.15), 0, 1 - 1e-9)
    bins = 500
    neg, pos = score_histograms(scores, y, bins=bins)
    binned = np.floor(scores * bins) / bins
    assert auprc_from_histograms(neg, pos) == pytest.approx(average_precision_score(y, binned), abs=1e-12)
    assert auprc_from_histograms(neg, pos) == pytest.approx(average_precision_score(y, scores), abs=0.02)
    assert np.isnan(auprc_from_histograms(neg, np.zeros(bins)))


def test_fedavgm_accumulates_momentum_and_restores_state() -> None:
    from consortium.federation.server_optimizers import FedAvgM

    opt = FedAvgM(server_lr=1.0, momentum=0.5)
    p = [np.zeros(2, dtype=np.float32)]
    p = opt.step(p, [np.ones(2)])  # v = 1
    np.testing.assert_allclose(p[0], 1.0)
    p = opt.step(p, [np.ones(2)])  # v = 1.5
    np.testing.assert_allclose(p[0], 2.5)
    clone = FedAvgM(server_lr=1.0, momentum=0.5)
    clone.load_state_arrays(opt.state_arrays())
    np.testing.assert_allclose(clone.step(p, [np.zeros(2)])[0], opt.step(p, [np.zeros(2)])[0])
    assert isinstance(create_server_optimizer(FederationConfig(strategy="fedavgm")), FedAvgM)
    with pytest.raises(ConfigError, match="'momentum'"):
        FedAvgM(momentum=1.0)
