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
