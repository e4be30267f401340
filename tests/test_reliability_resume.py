"""Resuming a run in-process: which run is picked, what is refused, and that resumed rounds continue the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from consortium.data import federate_institutions, generate_federation, save_split
from consortium.errors import FederationError, StoreError
from consortium.federation.client_app import build_client_app
from consortium.federation.config import FederationConfig
from consortium.federation.coordinator import Coordinator
from consortium.registry import RunStore
from consortium.secagg.inprocess import InProcessGrid

NODES = [11, 22, 33]


@pytest.fixture(scope="module")
def configs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, object]]:
    fed = generate_federation(3, transactions_per_institution=800, seed=9, n_days=20)
    split = federate_institutions({k: v.dataset for k, v in fed.items()}, seed=9)
    root = Path(save_split(split, tmp_path_factory.mktemp("inst")))
    return {n: {"data-path": str(root / name), "institution": name}
            for n, name in zip(NODES, split.names(), strict=True)}


def _run(store: RunStore, configs, nodes=NODES, **options):  # type: ignore[no-untyped-def]
    cfg = FederationConfig(min_nodes=len(nodes), secure_aggregation=False, store_url="sqlite://",
                           strategy="fedadam", round_timeout=30, run_name="r", **options)
    grid = InProcessGrid(build_client_app(), node_ids=nodes, node_configs={n: configs[n] for n in nodes})
    return Coordinator(cfg, store=store).run(grid)


def test_resume_continues_after_the_last_round_with_its_checkpoint(tmp_path: Path, configs) -> None:  # type: ignore[no-untyped-def]
    with RunStore(f"sqlite:///{tmp_path / 'r.db'}") as store:
        first = _run(store, configs, num_rounds=2)
        store.finish_run(first.run_id, status="failed", message="simulated crash")
        ckpt2 = store.load_checkpoint(first.run_id, round=2)
        resumed = _run(store, configs, num_rounds=4, resume="latest")
        assert resumed.run_id == first.run_id and len(store.list_runs()) == 1
        assert [r.round for r in resumed.rounds] == [1, 2, 3, 4]
        assert [r.round for r in store.rounds(first.run_id)] == [1, 2, 3, 4]
        assert store.get_run(first.run_id).status == "completed"
        # The resumed run started from round 2's model, not from a fresh one: round 3 is one step away from it.
        ckpt3 = store.load_checkpoint(first.run_id, round=3)
        n = int(ckpt2.extra["n_params"])
        step = sum(float(np.linalg.norm(a - b)) for a, b in zip(ckpt3.arrays[:n], ckpt2.arrays[:n], strict=True))
        fresh = _run(RunStore("sqlite://"), configs, num_rounds=1).params
        assert step < sum(float(np.linalg.norm(a - b)) for a, b in zip(ckpt3.arrays[:n], fresh, strict=True))
        # A completed run cannot be resumed; an unknown one is a clear store error.
        with pytest.raises(FederationError, match="already completed"):
            _run(store, configs, num_rounds=5, resume=first.run_id)
        with pytest.raises(StoreError, match="nope"):
            _run(store, configs, num_rounds=5, resume="nope")
        # "latest" with nothing unfinished starts a new run.
        again = _run(store, configs, num_rounds=1, resume="latest")
        assert again.run_id != first.run_id


def test_resume_refuses_an_institution_that_was_not_in_the_run(tmp_path: Path, configs) -> None:  # type: ignore[no-untyped-def]
    with RunStore(f"sqlite:///{tmp_path / 'r.db'}") as store:
        first = _run(store, configs, nodes=NODES[:2], num_rounds=1)
        store.finish_run(first.run_id, status="failed")
        with pytest.raises(FederationError, match=r"did not take part in it"):
            _run(store, configs, num_rounds=2, resume="latest")
