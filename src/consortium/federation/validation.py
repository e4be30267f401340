"""Check each institution's update before it is aggregated.

Under the clear-text transport the coordinator sees every update, so it can
refuse one that has the wrong number of tensors, a wrong shape or dtype,
NaN/inf values or an L2 norm above the configured bound. A refused update is
logged with the institution and left out; the round goes on with the others
(the coordinator then checks that ``min_nodes`` contributions remain).

Under secure aggregation the coordinator never sees an individual update.
There, the norm bound is enforced **client-side**: the institution's
``secagg_mod`` clips its delta to ``clip_norm`` before masking it. What the
coordinator can still verify is the *sum*: with weights ``w_i`` (capped at
``weight_cap``), ``||sum_i w_i clip(d_i)|| <= sum_i w_i * clip_norm``
(:func:`check_aggregate_norm`). A sum that breaks the bound proves that at
least one institution did not clip; the round is then refused as a whole,
because the coordinator cannot tell whose contribution it was. A malicious
institution that stays inside the bound is not detected by this check; it can
move the sum by at most its own ``w_i * clip_norm``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from consortium.errors import FederationError

logger = logging.getLogger(__name__)


class InvalidUpdateError(FederationError):
    """One institution's update failed validation (the message names it and why)."""

    def __init__(self, institution: str, reason: str) -> None:
        super().__init__(f"Update of institution '{institution}' rejected: {reason}")
        self.institution = institution
        self.reason = reason


@dataclass(frozen=True)
class UpdateValidator:
    """Shape, dtype, finiteness and norm check of clear-text updates.

    Parameters
    ----------
    reference : sequence of numpy.ndarray
        The global model's tensors; an update must match their count, shapes
        and dtypes.
    max_norm : float or None
        Bound on the update's global L2 norm (over all tensors); ``None`` or
        ``0`` disables the norm check.
    """

    reference: Sequence[np.ndarray]
    max_norm: float | None = None

    def check(self, arrays: object, *, institution: str) -> list[np.ndarray]:
        """Return the update as a list of arrays, or raise :class:`InvalidUpdateError`."""
        ref = self.reference
        if not isinstance(arrays, Sequence) or isinstance(arrays, (str, bytes)):
            raise InvalidUpdateError(institution, f"expected a list of {len(ref)} arrays, got {type(arrays).__name__}")
        if len(arrays) != len(ref):
            raise InvalidUpdateError(institution, f"expected {len(ref)} tensors, got {len(arrays)}")
        out: list[np.ndarray] = []
        for i, (a, r) in enumerate(zip(arrays, ref, strict=True)):
            if not isinstance(a, np.ndarray):
                raise InvalidUpdateError(institution, f"tensor {i} is a {type(a).__name__}, not an array")
            if a.shape != r.shape:
                raise InvalidUpdateError(institution, f"tensor {i} has shape {a.shape}, expected {r.shape}")
            if a.dtype != r.dtype:
                raise InvalidUpdateError(institution, f"tensor {i} has dtype {a.dtype}, expected {r.dtype}")
            if not np.all(np.isfinite(a)):
                raise InvalidUpdateError(institution, f"tensor {i} has NaN or infinite values")
            out.append(a)
        if self.max_norm:
            norm = update_norm(out)
            if not norm <= self.max_norm:
                raise InvalidUpdateError(
                    institution, f"L2 norm {norm:.4g} exceeds the bound max_update_norm={self.max_norm:g}"
                )
        return out


def update_norm(arrays: Sequence[np.ndarray]) -> float:
    """Global L2 norm of a list of tensors (float64 accumulation)."""
    return float(np.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays)))


def check_aggregate_norm(
    update_sum: Sequence[np.ndarray], *, weight_total: float, clip_norm: float, round_number: int = 0
) -> float:
    """Verify that a securely aggregated sum respects the client-side clip bound.

    Every honest institution sends ``w_i * clip(d_i)`` with ``||clip(d_i)|| <=
    clip_norm``, so the sum's norm is at most ``weight_total * clip_norm``
    (plus quantisation error, allowed for with 1 % slack).

    Returns
    -------
    float
        The sum's norm.

    Raises
    ------
    FederationError
        If the bound is broken: at least one institution did not clip.
    """
    norm = update_norm(update_sum)
    bound = weight_total * clip_norm * 1.01 + 1e-6
    if not norm <= bound:
        raise FederationError(
            f"Round {round_number}: the securely aggregated update has norm {norm:.4g}, above the bound "
            f"{bound:.4g} (sum of weights {weight_total:g} x clip_norm {clip_norm:g}); at least one "
            "institution did not clip its update. The round is refused and the model left unchanged."
        )
    return norm
