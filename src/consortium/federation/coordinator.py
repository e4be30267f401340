"""The coordinator's main loop over Flower's Grid.

One :class:`Coordinator` drives one federated run: it waits for institutions,
learns their schema, computes federated standardisation statistics, then for
each round sends the global model, receives the *sum* of the institutions'
weighted updates (through the configured :class:`~consortium.federation.transport.Transport`),
moves the global model with the server optimiser, runs federated evaluation,
picks the decision threshold from summed validation histograms, evaluates the
global held-out set when one is configured, and records the round with its
checkpoint in the run store.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from consortium.data import Dataset, load_npz
from consortium.errors import FederationError
from consortium.federation import messages as m
from consortium.federation.config import FederationConfig
from consortium.federation.exact_sum import decode_limb_sums
from consortium.federation.server_optimizers import create_server_optimizer
from consortium.federation.thresholds import (
    auprc_from_histograms,
    from_unit_interval,
    threshold_from_histograms,
)
from consortium.federation.transport import Transport, create_transport
from consortium.models import (
    FeatureStats,
    Standardizer,
    balanced_pos_weight,
    build_model,
    evaluate_scores,
    get_parameters,
    predict_scores,
    set_parameters,
)
from consortium.privacy.federated import RunPrivacy
from consortium.registry import RoundRecord, RunStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundReport:
    """What one completed round produced (also passed to progress callbacks)."""

    round: int
    participants: tuple[str, ...]
    dropped: tuple[str, ...]
    train_metrics: dict[str, float]
    global_metrics: dict[str, float]
    institution_metrics: dict[str, dict[str, float]]
    threshold: float
    seconds: float


@dataclass(frozen=True)
class RunResult:
    """Outcome of a federated run."""

    run_id: str
    rounds: tuple[RoundReport, ...]
    params: list[np.ndarray]
    standardizer: Standardizer
    threshold: float
    feature_names: tuple[str, ...]
    institutions: tuple[str, ...]
    selected_round: int = 0
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def selected(self) -> RoundReport:
        """The round whose model was kept (best federated validation AUPRC)."""
        return next(r for r in self.rounds if r.round == self.selected_round)


RoundCallback = Callable[[RoundReport], None]


class Coordinator:
    """Runs one federated training run over a Flower Grid.

    Parameters
    ----------
    config : FederationConfig
        Run options.
    store : RunStore
        Where runs, rounds and checkpoints are recorded.
    transport : Transport, optional
        How updates are summed; defaults to secure aggregation when
        ``config.secure_aggregation`` else clear-text sums.
    on_round : callable, optional
        Called with each :class:`RoundReport` (progress bars, dashboards).
    holdout : Dataset, optional
        Global held-out split evaluated after every round (else ``config.holdout_path``).
    """

    def __init__(
        self,
        config: FederationConfig,
        *,
        store: RunStore,
        transport: Transport | None = None,
        on_round: RoundCallback | None = None,
        holdout: Dataset | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.transport = transport or create_transport(config)
        self.on_round = on_round
        if holdout is None and config.holdout_path:
            holdout = load_npz(config.holdout_path, name="holdout")
        self.holdout = holdout
        self.data_ids: dict[str, str] = {}
        """Institution -> fingerprint of its training data (keys of the privacy ledger)."""

    # -- stages -----------------------------------------------------------------

    def wait_for_nodes(self, grid: Grid, *, timeout: float | None = None) -> list[int]:
        """Block until ``min_nodes`` are connected; return their ids."""
        timeout = self.config.round_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            ids = sorted(grid.get_node_ids())
            if len(ids) >= self.config.min_nodes:
                return ids
            if time.monotonic() > deadline:
                raise FederationError(
                    f"Only {len(ids)} institution node(s) connected within {timeout:.0f} s; "
                    f"the run needs min_nodes={self.config.min_nodes}."
                )
            time.sleep(0.5)

    def _query_all(self, grid: Grid, node_ids: Sequence[int], message_type: str) -> list[Message]:
        msgs = [
            Message(RecordDict({m.CONFIG: ConfigRecord({})}), dst_node_id=n, message_type=message_type)
            for n in node_ids
        ]
        replies = list(grid.send_and_receive(msgs, timeout=self.config.round_timeout))
        good = [r for r in replies if not r.has_error()]
        for r in replies:
            if r.has_error():
                logger.warning(
                    "%s: node %s replied with an error: %s",
                    message_type,
                    r.metadata.src_node_id,
                    r.error.reason,
                )
        return good

    def discover(self, grid: Grid, node_ids: Sequence[int]) -> tuple[dict[int, str], tuple[str, ...], dict[str, bool]]:
        """Ask each node for its institution name and feature schema; check they agree."""
        replies = self._query_all(grid, node_ids, m.INFO)
        names: dict[int, str] = {}
        schemas: dict[str, tuple[str, ...]] = {}
        disclose: dict[str, bool] = {}
        for r in replies:
            info = r.content.config_records[m.INFO_RECORD]
            name = str(info["institution"])
            node = r.metadata.src_node_id
            other = next((n for n, existing in names.items() if existing == name), None)
            if other is not None:
                raise FederationError(
                    f"Institution '{name}' is claimed by two nodes ({other} and {node}); each institution "
                    "must run exactly one node (a stale node may still be connected: stop it and restart)."
                )
            names[node] = name
            schemas[name] = tuple(str(f) for f in info["feature-names"])  # type: ignore[union-attr]
            disclose[name] = bool(info["disclose-eval"])
            self.data_ids[name] = str(info["data-fingerprint"]) if "data-fingerprint" in info else f"{name}:unknown"
        if len(names) < self.config.min_nodes:
            raise FederationError(
                f"Only {len(names)} institution(s) answered the info query; min_nodes={self.config.min_nodes}."
            )
        reference_name, reference = next(iter(schemas.items()))
        for name, schema in schemas.items():
            if schema != reference:
                raise FederationError(
                    f"Feature schema mismatch: institution '{name}' has {len(schema)} features "
                    f"{list(schema)[:5]}..., '{reference_name}' has {len(reference)} {list(reference)[:5]}...; "
                    "every institution must hold the same features in the same order."
                )
        return names, reference, disclose

    def federated_statistics(
        self, grid: Grid, node_ids: Sequence[int], names: Mapping[int, str], *, n_features: int
    ) -> FeatureStats:
        """Sum the institutions' feature statistics (count, positives, sums, sums of squares)."""
        result = self.transport.sum_statistics(
            grid, node_ids=node_ids, names=names, config=self.config, n_features=n_features
        )
        flat = decode_limb_sums(result.update_sum[0], n_participants=len(result.participants))
        d = (len(flat) - 2) // 2
        if len(result.participants) < self.config.min_nodes:
            raise FederationError(
                f"Only {len(result.participants)} institution(s) contributed feature statistics "
                f"({list(result.participants)}; dropped {list(result.dropped)}); min_nodes={self.config.min_nodes}."
            )
        return FeatureStats(
            count=float(flat[0]), positives=float(flat[1]), sum=flat[2 : 2 + d], sumsq=flat[2 + d :]
        )

    # -- the run ----------------------------------------------------------------

    def run(self, grid: Grid) -> RunResult:
        """Run all rounds; returns the final model, threshold and per-round reports."""
        cfg = self.config
        node_ids = self.wait_for_nodes(grid)
        names, feature_names, disclose = self.discover(grid, node_ids)
        node_ids = sorted(names)
        stats = self.federated_statistics(grid, node_ids, names, n_features=len(feature_names))
        standardizer = stats.standardizer()
        privacy = RunPrivacy.plan(
            cfg, store=self.store, data_ids=self.data_ids,
            rows_per_institution=stats.count / max(len(names), 1), positive_rate=stats.positive_rate,
        )
        pos_weight = balanced_pos_weight(stats.positive_rate) if cfg.loss == "weighted_bce" else 0.0
        model = build_model(cfg.model, len(feature_names), hidden=cfg.hidden, seed=cfg.seed)
        params = get_parameters(model)
        optimizer = create_server_optimizer(cfg)
        institutions = tuple(names[n] for n in node_ids)
        run_config: dict[str, Any] = dict(cfg.to_run_config())
        run_config.update(
            {
                "pos-weight": pos_weight,
                "feature-names": list(feature_names),
                "transport": self.transport.name,
                # Which institutions disclosed their own test-split metrics in this run.
                "disclosure": {names[n]: disclose[names[n]] for n in node_ids},
            }
        )
        run_config.pop("store-url", None)
        if privacy is not None:
            run_config["privacy"] = {"mechanism": privacy.mechanism.name, "delta": privacy.delta,
                                     "params": privacy.mechanism.params()}
        run_id = self.store.create_run(name=cfg.run_name, config=run_config, institutions=institutions)
        logger.info(
            "Run %s: %d institutions %s, %d features, pooled positive rate %.4f, pos_weight %.1f, transport %s",
            run_id, len(institutions), list(institutions), len(feature_names), stats.positive_rate,
            pos_weight, self.transport.name,
        )
        std_record = ArrayRecord({"mean": _arr(standardizer.mean), "std": _arr(standardizer.std)})
        base_config: dict[str, int | float | str] = {
            "model": cfg.model,
            "hidden": ",".join(str(h) for h in cfg.hidden),
            "seed": cfg.seed,
            "local-epochs": cfg.local_epochs,
            "batch-size": cfg.batch_size,
            "lr": cfg.lr,
            "optimizer": cfg.local_optimizer,
            "weight-decay": cfg.weight_decay,
            "loss": cfg.loss,
            "pos-weight": pos_weight,
            "focal-gamma": cfg.focal_gamma,
            "proximal-mu": cfg.effective_proximal_mu,
            "histogram-bins": m.HISTOGRAM_BINS,
            **(privacy.client_config() if privacy is not None else {}),
        }
        reports: list[RoundReport] = []
        threshold = 0.5
        best: tuple[float, int, list[np.ndarray], float] = (-1.0, 0, params, threshold)
        try:
            for rnd in range(1, cfg.num_rounds + 1):
                started = datetime.now(UTC)
                t0 = time.perf_counter()
                sampled = self._sample(grid, node_ids, rnd)
                if privacy is not None:  # stop BEFORE a round that would exceed a budget
                    privacy.check_before_round([names[n] for n in sampled])
                content = RecordDict(
                    {
                        m.GLOBAL_ARRAYS: ArrayRecord.from_numpy_ndarrays([p.copy() for p in params]),
                        m.STANDARDIZER: std_record,
                        m.CONFIG: ConfigRecord({**base_config, "server-round": rnd}),
                    }
                )
                agg = self.transport.sum_updates(
                    grid, node_ids=sampled, names=names, content=content, reference=params, config=cfg
                )
                if len(agg.participants) < min(cfg.min_nodes, len(sampled)):
                    raise FederationError(
                        f"Round {rnd}: only {len(agg.participants)} institution(s) contributed "
                        f"({list(agg.participants)}); dropped {list(agg.dropped)}; min_nodes={cfg.min_nodes}."
                    )
                params = optimizer.step(params, agg.mean_update())
                _check_finite(params, rnd)
                eval_content = RecordDict(
                    {
                        m.GLOBAL_ARRAYS: ArrayRecord.from_numpy_ndarrays([p.copy() for p in params]),
                        m.STANDARDIZER: std_record,
                        m.CONFIG: ConfigRecord({**base_config, "server-round": rnd}),
                    }
                )
                inst_metrics, neg, pos = self._evaluate(grid, node_ids, names, eval_content)
                choice = threshold_from_histograms(neg, pos, max_fpr=cfg.max_fpr)
                threshold = from_unit_interval(choice.unit_threshold, kind=cfg.model)
                val_auprc = auprc_from_histograms(neg, pos)
                global_metrics = {
                    "val-auprc": val_auprc,
                    "val-recall-at-threshold": choice.recall,
                    "val-fpr-at-threshold": choice.fpr,
                }
                if not val_auprc <= best[0]:  # NaN (no validation positives) keeps the latest round
                    best = (val_auprc if np.isfinite(val_auprc) else -1.0, rnd, params, threshold)
                if self.holdout is not None:
                    global_metrics.update(
                        self._evaluate_holdout(params, standardizer, len(feature_names), threshold)
                    )
                seconds = time.perf_counter() - t0
                train_metrics = agg.mean_metrics()
                record = RoundRecord(
                    round=rnd,
                    started_at=started,
                    finished_at=datetime.now(UTC),
                    participants=tuple(agg.participants),
                    dropped=tuple(agg.dropped),
                    train_metrics=train_metrics,
                    global_metrics={**global_metrics, "threshold": threshold, "seconds": seconds},
                )
                checkpoint = [*params, standardizer.mean, standardizer.std, *optimizer.state_arrays()]
                self.store.record_round(
                    run_id,
                    record,
                    checkpoint=checkpoint,
                    checkpoint_extra={
                        "n_params": len(params),
                        "threshold": threshold,
                        "model": cfg.model,
                        "hidden": list(cfg.hidden),
                        "feature_names": list(feature_names),
                        "optimizer": optimizer.name,
                        **({"privacy": run_config["privacy"]} if privacy is not None else {}),
                    },
                    also=None if privacy is None else privacy.charges_for(run_id, rnd, [names[n] for n in sampled]),
                )
                for inst, met in inst_metrics.items():
                    self.store.record_institution_metrics(
                        run_id, round=rnd, institution=inst, split="test", metrics=met
                    )
                report = RoundReport(
                    round=rnd,
                    participants=tuple(agg.participants),
                    dropped=tuple(agg.dropped),
                    train_metrics=train_metrics,
                    global_metrics=record.global_metrics,
                    institution_metrics=inst_metrics,
                    threshold=threshold,
                    seconds=seconds,
                )
                reports.append(report)
                logger.info(
                    "Round %d/%d: %d institutions, dropped %s, holdout AUPRC %s (%.1f s)",
                    rnd, cfg.num_rounds, len(agg.participants), list(agg.dropped),
                    f"{global_metrics.get('auprc', float('nan')):.4f}", seconds,
                )
                if self.on_round is not None:
                    self.on_round(report)
        except Exception as exc:
            self.store.finish_run(run_id, status="failed", message=f"{type(exc).__name__}: {exc}")
            raise
        _, selected_round, params, threshold = best
        self.store.finish_run(
            run_id, status="completed", message=f"selected round {selected_round} (best validation AUPRC)"
        )
        return RunResult(
            run_id=run_id,
            rounds=tuple(reports),
            params=params,
            standardizer=standardizer,
            threshold=threshold,
            feature_names=feature_names,
            institutions=institutions,
            selected_round=selected_round,
            extra={"disclosure": disclose, "pos_weight": pos_weight,
                   **({"privacy": privacy.statement(institutions)} if privacy is not None else {})},
        )

    def _sample(self, grid: Grid, node_ids: Sequence[int], rnd: int) -> list[int]:
        connected = set(grid.get_node_ids())
        alive = [n for n in node_ids if n in connected]
        k = max(self.config.min_nodes, int(round(self.config.fraction_train * len(alive))))
        if len(alive) <= k:
            return alive
        rng = np.random.default_rng(self.config.seed * 100_003 + rnd)
        return sorted(int(x) for x in rng.choice(alive, size=k, replace=False))

    def _evaluate(
        self, grid: Grid, node_ids: Sequence[int], names: Mapping[int, str], content: RecordDict
    ) -> tuple[dict[str, dict[str, float]], np.ndarray, np.ndarray]:
        msgs = [Message(content, dst_node_id=n, message_type=m.EVALUATE) for n in node_ids]
        replies = list(grid.send_and_receive(msgs, timeout=self.config.round_timeout))
        neg = np.zeros(m.HISTOGRAM_BINS)
        pos = np.zeros(m.HISTOGRAM_BINS)
        per_inst: dict[str, dict[str, float]] = {}
        for r in replies:
            if r.has_error():
                logger.warning("evaluate: node %s failed: %s", r.metadata.src_node_id, r.error.reason)
                continue
            hist = r.content.array_records[m.VAL_HISTOGRAM]
            neg += hist["neg"].numpy()
            pos += hist["pos"].numpy()
            met = dict(r.content.metric_records[m.METRICS])
            if met.get("disclosed", 0):
                name = names.get(r.metadata.src_node_id, str(r.metadata.src_node_id))
                per_inst[name] = {
                    k: (float(v) if float(v) >= 0 else float("nan"))  # type: ignore[arg-type]
                    for k, v in met.items()
                    if k not in ("disclosed", m.WEIGHT)
                }
        return per_inst, neg, pos

    def _evaluate_holdout(
        self, params: Sequence[np.ndarray], standardizer: Standardizer, n_features: int, threshold: float
    ) -> dict[str, float]:
        assert self.holdout is not None
        model = build_model(self.config.model, n_features, hidden=self.config.hidden, seed=self.config.seed)
        set_parameters(model, params)
        scores = predict_scores(model, standardizer.transform(self.holdout.X))
        fm = evaluate_scores(self.holdout.y, scores, threshold=threshold)
        return {
            "auprc": fm.auprc,
            "roc-auc": fm.roc_auc,
            "recall-at-1pct-fpr": fm.recall_at_1pct_fpr,
            "precision-at-threshold": _nan(fm.precision_at_threshold),
            "recall-at-threshold": _nan(fm.recall_at_threshold),
        }


def _arr(a: np.ndarray):  # type: ignore[no-untyped-def]
    from flwr.app import Array

    return Array(np.ascontiguousarray(a))


def _nan(x: float | None) -> float:
    return float("nan") if x is None else float(x)


def _check_finite(params: Sequence[np.ndarray], rnd: int) -> None:
    for i, p in enumerate(params):
        if not np.all(np.isfinite(p)):
            raise FederationError(
                f"Round {rnd}: the new global model has non-finite values in tensor {i}; "
                "lower lr/server_lr (or check the institutions' updates)."
            )
