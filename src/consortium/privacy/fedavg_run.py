"""Institution-level DP-FedAvg in the coordinator: fixed or adaptive clipping, distributed or central noise.

The unit protected is one institution's participation (McMahan et al. 2018).
Each institution trains locally, clips its model update to the round's bound C
and reports weight 1 (an unweighted mean: example counts would travel un-noised),
and no training loss.  The noise:

* **secure aggregation (default)**: every invited institution adds its share of
  Skellam noise to its *quantised* update before masking
  (:class:`~consortium.privacy.mechanisms.SkellamMechanism`, parameters sent in the
  round's config, see :mod:`consortium.privacy.distributed`), so the coordinator
  only ever unmasks a noised sum.  With ``k`` of ``n`` invited institutions in the
  sum, the noise variance is ``k/n`` of the plan and the round is charged with
  that smaller variance (logged).  Room for the noise is reserved in the
  encoding (``HEADROOM_SIGMAS`` per-institution standard deviations).
* **no secure aggregation**: the coordinator (then trusted with the individual
  updates) adds Gaussian noise σ·C to the sum (:class:`DpFedAvgMechanism`).

Adaptive clipping (Andrew et al. 2021): institutions also send the centred bit
``1[||Δ|| <= C] - 1/2`` (one institution moves the sum by 1/2), noised like the
update (distributed Skellam of std σ_b, or central Gaussian σ_b); the coordinator
moves ``C <- C·exp(-η (b̄ - γ))`` with the noisy unclipped fraction b̄ (projected
onto [0, 1]: post-processing).  The count
is accounted as its own event, composed with the update's in every round.

δ defaults to ``1/(10·n)`` with n the number of institutions in the run (the
protected units), and δ >= 1/n is refused.  With few institutions this δ is
large: pass ``--delta`` (and expect institution-level DP to need many
institutions for useful models).
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from dp_accounting import dp_event as dpe
from sqlalchemy.orm import Session

from consortium.errors import ConfigError
from consortium.federation.aggregation import AggregateResult
from consortium.federation.config import INSTITUTION_DP_MODES, FederationConfig
from consortium.federation.transport import UpdateBounds
from consortium.privacy.accounting import calibrate_noise_multiplier, check_delta, compose, default_delta, estimate
from consortium.privacy.distributed import COUNT_METRIC, COUNT_SEGMENT, UPDATE_SEGMENT, noise_config
from consortium.privacy.federated import RoundPlan, fingerprints
from consortium.privacy.ledger import PrivacyLedger
from consortium.privacy.mechanisms import DpFedAvgMechanism, SkellamMechanism
from consortium.registry import RunStore
from consortium.secagg.primitives import MAX_MODULUS_BITS

logger = logging.getLogger(__name__)

__all__ = ["HEADROOM_SIGMAS", "FedAvgRunPrivacy", "RoundNoise"]

HEADROOM_SIGMAS = 10.0
"""Encoding room for distributed noise, in per-institution noise standard deviations (clipping ~1e-23)."""
COUNT_SENSITIVITY = 0.5
"""One institution moves the sum of centred bits by 1/2."""
SHARE_LAMBDA_TARGET = 1e12
"""Largest Poisson λ of a Skellam share the encoding is sized for (numpy is exact to 1e13, see
:data:`~consortium.privacy.mechanisms.POISSON_LAMBDA_MAX`); a share std of ~1e6 integer steps is ample."""
MIN_MODULUS_BITS = 16
NOISE_NORM_SIGMAS = 8.0
"""Slack of the secure sum's norm check: noise norm <= std·(sqrt(d) + 8) except with probability ~1e-14."""


@dataclass(frozen=True)
class RoundNoise:
    """How one round was set up: the central mechanism at this round's C, and the Skellam shares."""

    invited: int
    central: DpFedAvgMechanism
    update: SkellamMechanism | None = None
    count: SkellamMechanism | None = None
    bounds: UpdateBounds | None = None
    """The update bounds (and encoding bits) the Skellam scales were computed for."""

    def event(self, survivors: int | None = None) -> dpe.DpEvent:
        """This round's DpEvent; under secure aggregation with ``survivors`` institutions in the sum."""
        if self.update is None:
            return self.central.round_event()
        k = self.invited if survivors is None else survivors
        parts = [self.update.round_event(survivors=k)]
        if self.count is not None:
            parts.append(self.count.round_event(survivors=k))
        return compose(parts)

    def params(self, survivors: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {**self.central.params(), "invited": self.invited}
        if self.update is not None:
            out.update({"noise": "skellam", "scale": self.update.scale, "dimension": self.update.dimension,
                        "survivors": self.invited if survivors is None else survivors,
                        "modulus_bits": self.bounds.modulus_bits if self.bounds is not None else None})
            if self.count is not None:
                out["count_scale"] = self.count.scale
        else:
            out["noise"] = "gaussian"
        return out


@dataclass
class FedAvgRunPrivacy:
    """Privacy state of one institution-level DP-FedAvg run (see the module docstring)."""

    mechanism: DpFedAvgMechanism
    """σ, the current clip bound C and the adaptive-clipping parameters (C moves when adaptive)."""
    mode: str
    delta: float
    rounds: int
    ledger: PrivacyLedger
    data_ids: Mapping[str, str]
    budget: float | None
    config: FederationConfig
    tensor_sizes: tuple[int, ...]
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(secrets.randbits(128)))
    current: RoundNoise | None = None
    survivors: int | None = None

    @property
    def secure(self) -> bool:
        return self.config.secure_aggregation

    @property
    def dimension(self) -> int:
        return int(sum(self.tensor_sizes))

    # -- planning ------------------------------------------------------------------

    @classmethod
    def plan(
        cls, config: FederationConfig, *, store: RunStore, data_ids: Mapping[str, str], reference: Sequence[Any]
    ) -> FedAvgRunPrivacy:
        """Validate δ against the institution count and calibrate σ (before any training)."""
        if config.dp not in INSTITUTION_DP_MODES:
            raise ConfigError(f"FedAvgRunPrivacy is DP-FedAvg; got privacy mode {config.dp!r}.")
        owner = "FederationConfig"
        n = len(data_ids)
        if n < 1:
            raise ConfigError("DP-FedAvg needs at least one institution to protect.")
        delta = config.delta or default_delta(n)
        check_delta(delta, owner, n_protected=n)
        base = DpFedAvgMechanism(
            noise_multiplier=config.dp_noise_multiplier or 1.0,
            clip_norm=config.update_clip,
            adaptive=config.dp == "dpfedavg-adaptive",
            count_noise_multiplier=config.count_noise_multiplier,
            target_quantile=config.clip_quantile,
            clip_lr=config.clip_lr,
        )
        plan = cls(
            mechanism=base, mode=config.dp, delta=delta, rounds=config.num_rounds, ledger=PrivacyLedger(store),
            data_ids=dict(data_ids), budget=config.budget_epsilon or None, config=config,
            tensor_sizes=tuple(int(np.asarray(r).size) for r in reference),
        )
        invited = plan.planned_invited(n)
        if config.target_epsilon > 0:
            sigma = calibrate_noise_multiplier(
                lambda s: dpe.SelfComposedDpEvent(
                    plan.setup(invited, mechanism=replace(base, noise_multiplier=s)).event(), config.num_rounds
                ),
                target_epsilon=config.target_epsilon,
                delta=delta,
                owner="FedAvgRunPrivacy.plan",
            )
            plan.mechanism = replace(base, noise_multiplier=sigma)
        planned = estimate(dpe.SelfComposedDpEvent(plan.setup(invited).event(), config.num_rounds), delta)
        logger.warning(
            "DP-FedAvg (%s, %s noise): σ = %.4f, update clip C = %g%s, %d institutions per round x %d rounds -> "
            "ε = %.4f (RDP %.4f) at δ = %.3g per institution (unit: one institution) for this run",
            config.dp, "distributed Skellam" if plan.secure else "central Gaussian", plan.mechanism.noise_multiplier,
            plan.mechanism.clip_norm,
            f" (adaptive: quantile {base.target_quantile:g}, η {base.clip_lr:g}, "
            f"count σ_b {base.count_noise_multiplier:g})" if base.adaptive else "",
            invited, config.num_rounds, planned.epsilon, planned.epsilon_rdp, delta,
        )
        return plan

    def planned_invited(self, n_institutions: int) -> int:
        """Institutions invited per round, as the coordinator samples them."""
        k = max(self.config.min_nodes, int(round(self.config.fraction_train * n_institutions)))
        return max(1, min(k, n_institutions))

    def bounds(
        self, invited: int, mechanism: DpFedAvgMechanism | None = None, modulus_bits: int | None = None
    ) -> UpdateBounds:
        """What each institution's contribution is bounded by (and the encoding room for its noise)."""
        mech = mechanism or self.mechanism
        if not self.secure:
            return UpdateBounds(clip_norm=mech.clip_norm, weight_cap=1.0)
        root = math.sqrt(invited)
        metric_bounds: dict[str, float] = {}
        if mech.adaptive:  # the centred bit is ±1/2; its bound also holds the noise's room
            metric_bounds[COUNT_METRIC] = COUNT_SENSITIVITY + HEADROOM_SIGMAS * mech.count_noise_multiplier / root
        return UpdateBounds(
            clip_norm=mech.clip_norm,
            weight_cap=1.0,
            noise_headroom=HEADROOM_SIGMAS * mech.noise_std() / root,
            metric_bounds=metric_bounds,
            modulus_bits=modulus_bits,
        )

    def setup(self, invited: int, *, mechanism: DpFedAvgMechanism | None = None) -> RoundNoise:
        """The round's noise for ``invited`` institutions (Skellam scales from the encoding they will use)."""
        mech = mechanism or self.mechanism
        if not self.secure:
            return RoundNoise(invited=invited, central=mech)
        noise = self._skellam(invited, mech, MAX_MODULUS_BITS)
        # The largest encoding whose shares stay where the Poisson sampler is exact (fewer bits: smaller scale).
        bits = MAX_MODULUS_BITS
        while bits > MIN_MODULUS_BITS and max(
            m.share_lambda() for m in (noise.update, noise.count) if m is not None
        ) > SHARE_LAMBDA_TARGET:
            bits -= 1
            noise = self._skellam(invited, mech, bits)
        return noise

    def _skellam(self, invited: int, mech: DpFedAvgMechanism, bits: int) -> RoundNoise:
        from consortium.federation.secure_transport import update_config  # noqa: PLC0415
        from consortium.secagg.contribution import ContributionSpec  # noqa: PLC0415
        from consortium.secagg.quantize import QuantizationPlan  # noqa: PLC0415

        bounds = self.bounds(invited, mech, modulus_bits=bits)
        secagg = update_config(self.config, bounds)
        spec = ContributionSpec.create(secagg, [np.empty(s) for s in self.tensor_sizes])
        qplan = QuantizationPlan.create(spec.segments(), n_participants=invited, modulus_bits=secagg.modulus_bits)
        update = SkellamMechanism(
            noise_multiplier=mech.noise_multiplier, clip_norm=mech.clip_norm,
            scale=qplan.segment(UPDATE_SEGMENT).scale, dimension=self.dimension, expected_participants=invited,
        )
        count = None
        if mech.adaptive:  # std σ_b on a sum of sensitivity 1/2: multiplier 2 σ_b
            count = SkellamMechanism(
                noise_multiplier=mech.count_noise_multiplier / COUNT_SENSITIVITY, clip_norm=COUNT_SENSITIVITY,
                scale=qplan.segment(COUNT_SEGMENT).scale, dimension=1, expected_participants=invited,
            )
        return RoundNoise(invited=invited, central=mech, update=update, count=count, bounds=bounds)

    # -- the coordinator's calls ---------------------------------------------------

    def describe(self) -> dict[str, Any]:
        return {
            "mechanism": self.mode,
            "delta": self.delta,
            "unit": "institution",
            "noise": "skellam" if self.secure else "gaussian",
            "params": dict(self.mechanism.params()),
        }

    def client_config(self) -> dict[str, int | float | str]:
        return {"dp": self.mode}

    def begin_round(self, institutions: Sequence[str]) -> RoundPlan:
        """Check every invited institution's budget with the planned event, then set the round up."""
        noise = self.setup(len(institutions))
        self.ledger.check_budgets(
            fingerprints(self.data_ids, institutions), event=noise.event(), delta=self.delta,
            budget_epsilon=self.budget,
        )
        self.current, self.survivors = noise, None
        config: dict[str, int | float | str] = {
            "dp-update-clip": noise.central.clip_norm,
            "dp-adaptive": int(noise.central.adaptive),
        }
        if noise.update is not None:
            config.update(noise_config(noise.update, noise.count))
        return RoundPlan(config=config, bounds=noise.bounds or self.bounds(len(institutions)))

    def _round(self) -> RoundNoise:
        if self.current is None:
            raise ConfigError("DP-FedAvg: a round was released before begin_round set it up (a coordinator bug).")
        return self.current

    def release(self, agg: AggregateResult, rnd: int) -> AggregateResult:
        """Noise the sum (central mode), log a dropout's smaller noise, and adapt the clip bound."""
        cur = self._round()
        k = len(agg.participants)
        self.survivors = k
        update_sum = list(agg.update_sum)
        metric_sums = dict(agg.metric_sums)
        if cur.update is None:
            std = cur.central.noise_std()
            update_sum = [(u + self.rng.normal(0.0, std, size=np.shape(u))).astype(np.asarray(u).dtype)
                          for u in update_sum]
            if cur.central.adaptive:
                metric_sums[COUNT_METRIC] = metric_sums.get(COUNT_METRIC, 0.0) + float(
                    self.rng.normal(0.0, cur.central.count_noise_multiplier))
        elif k < cur.invited:
            logger.warning(
                "Round %d: %d of %d invited institutions are in the sum, so it carries %d/%d of the planned noise "
                "variance; the round is charged with that smaller variance (ε per round %.4g instead of %.4g).",
                rnd, k, cur.invited, k, cur.invited,
                estimate(cur.event(k), self.delta).epsilon, estimate(cur.event(), self.delta).epsilon,
            )
        noisy_count = metric_sums.pop(COUNT_METRIC, None)
        released: dict[str, float] = {}
        if cur.central.adaptive and noisy_count is not None and k > 0:
            # A fraction lies in [0, 1]: projecting the noisy estimate there is post-processing, and keeps a
            # few institutions' large count noise from moving C by more than exp(±η/2) per round.
            unclipped = min(max(noisy_count / k + COUNT_SENSITIVITY, 0.0), 1.0)
            self.mechanism = self.mechanism.next_clip(1.0 - unclipped)
            logger.info("Round %d: noisy unclipped fraction %.3f (target %.2f): update clip %.4g -> %.4g",
                        rnd, unclipped, cur.central.target_quantile, cur.central.clip_norm, self.mechanism.clip_norm)
            # Sums over k institutions: mean_metrics() divides by the weight total k.
            released = {"dp-unclipped-fraction": unclipped * k, "dp-update-clip": cur.central.clip_norm * k}
        return AggregateResult(update_sum=update_sum, weight_total=agg.weight_total, metric_sums=released,
                               participants=agg.participants, dropped=agg.dropped)

    def aggregate_bound(self, agg: AggregateResult) -> tuple[float, float]:
        """Clip bound of the round, and how much norm its noise may add to a sum of clipped updates."""
        cur = self._round()
        k = max(len(agg.participants), 1)
        std = cur.central.noise_std() * math.sqrt(min(k, cur.invited) / cur.invited)
        return cur.central.clip_norm, std * (math.sqrt(self.dimension) + NOISE_NORM_SIGMAS)

    def charges_for(self, run_id: str, rnd: int, institutions: Sequence[str]) -> Callable[[Session], object]:
        """Charge every invited institution with the event of the noise actually in the sum."""
        cur = self._round()
        survivors = self.survivors
        event = cur.event(survivors)
        params = cur.params(survivors)
        name = "skellam" if cur.update is not None else DpFedAvgMechanism.name

        def work(session: Session) -> None:
            self.ledger.charge_each(
                fingerprints(self.data_ids, institutions), run_id=run_id, round=rnd, mechanism=name, event=event,
                delta=self.delta, budget_epsilon=self.budget, params=params, session=session,
                # The sum was released before this charge: record it even if dropouts took it past the budget.
                enforce_budget=False,
            )

        return work

    def restore(self, recorded: Mapping[str, Any]) -> None:
        """Continue adaptive clipping from a checkpoint's recorded bound (resumed runs)."""
        clip = recorded.get("params", {}).get("clip_norm") if isinstance(recorded, Mapping) else None
        if self.mechanism.adaptive and isinstance(clip, int | float) and clip > 0:
            self.mechanism = replace(self.mechanism, clip_norm=float(clip))

    def statement(self, institutions: Sequence[str] | None = None) -> dict[str, Any]:
        names = list(institutions or self.data_ids)
        per_inst = {
            inst: self.ledger.spent(institution=inst, data_id=self.data_ids.get(inst, "unknown"),
                                    delta=self.delta).epsilon
            for inst in names
        }
        return {
            **self.describe(),
            "epsilon": max(per_inst.values(), default=0.0),
            "epsilon_per_institution": per_inst,
            "params": {**self.mechanism.params(), "initial_clip_norm": self.config.update_clip,
                       "headroom_sigmas": HEADROOM_SIGMAS if self.secure else 0.0},
        }
