"""Quantile bin edges from summed histograms on a fine grid (no value leaves an institution).

Federated quantile binning in two sums, both secure-aggregated:

1. the federated standardisation statistics (count, sums, sums of squares) give
   each feature's pooled mean and standard deviation;
2. every institution counts its training rows in ``cells`` fine cells per feature
   on the grid ``asinh((x - mean) / (GRID_SCALE * std))`` over
   ``[-GRID_HALF_WIDTH, GRID_HALF_WIDTH]``: linear within a hundredth of a standard
   deviation of the mean and logarithmic beyond (each cell about 1 % of the
   distance to the mean with the default 4096 cells), so that heavy-tailed
   amounts keep resolution where their rows are.

The coordinator adds the cell counts and places up to ``max_bins - 1`` edges at
cell boundaries where the pooled cumulative count crosses ``k / max_bins``. It
learns the pooled fine histogram of each feature and nothing per institution.
A feature whose rows fall in a single cell (a constant feature) gets no edge: it
has one bin and is never split on.

Edges are float32 (the dtype of every feature matrix and of ONNX inputs), and a
value's bin is the number of edges strictly below it, so that
``bin(x) <= t  <=>  x <= edges[t]`` holds exactly in training, in Python
inference and in ONNX.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from consortium.errors import DataError, param_error

GRID_SCALE = 0.01
"""Width (in standard deviations) of the linear core of the fine grid."""
GRID_HALF_WIDTH = float(np.arcsinh(1e6 / GRID_SCALE))
"""The fine grid covers standardised values up to a million standard deviations."""
DEFAULT_CELLS = 4096
MIN_STD = 1e-12


def fine_cells(X: np.ndarray, mean: np.ndarray, std: np.ndarray, *, cells: int) -> np.ndarray:
    """Cell index of every value, shape ``(n, d)`` (int64 in ``[0, cells)``)."""
    s = np.where(np.asarray(std) > MIN_STD, std, 1.0)
    z = np.arcsinh((np.asarray(X, dtype=np.float64) - mean) / (GRID_SCALE * s))
    idx = np.floor((z + GRID_HALF_WIDTH) / (2 * GRID_HALF_WIDTH) * cells)
    return np.clip(idx, 0, cells - 1).astype(np.int64)


def cell_counts(X: np.ndarray, mean: np.ndarray, std: np.ndarray, *, cells: int = DEFAULT_CELLS) -> np.ndarray:
    """Per-feature counts of rows in each fine cell, shape ``(d, cells)`` float64 (an additive statistic)."""
    X = np.asarray(X)
    d = X.shape[1]
    idx = fine_cells(X, mean, std, cells=cells) + np.arange(d)[None, :] * cells
    return np.bincount(idx.ravel(), minlength=d * cells).astype(np.float64).reshape(d, cells)


def cell_boundary(j: np.ndarray | int, mean: float, std: float, *, cells: int) -> np.ndarray:
    """Raw value of the lower boundary of cell ``j``."""
    s = std if std > MIN_STD else 1.0
    z = np.sinh(-GRID_HALF_WIDTH + 2 * GRID_HALF_WIDTH * np.asarray(j, dtype=np.float64) / cells)
    return np.asarray(mean + GRID_SCALE * s * z, dtype=np.float64)


@dataclass(frozen=True, eq=False)
class BinEdges:
    """Per-feature sorted float32 edges; feature ``f`` has ``len(edges[f]) + 1`` bins."""

    edges: tuple[np.ndarray, ...]
    max_bins: int

    def __post_init__(self) -> None:
        for f, e in enumerate(self.edges):
            if e.ndim != 1 or e.dtype != np.float32 or np.any(np.diff(e) <= 0) or len(e) > self.max_bins - 1:
                raise DataError(f"Bin edges of feature {f} must be strictly increasing float32, "
                                f"at most {self.max_bins - 1} of them.")

    @property
    def n_features(self) -> int:
        return len(self.edges)

    def n_bins(self) -> np.ndarray:
        return np.asarray([len(e) + 1 for e in self.edges], dtype=np.int64)

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Bin index of every value: the number of edges strictly below it (uint8 or uint16)."""
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise DataError(f"Expected a matrix with {self.n_features} feature columns; got shape {X.shape}.")
        dtype = np.uint8 if self.max_bins <= 256 else np.uint16
        out = np.empty(X.shape, dtype=dtype)
        for f, e in enumerate(self.edges):
            out[:, f] = np.searchsorted(e, X[:, f], side="left")
        return out

    def threshold_value(self, feature: int, bin_threshold: int) -> float:
        """Raw threshold equivalent to ``bin <= bin_threshold`` (``x <= value``)."""
        return float(self.edges[feature][bin_threshold])

    def to_arrays(self) -> dict[str, np.ndarray]:
        sizes = np.asarray([len(e) for e in self.edges], dtype=np.int32)
        flat = np.concatenate(self.edges) if self.edges else np.zeros(0, np.float32)
        return {"edges": flat.astype(np.float32), "edge-sizes": sizes, "max-bins": np.asarray([self.max_bins])}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> BinEdges:
        sizes = np.asarray(arrays["edge-sizes"], dtype=np.int64)
        flat = np.asarray(arrays["edges"], dtype=np.float32)
        if sizes.sum() != flat.size:
            raise DataError(f"Bin edges: sizes add up to {int(sizes.sum())} but {flat.size} edges were sent.")
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        edges = tuple(flat[bounds[i] : bounds[i + 1]].copy() for i in range(len(sizes)))
        return cls(edges=edges, max_bins=int(np.asarray(arrays["max-bins"]).reshape(-1)[0]))

    def digest(self) -> str:
        h = hashlib.sha256()
        for v in self.to_arrays().values():
            h.update(np.ascontiguousarray(v).tobytes())
        return h.hexdigest()


def edges_from_cell_counts(
    counts: np.ndarray, mean: Sequence[float] | np.ndarray, std: Sequence[float] | np.ndarray, *, max_bins: int
) -> BinEdges:
    """Quantile edges from pooled fine-cell counts (``(d, cells)``), at cell boundaries."""
    if not isinstance(max_bins, int) or not 2 <= max_bins <= 65_536:
        raise param_error("max_bins", "edges_from_cell_counts", "an int in [2, 65536]", max_bins)
    counts = np.asarray(counts, dtype=np.float64)
    d, cells = counts.shape
    edges = []
    for f in range(d):
        c = np.maximum(np.rint(counts[f]), 0.0)
        nonempty = np.flatnonzero(c > 0)
        if nonempty.size <= 1:
            edges.append(np.zeros(0, dtype=np.float32))
            continue
        if nonempty.size <= max_bins:
            # Few distinct cells (discrete feature): one bin per occupied cell.
            cut_after = nonempty[:-1]
        else:
            cum = np.cumsum(c)
            total = cum[-1]
            targets = total * np.arange(1, max_bins) / max_bins
            cut_after = np.unique(np.searchsorted(cum, targets, side="left"))
            cut_after = cut_after[cut_after < nonempty[-1]]
        # Edge at the lower boundary of the next occupied cell: all rows of cell j <= edge.
        nxt = nonempty[np.searchsorted(nonempty, cut_after, side="right")]
        raw = cell_boundary(nxt, float(mean[f]), float(std[f]), cells=cells)
        e = np.unique(raw.astype(np.float32))
        edges.append(e[: max_bins - 1])
    return BinEdges(edges=tuple(edges), max_bins=max_bins)


def local_edges(X: np.ndarray, *, max_bins: int, cells: int = DEFAULT_CELLS) -> BinEdges:
    """The same edges computed on one party's rows (centralized and local-only baselines)."""
    X = np.asarray(X, dtype=np.float64)
    mean, std = X.mean(axis=0), X.std(axis=0)
    return edges_from_cell_counts(cell_counts(X, mean, std, cells=cells), mean, std, max_bins=max_bins)
