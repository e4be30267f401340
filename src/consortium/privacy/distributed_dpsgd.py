"""Record-level DP-SGD with its noise split across institutions under secure aggregation.

Each institution protecting itself (:func:`consortium.privacy.dpsgd.dp_sgd_train`)
must add the full noise σ·C to a gradient of *its own* rows; averaging k such
models leaves noise std σ·C/(q·n·sqrt(k)) per row-normalised step.  Under secure
aggregation the coordinator sees only the sum of the institutions' contributions,
so each one can add a ``1/k`` share of the variance instead
(:class:`~consortium.privacy.mechanisms.DistributedDpSgdMechanism`): the sum is a
central DP-SGD step over the union of rows with noise σ·C/(q·k·n), sqrt(k) times
less.  One step is one secure round:

1. :func:`institution_share` — inside each institution: Poisson-sample rows with
   rate q, per-row gradients at the current global model, clip each to its
   class-aware bound (≤ C, see :mod:`consortium.privacy.dpsgd`), sum, add Gaussian
   noise of std :meth:`~consortium.privacy.mechanisms.DistributedDpSgdMechanism.share_std`.
2. Secure aggregation sums the shares (here: a plain sum, what SecAgg computes up
   to its quantisation; the coordinator never holds a share).
3. :func:`apply_noisy_sum` — on the global model: divide by the expected pooled
   batch ``q · N`` (N from the private statistics: post-processing) and take an
   optimiser step.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from consortium.errors import param_error
from consortium.federation.validation import update_norm
from consortium.privacy.dpsgd import PerRowGradients, class_clip_bounds, per_row_gradients, poisson_clipped_sum
from consortium.privacy.mechanisms import DistributedDpSgdMechanism

__all__ = ["apply_noisy_sum", "clipped_share", "institution_share", "secagg_share"]


def clipped_share(
    model: nn.Module,
    X: torch.Tensor,  # noqa: N803
    y: torch.Tensor,
    *,
    mechanism: DistributedDpSgdMechanism,
    negative_ratio: float,
    generator: torch.Generator,
    per_row_grad: PerRowGradients | None = None,
) -> list[torch.Tensor]:
    """One institution's clipped gradient sum over a Poisson sample of its rows, *before* its noise.

    Never released as is: :func:`institution_share` adds the Gaussian share, and the
    coordinator's node code (:mod:`consortium.privacy.dpsgd_secagg_run`) adds it in float64.
    Arguments as :func:`institution_share`.
    """
    if not 0 < negative_ratio <= 1:
        raise param_error("negative_ratio", "clipped_share", "a float in (0, 1]", negative_ratio)
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    bounds = class_clip_bounds(y, clip_norm=mechanism.clip_norm, negative_ratio=negative_ratio)
    summed, _, _ = poisson_clipped_sum(
        per_row_grad or per_row_gradients(model), params, X, y, bounds,
        sampling_rate=mechanism.sampling_rate, generator=generator,
    )  # fmt: skip
    return list(summed.values())


def institution_share(
    model: nn.Module,
    X: torch.Tensor,  # noqa: N803
    y: torch.Tensor,
    *,
    mechanism: DistributedDpSgdMechanism,
    negative_ratio: float,
    generator: torch.Generator,
    per_row_grad: PerRowGradients | None = None,
) -> list[torch.Tensor]:
    """One institution's noisy clipped gradient sum for one step (what it masks and sends).

    Parameters
    ----------
    model : nn.Module
        The current global model (read only; eval mode so rows are independent).
    X, y : Tensor
        The institution's standardised rows and 0/1 labels.
    mechanism : DistributedDpSgdMechanism
        q, C and the share of σ.
    negative_ratio : float
        Negatives are clipped to ``C * negative_ratio`` (in (0, 1]).
    generator : torch.Generator
        The institution's own source of sampling and noise.
    per_row_grad : callable, optional
        Cached :func:`per_row_gradients` of ``model``.

    Returns
    -------
    list of Tensor
        One tensor per trainable parameter, in ``model.named_parameters()`` order.
    """
    out = clipped_share(
        model, X, y, mechanism=mechanism, negative_ratio=negative_ratio, generator=generator,
        per_row_grad=per_row_grad,
    )
    std = mechanism.share_std()
    return [s + torch.normal(0.0, std, size=s.shape, generator=generator) for s in out]


def secagg_share(
    model: nn.Module,
    X: torch.Tensor,  # noqa: N803
    y: torch.Tensor,
    *,
    mechanism: DistributedDpSgdMechanism,
    negative_ratio: float,
    expected_batch: float,
    data_bound: float,
    generator: torch.Generator,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """What one institution sends into the secure sum of a coordinator run: its share, divided by ``q · N``.

    The clipped sum (:func:`clipped_share`) divided by the public ``expected_batch``
    and projected onto the L2 ball of radius ``data_bound`` (a projection is
    1-Lipschitz, so one row still moves it by at most ``C / expected_batch``), plus
    Gaussian noise of std ``share_std() / expected_batch`` drawn in float64 (its grid
    is far finer than the secure-aggregation encoding the share then goes through).

    Parameters
    ----------
    generator : torch.Generator
        Source of the Poisson sampling (the institution's own, secret).
    rng : numpy.random.Generator
        Source of the noise (the institution's own, secret).
    Other parameters as :func:`institution_share`.
    """
    owner = "secagg_share"
    if not np.isfinite(expected_batch) or expected_batch <= 0:
        raise param_error("expected_batch", owner, "a finite float > 0", expected_batch)
    if not np.isfinite(data_bound) or data_bound <= 0:
        raise param_error("data_bound", owner, "a finite float > 0", data_bound)
    parts = clipped_share(
        model, X, y, mechanism=mechanism, negative_ratio=negative_ratio, generator=generator,
    )
    data = [p.detach().cpu().numpy().astype(np.float64) / expected_batch for p in parts]
    norm = update_norm(data)
    if norm > data_bound:
        data = [d * (data_bound / norm) for d in data]
    std = mechanism.share_std() / expected_batch
    return [d + rng.normal(0.0, std, size=d.shape) for d in data]


def apply_noisy_sum(
    optimizer: torch.optim.Optimizer,
    trainable: Sequence[torch.Tensor],
    noisy_sum: Sequence[torch.Tensor],
    *,
    expected_batch: float,
) -> None:
    """Step the global model with the securely summed shares, normalised by ``q · N``."""
    if not np.isfinite(expected_batch) or expected_batch <= 0:
        raise param_error("expected_batch", "apply_noisy_sum", "a finite float > 0", expected_batch)
    optimizer.zero_grad(set_to_none=True)
    for p, s in zip(trainable, noisy_sum, strict=True):
        p.grad = (s / expected_batch).to(p.dtype)
    optimizer.step()
