"""Local training of one institution's model copy, and scoring.

:func:`train_local` is what every federated client runs each round: a few epochs
of mini-batch training on its own rows, starting from the global weights.  It
handles both model tasks (see :func:`~consortium.models.architectures.model_task`):

* classifiers are trained with an imbalance-aware loss (:mod:`.losses`); when no
  ``pos_weight`` is configured it is derived from the consortium-wide positive
  rate if the caller passes one (so all institutions weight alike), else from the
  local labels;
* reconstruction models (autoencoders) are trained with MSE on normal rows only
  (``y == 0``), so that fraud stays badly reconstructed.

An optional FedProx term ``mu / 2 * ||w - w_global||^2`` keeps local weights near
the global model when institutions' data differ strongly (non-IID).

Training is deterministic for a given ``TrainConfig.seed``: shuffling uses its own
``torch.Generator`` and dropout draws from torch's CPU generator seeded inside
:func:`torch.random.fork_rng`, so the caller's random state is left untouched.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from consortium.errors import DataError, param_error
from consortium.models._validation import check_feature_matrix, check_labels
from consortium.models.architectures import model_task, parameter_names
from consortium.models.losses import (
    LOSS_NAMES,
    LossFn,
    balanced_pos_weight,
    make_loss,
    reconstruction_loss,
)

logger = logging.getLogger(__name__)

__all__ = ["TrainConfig", "TrainResult", "predict_scores", "train_local"]

_OPTIMIZERS = ("adam", "sgd")


def _is_int(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | np.integer)


def _is_real(value: object) -> bool:
    return (
        not isinstance(value, bool)
        and isinstance(value, int | float | np.integer | np.floating)
        and math.isfinite(float(value))
    )


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one local training call.

    Attributes
    ----------
    epochs : int
        Passes over the local data (>= 1).
    batch_size : int
        Rows per optimiser step (>= 1).
    lr : float
        Learning rate (> 0).
    weight_decay : float
        L2 penalty passed to the optimiser (>= 0).
    loss : {"weighted_bce", "focal", "bce"}
        Classification loss; ignored by reconstruction models (always MSE).
    pos_weight : float or None
        Weight of positive rows.  ``None`` with ``"weighted_bce"`` derives the
        balanced weight from the given positive rate or the local labels; with
        ``"focal"`` it means no class weighting; ``"bce"`` requires ``None``.
    focal_gamma : float
        Focal-loss exponent (>= 0).
    proximal_mu : float
        FedProx coefficient (>= 0; 0 disables the term).
    optimizer : {"adam", "sgd"}
        Adam, or plain SGD without momentum.
    seed : int
        Seed for shuffling and dropout (>= 0).
    max_steps : int or None
        Stop after this many optimiser steps in total (>= 1), whatever ``epochs``.
    """

    epochs: int = 1
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    loss: str = "weighted_bce"
    pos_weight: float | None = None
    focal_gamma: float = 2.0
    proximal_mu: float = 0.0
    optimizer: Literal["adam", "sgd"] = "adam"
    seed: int = 0
    max_steps: int | None = None

    def __post_init__(self) -> None:
        owner = "TrainConfig"
        if not _is_int(self.epochs) or self.epochs < 1:
            raise param_error("epochs", owner, "an integer >= 1", self.epochs)
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise param_error("batch_size", owner, "an integer >= 1", self.batch_size)
        if not _is_real(self.lr) or self.lr <= 0:
            raise param_error("lr", owner, "a finite float > 0", self.lr)
        if not _is_real(self.weight_decay) or self.weight_decay < 0:
            raise param_error("weight_decay", owner, "a finite float >= 0", self.weight_decay)
        if self.loss not in LOSS_NAMES:
            raise param_error("loss", owner, f"one of {list(LOSS_NAMES)}", self.loss)
        if self.pos_weight is not None and (not _is_real(self.pos_weight) or self.pos_weight <= 0):
            raise param_error("pos_weight", owner, "None or a finite float > 0", self.pos_weight)
        if self.loss == "bce" and self.pos_weight is not None:
            raise param_error(
                "pos_weight", owner, "None when loss is 'bce' (use 'weighted_bce')", self.pos_weight
            )
        if not _is_real(self.focal_gamma) or self.focal_gamma < 0:
            raise param_error("focal_gamma", owner, "a finite float >= 0", self.focal_gamma)
        if not _is_real(self.proximal_mu) or self.proximal_mu < 0:
            raise param_error("proximal_mu", owner, "a finite float >= 0", self.proximal_mu)
        if self.optimizer not in _OPTIMIZERS:
            raise param_error("optimizer", owner, f"one of {list(_OPTIMIZERS)}", self.optimizer)
        if not _is_int(self.seed) or self.seed < 0:
            raise param_error("seed", owner, "a non-negative integer", self.seed)
        if self.max_steps is not None and (not _is_int(self.max_steps) or self.max_steps < 1):
            raise param_error("max_steps", owner, "None or an integer >= 1", self.max_steps)


@dataclass(frozen=True)
class TrainResult:
    """Outcome of :func:`train_local`.

    Attributes
    ----------
    num_examples : int
        Rows trained on (for autoencoders: the normal rows) — the FedAvg weight.
    steps : int
        Optimiser steps taken.
    mean_loss : float
        Mean data loss over all steps, without the FedProx term.
    """

    num_examples: int
    steps: int
    mean_loss: float


def _proximal_anchor(
    model: nn.Module, global_params: Sequence[np.ndarray] | None
) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """Pair each trainable parameter with its global value for the FedProx term."""
    names = parameter_names(model)
    state = model.state_dict()
    owner = "train_local"
    if global_params is None:
        by_name = {name: state[name].detach().clone() for name in names}
    else:
        if isinstance(global_params, np.ndarray) or not isinstance(global_params, Sequence):
            raise param_error(
                "global_params", owner, "a list of numpy arrays", type(global_params).__name__
            )
        if len(global_params) != len(names):
            raise DataError(
                f"The 'global_params' parameter of {owner} must hold {len(names)} arrays "
                f"(one per state_dict entry). Got {len(global_params)} arrays instead."
            )
        by_name = {}
        for name, array in zip(names, global_params, strict=True):
            array = np.asarray(array)
            if array.shape != tuple(state[name].shape):
                raise DataError(
                    f"The 'global_params' parameter of {owner} must have shape "
                    f"{tuple(state[name].shape)} for layer '{name}'. "
                    f"Got shape {array.shape} instead."
                )
            if array.dtype.kind not in "fiu" or not np.all(np.isfinite(array)):
                raise DataError(
                    f"The 'global_params' parameter of {owner} must hold finite numbers for "
                    f"layer '{name}'. Got dtype {array.dtype} with NaN/inf or non-numbers instead."
                )
            by_name[name] = torch.as_tensor(array, dtype=state[name].dtype)
    return [(p, by_name[name]) for name, p in model.named_parameters() if p.requires_grad]


def _make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, weight_decay=config.weight_decay)


def _classification_loss(config: TrainConfig, y: np.ndarray, positive_rate: float | None) -> LossFn:
    pos_weight = config.pos_weight
    if config.loss == "weighted_bce" and pos_weight is None:
        rate = positive_rate if positive_rate is not None else float(np.mean(y))
        pos_weight = balanced_pos_weight(rate)
        logger.debug("derived pos_weight %.3f from positive rate %.5f", pos_weight, rate)
    return make_loss(config.loss, pos_weight=pos_weight, focal_gamma=config.focal_gamma)  # type: ignore[arg-type]


def _diverged(config: TrainConfig, steps: int, symptom: str) -> DataError:
    """The error for non-finite training, pointing at the settings to change."""
    mu_hint = (
        f" or its 'proximal_mu' (currently {config.proximal_mu}; SGD needs lr * mu < 2)"
        if config.proximal_mu > 0
        else ""
    )
    return DataError(
        f"Local training diverged after {steps} optimiser step(s) ({symptom}); the starting "
        f"weights were restored. Lower the 'lr' parameter of TrainConfig (currently {config.lr})"
        f"{mu_hint}, or check the input scaling."
    )


def train_local(
    model: nn.Module,
    X: np.ndarray,  # noqa: N803 - the conventional name of a feature matrix
    y: np.ndarray | None,
    *,
    config: TrainConfig,
    global_params: Sequence[np.ndarray] | None = None,
    positive_rate: float | None = None,
) -> TrainResult:
    """Train ``model`` in place on one institution's data.

    Parameters
    ----------
    model : nn.Module
        Model holding the starting (usually global) weights; updated in place.
    X : np.ndarray
        Standardised features ``(n, n_features)``.
    y : np.ndarray or None
        0/1 labels ``(n,)``; required for classifiers.  For reconstruction models
        only rows with ``y == 0`` are used; ``None`` uses all rows.
    config : TrainConfig
        Hyper-parameters.
    global_params : Sequence[np.ndarray], optional
        Global weights (``get_parameters`` order) for the FedProx term; defaults
        to the model's weights at the start of the call.
    positive_rate : float, optional
        Consortium-wide positive rate for deriving ``pos_weight``.

    Raises
    ------
    DataError
        Empty or malformed ``X``/``y``, or training diverged (non-finite loss); the
        model's starting weights are restored in that case.
    """
    owner = "train_local"
    if not isinstance(config, TrainConfig):
        raise param_error("config", owner, "a TrainConfig", type(config).__name__)
    if positive_rate is not None and (not _is_real(positive_rate) or not 0 <= positive_rate <= 1):
        raise param_error("positive_rate", owner, "None or a float in [0, 1]", positive_rate)
    features = check_feature_matrix(
        X, owner, allow_empty=False, n_features=getattr(model, "n_features", None)
    )
    task = model_task(model)
    if y is not None:
        y = check_labels(y, features.shape[0], owner)
    elif task == "classifier":
        raise param_error("y", owner, "a 1-D numpy array of 0/1 labels for a classifier", None)

    if task == "reconstruction":
        if y is not None:
            features = features[y == 0]
            if features.shape[0] == 0:
                raise DataError(
                    f"The 'y' parameter of {owner} must mark at least one normal row (y == 0) "
                    "to train an autoencoder. Got only positive rows instead."
                )
        inputs = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
        targets = inputs
        loss_fn: LossFn = reconstruction_loss
    elif y is not None:  # always true here: classifiers without labels were refused above
        inputs = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
        targets = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))
        loss_fn = _classification_loss(config, y, positive_rate)

    mu = float(config.proximal_mu)
    anchor = _proximal_anchor(model, global_params) if mu > 0 else []
    start_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = _make_optimizer(model, config)
    n = inputs.shape[0]
    generator = torch.Generator().manual_seed(int(config.seed))
    was_training = model.training
    steps, loss_sum = 0, 0.0
    try:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(int(config.seed))
            model.train()
            for _epoch in range(config.epochs):
                order = torch.randperm(n, generator=generator)
                for start in range(0, n, config.batch_size):
                    if config.max_steps is not None and steps >= config.max_steps:
                        break
                    idx = order[start : start + config.batch_size]
                    data_loss = loss_fn(model(inputs[idx]), targets[idx])
                    loss = data_loss
                    if anchor:
                        prox = sum(((p - g) ** 2).sum() for p, g in anchor)
                        loss = loss + 0.5 * mu * prox
                    if not torch.isfinite(loss):
                        model.load_state_dict(start_state)
                        raise _diverged(config, steps, f"the loss is {float(loss.detach())}")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    steps += 1
                    loss_sum += float(data_loss.detach())
                if config.max_steps is not None and steps >= config.max_steps:
                    break
    finally:
        model.train(was_training)
    # The last step can overflow the weights without any later loss to show it.
    if not all(bool(torch.isfinite(t).all()) for t in model.state_dict().values()):
        model.load_state_dict(start_state)
        raise _diverged(config, steps, "the weights hold NaN/inf")
    mean_loss = loss_sum / steps if steps else float("nan")
    logger.debug("trained %d steps on %d rows, mean loss %.5f", steps, n, mean_loss)
    return TrainResult(num_examples=int(n), steps=steps, mean_loss=mean_loss)


def predict_scores(
    model: nn.Module,
    X: np.ndarray,  # noqa: N803 - the conventional name of a feature matrix
    *,
    batch_size: int = 4096,
) -> np.ndarray:
    """Score rows: fraud probability (classifier) or reconstruction error (autoencoder).

    Runs in eval mode without gradients and restores the model's previous mode.

    Parameters
    ----------
    model : nn.Module
        Trained model.
    X : np.ndarray
        Standardised features ``(n, n_features)``; ``n`` may be 0.
    batch_size : int, default 4096
        Rows per forward pass (bounds memory only; results do not depend on it).

    Returns
    -------
    np.ndarray
        float64 scores ``(n,)``; higher means more suspicious.
    """
    owner = "predict_scores"
    if not _is_int(batch_size) or batch_size < 1:
        raise param_error("batch_size", owner, "an integer >= 1", batch_size)
    features = check_feature_matrix(
        X, owner, allow_empty=True, n_features=getattr(model, "n_features", None)
    )
    task = model_task(model)
    inputs = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    out = np.empty(features.shape[0], dtype=np.float64)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, features.shape[0], batch_size):
                xb = inputs[start : start + batch_size]
                if task == "reconstruction":
                    scores = torch.mean((model(xb) - xb) ** 2, dim=1)
                else:
                    # float64 sigmoid: float32 saturates at 1.0 and would tie the top scores.
                    scores = torch.sigmoid(model(xb).double())
                out[start : start + xb.shape[0]] = scores.double().numpy()
    finally:
        model.train(was_training)
    return out
