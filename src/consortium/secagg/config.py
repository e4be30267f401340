"""Parameters of consortium's secure aggregation, validated once.

How to choose them
------------------
``clip_norm``
    L2 bound on an institution's model delta. Deltas above it are scaled down
    (this also bounds one institution's influence, and is the sensitivity the
    privacy layer calibrates noise to). It is also the per-coordinate bound of
    the encoding, so the integer step of the update is
    ``clip_norm / M`` with ``M = (2**modulus_bits // n - 1) // 2``: with 32 bits and
    50 institutions, ``clip_norm * 2.3e-8``. Pick the smallest bound that rarely
    clips (the mod logs when it does).
``coordinate_bound``
    Optional bound on every coordinate of the (weighted) delta; coordinates
    beyond it are clipped and counted. By default the encoding bound is
    ``clip_norm`` itself, which wastes about ``log2(sqrt(d))`` bits of
    resolution on a ``d``-parameter model whose coordinates are typically
    ``clip_norm / sqrt(d)``; a bound of a few times that makes the encoding
    correspondingly finer, at the price of clipping rare outlier coordinates.
``weight_cap``
    An institution's weight is ``min(num_examples, weight_cap)``; it travels as
    ``w / weight_cap`` in ``[0, 1]`` inside the masked vector. Set it near the
    largest institution's training-set size: counts above are capped (bounded
    influence), counts far below it lose relative precision in proportion.
``metric_bounds``
    ``{name: bound}`` for every training metric to aggregate (``|metric| <= bound``;
    larger values are clipped and logged). Metrics not listed never leave the node.
``modulus_bits``
    Sums live in ``Z_{2^b}``; ``b <= 32`` keeps the uplink at 4 bytes per parameter.
    Fewer bits only coarsen the encoding (the wire format stays ``uint32``).
``neighbours``, ``threshold``
    SecAgg+ graph degree ``k`` (default ``min(n - 1, 2 ceil(log2 n) + 1)``) and
    Shamir threshold ``t`` among the ``k + 1`` holders of each node's secrets
    (default a majority, ``(k + 1) // 2 + 1``; it must be a majority). Each node
    needs ``t`` of its holders alive until the end of the round, so larger ``k``
    tolerates more dropouts; collusions of fewer than ``t`` holders learn nothing.
``stage_timeout``
    Seconds the coordinator waits for replies per stage; the first stage
    includes local training, so size it to the slowest institution's training.
``noise_headroom``
    Extra per-coordinate magnitude (value units) reserved in the update segment
    for noise the privacy layer adds to the encoded integers (e.g. 10 sigma).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from consortium.errors import param_error
from consortium.secagg.primitives import MAX_MODULUS_BITS

_OWNER = "SecAggConfig"


def _finite_positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise param_error(name, _OWNER, "a finite float > 0", value)
    return float(value)


@dataclass(frozen=True)
class SecAggConfig:
    """Validated settings of one secure-aggregation round (see the module docstring)."""

    clip_norm: float = 10.0
    weight_cap: float = 10_000.0
    metric_bounds: Mapping[str, float] = field(default_factory=dict)
    modulus_bits: int = MAX_MODULUS_BITS
    neighbours: int | None = None
    threshold: int | None = None
    stage_timeout: float = 120.0
    noise_headroom: float = 0.0
    coordinate_bound: float | None = None

    def __post_init__(self) -> None:
        _finite_positive("clip_norm", self.clip_norm)
        _finite_positive("weight_cap", self.weight_cap)
        _finite_positive("stage_timeout", self.stage_timeout)
        if self.coordinate_bound is not None:
            _finite_positive("coordinate_bound", self.coordinate_bound)
        if (
            isinstance(self.noise_headroom, bool)
            or not isinstance(self.noise_headroom, int | float)
            or not math.isfinite(self.noise_headroom)
            or self.noise_headroom < 0
        ):
            raise param_error("noise_headroom", _OWNER, "a finite float >= 0", self.noise_headroom)
        if (
            isinstance(self.modulus_bits, bool)
            or not isinstance(self.modulus_bits, int)
            or not 8 <= self.modulus_bits <= MAX_MODULUS_BITS
        ):
            raise param_error("modulus_bits", _OWNER, f"an int in [8, {MAX_MODULUS_BITS}]", self.modulus_bits)
        if self.neighbours is not None and (
            isinstance(self.neighbours, bool) or not isinstance(self.neighbours, int) or self.neighbours < 1
        ):
            raise param_error("neighbours", _OWNER, "None (automatic) or an int >= 1", self.neighbours)
        if self.threshold is not None and (
            isinstance(self.threshold, bool) or not isinstance(self.threshold, int) or self.threshold < 2
        ):
            raise param_error("threshold", _OWNER, "None (automatic) or an int >= 2", self.threshold)
        if not isinstance(self.metric_bounds, Mapping):
            raise param_error("metric_bounds", _OWNER, "a mapping of metric name to bound", self.metric_bounds)
        bounds = {}
        for name, bound in self.metric_bounds.items():
            if not isinstance(name, str) or not name or "/" in name:
                raise param_error("metric_bounds", _OWNER, "metric names as non-empty strings without '/'", name)
            bounds[name] = _finite_positive(f"metric_bounds[{name!r}]", bound)
        object.__setattr__(self, "metric_bounds", MappingProxyType(dict(sorted(bounds.items()))))
