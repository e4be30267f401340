"""Personalisation that never leaves the institution: fine-tune only the last layer.

The shared model's hidden layers encode what the consortium learned together;
an institution whose customers differ (higher spending, another mix of
merchants) can refit the output layer on its own labelled rows without
touching them.  The result is a local copy: it is never sent back, so nothing
about the local rows reaches the coordinator.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
from torch import nn

from consortium.errors import param_error
from consortium.models import TrainConfig, train_local

logger = logging.getLogger(__name__)


def last_linear(model: nn.Module) -> nn.Linear:
    """The model's output layer (its last ``nn.Linear``)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise param_error("model", "last_linear", "a module with at least one nn.Linear", type(model).__name__)
    return linears[-1]


def fine_tune_last_layer(
    model: nn.Module, X: np.ndarray, y: np.ndarray, *, config: TrainConfig, positive_rate: float | None = None
) -> nn.Module:
    """A copy of ``model`` whose output layer is refitted on local rows; the rest is frozen.

    Parameters
    ----------
    model : nn.Module
        The deployed (global) model; left unchanged.
    X, y : numpy.ndarray
        Standardised local features and 0/1 labels.
    config : TrainConfig
        Local training options (``proximal_mu > 0`` keeps the output layer near the global one).
    positive_rate : float, optional
        Positive rate for the class weight (default: from ``y``).

    Returns
    -------
    nn.Module
        The personalised copy, all parameters trainable again.
    """
    local = copy.deepcopy(model)
    head = last_linear(local)
    head_params = {id(p) for p in head.parameters()}
    for p in local.parameters():
        p.requires_grad_(id(p) in head_params)
    try:
        result = train_local(local, X, y, config=config, positive_rate=positive_rate)
    finally:
        for p in local.parameters():
            p.requires_grad_(True)
    logger.info("personalised the output layer on %d local rows (loss %.4f)", result.num_examples, result.mean_loss)
    return local
