"""Federated boosting end to end in Flower's simulation engine, and the CLI that selects it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from consortium.cli import main
from consortium.data import federate_institutions, generate_federation
from consortium.federation.config import FederationConfig
from consortium.federation.gbdt_simulation import simulate_gbdt
from consortium.models.gbdt import GBDTParams
from consortium.registry import RunStore

pytestmark = pytest.mark.slow


def test_secure_boosting_in_the_simulation_engine_records_every_tree(tmp_path: Path) -> None:
    fed = generate_federation(3, transactions_per_institution=1_500, seed=3, n_days=30)
    split = federate_institutions({k: v.dataset for k, v in fed.items()}, seed=3)
    cfg = FederationConfig(model="gbdt", min_nodes=3, secure_aggregation=True,
                           store_url=f"sqlite:///{tmp_path}/runs.db", round_timeout=120)
    params = GBDTParams(n_trees=2, max_depth=2, max_bins=16, early_stopping=0)
    with RunStore(cfg.store_url) as store:
        result = simulate_gbdt(split, cfg, params=params, work_dir=tmp_path / "w", store=store)
        assert store.get_run(result.run_id).status == "completed"
        assert [r.round for r in store.rounds(result.run_id)] == [1, 2]
    assert len(result.institutions) == 3 and result.requests == 2 * 2 + 1
    assert result.holdout_metrics["roc-auc"] > 0.5


def test_cli_simulate_selects_gbdt(tmp_path: Path) -> None:
    out = CliRunner().invoke(main, ["simulate", "--model", "gbdt", "--institutions", "2", "--transactions", "1000",
                                    "--trees", "1", "--no-secure-aggregation", "--no-baselines",
                                    "--store", f"sqlite:///{tmp_path}/s.db", "--json"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.output[out.output.index("{"):])
    assert result["model"] == "gbdt" and result["federated"]["trees"] <= 1
