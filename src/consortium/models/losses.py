"""Imbalance-aware losses on logits, and the autoencoder's reconstruction loss.

Fraud is rare (often well under 1 % of transactions), so a plain cross-entropy
model can reach 99 % accuracy by never flagging anything.  Two standard remedies:

* weighted binary cross-entropy — each positive row counts ``pos_weight`` times,
  typically ``(1 - p) / p`` (:func:`balanced_pos_weight`), so both classes carry
  equal total weight;
* focal loss (Lin et al., 2017) — down-weights rows the model already gets right
  by the factor ``(1 - p_t) ** gamma``, so the abundant easy negatives stop
  dominating the gradient.

All classification losses take logits and float targets in {0, 1} and return the
mean over the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional alias

from consortium.errors import param_error

__all__ = [
    "LOSS_NAMES",
    "LossFn",
    "balanced_pos_weight",
    "focal_loss",
    "make_loss",
    "reconstruction_loss",
    "weighted_bce",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LossName = Literal["weighted_bce", "focal", "bce"]
LOSS_NAMES: tuple[str, ...] = ("weighted_bce", "focal", "bce")


def _is_real(value: object) -> bool:
    return (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and math.isfinite(float(value))
    )


def balanced_pos_weight(positive_rate: float, *, cap: float = 100.0) -> float:
    """Positive-class weight that balances the classes: ``(1 - p) / p`` in ``[1, cap]``.

    The cap keeps a handful of positives from producing exploding gradients;
    ``p == 0`` (no positives seen) gives ``cap``.

    Parameters
    ----------
    positive_rate : float
        Fraction of positive rows, in ``[0, 1]``.
    cap : float, default 100.0
        Upper bound, >= 1.
    """
    if not _is_real(positive_rate) or not 0.0 <= float(positive_rate) <= 1.0:
        raise param_error(
            "positive_rate", "balanced_pos_weight", "a float in [0, 1]", positive_rate
        )
    if not _is_real(cap) or float(cap) < 1.0:
        raise param_error("cap", "balanced_pos_weight", "a finite float >= 1", cap)
    p = float(positive_rate)
    if p == 0.0:
        return float(cap)
    return float(min(max((1.0 - p) / p, 1.0), float(cap)))


def weighted_bce(logits: torch.Tensor, targets: torch.Tensor, *, pos_weight: float) -> torch.Tensor:
    """Binary cross-entropy on logits with positive rows weighted by ``pos_weight``."""
    weight = torch.tensor(pos_weight, dtype=logits.dtype, device=logits.device)
    return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=weight)


def focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    gamma: float = 2.0,
    alpha: float | None = None,
    pos_weight: float | None = None,
) -> torch.Tensor:
    """Sigmoid focal loss on logits, mean over the batch.

    ``loss = w_t * (1 - p_t) ** gamma * BCE``, where ``p_t`` is the probability the
    model gives the true class.  Class weighting ``w_t`` is either the focal
    paper's ``alpha`` (positives ``alpha``, negatives ``1 - alpha``) or, as in
    weighted BCE, ``pos_weight`` on positives and 1 on negatives; none by default.
    """
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * targets + (1.0 - p) * (1.0 - targets)
    loss = ce * (1.0 - p_t).pow(gamma)
    if alpha is not None:
        loss = loss * (alpha * targets + (1.0 - alpha) * (1.0 - targets))
    elif pos_weight is not None:
        loss = loss * (pos_weight * targets + (1.0 - targets))
    return loss.mean()


def reconstruction_loss(reconstruction: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Mean squared reconstruction error; callers pass normal rows only."""
    return F.mse_loss(reconstruction, inputs)


def make_loss(
    name: LossName,
    *,
    pos_weight: float | None,
    focal_gamma: float = 2.0,
    focal_alpha: float | None = None,
) -> LossFn:
    """Build a ``loss(logits, targets) -> scalar`` function by name.

    Parameters
    ----------
    name : {"weighted_bce", "focal", "bce"}
        ``"weighted_bce"`` needs ``pos_weight``; ``"bce"`` refuses one (use
        ``"weighted_bce"``); ``"focal"`` takes ``pos_weight`` *or* ``focal_alpha``
        as optional class weighting.
    pos_weight : float or None
        Weight of positive rows (> 0).
    focal_gamma : float, default 2.0
        Focusing exponent (>= 0; 0 gives weighted BCE).
    focal_alpha : float, optional
        Focal-loss class balance in ``[0, 1]``.
    """
    owner = "make_loss"
    if name not in LOSS_NAMES:
        raise param_error("name", owner, f"one of {list(LOSS_NAMES)}", name)
    if pos_weight is not None and (not _is_real(pos_weight) or float(pos_weight) <= 0):
        raise param_error("pos_weight", owner, "None or a finite float > 0", pos_weight)
    if not _is_real(focal_gamma) or float(focal_gamma) < 0:
        raise param_error("focal_gamma", owner, "a finite float >= 0", focal_gamma)
    if focal_alpha is not None and (not _is_real(focal_alpha) or not 0 <= focal_alpha <= 1):
        raise param_error("focal_alpha", owner, "None or a float in [0, 1]", focal_alpha)
    if name != "focal" and focal_alpha is not None:
        raise param_error("focal_alpha", owner, f"None for loss {name!r}", focal_alpha)

    if name == "bce":
        if pos_weight is not None:
            raise param_error(
                "pos_weight", owner, "None for loss 'bce' (use 'weighted_bce')", pos_weight
            )

        def bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return F.binary_cross_entropy_with_logits(logits, targets)

        return bce

    if name == "weighted_bce":
        if pos_weight is None:
            raise param_error("pos_weight", owner, "a float > 0 for loss 'weighted_bce'", None)
        weight = float(pos_weight)

        def wbce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return weighted_bce(logits, targets, pos_weight=weight)

        return wbce

    if focal_alpha is not None and pos_weight is not None:
        raise param_error(
            "focal_alpha",
            owner,
            "None when pos_weight is given (one class weighting only)",
            focal_alpha,
        )
    gamma = float(focal_gamma)
    alpha = None if focal_alpha is None else float(focal_alpha)
    weight_or_none = None if pos_weight is None else float(pos_weight)

    def focal(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return focal_loss(logits, targets, gamma=gamma, alpha=alpha, pos_weight=weight_or_none)

    return focal
