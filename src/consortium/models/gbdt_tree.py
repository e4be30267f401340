"""Regression trees on binned features, as flat arrays, and ensembles of them.

A :class:`Tree` is five parallel arrays indexed by node id (node 0 is the root):
``feature`` and ``threshold`` (a bin index: rows with ``bin <= threshold`` go
left), ``left`` and ``right`` child ids (``-1`` at a leaf) and ``value`` (the
leaf's contribution to the raw score, learning rate included). Because the bin
of a value is the number of bin edges strictly below it, ``bin <= t`` is the same
test as ``x <= edges[feature][t]`` on the raw value, so one tree serves binned
rows (training), raw rows (:meth:`Ensemble.predict_raw`) and ONNX's
``BRANCH_LEQ`` nodes alike.

Trees travel between coordinator and institutions as the flat arrays of
:meth:`Ensemble.to_arrays`; :func:`ensemble_digest` chains a SHA-256 over them so
an institution can check that its cached scores belong to exactly the trees the
coordinator holds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from consortium.errors import DataError

EMPTY_DIGEST = hashlib.sha256(b"consortium-gbdt").hexdigest()
"""Digest of an ensemble with no trees."""


@dataclass
class Tree:
    """One regression tree; grown in place by the booster, then treated as immutable."""

    feature: list[int] = field(default_factory=lambda: [-1])
    threshold: list[int] = field(default_factory=lambda: [-1])
    left: list[int] = field(default_factory=lambda: [-1])
    right: list[int] = field(default_factory=lambda: [-1])
    value: list[float] = field(default_factory=lambda: [0.0])

    @property
    def n_nodes(self) -> int:
        return len(self.feature)

    @property
    def n_leaves(self) -> int:
        return sum(1 for c in self.left if c < 0)

    def split(self, node: int, *, feature: int, threshold: int) -> tuple[int, int]:
        """Turn leaf ``node`` into a split; return the ids of its two new leaves."""
        if self.left[node] >= 0:
            raise DataError(f"Tree node {node} is already split; only leaves can be split.")
        ids = []
        for _ in range(2):
            ids.append(len(self.feature))
            self.feature.append(-1)
            self.threshold.append(-1)
            self.left.append(-1)
            self.right.append(-1)
            self.value.append(0.0)
        self.feature[node], self.threshold[node] = int(feature), int(threshold)
        self.left[node], self.right[node] = ids
        return ids[0], ids[1]

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(feature, threshold, left, right, value)`` as int32/float64 arrays."""
        return (
            np.asarray(self.feature, dtype=np.int32),
            np.asarray(self.threshold, dtype=np.int32),
            np.asarray(self.left, dtype=np.int32),
            np.asarray(self.right, dtype=np.int32),
            np.asarray(self.value, dtype=np.float64),
        )

    @classmethod
    def from_arrays(
        cls, feature: np.ndarray, threshold: np.ndarray, left: np.ndarray, right: np.ndarray, value: np.ndarray
    ) -> Tree:
        n = len(feature)
        if not (len(threshold) == len(left) == len(right) == len(value) == n) or n < 1:
            raise DataError(f"Tree arrays must have one equal, positive length; got {n}, {len(threshold)}, "
                            f"{len(left)}, {len(right)}, {len(value)}.")
        lf, rt = np.asarray(left), np.asarray(right)
        internal = lf >= 0
        backwards = np.any(lf[internal] <= np.flatnonzero(internal))
        if np.any((lf >= n) | (rt >= n)) or np.any(internal != (rt >= 0)) or backwards:
            raise DataError("Tree arrays are malformed: child ids must point forward inside the tree.")
        return cls(
            feature=[int(v) for v in feature], threshold=[int(v) for v in threshold],
            left=[int(v) for v in left], right=[int(v) for v in right], value=[float(v) for v in value],
        )

    def apply(self, binned: np.ndarray) -> np.ndarray:
        """Node id that each binned row reaches (a leaf of the tree as it is now)."""
        feature, threshold, left, right, _ = self.arrays()
        node = np.zeros(binned.shape[0], dtype=np.int32)
        rows = np.arange(binned.shape[0])
        active = rows[left[node] >= 0]
        while active.size:
            cur = node[active]
            go_left = binned[active, feature[cur]] <= threshold[cur]
            node[active] = np.where(go_left, left[cur], right[cur])
            active = active[left[node[active]] >= 0]
        return node

    def predict_binned(self, binned: np.ndarray) -> np.ndarray:
        """Leaf values of the binned rows."""
        return np.asarray(self.value, dtype=np.float64)[self.apply(binned)]

    def depth(self) -> int:
        """Longest root-to-leaf path (0 for a single leaf)."""
        depth = [0] * self.n_nodes
        for i in range(self.n_nodes):
            if self.left[i] >= 0:
                depth[self.left[i]] = depth[self.right[i]] = depth[i] + 1
        return max(depth)


def _tree_digest(previous: str, tree: Tree) -> str:
    h = hashlib.sha256(previous.encode())
    for a in tree.arrays():
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def ensemble_digest(trees: Sequence[Tree], *, start: str = EMPTY_DIGEST) -> str:
    """Hash chain over ``trees`` starting from ``start`` (the digest of the trees before them)."""
    digest = start
    for t in trees:
        digest = _tree_digest(digest, t)
    return digest


@dataclass
class Ensemble:
    """Boosted trees: ``score(x) = base_score + sum_t tree_t(x)`` (a log-odds margin)."""

    base_score: float
    trees: list[Tree] = field(default_factory=list)

    def predict_margin_binned(self, binned: np.ndarray) -> np.ndarray:
        out = np.full(binned.shape[0], self.base_score, dtype=np.float64)
        for t in self.trees:
            out += t.predict_binned(binned)
        return out

    def digest(self, n_trees: int | None = None) -> str:
        return ensemble_digest(self.trees[: len(self.trees) if n_trees is None else n_trees])

    def truncated(self, n_trees: int) -> Ensemble:
        """The first ``n_trees`` trees (early stopping keeps the best prefix)."""
        return Ensemble(base_score=self.base_score, trees=list(self.trees[:n_trees]))


def trees_to_arrays(trees: Sequence[Tree]) -> dict[str, np.ndarray]:
    """Concatenate trees into flat arrays plus ``sizes`` (nodes per tree)."""
    if not trees:
        return {"sizes": np.zeros(0, dtype=np.int32)}
    parts = [t.arrays() for t in trees]
    names = ("feature", "threshold", "left", "right", "value")
    out = {name: np.concatenate([p[i] for p in parts]) for i, name in enumerate(names)}
    out["sizes"] = np.asarray([t.n_nodes for t in trees], dtype=np.int32)
    return out


def trees_from_arrays(arrays: dict[str, np.ndarray]) -> list[Tree]:
    """Inverse of :func:`trees_to_arrays`."""
    sizes = np.asarray(arrays["sizes"], dtype=np.int64)
    if sizes.size == 0:
        return []
    if np.any(sizes < 1):
        raise DataError("Tree sizes must be positive.")
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    names = ("feature", "threshold", "left", "right", "value")
    for name in names:
        if len(arrays[name]) != bounds[-1]:
            raise DataError(f"Tree array '{name}' has {len(arrays[name])} entries; sizes say {int(bounds[-1])}.")
    return [
        Tree.from_arrays(*(np.asarray(arrays[name][bounds[i] : bounds[i + 1]]) for name in names))
        for i in range(len(sizes))
    ]
