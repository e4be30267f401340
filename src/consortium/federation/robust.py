"""Byzantine-robust aggregation rules for the clear-text transport.

The default rule is the weighted mean (FedAvg). One institution that sends a
scaled, sign-flipped or random update can move a mean arbitrarily far; the
rules here bound its influence:

``median``
    coordinate-wise median of the updates (Yin et al., 2018);
``trimmed-mean``
    coordinate-wise mean after dropping the ``trim_fraction`` largest and
    smallest values of each coordinate (Yin et al., 2018);
``krum``
    the single update closest to its ``n - f - 2`` nearest neighbours
    (Blanchard et al., 2017), ``f = byzantine_nodes``;
``multi-krum``
    the example-weighted mean of the ``n - f`` best-scoring updates by Krum's
    score.

The arithmetic is Flower's (``flwr.server.strategy.aggregate``): these rules
need every individual update, so they exist only for deployments without
secure aggregation (``FederationConfig`` refuses the combination). Under
secure aggregation the defence is the client-side norm bound, see
:mod:`consortium.federation.validation`.

:func:`robust_aggregate` returns an
:class:`~consortium.federation.aggregation.AggregateResult` whose
``mean_update()`` is the robust estimate, so the coordinator's server
optimisers use it unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from consortium.errors import FederationError, param_error
from consortium.federation.aggregation import AggregateResult, weighted_sum

logger = logging.getLogger(__name__)

AGGREGATIONS: tuple[str, ...] = ("mean", "median", "trimmed-mean", "krum", "multi-krum")
"""Names accepted by ``FederationConfig.aggregation``."""

Contribution = tuple[str, Sequence[np.ndarray], float, Mapping[str, float]]


def check_rule(rule: str, *, trim_fraction: float, byzantine_nodes: int, owner: str) -> None:
    """Validate a rule and its options (raises :class:`~consortium.errors.ConfigError`)."""
    if rule not in AGGREGATIONS:
        raise param_error("aggregation", owner, f"one of {AGGREGATIONS}", rule)
    if not 0.0 <= trim_fraction < 0.5:
        raise param_error("trim_fraction", owner, "a float in [0, 0.5)", trim_fraction)
    if isinstance(byzantine_nodes, bool) or not isinstance(byzantine_nodes, int) or byzantine_nodes < 0:
        raise param_error("byzantine_nodes", owner, "an int >= 0", byzantine_nodes)


def robust_aggregate(
    contributions: Sequence[Contribution],
    *,
    rule: str,
    reference: Sequence[np.ndarray],
    dropped: Sequence[str] = (),
    trim_fraction: float = 0.1,
    byzantine_nodes: int = 1,
) -> AggregateResult:
    """Aggregate clear-text ``(institution, delta, weight, metrics)`` contributions with ``rule``.

    Parameters
    ----------
    contributions : sequence
        Validated contributions (see :class:`~consortium.federation.validation.UpdateValidator`).
    rule : str
        One of :data:`AGGREGATIONS`.
    reference : sequence of numpy.ndarray
        Tensors giving dtypes and shapes of the result.
    dropped : sequence of str
        Institutions asked but left out before aggregation.
    trim_fraction : float
        Fraction cut at each end per coordinate (``trimmed-mean``).
    byzantine_nodes : int
        Assumed number of Byzantine institutions ``f`` (``krum``, ``multi-krum``).

    Returns
    -------
    AggregateResult
        ``mean_update()`` gives the robust update; ``participants`` lists
        every institution whose update was considered, and the metrics are
        the weighted means of all of them.
    """
    check_rule(rule, trim_fraction=trim_fraction, byzantine_nodes=byzantine_nodes, owner="robust_aggregate")
    plain = weighted_sum(contributions, reference=reference, dropped=dropped)
    if rule == "mean" or not contributions:
        return plain
    from flwr.server.strategy.aggregate import (  # noqa: PLC0415  (heavy import, only when used)
        aggregate_krum,
        aggregate_median,
        aggregate_trimmed_avg,
    )

    results = [([np.asarray(a, dtype=np.float64) for a in delta], max(int(round(w)), 1))
               for _, delta, w, _ in contributions]
    n = len(results)
    if rule == "median":
        robust = aggregate_median(results)
    elif rule == "trimmed-mean":
        robust = aggregate_trimmed_avg(results, trim_fraction)
    else:
        if n < 2 * byzantine_nodes + 3:
            raise FederationError(
                f"{rule} with byzantine_nodes={byzantine_nodes} needs at least {2 * byzantine_nodes + 3} "
                f"contributions (n >= 2f + 3). Got {n} instead."
            )
        keep = n - byzantine_nodes if rule == "multi-krum" else 0
        robust = aggregate_krum(results, byzantine_nodes, keep)
    total = plain.weight_total
    return AggregateResult(
        update_sum=[(np.asarray(r) * total).astype(ref.dtype) for r, ref in zip(robust, reference, strict=True)],
        weight_total=total,
        metric_sums=plain.metric_sums,
        participants=plain.participants,
        dropped=plain.dropped,
    )
