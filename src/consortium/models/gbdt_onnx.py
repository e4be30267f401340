"""ONNX export of a boosted ensemble: ``ai.onnx.ml.TreeEnsembleRegressor`` + ``Sigmoid``.

The graph takes ``input`` (float32, ``(N, d)``, the raw feature columns in the
training order) and returns ``score`` (float32, ``(N,)``): the fraud
probability, equal to :func:`consortium.models.gbdt.predict_proba` to about
1e-6. Every split node is ``BRANCH_LEQ`` on the float32 bin edge the tree was
grown with (``x <= edge`` is exactly ``bin(x) <= t``), leaves carry their
values, and the ensemble's base score is the regressor's ``base_values``. The
edge agent scores it with onnxruntime like any other bundle model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from consortium.errors import param_error
from consortium.models.gbdt import BoostResult
from consortium.models.gbdt_binning import BinEdges
from consortium.models.gbdt_tree import Ensemble

INPUT_NAME = "input"
"""Same input and output names as the MLP bundles (consortium.registry.export)."""
OUTPUT_NAME = "score"
ML_OPSET = 3
ONNX_OPSET = 17


def ensemble_to_onnx(
    ensemble: Ensemble, edges: BinEdges, *, feature_names: Sequence[str] | None = None, doc: str = ""
) -> onnx.ModelProto:
    """The ONNX model of ``ensemble`` (binned thresholds mapped back to raw values by ``edges``)."""
    d = edges.n_features
    if feature_names is not None and len(feature_names) != d:
        raise param_error("feature_names", "ensemble_to_onnx", f"{d} names", len(feature_names))
    attrs: dict[str, list[Any]] = {
        k: [] for k in ("nodes_treeids", "nodes_nodeids", "nodes_featureids", "nodes_values", "nodes_modes",
                        "nodes_truenodeids", "nodes_falsenodeids", "target_treeids", "target_nodeids",
                        "target_ids", "target_weights")
    }
    trees = ensemble.trees
    for t, tree in enumerate(trees):
        for node in range(tree.n_nodes):
            leaf = tree.left[node] < 0
            attrs["nodes_treeids"].append(t)
            attrs["nodes_nodeids"].append(node)
            attrs["nodes_featureids"].append(0 if leaf else tree.feature[node])
            attrs["nodes_values"].append(
                0.0 if leaf else edges.threshold_value(tree.feature[node], tree.threshold[node])
            )
            attrs["nodes_modes"].append("LEAF" if leaf else "BRANCH_LEQ")
            attrs["nodes_truenodeids"].append(0 if leaf else tree.left[node])
            attrs["nodes_falsenodeids"].append(0 if leaf else tree.right[node])
            if leaf:
                attrs["target_treeids"].append(t)
                attrs["target_nodeids"].append(node)
                attrs["target_ids"].append(0)
                attrs["target_weights"].append(float(tree.value[node]))
    if not trees:  # an ensemble without trees still scores its base rate: one leaf of value 0
        for k, v in (("nodes_treeids", 0), ("nodes_nodeids", 0), ("nodes_featureids", 0), ("nodes_values", 0.0),
                     ("nodes_modes", "LEAF"), ("nodes_truenodeids", 0), ("nodes_falsenodeids", 0),
                     ("target_treeids", 0), ("target_nodeids", 0), ("target_ids", 0), ("target_weights", 0.0)):
            attrs[k].append(v)
    regressor = helper.make_node(
        "TreeEnsembleRegressor", [INPUT_NAME], ["margin"], domain="ai.onnx.ml", n_targets=1,
        aggregate_function="SUM", post_transform="NONE", base_values=[float(ensemble.base_score)],
        **attrs,  # type: ignore[arg-type]
    )
    sigmoid = helper.make_node("Sigmoid", ["margin"], ["probability"])
    shape = helper.make_tensor("flat", TensorProto.INT64, [1], [-1])
    reshape = helper.make_node("Reshape", ["probability", "flat"], [OUTPUT_NAME])
    graph = helper.make_graph(
        [regressor, sigmoid, reshape], "consortium_gbdt",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", d])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N"])],
        initializer=[shape],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET), helper.make_opsetid("ai.onnx.ml", ML_OPSET)],
        producer_name="consortium", doc_string=doc or "Federated gradient-boosted trees (consortium)",
    )
    model.ir_version = 8
    if feature_names is not None:
        helper.set_model_props(model, {"feature_names": ",".join(feature_names)})
    onnx.checker.check_model(model)
    return model


def export_onnx(result: BoostResult, *, feature_names: Sequence[str] | None = None) -> bytes:
    """Serialized ONNX bytes of a trained :class:`BoostResult`."""
    return ensemble_to_onnx(result.ensemble, result.edges, feature_names=feature_names).SerializeToString()


def onnx_scores(model_bytes: bytes, X: np.ndarray) -> np.ndarray:  # noqa: N803
    """Score raw rows with onnxruntime (one intra-op thread), as the edge agent does."""
    import onnxruntime as ort  # noqa: PLC0415

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model_bytes, sess_options=opts, providers=["CPUExecutionProvider"])
    out = sess.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(X, dtype=np.float32)})[0]
    return np.asarray(out, dtype=np.float64)


def export_bundle(
    out_path: Path | str,
    *,
    result: BoostResult,
    feature_names: Sequence[str],
    threshold: float,
    model_version: str,
    private_key: Any,
    run_id: str | None = None,
    parent_version: str | None = None,
    metrics: Mapping[str, float] | None = None,
    privacy: Mapping[str, Any] | None = None,
) -> Path:
    """Write the ensemble as a signed bundle (:func:`consortium.registry.bundle.write_bundle`), kind ``gbdt``.

    Feature ranges in the manifest are the outermost bin edges (where the
    federated quantiles put the bulk of the rows); a feature without edges
    (constant) has no range. ``threshold`` is the probability threshold the
    coordinator chose on summed validation histograms.
    """
    from consortium.registry.bundle import BundleManifest, FeatureSpec, write_bundle  # noqa: PLC0415

    names = list(feature_names)
    if len(names) != result.edges.n_features:
        raise param_error("feature_names", "export_bundle", f"{result.edges.n_features} names", len(names))
    features = tuple(
        FeatureSpec(name, "float32", float(e[0]) if len(e) else None, float(e[-1]) if len(e) else None)
        for name, e in zip(names, result.edges.edges, strict=True)
    )
    manifest = BundleManifest(
        model_version=model_version, parent_version=parent_version, kind="gbdt", features=features,
        thresholds={"default": float(threshold)}, input_name=INPUT_NAME, output_name=OUTPUT_NAME, run_id=run_id,
        metrics={k: float(v) for k, v in (metrics or {}).items() if np.isfinite(v)},
        privacy=dict(privacy) if privacy is not None else None,
        extra={"score": "fraud probability in [0, 1]", "trees": len(result.ensemble.trees),
               "operators": "ai.onnx.ml.TreeEnsembleRegressor + Sigmoid", "ml_opset": ML_OPSET},
    )
    onnx_bytes = export_onnx(result, feature_names=names)
    return write_bundle(out_path, onnx_model=onnx_bytes, manifest=manifest, private_key=private_key)
