"""Secure aggregation as the coordinator's transport (the default).

Model deltas, example counts and training losses travel only inside masked
vectors (:func:`consortium.secagg.flower.run_secure_round`); feature
statistics travel as exact fixed-point limbs (:mod:`consortium.federation.exact_sum`)
through the same protocol. The coordinator learns sums and nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp import Grid

from consortium.federation import messages as m
from consortium.federation.aggregation import AggregateResult
from consortium.federation.config import FederationConfig
from consortium.federation.exact_sum import LIMB_BOUND, N_LIMBS
from consortium.federation.transport import Transport, UpdateBounds
from consortium.secagg.config import SecAggConfig
from consortium.secagg.flower import run_secure_round

TRAIN_LOSS_BOUND = 1_000.0
"""Bound on the training loss an institution reports inside the secret (clipped above)."""


def update_config(config: FederationConfig, bounds: UpdateBounds | None = None) -> SecAggConfig:
    """Secure-aggregation parameters of a training round (``bounds``: set by institution-level DP)."""
    if bounds is not None:
        coordinate = config.coordinate_bound if bounds.coordinate_bound is None else bounds.coordinate_bound
        return SecAggConfig(
            clip_norm=bounds.clip_norm,
            coordinate_bound=min(coordinate, bounds.clip_norm),
            weight_cap=bounds.weight_cap,
            metric_bounds=dict(bounds.metric_bounds),
            noise_headroom=bounds.noise_headroom,
            stage_timeout=config.round_timeout,
            **({"modulus_bits": bounds.modulus_bits} if bounds.modulus_bits is not None else {}),
        )
    return SecAggConfig(
        clip_norm=config.clip_norm,
        coordinate_bound=min(config.coordinate_bound, config.clip_norm),
        weight_cap=config.weight_cap,
        metric_bounds={"train-loss": TRAIN_LOSS_BOUND},
        stage_timeout=config.round_timeout,
    )


def statistics_config(config: FederationConfig, n_values: int) -> SecAggConfig:
    """Secure-aggregation parameters of the statistics round (exact limbs, weight 1)."""
    return SecAggConfig(
        clip_norm=LIMB_BOUND * math.sqrt(n_values) + 1.0,
        coordinate_bound=LIMB_BOUND,
        weight_cap=1.0,
        stage_timeout=config.round_timeout,
    )


class SecureTransport(Transport):
    """Every contribution summed with consortium's SecAgg+ (the coordinator sees only sums)."""

    name = "secagg"

    def sum_updates(
        self,
        grid: Grid,
        *,
        node_ids: Sequence[int],
        names: Mapping[int, str],
        content: RecordDict,
        reference: Sequence[np.ndarray],
        config: FederationConfig,
        bounds: UpdateBounds | None = None,
    ) -> AggregateResult:
        return run_secure_round(
            grid,
            node_ids=node_ids,
            node_names=names,
            train_content=content,
            reference=reference,
            config=update_config(config, bounds),
            message_type=m.TRAIN,
        )

    def sum_statistics(
        self,
        grid: Grid,
        *,
        node_ids: Sequence[int],
        names: Mapping[int, str],
        config: FederationConfig,
        n_features: int,
        request: Mapping[str, int | float | str] | None = None,
    ) -> AggregateResult:
        n_values = (2 + 2 * n_features) * N_LIMBS
        return run_secure_round(
            grid,
            node_ids=node_ids,
            node_names=names,
            train_content=RecordDict({m.CONFIG: ConfigRecord(dict(request or {}))}),
            reference=[np.zeros(n_values, dtype=np.float64)],
            config=statistics_config(config, n_values),
            message_type=m.STATS,
        )
