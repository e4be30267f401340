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
from consortium.errors import FederationError, StoreError
from consortium.federation import messages as m
from consortium.federation.aggregation import AggregateResult
from consortium.federation.config import INSTITUTION_DP_MODES, FederationConfig
from consortium.federation.exact_sum import decode_limb_sums
from consortium.federation.server_optimizers import ServerOptimizer, create_server_optimizer
from consortium.federation.thresholds import (
    auprc_from_histograms,
    from_unit_interval,
    threshold_from_histograms,
)
from consortium.federation.transport import Transport, create_transport
from consortium.federation.validation import (
    InvalidUpdateError,
    check_aggregate_norm,
    histograms_from_reply,
    info_from_reply,
)
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
from consortium.privacy.federated import (
    STATS_MECHANISM,
    CoordinatorPrivacy,
    RunPrivacy,
    check_statistics_budget,
    plan_privacy,
    statistics_request,
    statistics_spec,
)
from consortium.registry import RoundRecord, RunRecord, RunStore

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
RoundHook = Callable[[Any, str, int], None]
"""``hook(session, run_id, round)``: extra writes committed with a round (see :attr:`Coordinator.round_hooks`)."""


def find_resumable_run(store: RunStore, config: FederationConfig) -> RunRecord | None:
    """The run ``config.resume`` names: a run id, or ``"latest"`` unfinished run named ``config.run_name``.

    Returns None for ``"latest"`` when there is no unfinished run (a new run starts).

    Raises
    ------
    StoreError
        An explicit run id that the store does not know.
    FederationError
        An explicit run that already completed.
    """
    if config.resume == "latest":
        for run in store.list_runs(limit=1000):
            if run.name == config.run_name and run.status != "completed":
                return run
        logger.info("No unfinished run named %r to resume; starting a new run.", config.run_name)
        return None
    run = store.get_run(config.resume)
    if run.status == "completed":
        raise FederationError(f"Run {run.run_id} already completed; there is nothing to resume.")
    return run


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
    initial_parameters : sequence of numpy.ndarray, optional
        Start from these weights (e.g. the deployed global model, for a
        drift-triggered round set) instead of a fresh initialisation.
    initial_standardizer : Standardizer, optional
        Keep this standardisation (the one ``initial_parameters`` were trained
        on) instead of the freshly summed statistics.
    """

    def __init__(
        self,
        config: FederationConfig,
        *,
        store: RunStore,
        transport: Transport | None = None,
        on_round: RoundCallback | None = None,
        holdout: Dataset | None = None,
        initial_parameters: Sequence[np.ndarray] | None = None,
        initial_standardizer: Standardizer | None = None,
    ) -> None:
        self.round_hooks: list[RoundHook] = []
        """Called as ``hook(session, run_id, round)`` inside the transaction that records a round
        (e.g. the privacy ledger's charge), so both commit together or not at all."""
        self.config = config
        self.initial_parameters = None if initial_parameters is None else [np.asarray(p) for p in initial_parameters]
        self.initial_standardizer = initial_standardizer
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
            node = r.metadata.src_node_id
            try:
                name, schema, disclosed = info_from_reply(r.content, institution=f"node {node}",
                                                          info_key=m.INFO_RECORD)
            except InvalidUpdateError as exc:
                logger.warning("%s; the node is left out of this run.", exc)
                continue
            other = next((n for n, existing in names.items() if existing == name), None)
            if other is not None:
                raise FederationError(
                    f"Institution '{name}' is claimed by two nodes ({other} and {node}); each institution "
                    "must run exactly one node (a stale node may still be connected: stop it and restart)."
                )
            names[node] = name
            schemas[name] = schema
            disclose[name] = disclosed
            self.data_ids[name] = _data_fingerprint(r.content, name)
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
        self,
        grid: Grid,
        node_ids: Sequence[int],
        names: Mapping[int, str],
        *,
        n_features: int,
        request: Mapping[str, int | float | str] | None = None,
    ) -> FeatureStats:
        """Sum the institutions' feature statistics (count, positives, sums, sums of squares).

        With a private-statistics ``request`` (``dpsgd``) every institution adds its
        noise before the secure sum, and the noisy totals are repaired for use
        (post-processing: :func:`consortium.privacy.stats.combine_noisy`).
        """
        return self._statistics(grid, node_ids, names, n_features=n_features, request=request)[0]

    def _statistics(
        self,
        grid: Grid,
        node_ids: Sequence[int],
        names: Mapping[int, str],
        *,
        n_features: int,
        request: Mapping[str, int | float | str] | None = None,
    ) -> tuple[FeatureStats, tuple[str, ...]]:
        """:meth:`federated_statistics` and the institutions whose statistics are in the sum."""
        result = self.transport.sum_statistics(
            grid, node_ids=node_ids, names=names, config=self.config, n_features=n_features, request=request
        )
        flat = decode_limb_sums(result.update_sum[0], n_participants=len(result.participants))
        d = (len(flat) - 2) // 2
        if len(result.participants) < self.config.min_nodes:
            raise FederationError(
                f"Only {len(result.participants)} institution(s) contributed feature statistics "
                f"({list(result.participants)}; dropped {list(result.dropped)}); min_nodes={self.config.min_nodes}."
            )
        if request:
            from consortium.privacy.stats import combine_noisy  # noqa: PLC0415

            return combine_noisy([flat]), tuple(result.participants)
        stats = FeatureStats(count=float(flat[0]), positives=float(flat[1]), sum=flat[2 : 2 + d], sumsq=flat[2 + d :])
        return stats, tuple(result.participants)

    # -- the run ----------------------------------------------------------------

    def run(self, grid: Grid) -> RunResult:
        """Run all rounds; returns the final model, threshold and per-round reports."""
        cfg = self.config
        node_ids = self.wait_for_nodes(grid)
        names, feature_names, disclose = self.discover(grid, node_ids)
        node_ids = sorted(names)
        optimizer = create_server_optimizer(cfg)
        resumed = find_resumable_run(self.store, cfg) if cfg.resume else None
        if resumed is not None:
            return self._continue(grid, resumed, node_ids, names, feature_names, optimizer)
        model = build_model(cfg.model, len(feature_names), hidden=cfg.hidden, seed=cfg.seed)
        if self.initial_parameters is not None:  # continue from a given model (checked layer by layer)
            set_parameters(model, self.initial_parameters)
        params = get_parameters(model)
        stats_spec = statistics_spec(cfg)
        stats_from: tuple[str, ...] = ()
        if cfg.dp in INSTITUTION_DP_MODES:
            # Exact statistics would not be institution-level private: no data-dependent standardisation
            # (institutions weight their classes locally, inside their clipped, noised update).
            stats = None
            standardizer = self.initial_standardizer or _identity(len(feature_names))
            pos_weight = 0.0
        else:
            check_statistics_budget(cfg, store=self.store, data_ids=self.data_ids, spec=stats_spec)
            stats, stats_from = self._statistics(grid, node_ids, names, n_features=len(feature_names),
                                                 request=statistics_request(stats_spec))
            standardizer = self.initial_standardizer or stats.standardizer()
            pos_weight = balanced_pos_weight(stats.positive_rate) if cfg.loss == "weighted_bce" else 0.0
        rows = stats.count / max(len(names), 1) if stats is not None else 0.0
        rate = stats.positive_rate if stats is not None else 0.0
        privacy = plan_privacy(cfg, store=self.store, data_ids=self.data_ids, rows_per_institution=rows,
                               positive_rate=rate, reference=params)
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
            # The (private) counts the plan was made from: a resumed run re-plans from them, not from a new query.
            run_config["privacy"] = {**privacy.describe(), "rows-per-institution": rows, "positive-rate": rate}
        run_id = self.store.create_run(name=cfg.run_name, config=run_config, institutions=institutions)
        if isinstance(privacy, RunPrivacy):
            privacy.charge_statistics(run_id, stats_from)
        logger.info(
            "Run %s: %d institutions %s, %d features, pooled positive rate %.4f, pos_weight %.1f, transport %s",
            run_id, len(institutions), list(institutions), len(feature_names), rate,
            pos_weight, self.transport.name,
        )
        return self._rounds(
            grid, run_id=run_id, first_round=1, node_ids=node_ids, names=names, feature_names=feature_names,
            disclose=disclose, institutions=institutions, params=params, standardizer=standardizer,
            pos_weight=pos_weight, optimizer=optimizer, reports=[], threshold=0.5, best=(-1.0, 0, params, 0.5),
            privacy=privacy,
        )

    def _continue(
        self,
        grid: Grid,
        run: RunRecord,
        node_ids: list[int],
        names: dict[int, str],
        feature_names: tuple[str, ...],
        optimizer: ServerOptimizer,
    ) -> RunResult:
        """Resume ``run`` after its last completed round, from that round's checkpoint."""
        cfg = self.config
        recorded = tuple(str(f) for f in run.config.get("feature-names", ()))
        if recorded != feature_names:
            raise FederationError(
                f"Cannot resume run {run.run_id}: the institutions now have features {list(feature_names)[:5]}..., "
                f"the run was trained on {list(recorded)[:5]}...."
            )
        strangers = sorted(set(names.values()) - set(run.institutions))
        if strangers:
            raise FederationError(
                f"Cannot resume run {run.run_id}: institution(s) {strangers} did not take part in it "
                f"(its institutions: {list(run.institutions)}). Start a new run to add institutions."
            )
        last = self.store.last_completed_round(run.run_id)
        ckpt = self.store.load_checkpoint(run.run_id, round=last) if last else None
        planned = run.config.get("privacy")
        recorded_privacy: Mapping[str, Any] = planned if isinstance(planned, Mapping) else {}
        stats_request = statistics_request(statistics_spec(cfg))
        stats: FeatureStats | None = None
        stats_from: tuple[str, ...] = ()
        if ckpt is None:
            logger.warning("Run %s has no completed round; restarting it from round 1.", run.run_id)
            params = get_parameters(build_model(cfg.model, len(feature_names), hidden=cfg.hidden, seed=cfg.seed))
            if cfg.dp in INSTITUTION_DP_MODES:
                standardizer = _identity(len(feature_names))
            else:
                stats, stats_from = self._statistics(grid, node_ids, names, n_features=len(feature_names),
                                                     request=stats_request)
                standardizer = stats.standardizer()
            threshold = 0.5
        else:
            n = int(ckpt.extra["n_params"])
            params = [a.copy() for a in ckpt.arrays[:n]]
            standardizer = Standardizer(mean=ckpt.arrays[n], std=ckpt.arrays[n + 1])
            optimizer.load_state_arrays(ckpt.arrays[n + 2 :])
            threshold = float(ckpt.extra["threshold"])
        pos_weight = float(run.config.get("pos-weight", 0.0))
        privacy: CoordinatorPrivacy | None = None
        if cfg.dp != "none":  # a resumed run is charged from the ledger on, never from zero
            rows, rate = recorded_privacy.get("rows-per-institution"), recorded_privacy.get("positive-rate")
            if cfg.dp not in INSTITUTION_DP_MODES and stats is None and (rows is None or rate is None):
                stats, stats_from = self._statistics(grid, node_ids, names, n_features=len(feature_names),
                                                     request=stats_request)
            if stats is not None:
                rows, rate = stats.count / max(len(names), 1), stats.positive_rate
            privacy = plan_privacy(cfg, store=self.store, data_ids=self.data_ids,
                                   rows_per_institution=float(rows or 0.0), positive_rate=float(rate or 0.0),
                                   reference=params)
            if isinstance(privacy, RunPrivacy) and stats_from:  # statistics released again: charged again
                earlier = {c.mechanism for c in privacy.ledger.charges(run_id=run.run_id)
                           if c.mechanism.startswith(STATS_MECHANISM)}
                privacy.charge_statistics(run.run_id, stats_from, release=len(earlier) + 1)
            restore = getattr(privacy, "restore", None)
            if ckpt is not None and restore is not None and isinstance(ckpt.extra.get("privacy"), Mapping):
                restore(ckpt.extra["privacy"])
        reports: list[RoundReport] = []
        best: tuple[float, int, list[np.ndarray] | None, float] = (-1.0, 0, params, threshold)
        for rr in self.store.rounds(run.run_id):
            g = rr.global_metrics
            reports.append(
                RoundReport(
                    round=rr.round, participants=rr.participants, dropped=rr.dropped,
                    train_metrics=rr.train_metrics, global_metrics=g, institution_metrics={},
                    threshold=float(g.get("threshold", threshold)), seconds=float(g.get("seconds", 0.0)),
                )
            )
            val = float(g.get("val-auprc", float("nan")))
            if not val <= best[0]:
                best = (val if np.isfinite(val) else -1.0, rr.round, None, float(g.get("threshold", threshold)))
        logger.warning(
            "Resuming run %s after round %d of %d (checkpoint of round %d); institutions now: %s",
            run.run_id, last, cfg.num_rounds, last, sorted(names.values()),
        )
        return self._rounds(
            grid, run_id=run.run_id, first_round=last + 1, node_ids=node_ids, names=names,
            feature_names=feature_names, disclose=dict(run.config.get("disclosure", {})),
            institutions=tuple(run.institutions), params=params, standardizer=standardizer, pos_weight=pos_weight,
            optimizer=optimizer, reports=reports, threshold=threshold, best=best, privacy=privacy,
        )

    def _rounds(
        self,
        grid: Grid,
        *,
        run_id: str,
        first_round: int,
        node_ids: list[int],
        names: dict[int, str],
        feature_names: tuple[str, ...],
        disclose: dict[str, bool],
        institutions: tuple[str, ...],
        params: list[np.ndarray],
        standardizer: Standardizer,
        pos_weight: float,
        optimizer: ServerOptimizer,
        reports: list[RoundReport],
        threshold: float,
        best: tuple[float, int, list[np.ndarray] | None, float],
        privacy: CoordinatorPrivacy | None = None,
    ) -> RunResult:
        """Rounds ``first_round..num_rounds`` of run ``run_id``; finish the run."""
        cfg = self.config
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
        try:
            for rnd in range(first_round, cfg.num_rounds + 1):
                started = datetime.now(UTC)
                t0 = time.perf_counter()
                sampled = self._sample(grid, node_ids, rnd)
                sampled_names = [names[n] for n in sampled]
                # Stop BEFORE a round that would exceed a budget; the round's noise parameters travel in its config.
                plan = privacy.begin_round(sampled_names) if privacy is not None else None
                content = RecordDict(
                    {
                        m.GLOBAL_ARRAYS: ArrayRecord.from_numpy_ndarrays([p.copy() for p in params]),
                        m.STANDARDIZER: std_record,
                        m.CONFIG: ConfigRecord(
                            {**base_config, **(plan.config if plan is not None else {}), "server-round": rnd}),
                    }
                )
                agg = self.transport.sum_updates(
                    grid, node_ids=sampled, names=names, content=content, reference=params, config=cfg,
                    bounds=plan.bounds if plan is not None else None,
                )
                if privacy is not None:
                    agg = privacy.release(agg, rnd)
                if len(agg.participants) < min(cfg.min_nodes, len(sampled)):
                    if privacy is not None:  # the sum was released all the same: it is charged
                        self.store.run_transaction(privacy.charges_for(run_id, rnd, sampled_names),
                                                   action=f"charge the refused round {rnd} of run {run_id!r}")
                    raise FederationError(
                        f"Round {rnd}: only {len(agg.participants)} institution(s) contributed "
                        f"({list(agg.participants)}); dropped {list(agg.dropped)}; min_nodes={cfg.min_nodes}."
                    )
                bound = privacy.aggregate_bound(agg) if privacy is not None else (cfg.clip_norm, 0.0)
                if _sum_within_clip_bound(agg, rnd, secure=self.transport.name != "plain", bound=bound):
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
                self._record_round_durably(
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
                        **({"privacy": privacy.describe()} if privacy is not None else {}),
                    },
                    also=None if privacy is None else privacy.charges_for(run_id, rnd, sampled_names),
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
        _, selected_round, best_params, threshold = best
        if best_params is None:  # the best round was recorded before a restart
            best_params = list(self.store.load_checkpoint(run_id, round=selected_round).arrays[: len(params)])
        params = best_params
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

    def _record_round_durably(
        self, run_id: str, record: RoundRecord, *, also: Callable[[Any], object] | None = None, **checkpoint: Any
    ) -> None:
        """Record a round and its checkpoint (one transaction), riding out a store outage.

        The store itself retries briefly; if it stays unreachable, this keeps
        retrying for up to ``round_timeout`` seconds. A commit whose
        acknowledgement was lost is recognised on retry (the round is then
        already there) and not written twice. Nothing partial is ever stored.
        """
        deadline = time.monotonic() + self.config.round_timeout
        wait = 0.5
        hooks = list(self.round_hooks)
        extra = also  # e.g. the privacy ledger's charges for this round: same transaction as the round

        def together(session: Any) -> None:
            if extra is not None:
                extra(session)
            for hook in hooks:
                hook(session, run_id, record.round)

        while True:
            try:
                self.store.record_round(
                    run_id, record, also=together if (hooks or extra is not None) else None, **checkpoint)
                return
            except StoreError as exc:
                try:
                    if self.store.last_completed_round(run_id) >= record.round:
                        logger.warning("Round %d of run %s was committed before the connection broke.",
                                       record.round, run_id)
                        return
                except StoreError:
                    pass
                if time.monotonic() + wait > deadline:
                    raise
                logger.warning("Run store unavailable while recording round %d (%s); retrying in %.1f s",
                               record.round, exc, wait)
                time.sleep(wait)
                wait = min(wait * 2, 5.0)

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
            name = names.get(r.metadata.src_node_id, str(r.metadata.src_node_id))
            try:
                h_neg, h_pos, met = histograms_from_reply(
                    r.content, institution=name, bins=m.HISTOGRAM_BINS,
                    histogram_key=m.VAL_HISTOGRAM, metrics_key=m.METRICS,
                )
            except InvalidUpdateError as exc:
                logger.warning("evaluate: %s; left out of this evaluation.", exc)
                continue
            neg += h_neg
            pos += h_pos
            if met.get("disclosed", 0):
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


def _identity(n_features: int) -> Standardizer:
    """No data-dependent standardisation (institution-level DP releases no statistics)."""
    return Standardizer(mean=np.zeros(n_features), std=np.ones(n_features))


def _arr(a: np.ndarray):  # type: ignore[no-untyped-def]
    from flwr.app import Array

    return Array(np.ascontiguousarray(a))


def _nan(x: float | None) -> float:
    return float("nan") if x is None else float(x)


def _sum_within_clip_bound(agg: AggregateResult, rnd: int, *, secure: bool, bound: tuple[float, float]) -> bool:
    """Under secure aggregation, verify the sum against the client-side clip bound.

    A sum above ``weight_total * clip_norm`` (plus ``slack``: the norm DP noise may
    add) proves an institution skipped clipping; the round's update is then
    refused (model unchanged) and logged.
    """
    if not secure:
        return True
    clip_norm, slack = bound
    try:
        check_aggregate_norm(agg.update_sum, weight_total=agg.weight_total, clip_norm=clip_norm,
                             round_number=rnd, slack=slack)
    except FederationError as exc:
        logger.error("%s", exc)
        return False
    return True


def _check_finite(params: Sequence[np.ndarray], rnd: int) -> None:
    for i, p in enumerate(params):
        if not np.all(np.isfinite(p)):
            raise FederationError(
                f"Round {rnd}: the new global model has non-finite values in tensor {i}; "
                "lower lr/server_lr (or check the institutions' updates)."
            )


def _data_fingerprint(content: RecordDict, institution: str) -> str:
    """The node's fingerprint of its training data (the privacy ledger's key), or a per-institution fallback."""
    try:
        value = content[m.INFO_RECORD].get("data-fingerprint")  # type: ignore[union-attr]
    except (KeyError, AttributeError, TypeError):
        value = None
    return str(value) if isinstance(value, str) and value else f"{institution}:unknown"
