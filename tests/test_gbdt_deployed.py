"""Federated boosting as real processes: TLS coordinator + three institution nodes, one stump, SecAgg on."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

from consortium.federation.config import FederationConfig
from consortium.models.gbdt import GBDTParams
from consortium.registry import RunStore

if TYPE_CHECKING:
    from conftest import DeployedFederation  # the shared deployed-federation setup (tests/conftest.py)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_deployed_nodes_answer_the_gbdt_message_types(
    deployed_federation: Callable[..., DeployedFederation],
) -> None:
    # One tree of depth 1: Flower's SuperNode polls every 3 s, and every secure round has four stages.
    fed = deployed_federation(transactions_per_institution=1_500, seed=4, n_days=30)
    params = GBDTParams(n_trees=1, max_depth=1, max_bins=16, early_stopping=0)
    config = FederationConfig(model="gbdt", min_nodes=3, store_url=fed.store_url, run_name="deployed-gbdt",
                              holdout_path=str(fed.holdout_path), secure_aggregation=True, round_timeout=120,
                              extra=params.to_config())
    outcome = fed.run(config)
    assert outcome.succeeded, outcome.log[-3000:]
    with RunStore(fed.store_url) as store:
        (run,) = store.list_runs()
        rounds = store.rounds(run.run_id)
    assert run.status == "completed", run.message
    assert run.config["gbdt-n-trees"] == 1 and sorted(run.institutions) == sorted(fed.split.names())
    assert [r.round for r in rounds] == [1]
    assert rounds[0].global_metrics["val-loss"] > 0
