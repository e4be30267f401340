"""The boosting learner on its own: binning, histograms, splits, trees, ONNX parity, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from consortium.errors import ConfigError, DataError
from consortium.models.gbdt import (
    GBDTParams,
    best_split,
    check_training_data,
    fit_local,
    gradients,
    node_histograms,
    predict_proba,
)
from consortium.models.gbdt_binning import BinEdges, cell_counts, edges_from_cell_counts, local_edges
from consortium.models.gbdt_onnx import export_onnx, onnx_scores
from consortium.models.gbdt_tree import Tree, ensemble_digest, trees_from_arrays, trees_to_arrays
from consortium.models.metrics import evaluate_scores


def _data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = np.column_stack([  # noqa: N806
        rng.lognormal(3, 1.5, n),  # heavy-tailed amount
        rng.integers(0, 4, n),  # discrete
        rng.normal(0, 1, n),
        np.full(n, 7.0),  # constant
    ]).astype(np.float32)
    logit = -4 + 1.2 * (X[:, 0] > 60) + 1.5 * (X[:, 1] == 3) + 1.0 * X[:, 2]
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    return X, y


def test_bin_rule_matches_the_raw_threshold_and_cell_counts_add_up() -> None:
    X, _ = _data(3000, 0)
    mean, std = X.mean(axis=0).astype(np.float64), X.std(axis=0).astype(np.float64)
    parts = np.array_split(X, 3)
    pooled = cell_counts(X, mean, std, cells=512)
    assert np.array_equal(sum(cell_counts(p, mean, std, cells=512) for p in parts), pooled)
    edges = edges_from_cell_counts(pooled, mean, std, max_bins=32)
    assert len(edges.edges[3]) == 0, "a constant feature gets no edge (one bin, never split)"
    assert len(edges.edges[1]) == 3, "a 4-valued feature gets one bin per value"
    assert 20 <= len(edges.edges[0]) <= 31
    binned = edges.transform(X)
    for f in range(3):
        for t in range(len(edges.edges[f])):
            assert np.array_equal(binned[:, f] <= t, X[:, f] <= edges.edges[f][t])
    back = BinEdges.from_arrays(edges.to_arrays())
    assert back.digest() == edges.digest()


def test_histograms_and_split_match_brute_force() -> None:
    X, y = _data(500, 1)
    edges = local_edges(X, max_bins=16)
    b = edges.transform(X)
    g, h = gradients(np.zeros(len(y)), y.astype(np.float64), 1.0, 3.0)
    node = np.where(b[:, 2] <= 7, 1, 2)
    hist = node_histograms(b, g, h, node, [2], n_bins=16)
    rows = node == 2
    for f in range(4):
        for k in range(16):
            sel = rows & (b[:, f] == k)
            assert hist[0, f, k] == pytest.approx([g[sel].sum(), h[sel].sum(), sel.sum()])
    split = best_split(hist[0], GBDTParams(min_samples_leaf=5, l2=1.0))
    assert split is not None and split.feature != 3
    assert split.left + split.right == pytest.approx(hist[0, 0].sum(axis=0))


def test_boosting_learns_and_onnx_scores_equal_native_scores() -> None:
    X, y = _data(4000, 2)
    Xv, yv = _data(1500, 3)  # noqa: N806
    Xt, yt = _data(2000, 4)  # noqa: N806
    res = fit_local(X, y, Xv, yv, params=GBDTParams(n_trees=40, max_depth=4, max_bins=32))
    assert 1 <= res.best_n_trees <= 40 and len(res.ensemble.trees) == res.best_n_trees
    assert all(t.feature[i] != 3 for t in res.ensemble.trees for i in range(t.n_nodes)), "constant feature split"
    native = predict_proba(res, Xt)
    assert evaluate_scores(yt, native).roc_auc > 0.75
    onnx_bytes = export_onnx(res, feature_names=["amount", "kind", "z", "const"])
    assert np.max(np.abs(onnx_scores(onnx_bytes, Xt) - native)) < 1e-5


def test_tree_arrays_roundtrip_and_digest_chain() -> None:
    t = Tree()
    a, b = t.split(0, feature=1, threshold=3)
    t.split(b, feature=0, threshold=0)
    t.value[a] = 0.5
    back = trees_from_arrays(trees_to_arrays([t, Tree()]))
    assert [x.arrays()[0].tolist() for x in back] == [t.arrays()[0].tolist(), [-1]]
    assert ensemble_digest(back) == ensemble_digest([t, Tree()])
    assert ensemble_digest([Tree()], start=ensemble_digest([t])) == ensemble_digest([t, Tree()])
    with pytest.raises(DataError, match="already split"):
        t.split(0, feature=0, threshold=0)


def test_bad_input_gets_clear_errors() -> None:
    with pytest.raises(DataError, match="categorical strings"):
        check_training_data(np.array([["a", "b"]], dtype=object), np.array([0]))
    with pytest.raises(DataError, match="NaN"):
        check_training_data(np.array([[np.nan, 1.0]]), np.array([0]))
    with pytest.raises(DataError, match="labels"):
        check_training_data(np.zeros((2, 2)), np.array([0, 2]))
    with pytest.raises(ConfigError, match="'max_depth' parameter of GBDTParams must be an int >= 1. Got 0"):
        GBDTParams(max_depth=0)
    with pytest.raises(ConfigError, match="val_metric"):
        GBDTParams(val_metric="f1")  # type: ignore[arg-type]


def test_params_roundtrip_through_run_config() -> None:
    p = GBDTParams(n_trees=7, learning_rate=0.05, class_weight="none", val_metric="auprc")
    assert GBDTParams.from_config(dict(p.to_config())) == p
    assert p.class_weights(100, 0) == (1.0, 1.0)
    assert GBDTParams(class_weight="balanced").class_weights(100, 10) == pytest.approx((100 / 180, 5.0))


def test_signed_bundle_round_trips_and_scores_like_the_native_model(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from consortium.models.gbdt_onnx import export_bundle
    from consortium.registry.bundle import read_bundle
    from consortium.registry.signing import generate_signing_key, load_private_key, load_public_key

    X, y = _data(2000, 5)
    Xv, yv = _data(800, 6)  # noqa: N806
    res = fit_local(X, y, Xv, yv, params=GBDTParams(n_trees=10, max_depth=3, max_bins=16))
    key = generate_signing_key(tmp_path / "k.pem")
    path = export_bundle(tmp_path / "m.bundle", result=res, feature_names=["a", "b", "c", "d"], threshold=0.3,
                         model_version="gbdt-1", private_key=load_private_key(key), metrics={"auprc": 0.5})
    bundle = read_bundle(path, public_key=load_public_key(key.with_suffix(".pem.pub")))
    assert bundle.manifest.kind == "gbdt" and bundle.manifest.thresholds["default"] == 0.3
    assert bundle.manifest.features[3].min is None  # constant feature: no range
    assert np.max(np.abs(onnx_scores(bundle.onnx_bytes, Xv) - predict_proba(res, Xv))) < 1e-5
