"""Export a trained MLP or autoencoder to ONNX with its preprocessing inside the graph.

The edge agent runs ONNX Runtime only, so everything between a raw transaction
row and its score lives in the graph:

1. **Feature order**: the graph input is float32 ``(n, d)`` in the order of the
   manifest's ``features``; the agent fills it from named fields.
2. **Standardisation** with the federated :class:`~consortium.models.Standardizer`:
   ``z = (x - mean) / std``, in float32 as in training.
3. **Missing values**: NaN (and ±inf) become the training mean, i.e. ``z = 0``
   (``Where(IsNaN(z) or IsInf(z), 0, z)``).
4. **Model**: ``Gemm``/``Relu`` layers built from the weights.
5. **Score** (float32 ``(n,)``, higher = more suspicious): ``Sigmoid`` of the
   logit for the MLP (fraud probability in [0, 1]); mean squared reconstruction
   error of ``z`` for the autoencoder.

The graph is written directly with :mod:`onnx.helper` from the weights rather
than traced with :func:`torch.onnx.export`: torch 2.13's exporter needs the extra
``onnxscript`` dependency, and the layer vocabulary of our models is small
(``Linear``, ``ReLU``, ``Dropout``).  Other layers are refused with a clear error.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from consortium.errors import ConfigError, param_error
from consortium.models import Standardizer, model_task
from consortium.registry.bundle import BundleManifest, FeatureSpec, write_bundle

logger = logging.getLogger(__name__)

__all__ = ["OPSET", "RANGE_STDS", "export_bundle", "export_onnx", "feature_specs", "model_kind"]

OPSET = 17
"""ONNX opset of exported graphs (ONNX Runtime >= 1.14 runs it)."""
RANGE_STDS = 4.0
"""Feature ranges in the manifest are ``mean ± RANGE_STDS · std`` of the federated statistics."""


def model_kind(model: nn.Module) -> str:
    """Bundle ``kind`` of a model: ``"mlp"`` for classifiers, ``"autoencoder"`` for reconstruction models."""
    return "autoencoder" if model_task(model) == "reconstruction" else "mlp"


def _layer_stack(model: nn.Module) -> list[nn.Module]:
    """The model's layers in execution order (``layers``, or ``encoder`` then ``decoder``)."""
    if isinstance(getattr(model, "layers", None), nn.Sequential):
        return list(model.layers)  # type: ignore[arg-type]
    encoder, decoder = getattr(model, "encoder", None), getattr(model, "decoder", None)
    if isinstance(encoder, nn.Sequential) and isinstance(decoder, nn.Sequential):
        return [*encoder, *decoder]
    raise ConfigError(
        f"Cannot export {type(model).__name__} to ONNX: expected a 'layers' nn.Sequential "
        "(MLPClassifier) or 'encoder'/'decoder' nn.Sequential (Autoencoder)."
    )


def export_onnx(
    model: nn.Module,
    standardizer: Standardizer,
    *,
    input_name: str = "input",
    output_name: str = "score",
    model_version: str = "",
) -> bytes:
    """Serialize ``model`` with standardisation and missing-value handling as an ONNX graph.

    Parameters
    ----------
    model : nn.Module
        A trained :class:`~consortium.models.MLPClassifier`, :class:`~consortium.models.Autoencoder`
        or a registered model built from ``Linear``/``ReLU``/``Dropout`` layers.
    standardizer : Standardizer
        The federated scaling the model was trained with.
    input_name, output_name : str
        Graph input (float32 ``(n, d)``) and output (float32 ``(n,)``) names.
    model_version : str
        Stored in the ONNX metadata (``doc_string``) for humans.

    Returns
    -------
    bytes
        The checked, serialized ONNX model.

    Raises
    ------
    ConfigError
        For an unsupported layer or a width mismatch between model and standardizer.
    """
    if not isinstance(model, nn.Module):
        raise param_error("model", "export_onnx", "a torch.nn.Module", type(model).__name__)
    if not isinstance(standardizer, Standardizer):
        raise param_error("standardizer", "export_onnx", "a Standardizer", type(standardizer).__name__)
    task = model_task(model)
    d = standardizer.n_features
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = [
        numpy_helper.from_array(standardizer.mean.astype(np.float32), "std_mean"),
        numpy_helper.from_array(standardizer.std.astype(np.float32), "std_std"),
        numpy_helper.from_array(np.zeros((), np.float32), "zero"),
        numpy_helper.from_array(np.array([-1], np.int64), "flat_shape"),
    ]
    nodes += [
        helper.make_node("Sub", [input_name, "std_mean"], ["centered"]),
        helper.make_node("Div", ["centered", "std_std"], ["scaled"]),
        helper.make_node("IsNaN", ["scaled"], ["is_nan"]),
        helper.make_node("IsInf", ["scaled"], ["is_inf"]),
        helper.make_node("Or", ["is_nan", "is_inf"], ["is_missing"]),
        helper.make_node("Where", ["is_missing", "zero", "scaled"], ["z"]),
    ]
    current, width = "z", d
    linear_index = 0
    for layer in _layer_stack(model):
        if isinstance(layer, nn.Linear):
            weight = layer.weight.detach().cpu().numpy().astype(np.float32)
            if weight.shape[1] != width:
                raise ConfigError(
                    f"Cannot export {type(model).__name__}: layer {linear_index} expects {weight.shape[1]} "
                    f"inputs but receives {width} (the standardizer has {d} features)."
                )
            bias = (
                layer.bias.detach().cpu().numpy().astype(np.float32)
                if layer.bias is not None
                else np.zeros(weight.shape[0], np.float32)
            )
            w_name, b_name, out = f"linear{linear_index}_W", f"linear{linear_index}_b", f"linear{linear_index}"
            inits += [numpy_helper.from_array(weight, w_name), numpy_helper.from_array(bias, b_name)]
            nodes.append(helper.make_node("Gemm", [current, w_name, b_name], [out], transB=1))
            current, width = out, weight.shape[0]
            linear_index += 1
        elif isinstance(layer, nn.ReLU):
            nodes.append(helper.make_node("Relu", [current], [f"{current}_relu"]))
            current = f"{current}_relu"
        elif isinstance(layer, nn.Dropout | nn.Identity):
            continue  # inference: identity
        else:
            raise ConfigError(
                f"Cannot export {type(model).__name__} to ONNX: layer {type(layer).__name__} is not supported "
                "(supported: Linear, ReLU, Dropout)."
            )
    if task == "reconstruction":
        if width != d:
            raise ConfigError(f"Cannot export {type(model).__name__}: reconstruction has {width} columns, not {d}.")
        nodes += [
            helper.make_node("Sub", [current, "z"], ["residual"]),
            helper.make_node("Mul", ["residual", "residual"], ["squared"]),
            helper.make_node("ReduceMean", ["squared"], ["error"], axes=[1], keepdims=0),
            helper.make_node("Identity", ["error"], [output_name]),
        ]
    else:
        if width != 1:
            raise ConfigError(f"Cannot export {type(model).__name__}: a classifier must end in 1 logit, not {width}.")
        nodes += [
            helper.make_node("Sigmoid", [current], ["probability"]),
            helper.make_node("Reshape", ["probability", "flat_shape"], [output_name]),
        ]
    graph = helper.make_graph(
        nodes,
        "consortium_score",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["n", d])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["n"])],
        initializer=inits,
    )
    onnx_model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="consortium",
        doc_string=f"consortium {model_kind(model)} {model_version}".strip(),
    )
    onnx_model.ir_version = 8  # readable by every ONNX Runtime that supports opset 17
    onnx.checker.check_model(onnx_model, full_check=True)
    return onnx_model.SerializeToString()


def feature_specs(
    feature_names: Sequence[str], standardizer: Standardizer, *, range_stds: float = RANGE_STDS
) -> tuple[FeatureSpec, ...]:
    """Manifest feature schema: names in model order, float32, ranges ``mean ± range_stds · std``.

    The federated statistics hold only sums and sums of squares (no institution
    reveals its extremes), so the range is the band where almost all training
    rows lie; the agent uses it to report out-of-range inputs, never to clip.
    """
    names = list(feature_names)
    if len(names) != standardizer.n_features:
        raise param_error(
            "feature_names", "feature_specs", f"{standardizer.n_features} names (one per feature)", len(names)
        )
    mean = standardizer.mean.astype(np.float64)
    std = standardizer.std.astype(np.float64)
    return tuple(
        FeatureSpec(name, "float32", float(m - range_stds * s), float(m + range_stds * s))
        for name, m, s in zip(names, mean, std, strict=True)
    )


def export_bundle(
    out_path: Path | str,
    *,
    model: nn.Module,
    standardizer: Standardizer,
    feature_names: Sequence[str],
    threshold: float,
    model_version: str,
    private_key: Ed25519PrivateKey,
    parent_version: str | None = None,
    run_id: str | None = None,
    metrics: Mapping[str, float] | None = None,
    privacy: Mapping[str, Any] | None = None,
    thresholds: Mapping[str, float] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Export ``model`` to ONNX and write a signed bundle with its full manifest.

    ``threshold`` becomes ``thresholds["default"]``; further named thresholds go in
    ``thresholds``.  Non-finite metrics (e.g. AUPRC without positives) are left
    out: the manifest holds finite numbers only.
    """
    onnx_bytes = export_onnx(model, standardizer, model_version=model_version)
    kind = model_kind(model)
    manifest = BundleManifest(
        model_version=model_version,
        parent_version=parent_version,
        kind=kind,
        features=feature_specs(feature_names, standardizer),
        thresholds={**dict(thresholds or {}), "default": float(threshold)},
        run_id=run_id,
        metrics={k: float(v) for k, v in (metrics or {}).items() if np.isfinite(v)},
        privacy=dict(privacy) if privacy is not None else None,
        extra={
            "score": "fraud probability in [0, 1]" if kind == "mlp" else "mean squared reconstruction error",
            "missing_values": "NaN/inf replaced by the training mean",
            "feature_range": f"mean ± {RANGE_STDS:g} std of the federated statistics",
            "opset": OPSET,
            **dict(extra or {}),
        },
    )
    return write_bundle(out_path, onnx_model=onnx_bytes, manifest=manifest, private_key=private_key)
