"""DP-SGD through the real coordinator (Flower simulation): calibrated σ, ledger charges, budget stop, resume.

The private standardisation statistics are charged as round 0 and compose with the DP-SGD rounds.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from click.testing import CliRunner

from consortium.cli import main
from consortium.data import federate_institutions, generate_federation
from consortium.errors import ConfigError
from consortium.federation.config import FederationConfig
from consortium.federation.simulation import simulate
from consortium.privacy.accounting import compose, epsilon_pld
from consortium.privacy.ledger import PrivacyBudgetError, PrivacyLedger
from consortium.privacy.mechanisms import DpSgdMechanism
from consortium.privacy.stats import PrivateStatsSpec
from consortium.registry import RunStore

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_split():  # type: ignore[no-untyped-def]
    fed = generate_federation(2, transactions_per_institution=2_000, seed=3, n_days=30)
    return federate_institutions({k: v.dataset for k, v in fed.items()}, seed=3)


def _config(tmp_path: Path, **kw) -> FederationConfig:  # type: ignore[no-untyped-def]
    base = FederationConfig(
        num_rounds=1,
        min_nodes=2,
        store_url=f"sqlite:///{tmp_path}/runs.db",
        secure_aggregation=False,
        seed=1,
        hidden=(8,),
        dp="dpsgd",
        target_epsilon=2.0,
        delta=1e-5,
        dp_local_steps=2,
    )
    return dataclasses.replace(base, **kw)


def test_dpsgd_run_is_charged_per_round_and_repeated_runs_continue(small_split, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = _config(tmp_path)
    with RunStore(cfg.store_url) as store:
        first = simulate(small_split, cfg, work_dir=tmp_path / "w1", store=store, num_cpus=1)
        ledger = PrivacyLedger(store)
        charges = ledger.charges(run_id=first.run_id)
        assert sorted({c.institution for c in charges}) == sorted(small_split.names())
        assert {(c.round, c.mechanism) for c in charges} == {(0, "dpsgd-stats"), (1, "dpsgd")}
        eps_run = first.extra["privacy"]["epsilon"]  # type: ignore[index]
        assert eps_run == pytest.approx(2.0, rel=2e-3) and eps_run <= 2.0  # calibrated, never above the target
        sigma = next(c for c in charges if c.mechanism == "dpsgd").params["noise_multiplier"]
        mech = DpSgdMechanism(noise_multiplier=sigma, clip_norm=1.0, sampling_rate=0.3, steps_per_round=2)
        stats = PrivateStatsSpec().event()
        assert charges[-1].epsilon == pytest.approx(epsilon_pld(compose([stats, mech.event(1)]), 1e-5), rel=1e-3)
        ck = store.load_checkpoint(first.run_id)
        assert ck.extra["privacy"]["mechanism"] == "dpsgd"
        # A second run on the same data (its statistics are charged again), with a budget that only fits one
        # more round: stops before round 2.
        spent = charges[-1].epsilon
        budget = epsilon_pld(compose([stats, stats, mech.event(2)]), 1e-5) * 1.001  # exactly one more round
        second = dataclasses.replace(
            cfg, budget_epsilon=budget, target_epsilon=0.0, dp_noise_multiplier=sigma, num_rounds=2
        )
        with pytest.raises(PrivacyBudgetError, match=r"spent ε = .* remaining ε = "):
            simulate(small_split, second, work_dir=tmp_path / "w2", store=store, num_cpus=1)
        inst = small_split.names()[0]
        rounds_charged = [c for c in ledger.charges(institution=inst) if c.mechanism == "dpsgd"]
        assert len(rounds_charged) == 2  # 1 from the first run + 1 from the second, never from zero
        assert rounds_charged[-1].epsilon > spent


def test_bad_privacy_configuration_fails_before_training(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'dp_noise_multiplier'"):
        _config(tmp_path, target_epsilon=0.0, dp_noise_multiplier=0.0)
    with pytest.raises(ConfigError, match="'dp_clip'"):
        _config(tmp_path, dp_clip=0.0)
    with pytest.raises(ConfigError, match="'dp_sampling_rate'"):
        _config(tmp_path, dp_sampling_rate=1.5)
    with pytest.raises(ConfigError, match="'dp'"):
        _config(tmp_path, dp="laplace")
    with pytest.raises(ConfigError, match="'delta'"):
        _config(tmp_path, delta=1.5)


def test_privacy_report_cli_prints_the_ledger(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/r.db"
    mech = DpSgdMechanism(noise_multiplier=1.0, clip_norm=1.0, sampling_rate=0.1, steps_per_round=5)
    with RunStore(url) as store:
        PrivacyLedger(store).charge(
            run_id="runX",
            institution="bank_a",
            data_id="abc",
            round=1,
            mechanism="dpsgd",
            event=mech.round_event(),
            delta=1e-5,
        )
    out = CliRunner().invoke(main, ["privacy", "report", "runX", "--store", url])
    assert out.exit_code == 0, out.output
    assert "bank_a" in out.output and "ε=" in out.output
