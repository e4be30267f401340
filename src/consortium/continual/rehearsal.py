"""A local rehearsal buffer: earlier fraud kept at the institution for retraining.

Retraining on recent rows alone teaches the new pattern and slowly forgets the
old ones (catastrophic forgetting): old fraud scenarios are rare in any recent
window.  Each institution therefore keeps a bounded, uniformly sampled
(reservoir) buffer of the fraud rows it has seen, and a smaller one of
legitimate rows, and mixes them into its local data when a retraining round
set starts.  The buffer never leaves the institution; only model updates do.
"""

from __future__ import annotations

import numpy as np

from consortium.continual.errors import DriftInputError
from consortium.errors import param_error


class _Reservoir:
    """Algorithm R: a uniform sample of at most ``capacity`` rows of a stream."""

    def __init__(self, capacity: int, rng: np.random.Generator) -> None:
        self.capacity = capacity
        self.rng = rng
        self.rows: np.ndarray | None = None
        self.size = 0
        self.seen = 0

    def add(self, X: np.ndarray) -> None:
        if X.shape[0] == 0:
            return
        if self.rows is None:
            self.rows = np.empty((self.capacity, X.shape[1]), dtype=np.float32)
        for row in X:  # rows arriving per call are few (fraud) or pre-sampled (legit)
            if self.size < self.capacity:
                self.rows[self.size] = row
                self.size += 1
            else:
                j = int(self.rng.integers(0, self.seen + 1))
                if j < self.capacity:
                    self.rows[j] = row
            self.seen += 1

    def sample(self) -> np.ndarray:
        if self.rows is None:
            return np.zeros((0, 0), dtype=np.float32)
        return self.rows[: self.size].copy()


class RehearsalBuffer:
    """Reservoir samples of an institution's past fraud and legitimate rows.

    Parameters
    ----------
    n_features : int
        Width of the rows.
    fraud_capacity : int
        Fraud rows kept (all of them while fewer arrive).
    legit_capacity : int
        Legitimate rows kept.
    legit_sample_rate : float
        Share of arriving legitimate rows offered to the reservoir (keeps the
        per-row Python cost low for millions of legitimate rows).
    seed : int
        Seed of the sampling.
    """

    def __init__(
        self, n_features: int, *, fraud_capacity: int = 5_000, legit_capacity: int = 20_000,
        legit_sample_rate: float = 0.05, seed: int = 0,
    ) -> None:
        owner = "RehearsalBuffer"
        for name, value in (("n_features", n_features), ("fraud_capacity", fraud_capacity),
                            ("legit_capacity", legit_capacity)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise param_error(name, owner, "an int >= 1", value)
        if not isinstance(legit_sample_rate, int | float) or not 0.0 < legit_sample_rate <= 1.0:
            raise param_error("legit_sample_rate", owner, "a float in (0, 1]", legit_sample_rate)
        self.n_features = n_features
        self.legit_sample_rate = float(legit_sample_rate)
        self._rng = np.random.default_rng(seed)
        self._fraud = _Reservoir(fraud_capacity, self._rng)
        self._legit = _Reservoir(legit_capacity, self._rng)

    def add(self, X: np.ndarray, y: np.ndarray) -> None:
        """Offer labelled rows (raw features, 0/1 labels) to the buffer."""
        X = np.asarray(X, dtype=np.float32)
        y = np.asarray(y).reshape(-1)
        if X.ndim != 2 or X.shape != (y.size, self.n_features):
            raise DriftInputError(
                f"The 'X' of RehearsalBuffer.add must have shape ({y.size}, {self.n_features}). Got {X.shape} instead."
            )
        finite = np.isfinite(X).all(axis=1) & np.isin(y, (0, 1))
        X, y = X[finite], y[finite]
        self._fraud.add(X[y == 1])
        legit = X[y == 0]
        keep = self._rng.random(legit.shape[0]) < self.legit_sample_rate
        self._legit.add(legit[keep])

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        """All buffered rows and their labels (fraud first)."""
        f, g = self._fraud.sample(), self._legit.sample()
        parts = [a for a in (f, g) if a.size]
        if not parts:
            return np.zeros((0, self.n_features), dtype=np.float32), np.zeros(0, dtype=np.int64)
        X = np.vstack(parts)
        y = np.r_[np.ones(f.shape[0] if f.size else 0, dtype=np.int64), np.zeros(g.shape[0] if g.size else 0,
                                                                                   dtype=np.int64)]
        return X, y

    def __len__(self) -> int:
        return self._fraud.size + self._legit.size

    @property
    def fraud_rows(self) -> int:
        """Fraud rows held."""
        return self._fraud.size
