"""The consortium apps as real processes: TLS coordinator + three institution nodes, three rounds."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

from consortium.federation.config import FederationConfig
from consortium.registry import RunStore

if TYPE_CHECKING:
    from conftest import DeployedFederation  # the shared deployed-federation setup (tests/conftest.py)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_coordinator_and_three_nodes_complete_three_rounds_over_tls(
    deployed_federation: Callable[..., DeployedFederation],
) -> None:
    # Secure aggregation is on (the default). The clear-text transport is covered in simulation;
    # one deployed run is enough here because Flower's SuperNode polls every 3 s, which makes
    # each deployed round cost tens of seconds.
    fed = deployed_federation(transactions_per_institution=3_000, seed=3, n_days=60)
    config = FederationConfig(num_rounds=3, min_nodes=3, store_url=fed.store_url, run_name="deployed-test",
                              holdout_path=str(fed.holdout_path), secure_aggregation=True,
                              round_timeout=120)
    outcome = fed.run(config)
    assert outcome.succeeded, outcome.log[-3000:]

    split = fed.split
    with RunStore(fed.store_url) as store:
        (run,) = store.list_runs()
        rounds = store.rounds(run.run_id)
    assert run.status == "completed"
    assert sorted(run.institutions) == sorted(split.names())
    assert [r.round for r in rounds] == [1, 2, 3]
    assert all(sorted(r.participants) == sorted(split.names()) for r in rounds)
    assert rounds[-1].global_metrics["auprc"] > split.holdout.positive_rate
    assert run.config["transport"] == "secagg"
