"""The coordinator's privacy plan: calibrate before training, check before a round, charge with it.

:func:`plan_privacy` builds the run's plan from the
:class:`~consortium.federation.config.FederationConfig`; the coordinator then
talks to it through the same few calls whatever the mechanism:

``begin_round(institutions)``
    Refuse a round that would exceed an institution's budget *before* it starts,
    and return the round's extra client config and update bounds.
``release(agg, rnd)``
    What the coordinator may use of the round's sum (central noise added here
    when there is no secure aggregation; adaptive clipping's next bound).
``charges_for(run_id, rnd, institutions)``
    Work for ``RunStore.record_round(also=...)``: the round's charges commit with the round.

:class:`RunPrivacy` is record-level DP-SGD with private standardisation
statistics (:mod:`consortium.privacy.stats`), whose cost is charged to the ledger
as round 0 and composed with the DP-SGD steps (also when calibrating σ to
``target_epsilon``).  Its subclass
:class:`consortium.privacy.dpsgd_secagg_run.SecAggDpSgdRunPrivacy` (``dpsgd-secagg``)
is one global DP-SGD step per round with the noise split across the institutions
under secure aggregation.  Institution-level DP-FedAvg is
:class:`consortium.privacy.fedavg_run.FedAvgRunPrivacy`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar, Protocol, Self

from dp_accounting import dp_event as dpe
from sqlalchemy.orm import Session

from consortium.errors import ConfigError
from consortium.federation.aggregation import AggregateResult
from consortium.federation.config import INSTITUTION_DP_MODES, RECORD_DP_MODES, FederationConfig
from consortium.federation.transport import UpdateBounds
from consortium.privacy.accounting import (
    PrivacyEstimate,
    calibrate_noise_multiplier,
    check_delta,
    compose,
    default_delta,
    estimate,
)
from consortium.privacy.dpsgd import negative_clip_ratio
from consortium.privacy.ledger import PrivacyLedger
from consortium.privacy.mechanisms import DpSgdMechanism
from consortium.privacy.stats import PrivateStatsSpec
from consortium.registry import RunStore

logger = logging.getLogger(__name__)

__all__ = [
    "STATS_MECHANISM",
    "CoordinatorPrivacy",
    "RoundPlan",
    "RunPrivacy",
    "check_statistics_budget",
    "fingerprints",
    "statistics_request",
    "statistics_spec",
]

STATS_MECHANISM = "dpsgd-stats"
"""Ledger mechanism name of the private statistics release (charged as round 0)."""


@dataclass(frozen=True)
class RoundPlan:
    """What a round needs beyond the run's config: per-round client keys and update bounds."""

    config: dict[str, int | float | str] = field(default_factory=dict)
    bounds: UpdateBounds | None = None


class CoordinatorPrivacy(Protocol):
    """The calls the coordinator makes on a run's privacy plan (see the module docstring)."""

    delta: float

    def describe(self) -> dict[str, Any]:
        """Mechanism, δ and parameters, stored with the run and every checkpoint."""

    def client_config(self) -> dict[str, int | float | str]:
        """Config keys every training message carries."""

    def begin_round(self, institutions: Sequence[str]) -> RoundPlan:
        """Check the budgets (raise :class:`PrivacyBudgetError`) and set the round up."""

    def release(self, agg: AggregateResult, rnd: int) -> AggregateResult:
        """The sum the coordinator may use."""

    def aggregate_bound(self, agg: AggregateResult) -> tuple[float, float]:
        """``(clip_norm, slack)`` for checking a secure sum's norm (slack: the noise's share)."""

    def charges_for(self, run_id: str, rnd: int, institutions: Sequence[str]) -> Callable[[Session], object]:
        """One charge per institution for round ``rnd``, in the caller's transaction."""

    def statement(self, institutions: Sequence[str] | None = None) -> dict[str, Any]:
        """(ε, δ), mechanism and parameters: cumulative per institution from the ledger."""


def plan_privacy(
    config: FederationConfig,
    *,
    store: RunStore,
    data_ids: Mapping[str, str],
    rows_per_institution: float,
    positive_rate: float,
    reference: Sequence[Any],
) -> CoordinatorPrivacy | None:
    """The run's privacy plan, or None without DP; all checks happen here, before training."""
    if config.dp == "none":
        return None
    if config.dp in INSTITUTION_DP_MODES:
        from consortium.privacy.fedavg_run import FedAvgRunPrivacy  # noqa: PLC0415

        return FedAvgRunPrivacy.plan(config, store=store, data_ids=data_ids, reference=reference)
    cls = RunPrivacy
    if config.dp == "dpsgd-secagg":
        from consortium.privacy.dpsgd_secagg_run import SecAggDpSgdRunPrivacy  # noqa: PLC0415

        cls = SecAggDpSgdRunPrivacy
    return cls.plan(
        config, store=store, data_ids=data_ids, rows_per_institution=rows_per_institution,
        positive_rate=positive_rate, reference=reference,
    )


# -- private statistics (dpsgd) ---------------------------------------------------


def statistics_spec(config: FederationConfig) -> PrivateStatsSpec | None:
    """The noise of the standardisation statistics: private in ``dpsgd*`` modes, else None (exact sums)."""
    if config.dp not in RECORD_DP_MODES:
        return None
    return PrivateStatsSpec(noise_multiplier=config.dp_stats_noise_multiplier, bound=config.dp_stats_bound)


def statistics_request(spec: PrivateStatsSpec | None) -> dict[str, int | float | str]:
    """The statistics query's config: asks each institution to add its noise before the secure sum."""
    if spec is None:
        return {}
    return {"dp-stats-noise-multiplier": spec.noise_multiplier, "dp-stats-bound": spec.bound}


def check_statistics_budget(
    config: FederationConfig, *, store: RunStore, data_ids: Mapping[str, str], spec: PrivateStatsSpec | None
) -> None:
    """Refuse the statistics release if it alone would exceed an institution's budget.

    Needs δ before the statistics exist, so it runs when ``config.delta`` is set;
    with the default δ (from the noisy row count) the budget is first checked
    before round 1, after the statistics (which are then charged whatever the result).
    """
    if spec is None or not config.budget_epsilon or not config.delta:
        return
    PrivacyLedger(store).check_budgets(
        data_ids, event=spec.event(), delta=config.delta, budget_epsilon=config.budget_epsilon
    )


def fingerprints(data_ids: Mapping[str, str], institutions: Sequence[str]) -> dict[str, str]:
    """``institution -> data fingerprint`` (the ledger's key) for ``institutions``; unknown ones share one key."""
    return {inst: data_ids.get(inst, "unknown") for inst in institutions}


# -- record level -----------------------------------------------------------------


@dataclass
class RunPrivacy:
    """Privacy state of one coordinator run (record-level DP-SGD with private statistics)."""

    mechanism: DpSgdMechanism
    delta: float
    rounds: int
    ledger: PrivacyLedger
    data_ids: Mapping[str, str]
    budget: float | None
    negative_ratio: float
    lr: float
    stats: PrivateStatsSpec | None = None
    secure_clip: float = 0.0

    MODE: ClassVar[str] = "dpsgd"
    """The ``FederationConfig.dp`` this class plans."""

    @classmethod
    def base_mechanism(cls, config: FederationConfig, *, institutions: int) -> DpSgdMechanism:
        """The mechanism before calibration (σ from the config, or 1 as the search's start)."""
        return DpSgdMechanism(
            noise_multiplier=config.dp_noise_multiplier or 1.0,
            clip_norm=config.dp_clip,
            sampling_rate=config.dp_sampling_rate,
            steps_per_round=config.dp_local_steps,
        )

    @classmethod
    def plan(
        cls,
        config: FederationConfig,
        *,
        store: RunStore,
        data_ids: Mapping[str, str],
        rows_per_institution: float,
        positive_rate: float,
        reference: Sequence[Any] = (),
    ) -> Self:
        """Calibrate σ so that the statistics and all rounds compose to ``target_epsilon``.

        ``reference`` (the model's tensors) is for subclasses that size an encoding.
        """
        if config.dp != cls.MODE:
            raise ConfigError(f"{cls.__name__} plans privacy mode {cls.MODE!r}; got {config.dp!r}.")
        owner = "FederationConfig"
        n = max(int(rows_per_institution), 1)
        delta = config.delta or default_delta(n)
        check_delta(delta, owner, n_protected=n)
        stats = statistics_spec(config)
        stats_event: dpe.DpEvent = stats.event() if stats is not None else dpe.NoOpDpEvent()
        base = cls.base_mechanism(config, institutions=len(data_ids))
        if config.target_epsilon > 0:
            sigma = calibrate_noise_multiplier(
                lambda s: compose([stats_event, replace(base, noise_multiplier=s).event(config.num_rounds)]),
                target_epsilon=config.target_epsilon,
                delta=delta,
                owner="RunPrivacy.plan",
            )
            mech = replace(base, noise_multiplier=sigma)
        else:
            mech = base
        planned = estimate(compose([stats_event, mech.event(config.num_rounds)]), delta)
        logger.warning(
            "DP-SGD: noise multiplier σ = %.4f, clip C = %g, q = %g, %d steps/round x %d rounds%s -> ε = %.4f "
            "(RDP %.4f) at δ = %.3g per institution for this run",
            mech.noise_multiplier,
            mech.clip_norm,
            mech.sampling_rate,
            mech.steps_per_round,
            config.num_rounds,
            "" if stats is None else f" + private statistics (σ = {stats.noise_multiplier:g}, bound {stats.bound:g})",
            planned.epsilon,
            planned.epsilon_rdp,
            delta,
        )
        plan = cls(
            mechanism=mech,
            delta=delta,
            rounds=config.num_rounds,
            ledger=PrivacyLedger(store),
            data_ids=dict(data_ids),
            budget=config.budget_epsilon or None,
            negative_ratio=negative_clip_ratio(positive_rate, power=config.dp_negative_clip_power),
            lr=config.dp_lr,
            stats=stats,
            secure_clip=config.clip_norm,
        )
        plan.prepare(rows_per_institution=rows_per_institution, reference=reference, planned=planned)
        return plan

    def prepare(self, *, rows_per_institution: float, reference: Sequence[Any], planned: PrivacyEstimate) -> None:
        """Subclasses' set-up after calibration (``planned``: the run's planned PrivacyEstimate)."""

    def describe(self) -> dict[str, Any]:
        params: dict[str, Any] = dict(self.mechanism.params())
        if self.stats is not None:
            params["statistics"] = {**asdict(self.stats), "queries": 4}
        return {"mechanism": self.mechanism.name, "delta": self.delta, "unit": "record", "params": params}

    def client_config(self) -> dict[str, int | float | str]:
        """What every institution needs to run the accounted mechanism."""
        return {
            "dp": self.MODE,
            "dp-noise-multiplier": self.mechanism.noise_multiplier,
            "dp-clip": self.mechanism.clip_norm,
            "dp-sampling-rate": self.mechanism.sampling_rate,
            "dp-local-steps": self.mechanism.steps_per_round,
            "dp-negative-ratio": self.negative_ratio,
            "dp-lr": self.lr,
        }

    def begin_round(self, institutions: Sequence[str]) -> RoundPlan:
        self.check_before_round(institutions)
        return RoundPlan()

    def check_before_round(self, institutions: Sequence[str]) -> None:
        """Raise :class:`PrivacyBudgetError` if the next round would exceed any budget."""
        self.ledger.check_budgets(
            fingerprints(self.data_ids, institutions), event=self.mechanism.round_event(), delta=self.delta,
            budget_epsilon=self.budget,
        )

    def release(self, agg: AggregateResult, rnd: int) -> AggregateResult:
        return agg  # each institution noised its own steps

    def aggregate_bound(self, agg: AggregateResult) -> tuple[float, float]:
        return self.secure_clip, 0.0

    def charges_for(self, run_id: str, rnd: int, institutions: Sequence[str]) -> Callable[[Session], object]:
        """Work for ``RunStore.record_round(also=...)``: one charge per institution, same transaction."""

        def work(session: Session) -> None:
            self.ledger.charge_each(
                fingerprints(self.data_ids, institutions), run_id=run_id, round=rnd, mechanism=self.mechanism.name,
                event=self.mechanism.round_event(), delta=self.delta, budget_epsilon=self.budget,
                params=self.mechanism.params(), session=session,
            )  # fmt: skip

        return work

    def charge_statistics(self, run_id: str, institutions: Sequence[str], *, release: int = 1) -> None:
        """Charge the private statistics (already released) to every contributing institution, as round 0.

        ``release`` numbers repeated releases in one run (a resumed run without a
        checkpoint queries the statistics again, and pays again).
        """
        if self.stats is None:
            return
        stats = self.stats
        mechanism = STATS_MECHANISM if release == 1 else f"{STATS_MECHANISM}-{release}"

        def work(session: Session) -> None:
            self.ledger.charge_each(
                fingerprints(self.data_ids, institutions), run_id=run_id, round=0, mechanism=mechanism,
                event=stats.event(), delta=self.delta, budget_epsilon=self.budget,
                params={**asdict(stats), "queries": 4}, session=session,
                enforce_budget=False,  # released before this charge: it must be recorded
            )  # fmt: skip

        self.ledger.store.run_transaction(work, action=f"charge the private statistics of run {run_id!r}")

    def statement(self, institutions: Sequence[str] | None = None) -> dict[str, Any]:
        """(ε, δ), mechanism and parameters: cumulative per institution from the ledger."""
        names = list(institutions or self.data_ids)
        per_inst = {
            inst: self.ledger.spent(
                institution=inst, data_id=self.data_ids.get(inst, "unknown"), delta=self.delta
            ).epsilon
            for inst in names
        }
        return {
            "epsilon": max(per_inst.values(), default=0.0),
            "delta": self.delta,
            "mechanism": self.mechanism.name,
            "params": {**self.describe()["params"], "negative_clip_ratio": self.negative_ratio},
            "epsilon_per_institution": per_inst,
        }
