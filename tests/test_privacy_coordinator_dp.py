"""Institution-level DP-FedAvg and private statistics through the real Coordinator and ClientApp.

The Coordinator drives the real ClientApp (with the institutions' secure-aggregation
mod) behind an in-process Grid that serialises every message through Flower's
wire format; nodes can be made to vanish at a protocol stage.  ε is checked
against ``dp_accounting`` called directly, the noise against the exact sum of the
clipped updates the institutions produced.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from dp_accounting import dp_event as dpe
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from flwr.app import Message

from consortium.cli import main
from consortium.errors import ConfigError
from consortium.federation import messages as m
from consortium.federation.client_app import build_client_app, institution_secagg_mod
from consortium.federation.config import FederationConfig
from consortium.federation.coordinator import Coordinator
from consortium.federation.secure_transport import SecureTransport
from consortium.models import FeatureStats, build_model, get_parameters
from consortium.privacy.distributed import SkellamNoise
from consortium.privacy.fedavg_run import HEADROOM_SIGMAS
from consortium.privacy.ledger import PrivacyBudgetError, PrivacyLedger
from consortium.privacy.mechanisms import SkellamMechanism
from consortium.privacy.stats import combine_noisy
from consortium.registry import RunStore
from consortium.secagg.inprocess import InProcessGrid

NODES = [101, 202, 303]
SIGMA, CLIP, DELTA = 0.8, 0.5, 1e-3


@pytest.fixture(scope="module")
def institutions(three_banks: dict[str, Any]) -> dict[str, Any]:
    """The shared three banks (conftest); their node ids are NODES."""
    assert list(three_banks["dirs"]) == NODES
    return three_banks


class Captured:
    """The clipped updates the institutions' train handler produced, and the sums the coordinator obtained."""

    def __init__(self) -> None:
        self.updates: dict[int, dict[str, np.ndarray]] = defaultdict(dict)  # round -> institution -> flat update
        self.sums: list[Any] = []

    def mod(self, msg: Message, context: Any, call_next: Any) -> Message:
        reply = call_next(msg, context)
        if msg.metadata.message_type == m.TRAIN and not reply.has_error() and m.UPDATE in reply.content:
            rnd = int(msg.content[m.CONFIG]["server-round"])  # type: ignore[index]
            arrays = reply.content[m.UPDATE].to_numpy_ndarrays()  # type: ignore[union-attr]
            name = str(context.node_config["institution"])
            self.updates[rnd][name] = np.concatenate([a.ravel() for a in arrays]).astype(np.float64)
        return reply

    def transport(self) -> SecureTransport:
        captured = self

        class Recording(SecureTransport):
            def sum_updates(self, grid, **kw):  # type: ignore[no-untyped-def]
                agg = super().sum_updates(grid, **kw)
                captured.sums.append(agg)  # exactly what the coordinator unmasked
                return agg

        return Recording()


def _config(tmp_path: Path, **kw: Any) -> FederationConfig:
    base = FederationConfig(
        num_rounds=1, min_nodes=2, round_timeout=5.0, secure_aggregation=True, hidden=(8,), local_epochs=1,
        store_url=f"sqlite:///{tmp_path}/runs.db", dp="dpfedavg", dp_noise_multiplier=SIGMA, update_clip=CLIP,
        delta=DELTA, seed=1,
    )
    return dataclasses.replace(base, **kw)


def _run(cfg: FederationConfig, institutions: dict[str, Any], *, policy: Any = None, captured: Captured | None = None):  # type: ignore[no-untyped-def]
    mods = [institution_secagg_mod] + ([captured.mod] if captured is not None else [])
    grid = InProcessGrid(build_client_app(disclose_eval_default=True, mods=mods), node_ids=NODES,
                         node_configs=institutions["dirs"], policy=policy)
    store = RunStore(cfg.store_url)
    coord = Coordinator(cfg, store=store, transport=captured.transport() if captured else None)
    return coord, grid, store


def _flat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])


def _skellam_epsilon(
    params: dict[str, Any], *, survivors: int, invited: int, count: bool = False, rounds: int = 1
) -> float:
    """ε of one Skellam round from first principles (Agarwal et al. 2021, Thm 3.5), by dp_accounting's RDP."""
    sigma, clip, d = params["noise_multiplier"], params["clip_norm"], params["dimension"]
    bits = params["modulus_bits"]  # the largest encoding whose shares keep numpy's Poisson sampler exact
    assert 16 <= bits <= 32
    max_int = ((2**bits // invited) - 1) // 2
    headroom = HEADROOM_SIGMAS * sigma * clip / math.sqrt(invited)
    scale = max_int / (min(1.0, clip) + headroom)  # update segment: coordinate bound min(1, C) + noise room
    assert params["scale"] == pytest.approx(scale, rel=1e-12)
    assert (sigma * clip * scale) ** 2 / invited / 2 <= 1e13  # Poisson λ of a share: where numpy is exact
    events = []
    for mult, sens, sc, dim in [(sigma, clip, scale, d)] + (
        [(2 * params["count_noise_multiplier"], 0.5, params["count_scale"], 1)] if count else []
    ):
        mu = (mult * sens * sc) ** 2 * survivors / invited
        d2 = sens * sc + math.sqrt(dim)
        d1 = min(d2 * d2, math.sqrt(dim) * d2)
        events.append(dpe.ZCDpEvent(rho=d2 * d2 / (2 * mu), xi=3 * d1 / (2 * mu)))
    acc = rdp_privacy_accountant.RdpAccountant()
    for _ in range(rounds):
        for e in events:
            acc.compose(e)
    return float(acc.get_epsilon(DELTA))


def test_dpfedavg_under_secagg_noise_is_added_by_institutions_and_charged_exactly(
    tmp_path: Path, institutions: dict[str, Any]
) -> None:
    captured = Captured()
    coord, grid, store = _run(_config(tmp_path), institutions, captured=captured)
    result = coord.run(grid)
    assert not grid.client_errors
    # The coordinator's unmasked sum = exact sum of the clipped updates + the institutions' noise.
    (agg,) = captured.sums
    updates = captured.updates[1]
    assert len(updates) == 3 and all(np.linalg.norm(u) <= CLIP for u in updates.values())
    residual = _flat(agg.update_sum) - np.sum(list(updates.values()), axis=0)
    expected_var = (SIGMA * CLIP) ** 2  # 3 of 3 institutions: the full planned variance
    assert np.var(residual) == pytest.approx(expected_var, rel=0.35)
    assert abs(float(np.mean(residual))) < 4 * SIGMA * CLIP / math.sqrt(residual.size)
    assert agg.weight_total == pytest.approx(3.0)  # unweighted: each institution counts once
    # Ledger: one Skellam charge per institution, ε = an independent dp_accounting computation.
    charges = PrivacyLedger(store).charges(run_id=result.run_id)
    assert sorted(c.institution for c in charges) == sorted(institutions["split"].names())
    for c in charges:
        assert c.mechanism == "skellam" and c.round == 1 and c.params["survivors"] == 3
        assert c.epsilon == pytest.approx(_skellam_epsilon(c.params, survivors=3, invited=3), rel=1e-9)
    statement = result.extra["privacy"]
    assert statement["mechanism"] == "dpfedavg" and statement["noise"] == "skellam"  # type: ignore[index]
    assert statement["epsilon"] == pytest.approx(charges[-1].epsilon)  # type: ignore[index]
    assert store.load_checkpoint(result.run_id).extra["privacy"]["unit"] == "institution"
    store.close()


def test_dropout_round_is_charged_with_the_survivors_smaller_variance(
    tmp_path: Path, institutions: dict[str, Any]
) -> None:
    def policy(node: int, label: str) -> str:
        return "drop" if node == 303 and label == "masked_input" else "deliver"

    captured = Captured()
    coord, grid, store = _run(_config(tmp_path), institutions, policy=policy, captured=captured)
    result = coord.run(grid)
    dropped = institutions["dirs"][303]["institution"]
    assert result.rounds[0].dropped == (dropped,)
    (agg,) = captured.sums
    survivors = [n for n in captured.updates[1] if n != dropped]
    residual = _flat(agg.update_sum) - np.sum([captured.updates[1][n] for n in survivors], axis=0)
    assert np.var(residual) == pytest.approx((SIGMA * CLIP) ** 2 * 2 / 3, rel=0.35)
    charges = PrivacyLedger(store).charges(run_id=result.run_id)
    assert len(charges) == 3  # every invited institution is charged, with the noise actually in the sum
    full = _skellam_epsilon(charges[0].params, survivors=3, invited=3)
    for c in charges:
        assert c.params["survivors"] == 2 and c.params["invited"] == 3
        assert c.event["type"] == "zcdp"
        assert c.epsilon == pytest.approx(_skellam_epsilon(c.params, survivors=2, invited=3), rel=1e-9)
        assert c.epsilon > full * 1.1
    store.close()


def test_budget_stops_dpfedavg_before_the_round_that_would_exceed_it(
    tmp_path: Path, institutions: dict[str, Any]
) -> None:
    cfg = _config(tmp_path)
    coord, grid, store = _run(cfg, institutions)
    first = coord.run(grid)
    params = PrivacyLedger(store).charges(run_id=first.run_id)[0].params
    store.close()
    # Same data, budget with room for exactly one more round: round 1 runs, round 2 is never started.
    budget = _skellam_epsilon(params, survivors=3, invited=3, rounds=2) * 1.001
    second = dataclasses.replace(cfg, budget_epsilon=budget, num_rounds=3)
    coord, grid, store = _run(second, institutions)
    with pytest.raises(PrivacyBudgetError, match=r"spent ε = .* remaining ε = "):
        coord.run(grid)
    (run,) = [r for r in store.list_runs() if r.run_id != first.run_id]
    assert run.status == "failed" and [r.round for r in store.rounds(run.run_id)] == [1]
    inst = institutions["split"].names()[0]
    charges = PrivacyLedger(store).charges(institution=inst)
    assert len(charges) == 2 and charges[-1].epsilon <= budget  # 1 + 1, continued from the ledger, never from zero
    store.close()


def test_adaptive_clipping_moves_the_bound_and_accounts_the_count(tmp_path: Path, institutions: dict[str, Any]) -> None:
    cfg = _config(tmp_path, dp="dpfedavg-adaptive", num_rounds=2, count_noise_multiplier=5.0, clip_lr=0.2)
    coord, grid, store = _run(cfg, institutions)
    result = coord.run(grid)
    assert not grid.client_errors
    charges = PrivacyLedger(store).charges(run_id=result.run_id, institution=institutions["split"].names()[0])
    assert [c.round for c in charges] == [1, 2]
    first, second = charges
    assert first.params["clip_norm"] == CLIP and first.event["type"] == "composed"  # update + count, both zCDP
    ratio = second.params["clip_norm"] / first.params["clip_norm"]
    assert ratio != 1.0 and math.exp(-0.1) - 1e-9 <= ratio <= math.exp(0.1) + 1e-9  # projected fraction: ±η/2
    assert first.epsilon == pytest.approx(
        _skellam_epsilon(first.params, survivors=3, invited=3, count=True), rel=1e-9)
    without_count = _skellam_epsilon(first.params, survivors=3, invited=3)
    assert first.epsilon > without_count  # the count query has its own cost
    for report in result.rounds:
        assert 0.0 <= report.train_metrics["dp-unclipped-fraction"] <= 1.0
        assert "train-loss" not in report.train_metrics  # nothing un-noised is aggregated
    store.close()


def test_dpfedavg_without_secure_aggregation_adds_central_gaussian_noise(
    tmp_path: Path, institutions: dict[str, Any]
) -> None:
    captured = Captured()
    cfg = _config(tmp_path, secure_aggregation=False)
    grid = InProcessGrid(build_client_app(disclose_eval_default=True, mods=[institution_secagg_mod, captured.mod]),
                         node_ids=NODES, node_configs=institutions["dirs"])
    store = RunStore(cfg.store_url)
    result = Coordinator(cfg, store=store).run(grid)
    init = _flat(get_parameters(build_model("mlp", 23, hidden=(8,), seed=1)))
    step = _flat(result.params) - init  # server_lr 1: the released noisy mean of the 3 clipped updates
    residual = 3 * step - np.sum(list(captured.updates[1].values()), axis=0)
    assert np.var(residual) == pytest.approx((SIGMA * CLIP) ** 2, rel=0.35)
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(dpe.GaussianDpEvent(SIGMA))
    for c in PrivacyLedger(store).charges(run_id=result.run_id):
        assert c.mechanism == "dpfedavg" and c.params["noise"] == "gaussian"
        assert c.epsilon == pytest.approx(acc.get_epsilon(DELTA), rel=1e-3)
    store.close()


def test_dpsgd_statistics_are_private_charged_and_composed(tmp_path: Path, institutions: dict[str, Any]) -> None:
    cfg = _config(tmp_path, dp="dpsgd", target_epsilon=2.0, delta=1e-5, dp_noise_multiplier=0.0, dp_local_steps=2)
    coord, grid, store = _run(cfg, institutions)
    result = coord.run(grid)
    split = institutions["split"]
    X = np.concatenate([i.train.X for i in split.institutions]).astype(np.float64)
    y = np.concatenate([i.train.y for i in split.institutions])
    exact = FeatureStats.from_data(X, y).standardizer()
    xc = np.clip(X, -1.0, 1.0)  # the statistics' public bound: exact clipped sums, no noise
    clipped = combine_noisy([np.concatenate([[len(y), y.sum()], xc.sum(0), (xc * xc).sum(0)])]).standardizer()
    assert not np.allclose(result.standardizer.mean, exact.mean, atol=1e-3)
    assert not np.allclose(result.standardizer.mean, clipped.mean, atol=1e-6)  # noise, not only clipping
    # The noise of the sums (σ = 30 × sensitivity sqrt(d)) over ~N rows: 6 standard deviations of slack.
    noise_std = 30.0 * math.sqrt(X.shape[1]) / len(y)
    assert np.allclose(result.standardizer.mean, clipped.mean, atol=6 * noise_std + 0.05)
    ledger = PrivacyLedger(store)
    inst = split.names()[0]
    charges = ledger.charges(run_id=result.run_id, institution=inst)
    assert [(c.round, c.mechanism) for c in charges] == [(0, "dpsgd-stats"), (1, "dpsgd")]
    sigma = charges[1].params["noise_multiplier"]
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(dpe.ComposedDpEvent([
        dpe.SelfComposedDpEvent(dpe.GaussianDpEvent(30.0), 4),
        dpe.SelfComposedDpEvent(dpe.PoissonSampledDpEvent(0.3, dpe.GaussianDpEvent(sigma)), 2),
    ]))
    composed = acc.get_epsilon(1e-5)
    assert charges[1].epsilon == pytest.approx(composed, rel=1e-3)
    statement = result.extra["privacy"]
    assert statement["epsilon"] == pytest.approx(2.0, rel=2e-3) and statement["epsilon"] <= 2.0  # type: ignore[index]
    assert "note" not in statement  # type: ignore[operator]
    assert statement["params"]["statistics"]["noise_multiplier"] == 30.0  # type: ignore[index]
    store.close()


def test_bad_dpfedavg_settings_are_refused_before_training(tmp_path: Path, institutions: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="'update_clip'"):
        _config(tmp_path, update_clip=0.0)
    with pytest.raises(ConfigError, match="'aggregation'"):
        _config(tmp_path, secure_aggregation=False, aggregation="median")
    with pytest.raises(ConfigError, match="'clip_quantile'"):
        _config(tmp_path, dp="dpfedavg-adaptive", clip_quantile=1.0)
    with pytest.raises(ConfigError, match="'count_noise_multiplier'"):
        _config(tmp_path, dp="dpfedavg-adaptive", count_noise_multiplier=0.0)
    with pytest.raises(ConfigError, match="'dp_stats_noise_multiplier'"):
        _config(tmp_path, dp="dpsgd", dp_stats_noise_multiplier=0.0)
    # δ >= 1/n for n = 3 institutions: refused after discovery, before any training round.
    coord, grid, store = _run(_config(tmp_path, delta=0.4), institutions)
    with pytest.raises(ConfigError, match=r"'delta'.*1/n"):
        coord.run(grid)
    assert store.list_runs() == [] and "advertise_keys" not in grid.stats.bytes_down
    store.close()
    # The node refuses noise whose accounted scale is not its encoding's.
    hook = SkellamNoise(SkellamMechanism(noise_multiplier=1.0, clip_norm=1.0, scale=100.0, dimension=4,
                                         expected_participants=2))
    assert hook("update", (4,), 100.0, np.random.default_rng(0)) is not None
    with pytest.raises(ConfigError, match="scale"):
        hook("update", (4,), 50.0, np.random.default_rng(0))
    out = CliRunner().invoke(main, ["simulate", "--institutions", "2", "--transactions", "1000",
                                    "--dp", "dpfedavg", "--update-clip", "-1", "--dp-noise-multiplier", "1"])
    assert out.exit_code == 2 and "update_clip" in out.output
