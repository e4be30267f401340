"""Federated boosting as real processes: TLS coordinator + three institution nodes, one stump, SecAgg on."""

from __future__ import annotations

from pathlib import Path

import pytest

from consortium.data import federate_institutions, generate_federation, save_npz, save_split
from consortium.federation.certs import make_local_ca
from consortium.federation.config import FederationConfig
from consortium.federation.deploy import FlowerProcess, start_coordinator, start_node, submit_run
from consortium.models.gbdt import GBDTParams
from consortium.registry import RunStore

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_deployed_nodes_answer_the_gbdt_message_types(tmp_path: Path) -> None:
    # One tree of depth 1: Flower's SuperNode polls every 3 s, and every secure round has four stages.
    fed = generate_federation(3, transactions_per_institution=1_500, seed=4, n_days=30)
    split = federate_institutions({k: v.dataset for k, v in fed.items()}, seed=4)
    data_root = save_split(split, tmp_path / "data")
    holdout = save_npz(split.holdout, tmp_path / "holdout.npz")
    certs = make_local_ca(tmp_path / "certs")
    store_url = f"sqlite:///{tmp_path / 'runs.db'}"
    params = GBDTParams(n_trees=1, max_depth=1, max_bins=16, early_stopping=0)
    config = FederationConfig(model="gbdt", min_nodes=3, store_url=store_url, run_name="deployed-gbdt",
                              holdout_path=str(holdout), secure_aggregation=True, round_timeout=120,
                              extra=params.to_config())
    nodes: list[FlowerProcess] = []
    with start_coordinator(certs=certs, work_dir=tmp_path / "coordinator") as coordinator:
        coordinator.wait_ready(timeout=60)
        try:
            for name in split.names():
                nodes.append(start_node(fleet_address=coordinator.addresses.fleet, ca_cert=certs.ca_cert,
                                        data_path=Path(data_root) / name, institution=name,
                                        work_dir=tmp_path / f"node-{name}"))
            for node in nodes:
                node.wait_ready(timeout=60)  # type: ignore[attr-defined]
            outcome = submit_run(coordinator, run_config=config.to_run_config(), timeout=600)
        finally:
            for node in nodes:
                node.stop()
    assert outcome.succeeded, outcome.log[-3000:]
    with RunStore(store_url) as store:
        (run,) = store.list_runs()
        rounds = store.rounds(run.run_id)
    assert run.status == "completed", run.message
    assert run.config["gbdt-n-trees"] == 1 and sorted(run.institutions) == sorted(split.names())
    assert [r.round for r in rounds] == [1]
    assert rounds[0].global_metrics["val-loss"] > 0
