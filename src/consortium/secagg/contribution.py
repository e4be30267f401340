"""What an institution puts inside the secret, and how the coordinator reads the sum.

An institution's contribution is the vector of segments

    update        = w * clip(delta)                  (length d, bound clip_norm)
    weight        = w                                (length 1, bound 1)
    metric/<name> = w * clip(metric, -bound, bound)  (length 1 each)

with ``w = min(num_examples, weight_cap) / weight_cap`` in ``[0, 1]``. Because the
weight and the weighted metrics are *inside* the masked vector, the coordinator
learns only ``sum w_i delta_i``, ``sum w_i`` and ``sum w_i m_i`` - never one
institution's example count or loss. :func:`to_aggregate` rescales by
``weight_cap`` so that the result has the same meaning as the clear-text oracle
:func:`consortium.federation.aggregation.weighted_sum` with weights
``min(num_examples, weight_cap)``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from consortium.errors import DataError
from consortium.federation.aggregation import AggregateResult
from consortium.secagg.config import SecAggConfig
from consortium.secagg.errors import SecAggError
from consortium.secagg.messages import Stage
from consortium.secagg.protocol import SecureSum
from consortium.secagg.quantize import SegmentSpec

logger = logging.getLogger(__name__)

UPDATE_SEGMENT = "update"
WEIGHT_SEGMENT = "weight"
METRIC_PREFIX = "metric/"


@dataclass(frozen=True)
class ContributionSpec:
    """Public description of the contribution, sent to every node at stage 0.

    Attributes
    ----------
    clip_norm : float
        L2 bound on the model delta.
    weight_cap : float
        Example counts above it count as ``weight_cap``.
    tensor_sizes : tuple of int
        Number of values of each model tensor, in model order.
    metric_bounds : tuple of (str, float)
        Aggregated training metrics and their bounds, sorted by name.
    noise_headroom : float
        Room reserved in the update segment for the privacy layer's noise.
    coordinate_bound : float
        Bound on each coordinate of the delta (``clip_norm`` unless set lower).
    """

    clip_norm: float
    weight_cap: float
    tensor_sizes: tuple[int, ...]
    metric_bounds: tuple[tuple[str, float], ...] = ()
    noise_headroom: float = 0.0
    coordinate_bound: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.coordinate_bound <= self.clip_norm:
            object.__setattr__(self, "coordinate_bound", float(self.clip_norm))

    @classmethod
    def create(cls, config: SecAggConfig, reference: Sequence[np.ndarray]) -> ContributionSpec:
        """The spec for a model with the shapes of ``reference``."""
        return cls(
            clip_norm=config.clip_norm,
            weight_cap=config.weight_cap,
            tensor_sizes=tuple(int(np.asarray(r).size) for r in reference),
            metric_bounds=tuple(config.metric_bounds.items()),
            noise_headroom=config.noise_headroom,
            coordinate_bound=config.coordinate_bound or config.clip_norm,
        )

    @property
    def update_length(self) -> int:
        return int(sum(self.tensor_sizes))

    def segments(self) -> tuple[SegmentSpec, ...]:
        """The quantisation segments of this contribution."""
        segs = [
            SegmentSpec(UPDATE_SEGMENT, self.update_length, self.coordinate_bound, self.noise_headroom),
            SegmentSpec(WEIGHT_SEGMENT, 1, 1.0),
        ]
        segs += [SegmentSpec(METRIC_PREFIX + name, 1, bound) for name, bound in self.metric_bounds]
        return tuple(segs)

    def to_record(self) -> dict[str, Any]:
        return {
            "clip-norm": float(self.clip_norm),
            "weight-cap": float(self.weight_cap),
            "tensor-sizes": [int(s) for s in self.tensor_sizes],
            "metric-names": [n for n, _ in self.metric_bounds],
            "metric-bounds": [float(b) for _, b in self.metric_bounds],
            "noise-headroom": float(self.noise_headroom),
            "coordinate-bound": float(self.coordinate_bound),
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> ContributionSpec:
        st = Stage.ADVERTISE_KEYS.label
        try:
            names = list(record["metric-names"])
            bounds = [float(b) for b in record["metric-bounds"]]
            if len(names) != len(bounds) or not all(isinstance(n, str) for n in names):
                raise ValueError("metric-names and metric-bounds must be equally long lists")
            sizes = tuple(int(s) for s in record["tensor-sizes"])
            if not sizes or min(sizes) < 1:
                raise ValueError("tensor-sizes must be a non-empty list of positive ints")
            return cls(
                clip_norm=float(record["clip-norm"]),
                weight_cap=float(record["weight-cap"]),
                tensor_sizes=sizes,
                metric_bounds=tuple(zip(names, bounds, strict=True)),
                noise_headroom=float(record["noise-headroom"]),
                coordinate_bound=float(record["coordinate-bound"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SecAggError(f"Invalid contribution spec in the setup message: {exc!r}.", stage=st) from exc


@dataclass(frozen=True)
class Contribution:
    """One institution's segment values, ready to encode.

    Attributes
    ----------
    values : dict of str to numpy.ndarray
        Flat float64 array per segment.
    delta_norm : float
        L2 norm of the delta before clipping.
    clipped : bool
        Whether the delta was scaled down to ``clip_norm``.
    clipped_coordinates : int
        Coordinates clipped to ``coordinate_bound``.
    clipped_metrics : tuple of str
        Metrics whose value was clipped to their bound.
    """

    values: dict[str, np.ndarray]
    delta_norm: float
    clipped: bool
    clipped_metrics: tuple[str, ...] = ()
    clipped_coordinates: int = 0


def _l2_norm(flat: np.ndarray) -> float:
    return math.sqrt(float(np.einsum("i,i->", flat, flat)))  # no BLAS threads


def clip_by_l2(flat: np.ndarray, clip_norm: float) -> tuple[np.ndarray, float]:
    """Scale ``flat`` down to L2 norm ``clip_norm`` if it is longer; return it and its old norm."""
    norm = _l2_norm(flat)
    if norm > clip_norm:
        return flat * (clip_norm / norm), norm
    return flat, norm


def build_contribution(
    delta: Sequence[np.ndarray],
    *,
    num_examples: float,
    metrics: Mapping[str, float],
    spec: ContributionSpec,
) -> Contribution:
    """Clip, weight and lay out an institution's update, weight and metrics.

    The update costs four passes over ``d`` values: the float64 concatenation,
    the norm (which also detects NaN/inf: they make it non-finite), the
    coordinate bound check (only with a ``coordinate_bound``), and one scaling
    by ``w`` times the L2 clipping factor.

    Raises
    ------
    DataError
        If the delta does not match the model's tensor sizes, holds NaN/inf,
        the example count is negative or not finite, or a declared metric is missing.
    """
    arrays = [np.asarray(a) for a in delta]
    sizes = tuple(int(a.size) for a in arrays)
    if sizes != spec.tensor_sizes:
        raise DataError(
            f"The model delta has tensor sizes {list(sizes)}, but the round expects "
            f"{list(spec.tensor_sizes)} (same model as the coordinator's)."
        )
    flat = np.concatenate([a.reshape(-1) for a in arrays], dtype=np.float64)
    norm = _l2_norm(flat)
    if not math.isfinite(norm) and not np.all(np.isfinite(flat)):  # finite values can still overflow the norm
        raise DataError("The model delta contains NaN or inf values; local training diverged.")
    n = float(num_examples)
    if not np.isfinite(n) or n < 0:
        raise DataError(f"The example count must be a finite number >= 0. Got {num_examples!r} instead.")
    factor = spec.clip_norm / norm if norm > spec.clip_norm else 1.0
    if norm > spec.clip_norm:
        logger.info("Model delta clipped from L2 norm %.4g to %.4g.", norm, spec.clip_norm)
    w = min(n, spec.weight_cap) / spec.weight_cap
    n_coord = 0
    update = None
    if spec.coordinate_bound < spec.clip_norm and flat.size:
        peak = factor * max(float(flat.max()), -float(flat.min()))
        if peak > spec.coordinate_bound:
            clipped_flat = flat * factor if factor != 1.0 else flat
            n_coord = int(np.count_nonzero(np.abs(clipped_flat) > spec.coordinate_bound))
            if n_coord:
                logger.info("%d coordinate(s) of the delta clipped to +-%.4g.", n_coord, spec.coordinate_bound)
                update = w * np.clip(clipped_flat, -spec.coordinate_bound, spec.coordinate_bound)
    if update is None:
        update = np.multiply(flat, w * factor, out=flat)  # one pass, in place: weight and L2 clipping together
    values = {UPDATE_SEGMENT: update, WEIGHT_SEGMENT: np.array([w])}
    clipped_metrics = []
    for name, bound in spec.metric_bounds:
        if name not in metrics:
            raise DataError(
                f"Training metric '{name}' is declared for aggregation but the training handler did "
                f"not return it (returned: {sorted(metrics)})."
            )
        m = float(metrics[name])
        if not np.isfinite(m):
            raise DataError(f"Training metric '{name}' is {m!r}; it must be finite.")
        if abs(m) > bound:
            clipped_metrics.append(name)
            logger.warning("Training metric '%s' = %.4g clipped to its bound %.4g.", name, m, bound)
            m = float(np.clip(m, -bound, bound))
        values[METRIC_PREFIX + name] = np.array([w * m])
    return Contribution(
        values=values,
        delta_norm=norm,
        clipped=norm > spec.clip_norm,
        clipped_metrics=tuple(clipped_metrics),
        clipped_coordinates=n_coord,
    )


def to_aggregate(
    result: SecureSum,
    *,
    spec: ContributionSpec,
    reference: Sequence[np.ndarray],
    names: Mapping[int, str],
) -> AggregateResult:
    """Turn the decoded secure sum into the coordinator's :class:`AggregateResult`.

    The update sum is reshaped like ``reference`` and cast to its dtypes, so a
    float32 model stays float32.
    """
    cap = spec.weight_cap
    flat = result.values[UPDATE_SEGMENT] * cap
    arrays, offset = [], 0
    for ref in reference:
        r = np.asarray(ref)
        arrays.append(flat[offset : offset + r.size].reshape(r.shape).astype(r.dtype))
        offset += r.size
    metric_sums = {name: float(result.values[METRIC_PREFIX + name][0] * cap) for name, _ in spec.metric_bounds}
    return AggregateResult(
        update_sum=arrays,
        weight_total=float(result.values[WEIGHT_SEGMENT][0] * cap),
        metric_sums=metric_sums,
        participants=tuple(names.get(u, str(u)) for u in result.participants),
        dropped=tuple(names.get(u, str(u)) for u in result.dropped),
    )
