"""What the coordinator learns from one training round, whatever the transport.

A round's outcome is always a *sum*: the sum of the institutions' weighted model
updates, the sum of their weights and the sums of their weighted training metrics.
With secure aggregation (the default) only these sums ever reach the coordinator;
the plain path computes the very same :class:`AggregateResult` from clear-text
replies so that the server loop, the server optimisers and the run store do not
care which transport produced it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from consortium.errors import FederationError

UPDATE_RECORD = "update"
"""Key of the ArrayRecord that carries an institution's model delta (local - global)."""
METRICS_RECORD = "metrics"
"""Key of the MetricRecord with ``num-examples`` and training metrics."""
WEIGHT_KEY = "num-examples"


@dataclass(frozen=True)
class AggregateResult:
    """Sums from one round, as the coordinator is allowed to see them.

    Attributes
    ----------
    update_sum : list of numpy.ndarray
        Sum over participants of ``weight_i * delta_i`` (one array per model tensor).
    weight_total : float
        Sum of the participants' weights (capped example counts).
    metric_sums : dict
        Sum over participants of ``weight_i * metric_i`` for each training metric.
    participants : tuple of str
        Institutions whose contribution is inside the sums.
    dropped : tuple of str
        Institutions that were asked but whose contribution is not in the sums.
    """

    update_sum: list[np.ndarray]
    weight_total: float
    metric_sums: dict[str, float] = field(default_factory=dict)
    participants: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()

    def mean_update(self) -> list[np.ndarray]:
        """The weighted mean update ``sum(w_i delta_i) / sum(w_i)``."""
        if self.weight_total <= 0:
            raise FederationError(
                f"Cannot average a round with total weight {self.weight_total!r}: "
                f"no institution contributed (participants={list(self.participants)})."
            )
        return [u / self.weight_total for u in self.update_sum]

    def mean_metrics(self) -> dict[str, float]:
        """Weighted mean of each training metric."""
        if self.weight_total <= 0:
            return {}
        return {k: v / self.weight_total for k, v in self.metric_sums.items()}


def weighted_sum(
    contributions: Sequence[tuple[str, Sequence[np.ndarray], float, Mapping[str, float]]],
    *,
    reference: Sequence[np.ndarray],
    dropped: Sequence[str] = (),
) -> AggregateResult:
    """Sum clear-text contributions ``(institution, delta, weight, metrics)``.

    Used by the plain (non-secure) transport and by tests as the oracle that
    secure aggregation must reproduce up to quantisation.
    """
    sums = [np.zeros_like(r, dtype=np.float64) for r in reference]
    total = 0.0
    metric_sums: dict[str, float] = {}
    names = []
    for name, delta, weight, metrics in contributions:
        for s, d in zip(sums, delta, strict=True):
            s += weight * np.asarray(d, dtype=np.float64)
        total += weight
        for k, v in metrics.items():
            metric_sums[k] = metric_sums.get(k, 0.0) + weight * float(v)
        names.append(name)
    return AggregateResult(
        update_sum=[s.astype(r.dtype) for s, r in zip(sums, reference, strict=True)],
        weight_total=total,
        metric_sums=metric_sums,
        participants=tuple(names),
        dropped=tuple(dropped),
    )
