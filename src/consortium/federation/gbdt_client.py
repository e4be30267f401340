"""What an institution computes for federated boosting (numpy only, no PyTorch).

Both handlers return one additive vector; under secure aggregation
:func:`consortium.secagg.flower.secagg_mod` masks it before it leaves the node,
so the coordinator only ever sees the sum over institutions. The optional
differential-privacy noise (:func:`add_histogram_noise`) is added here, before
masking.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict

from consortium.data import InstitutionSplit
from consortium.errors import DataError
from consortium.federation import gbdt_protocol as p
from consortium.models.gbdt import PartyData, validation_stats
from consortium.models.gbdt import gradients as _gradients
from consortium.models.gbdt import node_histograms as _node_histograms
from consortium.models.gbdt_binning import BinEdges, cell_counts
from consortium.models.gbdt_tree import EMPTY_DIGEST, ensemble_digest

logger = logging.getLogger(__name__)


class StaleCacheError(DataError):
    """The institution's cached scores do not belong to the coordinator's ensemble."""


def bins_reply(split: InstitutionSplit, content: RecordDict) -> RecordDict:
    """Fine-grid cell counts of the training rows, then the number of validation rows."""
    grid = content.array_records[p.GRID]
    mean, std = grid["mean"].numpy(), grid["std"].numpy()
    cells = int(content.config_records["config"]["cells"])  # type: ignore[arg-type]
    if mean.shape != (split.train.n_features,) or std.shape != mean.shape:
        raise DataError(
            f"The coordinator's grid has {mean.shape[0]} features but this institution holds "
            f"{split.train.n_features}; the feature schemas differ."
        )
    counts = cell_counts(split.train.X, mean, std, cells=cells)
    values = np.concatenate([counts.ravel(), [float(split.val.n_rows)]])
    noise = float(content.config_records["config"].get("noise-std", 0.0))  # type: ignore[arg-type]
    if noise > 0:
        values = add_histogram_noise(values, std=noise, rng=np.random.default_rng(secrets.randbits(128)))
    return p.sums_reply(values)


def add_histogram_noise(values: np.ndarray, *, std: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise of standard deviation ``std`` on every histogram entry (DP, before masking)."""
    if std <= 0:
        return values
    return values + rng.normal(0.0, std, size=values.shape)


def data_tag(directory: Path) -> str:
    """Identity of an institution's data files (path, sizes, modification times)."""
    parts = [str(directory.resolve())]
    for f in sorted(directory.glob("*.npz")):
        st = f.stat()
        parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def _load_cache(
    context: Context, msg: p.LevelMessage, load: Callable[[], InstitutionSplit], tag: str
) -> PartyData:
    meta = context.state.get(p.CACHE_STATE)
    arrays = context.state.get(p.CACHE_ARRAYS)
    fresh = msg.edges is not None and (
        not isinstance(meta, ConfigRecord)
        or meta.get("run-tag") != msg.run_tag
        or meta.get("edges-digest") != msg.edges_digest
        or meta.get("data-tag") != tag
        or msg.trees_from == 0
    )
    if fresh:
        assert msg.edges is not None
        split = load()
        if msg.edges.digest() != msg.edges_digest:
            raise DataError("The bin edges do not match their digest; the message was altered.")
        if msg.edges.n_features != split.train.n_features:
            raise DataError(
                f"The coordinator's bin edges cover {msg.edges.n_features} features but this institution "
                f"holds {split.train.n_features}; the feature schemas differ."
            )
        data = PartyData.create(msg.edges, split.train.X, split.train.y, split.val.X, split.val.y, base=msg.base)
        _store(context, msg, data, digest=EMPTY_DIGEST, full=True, tag=tag)
        return data
    if not isinstance(meta, ConfigRecord) or not isinstance(arrays, ArrayRecord):
        raise StaleCacheError("This institution holds no boosting state (it restarted); the coordinator resends it.")
    if meta.get("run-tag") != msg.run_tag or meta.get("edges-digest") != msg.edges_digest:
        raise StaleCacheError("This institution's boosting state belongs to another run or other bin edges.")
    if meta.get("data-tag") != tag:
        raise StaleCacheError("This institution's data files changed since its boosting state was cached.")
    return PartyData(
        binned=arrays["binned"].numpy(), y=arrays["y"].numpy(),
        binned_val=arrays["binned-val"].numpy(), y_val=arrays["y-val"].numpy(),
        margin=arrays["margin"].numpy().copy(), margin_val=arrays["margin-val"].numpy().copy(),
        n_applied=int(meta["n-trees"]),  # type: ignore[arg-type]
    )


def _store(context: Context, msg: p.LevelMessage, data: PartyData, *, digest: str, full: bool, tag: str) -> None:
    context.state[p.CACHE_STATE] = ConfigRecord(
        {"run-tag": msg.run_tag, "edges-digest": msg.edges_digest, "n-trees": data.n_applied, "digest": digest,
         "data-tag": tag}
    )
    record = context.state.get(p.CACHE_ARRAYS)
    if full or not isinstance(record, ArrayRecord):
        record = ArrayRecord({"binned": Array(data.binned), "binned-val": Array(data.binned_val),
                              "y": Array(data.y), "y-val": Array(data.y_val)})
    record["margin"] = Array(data.margin)
    record["margin-val"] = Array(data.margin_val)
    context.state[p.CACHE_ARRAYS] = record


def level_reply(
    load: Callable[[], InstitutionSplit],
    content: RecordDict,
    context: Context,
    *,
    tag: str,
    rng: np.random.Generator | None = None,
) -> RecordDict:
    """Histograms of the requested nodes (and validation statistics) on this institution's rows.

    ``load`` reads the institution's data; it is called only when the node's
    cached binned rows are missing or stale (``tag`` identifies the data files).
    """
    msg = p.LevelMessage.from_content(content)
    data = _load_cache(context, msg, load, tag)
    meta = context.state[p.CACHE_STATE]
    digest = str(meta["digest"]) if isinstance(meta, ConfigRecord) else EMPTY_DIGEST
    if data.n_applied == msg.trees_from and digest == msg.prefix_digest:
        data.n_applied = 0  # apply the new trees on top of the cached margins
        data.catch_up(msg.new_trees)
        data.n_applied = msg.n_trees
        digest = ensemble_digest(msg.new_trees, start=digest)
        if digest != msg.ensemble_digest:
            raise StaleCacheError("The trees received do not hash to the coordinator's ensemble digest.")
        _store(context, msg, data, digest=digest, full=False, tag=tag)
    elif not (data.n_applied == msg.n_trees and digest == msg.ensemble_digest):
        raise StaleCacheError(
            f"This institution's scores cover {data.n_applied} trees (digest {digest[:8]}), the coordinator "
            f"sent trees {msg.trees_from}..{msg.n_trees}; the coordinator resends the ensemble."
        )
    wmax = max(msg.w_neg, msg.w_pos)
    d = data.binned.shape[1]
    if msg.nodes and msg.tree is not None:
        g, h = _gradients(data.margin, data.y, msg.w_neg, msg.w_pos)
        hist = _node_histograms(data.binned, g / wmax, h / wmax, msg.tree.apply(data.binned), msg.nodes,
                                n_bins=msg.n_bins)
    else:
        hist = np.zeros((len(msg.nodes), d, msg.n_bins, 3))
    parts = [hist.ravel()]
    if msg.with_validation:
        parts.append(validation_stats(data.margin_val, data.y_val, msg.w_neg, msg.w_pos))
    values = np.concatenate(parts)
    if msg.noise_std > 0:
        values = add_histogram_noise(values, std=msg.noise_std, rng=rng or np.random.default_rng(secrets.randbits(128)))
    return p.sums_reply(values)


def expected_edges(content: RecordDict) -> BinEdges | None:
    """The bin edges a level message carries (tests)."""
    return p.LevelMessage.from_content(content).edges
