"""Record-level DP-SGD for one institution's local training, vectorised.

Named steps, as in Opacus' optimiser: Poisson-sample rows, compute per-row
gradients (``torch.func.vmap(grad)``: one batched pass, no Python loop over
rows), clip each row's gradient, add Gaussian noise to the sum, normalise by the
expected batch size, take an optimiser step.  The DpEvent is the mechanism's
(``PoissonSampled(q, Gaussian(σ))`` per step); nothing here decides ε.

Imbalance, clipping-aware
-------------------------
A positive-class loss weight (~42 on mammography) does nothing under per-row
clipping: every row's gradient is clipped to C whatever its weight, so the
minority class loses its weight.  Here the *negative* rows are clipped to the
smaller bound ``C · negative_clip_ratio`` while positive rows keep ``C``.  A row's
influence is still at most C (so σ·C noise still gives the accounted
guarantee), and the class balance is restored by shrinking the majority
instead of inflating the minority, which clipping would undo.  The ratio is set
from the *private* pooled positive rate (:mod:`consortium.privacy.stats`), so it
costs no further privacy.

This is our own implementation rather than Opacus' (pinned as a dependency)
because Opacus clips every row to one bound, which rules out the class-aware
clipping above, and not for speed (Opacus' ``GradSampleModule`` was measured
no slower than this ``vmap`` on the default MLP); ``tests/test_dpsgd_opacus.py``
checks our per-row gradients, clipped sums and noise scale against Opacus'
``GradSampleModule``/``DPOptimizer`` to float tolerance.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from consortium.errors import param_error
from consortium.privacy.mechanisms import DpSgdMechanism

logger = logging.getLogger(__name__)

__all__ = [
    "DpSgdResult",
    "class_clip_bounds",
    "clip_and_sum",
    "dp_sgd_train",
    "negative_clip_ratio",
    "per_row_gradients",
    "poisson_clipped_sum",
]

PerRowGradients = Callable[[Mapping[str, torch.Tensor], torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]
"""``(params, X, y) -> {name: gradient of row i's loss, stacked over rows}``."""


def negative_clip_ratio(positive_rate: float, *, power: float = 0.5) -> float:
    """Clip ratio of negatives ``(p / (1 - p)) ** power`` (1 = no rebalancing, power 1 = fully balanced)."""
    p = min(max(float(positive_rate), 1e-6), 0.5)
    return float((p / (1.0 - p)) ** power)


def per_row_gradients(model: nn.Module) -> PerRowGradients:
    """Build the vectorised per-row gradient function of ``model``'s BCE-with-logits loss.

    The result maps ``(params, X, y)`` to ``{name: tensor of shape (rows, *param.shape)}``,
    row ``i`` being the gradient of ``BCE(model(X[i]), y[i])`` at ``params`` (trainable
    parameters by name).  ``torch.func.vmap(grad(...))`` computes all rows in one
    batched pass; the model's buffers are captured as they are now.  Call it with the
    model in eval mode (no dropout), so each row's gradient depends on that row only.
    """
    buffers = {k: b.detach() for k, b in model.named_buffers()}

    def row_loss(p: Mapping[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        logit = functional_call(model, (dict(p), buffers), (xb.unsqueeze(0),)).reshape(())
        return nn.functional.binary_cross_entropy_with_logits(logit, yb)

    fn: PerRowGradients = vmap(grad(row_loss), in_dims=(None, 0, 0))
    return fn


def clip_and_sum(
    grads: Mapping[str, torch.Tensor], bound: torch.Tensor
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Clip each row's gradient to its L2 bound and sum the rows.

    Parameters
    ----------
    grads : mapping of str to Tensor
        Per-row gradients as returned by :func:`per_row_gradients` (all with the
        same number of rows, at least one).
    bound : Tensor
        One clip bound per row (``C``, or ``C * negative_ratio`` for negatives).

    Returns
    -------
    summed : dict of str to Tensor
        ``sum_i g_i * min(1, bound_i / ||g_i||)``, by parameter name, where
        ``||g_i||`` is the norm of row ``i``'s gradient over all parameters.
    norms : Tensor
        ``||g_i||`` before clipping (to count clipped rows).
    """
    rows = bound.shape[0]
    flat = torch.cat([g.reshape(rows, -1) for g in grads.values()], dim=1)
    norms = flat.norm(dim=1)
    factor = torch.clamp(bound / (norms + 1e-12), max=1.0)
    summed = {k: (g * factor.view(-1, *([1] * (g.dim() - 1)))).sum(0) for k, g in grads.items()}
    return summed, norms


def class_clip_bounds(y: torch.Tensor, *, clip_norm: float, negative_ratio: float) -> torch.Tensor:
    """Each row's clip bound: ``C`` for positives, ``C * negative_ratio`` for negatives (see the module docstring)."""
    return torch.where(y > 0.5, torch.tensor(clip_norm), torch.tensor(clip_norm * negative_ratio))


def poisson_clipped_sum(
    per_row_grad: PerRowGradients,
    params: Mapping[str, torch.Tensor],
    X: torch.Tensor,  # noqa: N803
    y: torch.Tensor,
    bounds: torch.Tensor,
    *,
    sampling_rate: float,
    generator: torch.Generator,
) -> tuple[dict[str, torch.Tensor], int, int]:
    """Steps 1-3 of a DP-SGD step: Poisson-sample rows, clip each one's gradient to its bound, sum.

    Each row is kept independently with probability ``sampling_rate`` (one draw of
    ``generator`` per row, so callers' later draws stay in step).  Returns the sum by
    parameter name (zeros when no row was drawn), the rows sampled and the rows clipped.
    """
    idx = torch.nonzero(torch.rand(X.shape[0], generator=generator) < sampling_rate).squeeze(1)
    if idx.numel() == 0:
        return {k: torch.zeros_like(p) for k, p in params.items()}, 0, 0
    bound = bounds[idx]
    summed, norms = clip_and_sum(per_row_grad(params, X[idx], y[idx]), bound)
    return summed, int(idx.numel()), int((norms > bound).sum())


@dataclass(frozen=True)
class DpSgdResult:
    """Outcome of :func:`dp_sgd_train`.

    Attributes
    ----------
    steps : int
        Noisy steps taken (each one is one accounted Poisson-sampled Gaussian).
    mean_batch : float
        Mean sampled batch size.
    clipped_fraction : float
        Share of per-row gradients that were clipped.
    """

    steps: int
    mean_batch: float
    clipped_fraction: float


def dp_sgd_train(
    model: nn.Module,
    X: np.ndarray,  # noqa: N803
    y: np.ndarray,
    *,
    mechanism: DpSgdMechanism,
    lr: float,
    negative_ratio: float = 1.0,
    optimizer: str = "adam",
    seed: int = 0,
    steps: int | None = None,
) -> DpSgdResult:
    """Train ``model`` in place with DP-SGD on ``(X, y)`` (binary classifier, BCE loss).

    Parameters
    ----------
    model : nn.Module
        Classifier returning one logit per row; updated in place.
    X, y : np.ndarray
        Standardised features and 0/1 labels of this institution.
    mechanism : DpSgdMechanism
        σ, C, q and the steps per round (the accounted parameters).
    lr : float
        Optimiser learning rate.
    negative_ratio : float
        Negative rows are clipped to ``C * negative_ratio`` (in (0, 1]).
    optimizer : {"adam", "sgd"}
        Update rule applied to the privatised gradient (post-processing).
    seed : int
        Seed of sampling and noise.
    steps : int, optional
        Override of ``mechanism.steps_per_round`` (must then be accounted as such).
    """
    owner = "dp_sgd_train"
    if not 0 < negative_ratio <= 1:
        raise param_error("negative_ratio", owner, "a float in (0, 1]", negative_ratio)
    if optimizer not in ("adam", "sgd"):
        raise param_error("optimizer", owner, "one of ('adam', 'sgd')", optimizer)
    n_steps = mechanism.steps_per_round if steps is None else int(steps)
    xs = torch.as_tensor(np.ascontiguousarray(X, dtype=np.float32))
    ys = torch.as_tensor(np.ascontiguousarray(y, dtype=np.float32))
    n = xs.shape[0]
    q, clip, sigma = mechanism.sampling_rate, mechanism.clip_norm, mechanism.noise_multiplier
    expected_batch = max(q * n, 1.0)
    row_clip = class_clip_bounds(ys, clip_norm=clip, negative_ratio=negative_ratio)
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    per_row_grad = per_row_gradients(model)
    trainable = [dict(model.named_parameters())[k] for k in names]
    opt: torch.optim.Optimizer = (
        torch.optim.Adam(trainable, lr=lr) if optimizer == "adam" else torch.optim.SGD(trainable, lr=lr)
    )
    gen = torch.Generator().manual_seed(int(seed))
    batch_total, clipped = 0, 0
    was_training = model.training
    model.eval()  # no dropout: per-row gradients must be deterministic functions of the row
    try:
        for _ in range(n_steps):
            params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
            # 1. Poisson sampling, 2. per-row gradients, 3. per-row clipping (class-dependent bound <= C).
            clipped_sum, n_rows, n_clipped = poisson_clipped_sum(
                per_row_grad, params, xs, ys, row_clip, sampling_rate=q, generator=gen
            )
            summed = [clipped_sum[k] for k in names]
            batch_total += n_rows
            clipped += n_clipped
            # 4. Gaussian noise σ·C on the sum, 5. normalise by the expected batch size.
            opt.zero_grad(set_to_none=True)
            for p, s in zip(trainable, summed, strict=True):
                noise = torch.normal(0.0, sigma * clip, size=s.shape, generator=gen)
                p.grad = (s + noise) / expected_batch
            opt.step()
    finally:
        model.train(was_training)
    return DpSgdResult(
        steps=n_steps,
        mean_batch=batch_total / max(n_steps, 1),
        clipped_fraction=clipped / max(batch_total, 1),
    )


def parameter_vector(model: nn.Module) -> Sequence[np.ndarray]:
    """The model's trainable parameters as numpy arrays (state order)."""
    return [p.detach().cpu().numpy().copy() for p in model.parameters()]
