"""Private federated standardisation statistics and class weight.

Each institution releases its additive statistics (row count, positives, per
feature sums and sums of squares) with Gaussian noise calibrated to one row's
influence; features are clipped to ``[-bound, bound]`` for the statistics only,
so one row changes the sums by at most ``bound·sqrt(d)`` and the squares by
``bound²·sqrt(d)``.  The four queries are one composed DpEvent, charged to the
institution's ledger.  The pooled mean/std and positive rate derived from the
noisy sums are post-processing: the model, the class weight and the clip ratio
of :mod:`consortium.privacy.dpsgd` may use them freely.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from dp_accounting import dp_event as dpe

from consortium.privacy.accounting import check_noise_multiplier, check_positive

if TYPE_CHECKING:  # consortium.models imports torch; a node's statistics handler must not need it
    from consortium.models import FeatureStats

__all__ = ["PrivateStatsSpec", "combine_noisy", "noisy_stats"]


@dataclass(frozen=True)
class PrivateStatsSpec:
    """Noise of the private statistics.

    Attributes
    ----------
    noise_multiplier : float
        σ of each of the four Gaussian queries, in units of its sensitivity.
    bound : float
        Public per-feature clipping bound used for the sums.
    """

    noise_multiplier: float = 30.0
    bound: float = 1.0

    def __post_init__(self) -> None:
        check_noise_multiplier(self.noise_multiplier, "PrivateStatsSpec")
        check_positive("bound", self.bound, "PrivateStatsSpec", why="the public feature range of the statistics")

    def event(self) -> dpe.DpEvent:
        """Four Gaussian queries (count, positives, sums, sums of squares)."""
        return dpe.SelfComposedDpEvent(dpe.GaussianDpEvent(self.noise_multiplier), 4)

    def sensitivities(self, n_features: int) -> tuple[float, float, float, float]:
        r = float(np.sqrt(n_features))
        return 1.0, 1.0, self.bound * r, self.bound**2 * r


def noisy_stats(
    X: np.ndarray,
    y: np.ndarray,
    *,
    spec: PrivateStatsSpec,
    rng: np.random.Generator,  # noqa: N803
) -> np.ndarray:
    """One institution's flat ``[count, positives, sums, sums of squares]`` with its noise added.

    This vector is what leaves the institution (the layout of the federated
    statistics query, so it can travel through the same exact-sum path).
    """
    xc = np.clip(np.asarray(X, dtype=np.float64), -spec.bound, spec.bound)
    d = xc.shape[1]
    s_count, s_pos, s_sum, s_sq = spec.sensitivities(d)
    sigma = spec.noise_multiplier
    return np.concatenate(
        [
            [xc.shape[0] + rng.normal(0, sigma * s_count), float(np.sum(y)) + rng.normal(0, sigma * s_pos)],
            xc.sum(axis=0) + rng.normal(0, sigma * s_sum, size=d),
            (xc * xc).sum(axis=0) + rng.normal(0, sigma * s_sq, size=d),
        ]
    )


def combine_noisy(parts: Sequence[np.ndarray]) -> FeatureStats:
    """Pool the institutions' noisy vectors, repairing what noise can break (post-processing only).

    A single vector that is already the sum (e.g. from secure aggregation) is pooled as ``[total]``.
    """
    from consortium.models import FeatureStats  # noqa: PLC0415

    flat = np.sum(np.stack(parts), axis=0)
    d = (flat.shape[0] - 2) // 2
    count = max(float(flat[0]), 2.0)
    positives = float(np.clip(flat[1], 1.0, count - 1.0))
    total = flat[2 : 2 + d]
    mean = total / count
    sumsq = np.maximum(flat[2 + d :], count * (mean * mean + 1e-2))
    return FeatureStats(count=count, positives=positives, sum=total, sumsq=sumsq)
