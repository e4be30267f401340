"""Federated training end to end in Flower's simulation engine, on small synthetic data."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from consortium.data import federate_institutions, generate_federation
from consortium.federation.config import FederationConfig
from consortium.federation.experiment import run_experiment
from consortium.federation.simulation import simulate
from consortium.registry import RunStore

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_split():  # type: ignore[no-untyped-def]
    fed = generate_federation(3, transactions_per_institution=4_000, seed=7, n_days=60)
    return federate_institutions({k: v.dataset for k, v in fed.items()}, seed=7)


def _config(tmp_path: Path, **kw) -> FederationConfig:  # type: ignore[no-untyped-def]
    base = FederationConfig(num_rounds=3, min_nodes=3, local_epochs=1, batch_size=128, lr=3e-3,
                            store_url=f"sqlite:///{tmp_path}/runs.db", secure_aggregation=False, seed=1)
    return dataclasses.replace(base, **kw)


def test_plain_simulation_records_every_round_and_learns(small_split, tmp_path: Path, run_store) -> None:  # type: ignore[no-untyped-def]
    # run_store: SQLite file and the real PostgreSQL server (its own schema).
    cfg = _config(tmp_path)
    seen = []
    store = run_store
    result = simulate(small_split, cfg, work_dir=tmp_path / "w", store=store, on_round=seen.append)
    rounds = store.rounds(result.run_id)
    run = store.get_run(result.run_id)
    ckpt = store.load_checkpoint(result.run_id, round=result.selected_round)
    inst = store.institution_metrics(result.run_id)
    assert [r.round for r in rounds] == [1, 2, 3] == [r.round for r in seen]
    assert run.status == "completed"
    assert sorted(run.institutions) == sorted(small_split.names())
    assert all(set(r.participants) == set(small_split.names()) and not r.dropped for r in rounds)
    # The checkpoint holds exactly the final global model (+ standardiser).
    for a, b in zip(ckpt.arrays[: len(result.params)], result.params, strict=True):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == np.float32
    # Institutions disclosed their own test metrics (default) every round.
    assert {(m.round, m.institution) for m in inst} == {(r, n) for r in (1, 2, 3) for n in small_split.names()}
    holdout_rate = small_split.holdout.positive_rate
    final = rounds[-1].global_metrics
    assert final["auprc"] > 3 * holdout_rate, (final, holdout_rate)
    assert 0 < result.threshold < 1


def test_institution_that_does_not_disclose_keeps_its_metrics(small_split, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from consortium.federation import messages as m

    def no_disclosure_for_first(msg, context, call_next):  # type: ignore[no-untyped-def]
        # Institution 0's node policy: never disclose evaluation metrics.
        if int(context.node_config.get("partition-id", -1)) == 0:
            context.node_config[m.NODE_DISCLOSE_EVAL] = "false"
        return call_next(msg, context)

    cfg = _config(tmp_path, num_rounds=1)
    with RunStore(cfg.store_url) as store:
        result = simulate(small_split, cfg, work_dir=tmp_path / "w", store=store,
                          client_mods=[no_disclosure_for_first])
        inst = store.institution_metrics(result.run_id)
    first = small_split.names()[0]
    assert first not in {i.institution for i in inst}
    assert result.extra["disclosure"][first] is False
    assert {i.institution for i in inst} == set(small_split.names()[1:])


@pytest.mark.parametrize("strategy", ["fedprox", "fedadam"])
def test_other_strategies_run(small_split, tmp_path: Path, strategy: str) -> None:  # type: ignore[no-untyped-def]
    cfg = _config(tmp_path, strategy=strategy, num_rounds=2, adam_lr=3e-3)
    with RunStore(cfg.store_url) as store:
        result = simulate(small_split, cfg, work_dir=tmp_path / "w", store=store)
    assert len(result.rounds) == 2
    assert np.isfinite(result.rounds[-1].global_metrics["auprc"])


def test_experiment_baselines_use_same_holdout(small_split, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = _config(tmp_path, num_rounds=2)
    with RunStore(cfg.store_url) as store:
        res = run_experiment(small_split, cfg, work_dir=tmp_path / "w", dataset_name="synthetic", store=store)
        baselines = store.baselines(res.run.run_id)
    s = res.summary()
    assert {"federated_auprc", "centralized_auprc", "local_only_auprc_mean"} <= set(s)
    assert len(res.local) == 3 and res.central is not None
    assert {b.kind for b in baselines} == {"local_only", "centralized"}
    assert all(r.metrics.n == small_split.holdout.n_rows for r in [*res.local, res.central])


def test_secure_aggregation_gives_the_plain_model_up_to_quantisation(small_split, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    results = {}
    for secure in (False, True):
        cfg = _config(tmp_path, num_rounds=2, secure_aggregation=secure)
        with RunStore(cfg.store_url) as store:
            results[secure] = simulate(small_split, cfg, work_dir=tmp_path / f"w{secure}", store=store)
            run = store.get_run(results[secure].run_id)
        assert run.config["transport"] == ("secagg" if secure else "plain")
    plain, secure_result = results[False], results[True]
    # Federated standardisation equals the pooled data's (no row left an institution).
    from consortium.models import FeatureStats

    pooled = FeatureStats.from_data(small_split.pooled_train().X, small_split.pooled_train().y).standardizer()
    np.testing.assert_allclose(secure_result.standardizer.mean, pooled.mean, rtol=1e-6)
    np.testing.assert_allclose(secure_result.standardizer.std, pooled.std, rtol=1e-6)
    # Federated standardisation through exact limbs is bit-identical.
    np.testing.assert_array_equal(plain.standardizer.mean, secure_result.standardizer.mean)
    np.testing.assert_array_equal(plain.standardizer.std, secure_result.standardizer.std)
    for a, b in zip(plain.params, secure_result.params, strict=True):
        assert b.dtype == a.dtype == np.float32
        np.testing.assert_allclose(b, a, atol=1e-4, rtol=1e-3)
    assert set(secure_result.rounds[-1].participants) == set(plain.rounds[-1].participants) == set(small_split.names())


def test_autoencoder_federation_scores_by_reconstruction_error(small_split, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = _config(tmp_path, model="autoencoder", num_rounds=2, hidden=(16, 4))
    with RunStore(cfg.store_url) as store:
        result = simulate(small_split, cfg, work_dir=tmp_path / "w", store=store)
    final = result.rounds[-1]
    assert np.isfinite(final.global_metrics["roc-auc"]) and np.isfinite(final.global_metrics["auprc"])
    # The threshold lives in reconstruction-error space (not a probability).
    assert result.threshold > 0
    assert final.train_metrics["train-loss"] > 0


def test_two_nodes_claiming_one_institution_are_refused(small_split, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from consortium.errors import FederationError
    from consortium.federation import messages as m

    def everyone_is_bank_a(msg, context, call_next):  # type: ignore[no-untyped-def]
        context.node_config[m.NODE_INSTITUTION] = "bank_a"
        return call_next(msg, context)

    cfg = _config(tmp_path, num_rounds=1)
    with RunStore(cfg.store_url) as store, pytest.raises(FederationError, match="'bank_a' is claimed by two nodes"):
        simulate(small_split, cfg, work_dir=tmp_path / "w", store=store, client_mods=[everyone_is_bank_a])
