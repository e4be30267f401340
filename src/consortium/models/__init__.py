"""consortium.models — PyTorch models, local training, federated standardisation, metrics.

Works on plain numpy arrays: features ``X`` float32 ``(n, d)`` and labels ``y``
int64 ``(n,)`` in {0, 1}.

* :mod:`.architectures` — :class:`MLPClassifier`, :class:`Autoencoder`, the model
  registry (:func:`build_model`, :func:`register_model`) and flat parameter
  exchange (:func:`get_parameters`, :func:`set_parameters`).
* :mod:`.standardize` — :class:`FeatureStats` (additive count/sum/sum-of-squares)
  and :class:`Standardizer`, for feature scaling without sharing rows.
* :mod:`.losses` — weighted BCE and focal loss for imbalanced labels.
* :mod:`.training` — :func:`train_local` (with FedProx) and :func:`predict_scores`.
* :mod:`.metrics` — AUPRC, recall at a false-positive budget, precision@k,
  threshold choice (:func:`evaluate_scores`, :class:`FraudMetrics`).
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from consortium.models.architectures import (
        Autoencoder,
        MLPClassifier,
        ModelBuilder,
        ModelTask,
        available_models,
        build_model,
        get_parameters,
        model_task,
        parameter_names,
        register_model,
        set_parameters,
    )
    from consortium.models.losses import (
        LOSS_NAMES,
        LossFn,
        balanced_pos_weight,
        focal_loss,
        make_loss,
        reconstruction_loss,
        weighted_bce,
    )
    from consortium.models.metrics import (
        FraudMetrics,
        choose_threshold,
        evaluate_scores,
        precision_at_k,
        recall_at_fpr,
    )
    from consortium.models.standardize import FeatureStats, Standardizer, combine_stats
    from consortium.models.training import TrainConfig, TrainResult, predict_scores, train_local

_LAZY: dict[str, str] = {
    "Autoencoder": "consortium.models.architectures",
    "FeatureStats": "consortium.models.standardize",
    "FraudMetrics": "consortium.models.metrics",
    "LOSS_NAMES": "consortium.models.losses",
    "LossFn": "consortium.models.losses",
    "MLPClassifier": "consortium.models.architectures",
    "ModelBuilder": "consortium.models.architectures",
    "ModelTask": "consortium.models.architectures",
    "Standardizer": "consortium.models.standardize",
    "TrainConfig": "consortium.models.training",
    "TrainResult": "consortium.models.training",
    "available_models": "consortium.models.architectures",
    "balanced_pos_weight": "consortium.models.losses",
    "build_model": "consortium.models.architectures",
    "choose_threshold": "consortium.models.metrics",
    "combine_stats": "consortium.models.standardize",
    "evaluate_scores": "consortium.models.metrics",
    "focal_loss": "consortium.models.losses",
    "get_parameters": "consortium.models.architectures",
    "make_loss": "consortium.models.losses",
    "model_task": "consortium.models.architectures",
    "parameter_names": "consortium.models.architectures",
    "precision_at_k": "consortium.models.metrics",
    "predict_scores": "consortium.models.training",
    "recall_at_fpr": "consortium.models.metrics",
    "reconstruction_loss": "consortium.models.losses",
    "register_model": "consortium.models.architectures",
    "set_parameters": "consortium.models.architectures",
    "train_local": "consortium.models.training",
    "weighted_bce": "consortium.models.losses",
}
"""Public name -> defining module; imported on first access (PEP 562)."""


def __getattr__(name: str) -> Any:
    # Lazy: the numpy-only boosting modules (consortium.models.gbdt*) run in the
    # institutions' ClientApp, which must not pay for importing PyTorch.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'consortium.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "LOSS_NAMES",
    "Autoencoder",
    "FeatureStats",
    "FraudMetrics",
    "LossFn",
    "MLPClassifier",
    "ModelBuilder",
    "ModelTask",
    "Standardizer",
    "TrainConfig",
    "TrainResult",
    "available_models",
    "balanced_pos_weight",
    "build_model",
    "choose_threshold",
    "combine_stats",
    "evaluate_scores",
    "focal_loss",
    "get_parameters",
    "make_loss",
    "model_task",
    "parameter_names",
    "precision_at_k",
    "recall_at_fpr",
    "reconstruction_loss",
    "register_model",
    "set_parameters",
    "train_local",
    "predict_scores",
    "weighted_bce",
]
