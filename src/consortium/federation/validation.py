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
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

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
    update_sum: Sequence[np.ndarray],
    *,
    weight_total: float,
    clip_norm: float,
    round_number: int = 0,
    slack: float = 0.0,
) -> float:
    """Verify that a securely aggregated sum respects the client-side clip bound.

    Every honest institution sends ``w_i * clip(d_i)`` with ``||clip(d_i)|| <=
    clip_norm``, so the sum's norm is at most ``weight_total * clip_norm``
    (plus quantisation error, allowed for with 1 % slack, plus ``slack``: the
    norm that differential-privacy noise inside the sum may add).

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
    bound = weight_total * clip_norm * 1.01 + 1e-6 + slack
    if not norm <= bound:
        raise FederationError(
            f"Round {round_number}: the securely aggregated update has norm {norm:.4g}, above the bound "
            f"{bound:.4g} (sum of weights {weight_total:g} x clip_norm {clip_norm:g}); at least one "
            "institution did not clip its update. The round is refused and the model left unchanged."
        )
    return norm


# --------------------------------------------------------------------------------------
# Replies received by the coordinator (a trust boundary: any node may send anything)
# --------------------------------------------------------------------------------------


def _record(content: object, key: str, kind: type, *, institution: str) -> Any:
    if not isinstance(content, RecordDict):
        raise InvalidUpdateError(institution, f"the reply content is a {type(content).__name__}, not a RecordDict")
    record = content.get(key)
    if not isinstance(record, kind):
        got = "nothing" if record is None else type(record).__name__
        raise InvalidUpdateError(institution, f"the reply must carry a {kind.__name__} '{key}'; got {got}")
    return record


def _arrays(record: ArrayRecord, *, institution: str, key: str) -> list[np.ndarray]:
    try:
        return [np.asarray(record[name].numpy()) for name in record]
    except Exception as exc:  # noqa: BLE001 - any decoding failure of untrusted bytes is a bad reply
        reason = f"the arrays in '{key}' cannot be decoded ({type(exc).__name__})"
        raise InvalidUpdateError(institution, reason) from None


def _number(value: object, *, institution: str, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidUpdateError(institution, f"metric '{name}' must be a number, got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number):
        raise InvalidUpdateError(institution, f"metric '{name}' must be finite, got {number!r}")
    return number


def contribution_from_reply(
    content: object,
    *,
    institution: str,
    reference: Sequence[np.ndarray] | None,
    max_norm: float | None = None,
    update_key: str = "update",
    metrics_key: str = "metrics",
    weight_key: str = "num-examples",
) -> tuple[list[np.ndarray], float, dict[str, float]]:
    """Parse and validate one clear-text training/statistics reply.

    Returns
    -------
    tuple
        ``(arrays, weight, metrics)``.

    Raises
    ------
    InvalidUpdateError
        For any missing record, undecodable array, wrong shape/dtype, NaN/inf,
        norm above ``max_norm``, or a weight/metric that is not a finite number
        (weight must be > 0). Nothing else escapes.
    """
    arrays = _arrays(_record(content, update_key, ArrayRecord, institution=institution),
                     institution=institution, key=update_key)
    metrics_record = _record(content, metrics_key, MetricRecord, institution=institution)
    if weight_key not in metrics_record:
        raise InvalidUpdateError(institution, f"metric record '{metrics_key}' has no '{weight_key}'")
    metrics = {str(k): _number(v, institution=institution, name=str(k)) for k, v in metrics_record.items()}
    weight = metrics.pop(weight_key)
    if not weight > 0:
        raise InvalidUpdateError(institution, f"'{weight_key}' must be > 0, got {weight!r}")
    if reference is None:
        reference = [np.empty(a.shape, a.dtype) for a in arrays]
        for i, a in enumerate(arrays):
            if a.dtype.kind not in "iuf":
                raise InvalidUpdateError(institution, f"tensor {i} has dtype {a.dtype}, expected a number type")
    checked = UpdateValidator(reference, max_norm=max_norm).check(arrays, institution=institution)
    return checked, weight, metrics


def histograms_from_reply(
    content: object, *, institution: str, bins: int, histogram_key: str = "val-histogram", metrics_key: str = "metrics"
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Parse an evaluation reply: validation-score histograms ``neg``/``pos`` and metrics.

    Raises
    ------
    InvalidUpdateError
        Missing records, histograms that are not ``bins`` finite counts >= 0,
        or non-numeric metrics.
    """
    record = _record(content, histogram_key, ArrayRecord, institution=institution)
    out = []
    for name in ("neg", "pos"):
        if name not in record:
            raise InvalidUpdateError(institution, f"histogram record has no '{name}'")
        try:
            h = np.asarray(record[name].numpy(), dtype=np.float64)
        except Exception as exc:  # noqa: BLE001 - untrusted bytes
            reason = f"histogram '{name}' cannot be decoded ({type(exc).__name__})"
            raise InvalidUpdateError(institution, reason) from None
        if h.shape != (bins,) or not np.all(np.isfinite(h)) or np.any(h < 0):
            raise InvalidUpdateError(institution, f"histogram '{name}' must be {bins} finite counts >= 0")
        out.append(h)
    metrics_record = _record(content, metrics_key, MetricRecord, institution=institution)
    metrics = {str(k): _number(v, institution=institution, name=str(k)) for k, v in metrics_record.items()}
    return out[0], out[1], metrics


def info_from_reply(content: object, *, institution: str, info_key: str = "info") -> tuple[str, tuple[str, ...], bool]:
    """Parse a node's ``info`` reply: (institution name, feature names, disclose-eval)."""
    info = _record(content, info_key, ConfigRecord, institution=institution)
    name = info.get("institution")
    features = info.get("feature-names")
    disclose = info.get("disclose-eval")
    if not isinstance(name, str) or not name.strip() or not name.isprintable() or len(name) > 200:
        raise InvalidUpdateError(institution, f"'institution' must be a printable name, got {name!r:.60}")
    if not isinstance(features, list) or not features or not all(isinstance(f, str) for f in features):
        raise InvalidUpdateError(institution, "'feature-names' must be a non-empty list of strings")
    if not isinstance(disclose, bool):
        raise InvalidUpdateError(institution, f"'disclose-eval' must be a bool, got {type(disclose).__name__}")
    return name, tuple(features), disclose
