"""Federated feature standardisation from additive sufficient statistics.

A model trained across institutions needs one shared input scaling, but no
institution may reveal its rows.  Mean and variance follow from three additive
quantities — row count, per-feature sum and per-feature sum of squares — so each
institution computes :class:`FeatureStats` locally, the coordinator adds them
(plainly with ``+``/:func:`combine_stats`, or under secure aggregation via the flat
:meth:`FeatureStats.to_vector` layout), and everyone standardises with the
resulting :class:`Standardizer`.  The class balance (``positives``) travels along
because imbalance-aware losses need the consortium-wide positive rate.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from consortium.errors import DataError, param_error
from consortium.models._validation import check_feature_matrix, check_labels

logger = logging.getLogger(__name__)

__all__ = ["FeatureStats", "Standardizer", "combine_stats"]


def _frozen_array(values: np.ndarray, dtype: type[np.floating]) -> np.ndarray:
    """A private read-only copy, so frozen dataclasses are really immutable."""
    out = np.array(values, dtype=dtype, copy=True)
    out.setflags(write=False)
    return out


@dataclass(frozen=True)
class FeatureStats:
    """Additive sufficient statistics of a feature matrix (and its labels).

    Because every field is a sum over rows, the statistics of a union of datasets
    are the sum of their statistics — which is what lets institutions combine
    them without sharing rows, also under secure aggregation.

    Attributes
    ----------
    count : float
        Number of rows.
    sum : np.ndarray
        Per-feature sum, float64 ``(d,)``.
    sumsq : np.ndarray
        Per-feature sum of squares, float64 ``(d,)``.
    positives : float
        Number of rows labelled 1 (0 when built without labels).
    """

    count: float
    sum: np.ndarray
    sumsq: np.ndarray
    positives: float

    def __post_init__(self) -> None:
        owner = "FeatureStats"
        for name in ("count", "positives"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float | np.integer | np.floating)
                or not np.isfinite(value)
                or value < 0
            ):
                raise param_error(name, owner, "a finite number >= 0", value)
            object.__setattr__(self, name, float(value))
        for name in ("sum", "sumsq"):
            value = np.asarray(getattr(self, name))
            if value.ndim != 1 or value.dtype.kind not in "fiu":
                raise DataError(
                    f"The '{name}' parameter of {owner} must be a 1-D numeric array. "
                    f"Got shape {value.shape} and dtype {value.dtype} instead."
                )
            if not np.all(np.isfinite(value)):
                raise DataError(
                    f"The '{name}' parameter of {owner} must hold finite values. "
                    "Got NaN/inf instead."
                )
            object.__setattr__(self, name, _frozen_array(value, np.float64))
        if self.sum.shape != self.sumsq.shape:
            raise DataError(
                f"The 'sumsq' parameter of {owner} must have the shape of 'sum' "
                f"{self.sum.shape}. Got shape {self.sumsq.shape} instead."
            )
        # Tolerance for float noise from (de)quantised secure aggregation.
        if self.positives > self.count * (1 + 1e-9) + 1e-6:
            raise param_error("positives", owner, f"<= count ({self.count})", self.positives)

    @classmethod
    def from_data(cls, X: np.ndarray, y: np.ndarray | None = None) -> FeatureStats:  # noqa: N803
        """Compute the statistics of one institution's feature matrix.

        Parameters
        ----------
        X : np.ndarray
            Feature matrix ``(n, d)``; summed in float64.
        y : np.ndarray, optional
            0/1 labels ``(n,)``; without them ``positives`` is 0.
        """
        owner = "FeatureStats.from_data"
        values = check_feature_matrix(X, owner).astype(np.float64, copy=False)
        positives = 0.0
        if y is not None:
            positives = float(np.count_nonzero(check_labels(y, values.shape[0], owner)))
        return cls(
            count=float(values.shape[0]),
            sum=values.sum(axis=0),
            sumsq=np.square(values).sum(axis=0),
            positives=positives,
        )

    @classmethod
    def zeros(cls, n_features: int) -> FeatureStats:
        """The neutral element: statistics of zero rows with ``n_features`` columns."""
        return cls(count=0.0, sum=np.zeros(n_features), sumsq=np.zeros(n_features), positives=0.0)

    @property
    def n_features(self) -> int:
        """Number of features ``d``."""
        return int(self.sum.shape[0])

    @property
    def positive_rate(self) -> float:
        """Fraction of rows labelled 1."""
        if self.count <= 0:
            raise DataError("FeatureStats.positive_rate is undefined for zero rows (count is 0).")
        return min(1.0, self.positives / self.count)

    def __add__(self, other: object) -> FeatureStats:
        if not isinstance(other, FeatureStats):
            return NotImplemented
        if other.n_features != self.n_features:
            raise DataError(
                f"FeatureStats can only be added for the same number of features: "
                f"expected {self.n_features}. Got {other.n_features} instead."
            )
        return FeatureStats(
            count=self.count + other.count,
            sum=self.sum + other.sum,
            sumsq=self.sumsq + other.sumsq,
            positives=self.positives + other.positives,
        )

    def __radd__(self, other: object) -> FeatureStats:
        # Lets the builtin sum() start from 0.
        if isinstance(other, int) and not isinstance(other, bool) and other == 0:
            return self
        return self.__add__(other)

    def to_vector(self) -> np.ndarray:
        """Flat float64 layout ``[count, positives, sum..., sumsq...]`` for transport."""
        return np.concatenate(([self.count, self.positives], self.sum, self.sumsq)).astype(
            np.float64
        )

    @classmethod
    def from_vector(cls, v: np.ndarray, n_features: int) -> FeatureStats:
        """Inverse of :meth:`to_vector` (also for a sum of such vectors)."""
        owner = "FeatureStats.from_vector"
        if (
            isinstance(n_features, bool)
            or not isinstance(n_features, int | np.integer)
            or (n_features < 1)
        ):
            raise param_error("n_features", owner, "a positive integer", n_features)
        v = np.asarray(v)
        expected = 2 + 2 * int(n_features)
        if v.ndim != 1 or v.shape[0] != expected:
            raise DataError(
                f"The 'v' parameter of {owner} must have shape ({expected},) for "
                f"{n_features} features. Got shape {v.shape} instead."
            )
        d = int(n_features)
        return cls(count=float(v[0]), positives=float(v[1]), sum=v[2 : 2 + d], sumsq=v[2 + d :])

    def standardizer(self, *, eps: float = 1e-6) -> Standardizer:
        """The mean/std scaler these statistics define.

        The variance is the population variance ``sumsq/n - mean**2`` (clamped at
        0).  Features whose std is below ``eps * max(1, |mean|)`` are treated as
        constant and get std 1 — relative because the sum-of-squares formula
        loses precision for features with a large mean, and a constant feature
        must not be blown up into noise.

        Raises
        ------
        DataError
            When the statistics cover zero rows.
        """
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not eps > 0:
            raise param_error("eps", "FeatureStats.standardizer", "a float > 0", eps)
        if self.count <= 0:
            raise DataError("Cannot build a Standardizer from FeatureStats with count 0.")
        mean = self.sum / self.count
        var = np.maximum(self.sumsq / self.count - np.square(mean), 0.0)
        std = np.sqrt(var)
        constant = std <= eps * np.maximum(1.0, np.abs(mean))
        if np.any(constant):
            logger.debug("%d constant feature(s) get std 1", int(np.count_nonzero(constant)))
        std = np.where(constant, 1.0, std)
        return Standardizer(mean=mean, std=std)


def combine_stats(stats: Sequence[FeatureStats]) -> FeatureStats:
    """Sum the statistics of several institutions (equals the pooled statistics)."""
    if isinstance(stats, FeatureStats) or not isinstance(stats, Sequence) or not stats:
        raise param_error("stats", "combine_stats", "a non-empty sequence of FeatureStats", stats)
    for i, s in enumerate(stats):
        if not isinstance(s, FeatureStats):
            raise param_error(f"stats[{i}]", "combine_stats", "a FeatureStats", type(s).__name__)
    total = stats[0]
    for s in stats[1:]:
        total = total + s
    return total


@dataclass(frozen=True)
class Standardizer:
    """Feature-wise ``(x - mean) / std`` scaling, stored with the model.

    Attributes
    ----------
    mean : np.ndarray
        float32 ``(d,)``.
    std : np.ndarray
        float32 ``(d,)``, strictly positive.
    """

    mean: np.ndarray
    std: np.ndarray

    def __post_init__(self) -> None:
        owner = "Standardizer"
        for name in ("mean", "std"):
            value = np.asarray(getattr(self, name))
            if value.ndim != 1 or value.dtype.kind not in "fiu" or value.size == 0:
                raise DataError(
                    f"The '{name}' parameter of {owner} must be a non-empty 1-D numeric array. "
                    f"Got shape {value.shape} and dtype {value.dtype} instead."
                )
            if not np.all(np.isfinite(value)):
                raise DataError(
                    f"The '{name}' parameter of {owner} must hold finite values. "
                    "Got NaN/inf instead."
                )
            object.__setattr__(self, name, _frozen_array(value, np.float32))
        if self.mean.shape != self.std.shape:
            raise DataError(
                f"The 'std' parameter of {owner} must have the shape of 'mean' "
                f"{self.mean.shape}. Got shape {self.std.shape} instead."
            )
        if np.any(self.std <= 0):
            raise DataError(
                f"The 'std' parameter of {owner} must be > 0 everywhere. "
                f"Got {int(np.count_nonzero(self.std <= 0))} non-positive entries instead."
            )

    @property
    def n_features(self) -> int:
        """Number of features ``d``."""
        return int(self.mean.shape[0])

    def transform(self, X: np.ndarray) -> np.ndarray:  # noqa: N803
        """Standardise ``X`` ``(n, d)``; returns a new float32 array."""
        values = check_feature_matrix(X, "Standardizer.transform")
        if values.shape[1] != self.n_features:
            raise DataError(
                f"The 'X' parameter of Standardizer.transform must have {self.n_features} "
                f"columns. Got {values.shape[1]} columns instead."
            )
        return ((values.astype(np.float32, copy=False) - self.mean) / self.std).astype(
            np.float32, copy=False
        )

    def inverse_transform(self, z: np.ndarray) -> np.ndarray:
        """Map standardised values ``z`` back to the original scale (float32)."""
        values = check_feature_matrix(z, "Standardizer.inverse_transform", name="z")
        if values.shape[1] != self.n_features:
            raise DataError(
                f"The 'z' parameter of Standardizer.inverse_transform must have "
                f"{self.n_features} columns. Got {values.shape[1]} columns instead."
            )
        return (values.astype(np.float32, copy=False) * self.std + self.mean).astype(
            np.float32, copy=False
        )

    def to_arrays(self) -> list[np.ndarray]:
        """``[mean, std]`` as float32 copies, for storing next to model weights."""
        return [self.mean.copy(), self.std.copy()]

    @classmethod
    def from_arrays(cls, arrays: Sequence[np.ndarray]) -> Standardizer:
        """Inverse of :meth:`to_arrays`."""
        if isinstance(arrays, np.ndarray) or not isinstance(arrays, Sequence) or len(arrays) != 2:
            raise param_error(
                "arrays", "Standardizer.from_arrays", "a sequence [mean, std]", arrays
            )
        return cls(mean=np.asarray(arrays[0]), std=np.asarray(arrays[1]))
