"""The coordinator of federated boosting: binning, then one summed histogram request per tree level.

Stages of a run (each institution answers every stage; every answer is a sum):

1. ``query.info`` - institution names and feature schemas, which must agree;
2. ``query.stats`` - federated count / positives / sums / sums of squares (exact limbs);
3. ``query.gbdtbins`` - fine-grid cell counts per feature -> quantile bin edges;
4. per tree and level, ``query.gbdtlevel`` - gradient / hessian / count
   histograms of the level's nodes (the smaller sibling of each pair only), plus
   validation statistics on each tree's first level.

With ``secure_aggregation`` (the default) stages 2-4 run through consortium's
SecAgg+ (:func:`consortium.secagg.flower.run_secure_round` with the GBDT message
types): the coordinator learns the sums and nothing per institution. What it
learns in total is documented in ``docs/gbdt.md``.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from consortium.data import Dataset, load_npz
from consortium.errors import FederationError
from consortium.federation import gbdt_protocol as p
from consortium.federation import messages as m
from consortium.federation.config import FederationConfig
from consortium.federation.coordinator import Coordinator
from consortium.federation.thresholds import threshold_from_histograms
from consortium.models.gbdt import (
    VAL_BINS,
    VAL_LENGTH,
    VAL_RANGE,
    BoostResult,
    GBDTParams,
    LevelRequest,
    LevelSums,
    ValidationPoint,
    base_score,
    boost,
    predict_proba,
)
from consortium.models.gbdt_binning import DEFAULT_CELLS, BinEdges, edges_from_cell_counts
from consortium.models.gbdt_tree import (
    EMPTY_DIGEST,
    Ensemble,
    Tree,
    ensemble_digest,
    trees_from_arrays,
    trees_to_arrays,
)
from consortium.models.metrics import evaluate_scores
from consortium.registry import RoundRecord, RunStore
from consortium.secagg.config import SecAggConfig
from consortium.secagg.errors import SecAggAbort
from consortium.secagg.flower import run_secure_round

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VectorSum:
    """One summed vector and who is inside it."""

    values: np.ndarray
    participants: tuple[str, ...]
    dropped: tuple[str, ...]


def sum_vectors(
    grid: Grid,
    *,
    node_ids: Sequence[int],
    names: Mapping[int, str],
    content: RecordDict,
    message_type: str,
    length: int,
    bound: float,
    secure: bool,
    timeout: float,
) -> VectorSum:
    """Sum the ``sums`` vector every node replies with, securely or in the clear.

    ``bound`` is the largest magnitude any single institution's entry can have:
    under secure aggregation it sets the fixed-point step (``bound / ~2^31 * n``).
    """
    if secure:
        config = SecAggConfig(
            clip_norm=bound * math.sqrt(length) + 1.0, coordinate_bound=bound, weight_cap=1.0, stage_timeout=timeout
        )
        try:
            agg = run_secure_round(
                grid, node_ids=node_ids, node_names=names, train_content=content,
                reference=[np.zeros(length, dtype=np.float64)], config=config, message_type=message_type,
            )
        except SecAggAbort as exc:
            logger.warning("%s: secure aggregation aborted (%s).", message_type, exc)
            return VectorSum(values=np.zeros(length), participants=(), dropped=tuple(names[n] for n in node_ids))
        return VectorSum(values=np.asarray(agg.update_sum[0], dtype=np.float64), participants=agg.participants,
                         dropped=agg.dropped)
    msgs = [Message(content, dst_node_id=n, message_type=message_type) for n in node_ids]
    replies = list(grid.send_and_receive(msgs, timeout=timeout))
    total = np.zeros(length, dtype=np.float64)
    got: list[str] = []
    for r in replies:
        name = names.get(r.metadata.src_node_id, str(r.metadata.src_node_id))
        if r.has_error():
            logger.warning("%s: institution %s replied with an error: %s", message_type, name, r.error.reason)
            continue
        try:
            vec = r.content.array_records[m.UPDATE][p.SUMS].numpy()
        except (KeyError, TypeError, ValueError) as exc:
            logger.warning("%s: institution %s sent a malformed reply (%s).", message_type, name, exc)
            continue
        if vec.shape != (length,) or not np.all(np.isfinite(vec)):
            logger.warning("%s: institution %s sent %s values (expected %d finite); left out.",
                           message_type, name, vec.shape, length)
            continue
        total += vec
        got.append(name)
    dropped = tuple(sorted(set(names[n] for n in node_ids) - set(got)))
    return VectorSum(values=total, participants=tuple(got), dropped=dropped)


@dataclass(frozen=True)
class GBDTRunResult:
    """Outcome of a federated boosting run."""

    run_id: str
    boost: BoostResult
    threshold: float
    feature_names: tuple[str, ...]
    institutions: tuple[str, ...]
    holdout_metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    requests: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:  # noqa: N803
        return predict_proba(self.boost, X)


TreeCallback = Callable[[int, ValidationPoint | None], None]


class _FederatedSource:
    """A :class:`~consortium.models.gbdt.HistogramSource` answered by the institutions' secure sums."""

    def __init__(self, coord: GBDTCoordinator, grid: Grid, node_ids: Sequence[int], names: Mapping[int, str], *,
                 edges: BinEdges, base: float, weights: tuple[float, float], bound: float, run_tag: str,
                 noise_std: float) -> None:
        self.coord, self.grid, self.node_ids, self.names = coord, grid, list(node_ids), names
        self.edges, self.base, self.weights, self.bound, self.run_tag = edges, base, weights, bound, run_tag
        self.noise_std = noise_std
        self.edges_digest = edges.digest()
        self.synced = 0  # trees every institution has applied
        self.synced_digest = EMPTY_DIGEST
        self.edges_sent = False
        self.requests = 0
        self.validation: dict[int, np.ndarray] = {}

    def _message(self, request: LevelRequest, *, full: bool) -> p.LevelMessage:
        start = 0 if full else self.synced
        prefix = EMPTY_DIGEST if full else self.synced_digest
        new = list(request.trees[start:])
        return p.LevelMessage(
            run_tag=self.run_tag, edges=self.edges if full else None, edges_digest=self.edges_digest,
            new_trees=new, trees_from=start, prefix_digest=prefix,
            ensemble_digest=ensemble_digest(new, start=prefix), tree=request.tree, nodes=list(request.nodes),
            with_validation=request.with_validation, base=self.base, w_neg=self.weights[0], w_pos=self.weights[1],
            n_bins=self.edges.max_bins, noise_std=self.noise_std,
        )

    def level(self, request: LevelRequest) -> LevelSums:
        d, n_bins = self.edges.n_features, self.edges.max_bins
        n_hist = len(request.nodes) * d * n_bins * 3
        length = n_hist + (VAL_LENGTH if request.with_validation else 0)
        full = not self.edges_sent
        for attempt in range(2):
            msg = self._message(request, full=full)
            self.requests += 1
            out = self.coord.sum(self.grid, self.node_ids, self.names, msg.to_content(), p.LEVEL, length, self.bound)
            if not out.dropped:
                break
            logger.warning("Tree level: institutions %s did not contribute; %s", list(out.dropped),
                           "re-sending the whole ensemble" if attempt == 0 else "giving up")
            full = True
        else:
            raise FederationError(
                f"Institutions {list(out.dropped)} did not contribute histograms twice in a row; federated boosting "
                "needs every institution at every tree level (the sums would otherwise mix different row sets)."
            )
        self.edges_sent = True
        self.synced, self.synced_digest = msg.n_trees, msg.ensemble_digest
        wmax = max(self.weights)
        hist = out.values[:n_hist].reshape(len(request.nodes), d, n_bins, 3).copy()
        hist[..., :2] *= wmax
        val = out.values[n_hist:] if request.with_validation else None
        if val is not None:
            self.validation[len(request.trees)] = val
        return LevelSums(histograms=hist, validation=val)


class GBDTCoordinator:
    """Runs one federated boosting run over a Flower Grid.

    Parameters
    ----------
    config : FederationConfig
        Run options (nodes, timeouts, secure aggregation, store, holdout path).
    params : GBDTParams
        Boosting hyperparameters.
    store : RunStore
        Where the run and one record per tree are written.
    on_tree : callable, optional
        Progress callback ``(trees_done, validation_point)``.
    holdout : Dataset, optional
        Global held-out split scored at the end (benchmarks and simulations only).
    noise_std : float
        Standard deviation of the Gaussian noise each institution adds to every
        level histogram entry before masking, without accounting (tests; prefer ``dp_epsilon``).
    dp_epsilon : float, optional
        Differential privacy: noise calibrated so that the run's histogram releases
        are ``(dp_epsilon, dp_delta)``-DP per training row, charged to the privacy
        ledger (:mod:`consortium.federation.gbdt_privacy`).
    dp_delta : float
        δ of the DP guarantee.
    cells : int
        Fine-grid cells per feature for federated binning.
    """

    def __init__(self, config: FederationConfig, *, params: GBDTParams, store: RunStore,
                 on_tree: TreeCallback | None = None, holdout: Dataset | None = None, noise_std: float = 0.0,
                 dp_epsilon: float | None = None, dp_delta: float = 1e-5, cells: int = DEFAULT_CELLS) -> None:
        self.config, self.params, self.store, self.on_tree = config, params, store, on_tree
        if holdout is None and config.holdout_path:
            holdout = load_npz(config.holdout_path, name="holdout")
        self.holdout = holdout
        self.noise_std = float(noise_std)
        self.dp_epsilon, self.dp_delta = dp_epsilon, float(dp_delta)
        self.cells = int(cells)
        self._base = Coordinator(config, store=store, holdout=holdout)

    def sum(self, grid: Grid, node_ids: Sequence[int], names: Mapping[int, str], content: RecordDict,
            message_type: str, length: int, bound: float) -> VectorSum:
        return sum_vectors(grid, node_ids=node_ids, names=names, content=content, message_type=message_type,
                           length=length, bound=bound, secure=self.config.secure_aggregation,
                           timeout=self.config.round_timeout)

    def bin_edges(self, grid: Grid, node_ids: Sequence[int], names: Mapping[int, str], *, mean: np.ndarray,
                  std: np.ndarray, n_train: float, noise_std: float = 0.0) -> tuple[BinEdges, float]:
        """Federated quantile binning; returns the edges and the pooled validation row count.

        ``noise_std`` is the standard deviation of the noise in each summed count
        (DP); counts below three of it are treated as empty cells.
        """
        d = len(mean)
        share = noise_std / math.sqrt(len(node_ids))
        out = self.sum(grid, node_ids, names, p.bins_content(mean, std, cells=self.cells, noise_std=share), p.BINS,
                       d * self.cells + 1, 10.0 * max(n_train, 1.0) + 100.0 * noise_std)
        if out.dropped:
            raise FederationError(f"Institutions {list(out.dropped)} did not contribute to federated binning.")
        counts = out.values[:-1].reshape(d, self.cells)
        if noise_std > 0:
            counts = np.where(counts > 3.0 * noise_std, counts, 0.0)
        edges = edges_from_cell_counts(counts, mean, std, max_bins=self.params.max_bins)
        constant = [i for i, e in enumerate(edges.edges) if len(e) == 0]
        if constant:
            logger.warning("Features %s take a single value across all institutions: they are kept but never "
                           "split on.", constant)
        return edges, float(out.values[-1])

    def run(self, grid: Grid) -> GBDTRunResult:
        t0 = time.perf_counter()
        cfg = self.config
        node_ids = self._base.wait_for_nodes(grid)
        names, feature_names, _ = self._base.discover(grid, node_ids)
        node_ids = sorted(names)
        institutions = tuple(names[n] for n in node_ids)
        stats = self._base.federated_statistics(grid, node_ids, names, n_features=len(feature_names))
        std = stats.standardizer()
        run_config: dict[str, Any] = {**cfg.to_run_config(), **self.params.to_config(),
                                      "feature-names": list(feature_names), "noise-std": self.noise_std}
        run_config.pop("store-url", None)
        run_id = self.store.create_run(name=cfg.run_name, config=run_config, institutions=institutions)
        try:
            dp = None
            if self.dp_epsilon is not None:
                from consortium.federation.gbdt_privacy import calibrate  # noqa: PLC0415

                dp = calibrate(self.params, n_features=len(feature_names), epsilon=self.dp_epsilon,
                               delta=self.dp_delta)
                logger.info("DP: noise multiplier %.3g over %d releases for (%.3g, %.3g)-DP",
                            dp.noise_multiplier, dp.n_releases, dp.target_epsilon, dp.delta)
            edges, n_val = self.bin_edges(grid, node_ids, names, mean=std.mean, std=std.std, n_train=stats.count,
                                          noise_std=dp.binning_std if dp else 0.0)
            n_val = max(n_val, 0.0)
            w_neg, w_pos = self.params.class_weights(stats.count, stats.positives)
            base = base_score(stats.count, stats.positives, w_neg, w_pos)
            logger.info("Run %s: %d institutions, %d rows, %d features, %d bins, class weights (%.3g, %.3g)",
                        run_id, len(institutions), int(stats.count), len(feature_names), edges.max_bins, w_neg, w_pos)
            source = _FederatedSource(self, grid, node_ids, names, edges=edges, base=base, weights=(w_neg, w_pos),
                                      bound=max(stats.count, n_val) + 1.0 + (100.0 * dp.level_std if dp else 0.0),
                                      run_tag=secrets.token_hex(8),
                                      noise_std=dp.per_institution(dp.level_std, len(node_ids)) if dp
                                      else self.noise_std)

            # One run-store round per tree; each is written when the next arrives, so the last one can
            # carry the kept ensemble as its checkpoint (see load_gbdt_checkpoint).
            pending: list[RoundRecord] = []
            started = [datetime.now(UTC)]

            def record(n_trees: int, point: ValidationPoint | None) -> None:
                now = datetime.now(UTC)
                metrics = {"val-loss": point.loss, "val-auprc": point.auprc} if point else {}
                if pending:
                    self.store.record_round(run_id, pending.pop())
                pending.append(RoundRecord(round=n_trees, started_at=started[0], finished_at=now,
                                           participants=institutions, dropped=(), train_metrics={},
                                           global_metrics=metrics))
                started[0] = now
                if self.on_tree is not None:
                    self.on_tree(n_trees, point)

            result = boost(source, edges=edges, params=self.params, base=base, class_weights=(w_neg, w_pos),
                           on_tree=record)
            val = source.validation.get(result.best_n_trees)
            threshold = 0.5
            if val is not None:
                choice = threshold_from_histograms(val[:VAL_BINS], val[VAL_BINS : 2 * VAL_BINS], max_fpr=cfg.max_fpr)
                margin = choice.unit_threshold * 2 * VAL_RANGE - VAL_RANGE
                threshold = float(1.0 / (1.0 + math.exp(-margin)))
            holdout: dict[str, float] = {}
            if self.holdout is not None:
                fm = evaluate_scores(self.holdout.y, predict_proba(result, self.holdout.X), threshold=threshold)
                holdout = {"auprc": fm.auprc, "roc-auc": fm.roc_auc, "recall-at-1pct-fpr": fm.recall_at_1pct_fpr}
            if pending:
                last = pending.pop()
                last = RoundRecord(round=last.round, started_at=last.started_at, finished_at=last.finished_at,
                                   participants=last.participants, dropped=(), train_metrics={},
                                   global_metrics={**last.global_metrics, **holdout, "threshold": threshold})
                arrays, extra = checkpoint_of(result, threshold=threshold, feature_names=feature_names)
                self.store.record_round(run_id, last, checkpoint=arrays, checkpoint_extra=extra)
            privacy: dict[str, Any] = {}
            if dp is not None:
                from consortium.federation.gbdt_privacy import charge_run  # noqa: PLC0415

                spent = charge_run(self.store, run_id=run_id, institutions=institutions, dp=dp,
                                   n_releases=source.requests + 1)
                privacy = {**dp.to_dict(), "epsilon_spent": spent, "releases": source.requests + 1}
        except Exception as exc:
            self.store.finish_run(run_id, status="failed", message=f"{type(exc).__name__}: {exc}")
            raise
        kept = f"kept {result.best_n_trees} trees (best federated validation {self.params.val_metric})"
        self.store.finish_run(run_id, status="completed", message=kept)
        return GBDTRunResult(run_id=run_id, boost=result, threshold=threshold, feature_names=feature_names,
                             institutions=institutions, holdout_metrics=holdout, seconds=time.perf_counter() - t0,
                             requests=source.requests,
                             extra={"n_val": n_val, "pooled_rows": stats.count, "privacy": privacy})


_CHECKPOINT_KEYS = ("feature", "threshold", "left", "right", "value", "sizes", "edges", "edge-sizes", "max-bins")


def checkpoint_of(result: BoostResult, *, threshold: float, feature_names: Sequence[str]
                  ) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Run-store checkpoint of the kept ensemble: flat tree arrays, bin edges and what scoring needs."""
    arrays = {**trees_to_arrays(result.ensemble.trees), **result.edges.to_arrays()}
    if not result.ensemble.trees:
        arrays.update({k: np.zeros(0) for k in ("feature", "threshold", "left", "right", "value")})
    extra = {"model": "gbdt", "base_score": result.ensemble.base_score, "threshold": threshold,
             "trees": len(result.ensemble.trees), "feature_names": list(feature_names),
             "arrays": list(_CHECKPOINT_KEYS), "params": dict(result.params.__dict__)}
    return [np.asarray(arrays[k]) for k in _CHECKPOINT_KEYS], extra


def load_gbdt_checkpoint(store: RunStore, run_id: str) -> tuple[BoostResult, float, tuple[str, ...]]:
    """The kept ensemble of a finished boosting run (for export after a deployed run)."""
    ckpt = store.load_checkpoint(run_id)
    if ckpt.extra.get("model") != "gbdt":
        raise FederationError(f"Run {run_id!r} is not a gradient-boosting run (checkpoint model "
                              f"{ckpt.extra.get('model')!r}).")
    arrays = dict(zip(ckpt.extra["arrays"], ckpt.arrays, strict=True))
    trees = trees_from_arrays(arrays) if len(arrays["sizes"]) else []
    edges = BinEdges.from_arrays(arrays)
    result = BoostResult(ensemble=Ensemble(base_score=float(ckpt.extra["base_score"]), trees=trees), edges=edges,
                         params=GBDTParams(**ckpt.extra["params"]), best_n_trees=len(trees))
    return result, float(ckpt.extra["threshold"]), tuple(ckpt.extra["feature_names"])


def tree_summary(trees: Sequence[Tree]) -> dict[str, float]:
    """Mean leaves and depth of trees (reports)."""
    if not trees:
        return {"trees": 0, "mean_leaves": 0.0, "mean_depth": 0.0}
    return {"trees": len(trees), "mean_leaves": float(np.mean([t.n_leaves for t in trees])),
            "mean_depth": float(np.mean([t.depth() for t in trees]))}
