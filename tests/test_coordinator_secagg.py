"""The coordinator's rounds under secure aggregation with institutions dropping out.

Runs the real ClientApp (with ``secagg_mod``) behind an in-process Grid that
serialises every message through Flower's protobuf format and lets a policy
make nodes vanish at a chosen protocol stage.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from consortium.data import federate_institutions, generate_federation, save_split
from consortium.errors import FederationError
from consortium.federation.client_app import build_client_app
from consortium.federation.config import FederationConfig
from consortium.federation.coordinator import Coordinator
from consortium.registry import RunStore
from consortium.secagg.inprocess import InProcessGrid

NODES = [101, 202, 303]


@pytest.fixture(scope="module")
def institution_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, object]]:
    fed = generate_federation(3, transactions_per_institution=2_000, seed=11, n_days=40)
    split = federate_institutions({k: v.dataset for k, v in fed.items()}, seed=11)
    root = Path(save_split(split, tmp_path_factory.mktemp("inst")))
    names = split.names()
    return {node: {"data-path": str(root / name), "institution": name} for node, name in zip(NODES, names, strict=True)}


def _drop_in_training(dropping: set[int], stage: str):  # type: ignore[no-untyped-def]
    """Nodes in ``dropping`` vanish at ``stage`` of every *training* round (the statistics round goes through)."""
    seen: Counter[tuple[int, str]] = Counter()

    def policy(node: int, label: str) -> str:
        seen[(node, label)] += 1
        first_secure_round_is_statistics = seen[(node, label)] == 1
        if node in dropping and label == stage and not first_secure_round_is_statistics:
            return "drop"
        return "deliver"

    return policy


def _run(tmp_path: Path, dirs, policy, *, min_nodes: int):  # type: ignore[no-untyped-def]
    cfg = FederationConfig(num_rounds=2, min_nodes=min_nodes, round_timeout=1.5, secure_aggregation=True,
                           store_url=f"sqlite:///{tmp_path}/runs.db", batch_size=128)
    grid = InProcessGrid(build_client_app(disclose_eval_default=True), node_ids=NODES, node_configs=dirs,
                         policy=policy)
    store = RunStore(cfg.store_url)
    return Coordinator(cfg, store=store).run, grid, store


@pytest.mark.parametrize("stage", ["share_keys", "masked_input"])
def test_round_completes_with_the_survivors_when_one_institution_drops(
    tmp_path: Path, institution_dirs, stage: str  # type: ignore[no-untyped-def]
) -> None:
    run, grid, store = _run(tmp_path, institution_dirs, _drop_in_training({303}, stage), min_nodes=2)
    result = run(grid)
    dropped_name = institution_dirs[303]["institution"]
    for report in result.rounds:
        assert dropped_name in report.dropped
        assert set(report.participants) == {institution_dirs[n]["institution"] for n in (101, 202)}
    assert [r.round for r in store.rounds(result.run_id)] == [1, 2]
    store.close()


def test_unmask_dropout_keeps_the_contribution_that_arrived(tmp_path: Path, institution_dirs) -> None:  # type: ignore[no-untyped-def]
    run, grid, store = _run(tmp_path, institution_dirs, _drop_in_training({303}, "unmask"), min_nodes=3)
    result = run(grid)
    # Its masked input arrived before it vanished: it is in the sum, and never unmasked individually.
    assert all(len(r.participants) == 3 and not r.dropped for r in result.rounds)
    store.close()


def test_too_many_dropouts_abort_cleanly_and_leave_the_model_unchanged(tmp_path: Path, institution_dirs) -> None:  # type: ignore[no-untyped-def]
    run, grid, store = _run(tmp_path, institution_dirs, _drop_in_training({202, 303}, "masked_input"), min_nodes=1)
    with pytest.raises(FederationError, match="masked_input") as excinfo:
        run(grid)
    assert "answered=1" in str(excinfo.value) and "threshold=2" in str(excinfo.value)
    (rec,) = store.list_runs()
    assert rec.status == "failed" and "masked_input" in (rec.message or "")
    assert store.rounds(rec.run_id) == []  # no round recorded: the global model never changed
    store.close()
