"""Federated boosting over the real ClientApp (in-process Grid, protobuf on every message).

The oracle: a plain federated run must grow exactly the trees that the same
booster grows on the pooled rows with the same bin edges; secure aggregation
must change the sums only by its fixed-point rounding, and no reply may carry
an institution's histogram in the clear.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.common.serde import recorddict_from_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # pylint: disable=E0611

from consortium.data import Dataset, FederatedSplit, InstitutionSplit, save_split
from consortium.errors import FederationError
from consortium.federation import gbdt_protocol as p
from consortium.federation.client_app import build_client_app
from consortium.federation.config import FederationConfig
from consortium.federation.gbdt_coordinator import GBDTCoordinator, GBDTRunResult, load_gbdt_checkpoint
from consortium.models.gbdt import GBDTParams, fit_local, predict_proba
from consortium.privacy.ledger import PrivacyLedger
from consortium.registry import RunStore
from consortium.secagg.inprocess import InProcessGrid

NODES = [101, 202, 303]
PARAMS = GBDTParams(n_trees=6, max_depth=3, max_leaves=8, max_bins=16, min_samples_leaf=10, early_stopping=0)
FEATURES = ("amount", "hour", "kind", "noise", "const")


def _dataset(n: int, seed: int, *, positives: bool = True, name: str = "d") -> Dataset:
    rng = np.random.default_rng(seed)
    X = np.column_stack([rng.lognormal(3, 1, n), rng.integers(0, 24, n), rng.integers(0, 3, n),  # noqa: N806
                         rng.normal(size=n), np.full(n, 2.5)]).astype(np.float32)
    logit = -3 + 2.0 * (X[:, 0] > 40) + 1.0 * (X[:, 2] == 2) + 0.5 * X[:, 3]
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64) if positives else np.zeros(n, np.int64)
    return Dataset(X, y, FEATURES, name=name)


def _split(*, no_positives_at: int | None = None) -> FederatedSplit:
    insts = []
    for i, name in enumerate(["bank_a", "bank_b", "bank_c"]):
        pos = i != no_positives_at
        insts.append(InstitutionSplit(name, _dataset(600 + 200 * i, i, positives=pos),
                                      _dataset(300, 10 + i, positives=pos), _dataset(100, 20 + i, positives=pos)))
    return FederatedSplit(tuple(insts), _dataset(800, 99, name="holdout"))


def _run(tmp: Path, split: FederatedSplit, *, secure: bool, params: GBDTParams = PARAMS, policy=None,  # type: ignore[no-untyped-def]
         capture: bool = False, dirs: dict[int, dict[str, object]] | None = None, noise_std: float = 0.0,
         on_grid=None, dp_epsilon: float | None = None) -> tuple[GBDTRunResult, InProcessGrid]:
    root = Path(save_split(split, tmp / "data"))
    if dirs is None:
        dirs = {n: {"data-path": str(root / name), "institution": name} for n, name in
                zip(NODES, split.names(), strict=True)}
    cfg = FederationConfig(min_nodes=3, secure_aggregation=secure, store_url=f"sqlite:///{tmp}/runs.db",
                           round_timeout=30)
    grid = InProcessGrid(build_client_app(), node_ids=NODES, node_configs=dirs, policy=policy, capture=capture)
    if on_grid is not None:
        on_grid(grid)
    with RunStore(cfg.store_url) as store:
        result = GBDTCoordinator(cfg, params=params, store=store, holdout=split.holdout,
                                 noise_std=noise_std, dp_epsilon=dp_epsilon).run(grid)
        assert store.get_run(result.run_id).status == "completed"
        if dp_epsilon is not None:
            charges = PrivacyLedger(store).charges(run_id=result.run_id)
            assert sorted(c.institution for c in charges) == sorted(split.names())
            assert all(0 < c.epsilon <= dp_epsilon for c in charges), [(c.epsilon, c.epsilon_rdp) for c in charges]
    return result, grid


def test_plain_federation_grows_exactly_the_centralized_trees(tmp_path: Path) -> None:
    split = _split()
    fed, _ = _run(tmp_path, split, secure=False)
    train, val = split.pooled_train(), split.pooled_val()
    central = fit_local(train.X, train.y, val.X, val.y, params=PARAMS, edges=fed.boost.edges)
    assert fed.boost.best_n_trees == central.best_n_trees
    assert [t.arrays()[0].tolist() for t in fed.boost.ensemble.trees] == [
        t.arrays()[0].tolist() for t in central.ensemble.trees]
    np.testing.assert_allclose(fed.predict_proba(split.holdout.X), predict_proba(central, split.holdout.X), atol=1e-9)
    assert len(fed.boost.edges.edges[4]) == 0  # constant feature: one bin, never split
    assert fed.holdout_metrics["roc-auc"] > 0.7
    with RunStore(f"sqlite:///{tmp_path}/runs.db") as store:  # the kept ensemble is the last round's checkpoint
        rounds = store.rounds(fed.run_id)
        stored, threshold, names = load_gbdt_checkpoint(store, fed.run_id)
    assert [r.round for r in rounds] == list(range(1, PARAMS.n_trees + 1))
    assert threshold == fed.threshold and names == FEATURES
    np.testing.assert_array_equal(predict_proba(stored, split.holdout.X), fed.predict_proba(split.holdout.X))


def test_secure_aggregation_hides_histograms_and_matches_plain(tmp_path: Path) -> None:
    split = _split()
    plain, _ = _run(tmp_path / "plain", split, secure=False)
    secure, grid = _run(tmp_path / "secure", split, secure=True, capture=True)
    np.testing.assert_allclose(secure.predict_proba(split.holdout.X), plain.predict_proba(split.holdout.X), atol=0.02)
    assert secure.holdout_metrics["auprc"] == pytest.approx(plain.holdout_metrics["auprc"], abs=0.03)
    labels = {label for _, label, _ in grid.captured_up}
    assert labels == {"query.info", "advertise_keys", "share_keys", "masked_input", "unmask"}
    for _, _, raw in grid.captured_up:  # beyond the schema query: keys, shares, masked vectors only
        content = recorddict_from_proto(ProtoRecordDict.FromString(raw))
        assert "update" not in content
        assert all(p.SUMS not in rec for rec in content.array_records.values())


def test_a_node_that_lost_its_cache_is_resynchronised(tmp_path: Path) -> None:
    split = _split()
    reference, _ = _run(tmp_path / "ref", split, secure=False)
    seen = {"n": 0}
    grid_box: list[InProcessGrid] = []

    def policy(node: int, label: str) -> str:
        if node == 202 and label == p.LEVEL:
            seen["n"] += 1
            if seen["n"] == 9:  # the node restarts: its context state is gone
                for key in (p.CACHE_STATE, p.CACHE_ARRAYS):
                    if key in grid_box[0].contexts[node].state:
                        del grid_box[0].contexts[node].state[key]
        return "deliver"

    result, grid = _run(tmp_path / "restart", split, secure=False, policy=policy, on_grid=grid_box.append)
    assert any("no boosting state" in e for e in grid.client_errors)
    np.testing.assert_allclose(result.predict_proba(split.holdout.X), reference.predict_proba(split.holdout.X),
                               atol=1e-9)


def test_an_institution_without_positives_still_contributes(tmp_path: Path) -> None:
    result, grid = _run(tmp_path, _split(no_positives_at=1), secure=True)
    assert not grid.client_errors
    assert result.boost.best_n_trees >= 1 and result.holdout_metrics["roc-auc"] > 0.65


def test_mismatched_feature_schemas_are_refused(tmp_path: Path) -> None:
    split = _split()
    other = _dataset(300, 5)
    renamed = Dataset(other.X, other.y, ("amount", "hour", "kind", "noise", "CONSTANT"), name="odd")
    odd = FederatedSplit((InstitutionSplit("bank_c", renamed, renamed, renamed),), renamed)
    odd_root = Path(save_split(odd, tmp_path / "odd"))
    root = tmp_path / "data"
    dirs = {101: {"data-path": str(root / "bank_a"), "institution": "bank_a"},
            202: {"data-path": str(root / "bank_b"), "institution": "bank_b"},
            303: {"data-path": str(odd_root / "bank_c"), "institution": "bank_c"}}
    with pytest.raises(FederationError, match="Feature schema mismatch"):
        _run(tmp_path, split, secure=False, dirs=dirs)


def test_histogram_noise_changes_the_sums_but_training_completes(tmp_path: Path) -> None:
    split = _split()
    plain, _ = _run(tmp_path / "a", split, secure=False)
    noisy, _ = _run(tmp_path / "b", split, secure=True, noise_std=2.0)
    assert not np.allclose(noisy.predict_proba(split.holdout.X), plain.predict_proba(split.holdout.X), atol=1e-3)
    # Unaccounted noise of std 2 on every histogram entry can make the first split's gain negative, and boosting
    # then stops with no tree (a constant score, AUC 0.5; about 1 run in 4 here): that is allowed, a model whose
    # trees rank worse than 0.6 is not.
    scores = noisy.predict_proba(split.holdout.X)
    assert noisy.holdout_metrics["roc-auc"] > 0.6 or np.ptp(scores) == 0, noisy.holdout_metrics


def test_dp_run_is_calibrated_and_charged_to_every_institutions_ledger(tmp_path: Path) -> None:
    result, _ = _run(tmp_path, _split(), secure=True, dp_epsilon=8.0)
    privacy = result.extra["privacy"]
    assert privacy["noise_multiplier"] > 0 and privacy["releases"] <= privacy["n_releases"] + 2
    assert 0 < privacy["epsilon_spent"] <= 8.0
