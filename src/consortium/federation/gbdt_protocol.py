"""The GBDT wire contract between coordinator and institutions: message types and records.

Two message types, both answered with one additive vector (ArrayRecord
``update`` with array ``sums``, MetricRecord ``metrics`` with ``num-examples`` 1),
so that they travel through secure aggregation exactly like ``query.stats``:

``query.gbdtbins``
    Carries the pooled per-feature mean and standard deviation (ArrayRecord
    ``gbdt-grid``). Reply: counts of training rows per fine grid cell and feature
    (:func:`consortium.models.gbdt_binning.cell_counts`) followed by the number
    of validation rows.
``query.gbdtlevel``
    Carries the bin edges (only when the institution may not have them), the
    trees finished since the previous message, the tree under construction and
    the nodes whose histograms are needed (ArrayRecord ``gbdt-model``) plus
    class weights and digests (ConfigRecord ``config``). Reply: per requested
    node, feature and bin the sums of gradient / max weight, hessian / max weight
    and row count, then (on a tree's first level) the validation statistics
    (:func:`consortium.models.gbdt.validation_stats`).

Institutions keep their binned rows and running scores in the node's
``context.state`` between messages; the digests let them prove that their cache
belongs to exactly the coordinator's ensemble, and a stale cache is an error
reply after which the coordinator re-sends everything once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from consortium.errors import DataError
from consortium.federation import messages as m
from consortium.models.gbdt_binning import BinEdges
from consortium.models.gbdt_tree import Tree, trees_from_arrays, trees_to_arrays

BINS: Final = "query.gbdtbins"
LEVEL: Final = "query.gbdtlevel"
GRID: Final = "gbdt-grid"
MODEL: Final = "gbdt-model"
SUMS: Final = "sums"

CACHE_STATE: Final = "gbdt-cache"
CACHE_ARRAYS: Final = "gbdt-cache-arrays"

_EDGE_KEYS = ("edges", "edge-sizes", "max-bins")
_TREE_KEYS = ("feature", "threshold", "left", "right", "value", "sizes")


@dataclass(frozen=True)
class LevelMessage:
    """Decoded ``query.gbdtlevel`` content."""

    run_tag: str
    edges: BinEdges | None
    edges_digest: str
    new_trees: list[Tree]
    trees_from: int
    prefix_digest: str
    ensemble_digest: str
    tree: Tree | None
    nodes: list[int]
    with_validation: bool
    base: float
    w_neg: float
    w_pos: float
    n_bins: int
    noise_std: float = 0.0

    @property
    def n_trees(self) -> int:
        return self.trees_from + len(self.new_trees)

    def to_content(self) -> RecordDict:
        arrays: dict[str, np.ndarray] = {}
        if self.edges is not None:
            arrays.update(self.edges.to_arrays())
        arrays.update({f"trees-{k}": v for k, v in trees_to_arrays(self.new_trees).items()})
        if self.tree is not None:
            arrays.update({f"tree-{k}": v for k, v in trees_to_arrays([self.tree]).items()})
        arrays["nodes"] = np.asarray(self.nodes, dtype=np.int32)
        config = ConfigRecord(
            {
                "run-tag": self.run_tag,
                "edges-digest": self.edges_digest,
                "trees-from": self.trees_from,
                "prefix-digest": self.prefix_digest,
                "ensemble-digest": self.ensemble_digest,
                "with-validation": self.with_validation,
                "base": float(self.base),
                "w-neg": float(self.w_neg),
                "w-pos": float(self.w_pos),
                "n-bins": int(self.n_bins),
                "noise-std": float(self.noise_std),
            }
        )
        record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
        return RecordDict({MODEL: record, m.CONFIG: config})

    @classmethod
    def from_content(cls, content: RecordDict) -> LevelMessage:
        try:
            cfg = content.config_records[m.CONFIG]
            rec = content.array_records[MODEL]
            arrays = {k: rec[k].numpy() for k in rec}
            edges = BinEdges.from_arrays({k: arrays[k] for k in _EDGE_KEYS}) if "edges" in arrays else None
            new_trees = trees_from_arrays({k: arrays[f"trees-{k}"] for k in _TREE_KEYS if f"trees-{k}" in arrays})
            tree_list = (
                trees_from_arrays({k: arrays[f"tree-{k}"] for k in _TREE_KEYS}) if "tree-sizes" in arrays else []
            )
            return cls(
                run_tag=str(cfg["run-tag"]),
                edges=edges,
                edges_digest=str(cfg["edges-digest"]),
                new_trees=new_trees,
                trees_from=int(cfg["trees-from"]),  # type: ignore[arg-type]
                prefix_digest=str(cfg["prefix-digest"]),
                ensemble_digest=str(cfg["ensemble-digest"]),
                tree=tree_list[0] if tree_list else None,
                nodes=[int(n) for n in arrays["nodes"]],
                with_validation=bool(cfg["with-validation"]),
                base=float(cfg["base"]),  # type: ignore[arg-type]
                w_neg=float(cfg["w-neg"]),  # type: ignore[arg-type]
                w_pos=float(cfg["w-pos"]),  # type: ignore[arg-type]
                n_bins=int(cfg["n-bins"]),  # type: ignore[arg-type]
                noise_std=float(cfg.get("noise-std", 0.0)),  # type: ignore[arg-type]
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"Malformed {LEVEL} message: {type(exc).__name__}: {exc}.") from exc


def bins_content(mean: np.ndarray, std: np.ndarray, *, cells: int, noise_std: float = 0.0) -> RecordDict:
    """Content of a ``query.gbdtbins`` message (``noise_std``: each institution's DP noise per count)."""
    grid = ArrayRecord({"mean": Array(np.asarray(mean, np.float64)), "std": Array(np.asarray(std, np.float64))})
    return RecordDict({GRID: grid, m.CONFIG: ConfigRecord({"cells": int(cells), "noise-std": float(noise_std)})})


def sums_reply(values: np.ndarray) -> RecordDict:
    """The reply every GBDT handler sends: one additive vector, weight 1."""
    from flwr.app import MetricRecord  # noqa: PLC0415

    return RecordDict(
        {
            m.UPDATE: ArrayRecord({SUMS: Array(np.ascontiguousarray(values, dtype=np.float64))}),
            m.METRICS: MetricRecord({m.WEIGHT: 1}),
        }
    )
