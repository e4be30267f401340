"""The consortium apps as real processes: TLS coordinator + three institution nodes, three rounds."""

from __future__ import annotations

from pathlib import Path

import pytest

from consortium.data import federate_institutions, generate_federation, save_npz, save_split
from consortium.federation.certs import make_local_ca
from consortium.federation.config import FederationConfig
from consortium.federation.deploy import FlowerProcess, start_coordinator, start_node, submit_run
from consortium.registry import RunStore

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_coordinator_and_three_nodes_complete_three_rounds_over_tls(tmp_path: Path) -> None:
    # Secure aggregation is on (the default). The clear-text transport is covered in simulation;
    # one deployed run is enough here because Flower's SuperNode polls every 3 s, which makes
    # each deployed round cost tens of seconds.
    fed = generate_federation(3, transactions_per_institution=3_000, seed=3, n_days=60)
    split = federate_institutions({k: v.dataset for k, v in fed.items()}, seed=3)
    data_root = save_split(split, tmp_path / "data")
    holdout = save_npz(split.holdout, tmp_path / "holdout.npz")
    certs = make_local_ca(tmp_path / "certs")
    store_url = f"sqlite:///{tmp_path / 'runs.db'}"
    config = FederationConfig(num_rounds=3, min_nodes=3, store_url=store_url, run_name="deployed-test",
                              holdout_path=str(holdout), secure_aggregation=True,
                              round_timeout=120)

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
    assert run.status == "completed"
    assert sorted(run.institutions) == sorted(split.names())
    assert [r.round for r in rounds] == [1, 2, 3]
    assert all(sorted(r.participants) == sorted(split.names()) for r in rounds)
    assert rounds[-1].global_metrics["auprc"] > split.holdout.positive_rate
    assert run.config["transport"] == "secagg"
