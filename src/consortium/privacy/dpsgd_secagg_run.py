"""Record-level DP-SGD with noise shares under secure aggregation, in the coordinator (``dpsgd-secagg``).

One global model; **every round is one DP-SGD step** over the union of the
institutions' rows (:class:`~consortium.privacy.mechanisms.DistributedDpSgdMechanism`,
the in-process version is :mod:`consortium.privacy.distributed_dpsgd`):

1. Each institution Poisson-samples its rows (rate q), clips each row's gradient
   at the current global model (class-aware bound ≤ C), sums, divides by the
   public expected pooled batch ``q·N`` (N: the noisy row count of the private
   statistics, post-processing), projects onto the L2 ball of radius
   ``DATA_BOUND_CLIPS · C`` (a projection is 1-Lipschitz: one row still moves it by
   at most ``C/(q·N)``) and adds Gaussian noise of std ``σC/(sqrt(k)·q·N)`` in
   float64 (:func:`consortium.privacy.distributed_dpsgd.secagg_share`).  It sends
   that share with weight 1 and no metric through secure aggregation.
2. The coordinator unmasks only the **sum** of the ``s`` shares, a central DP-SGD
   step with noise ``σ·sqrt(s/k)·C/(q·N)`` (``s = k`` without dropouts), and moves
   the model by ``-dp_lr · sum`` through the server optimiser (plain SGD with the
   default ``fedprox``/``fedavg`` and ``server_lr = 1``; momentum or Adam are
   post-processing).  It never sees one institution's share.
3. Every invited institution is charged ``round_event(survivors=s)`` in the
   round's transaction (dropouts: the smaller noise actually present); the budget
   is checked before the round.  The statement also gives ``epsilon_if_one_colludes``:
   ε of the whole run against a coordinator that learns one institution's shares.

The share's Gaussian noise is continuous and added *before* the secure-aggregation
encoding, which clips to declared bounds and rounds stochastically.  Neither
changes the guarantee beyond a δ far below the accounted one
(:meth:`SecAggDpSgdRunPrivacy.encoding_delta`, refused when above
``ENCODING_DELTA_FRACTION · δ``): the bounds hold the noise to ``HEADROOM_SIGMAS``
per coordinate and ``sqrt(d) + HEADROOM_SIGMAS`` in norm, and the rounding of
values whose noise has std ``τ ≫ 1`` encoding step is, up to total variation
``≤ d·tv(τ, k)`` per round, a post-processing of the central Gaussian sum
(:func:`rounding_tv`; docs/privacy.md gives the argument).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from dp_accounting import dp_event as dpe
from sqlalchemy.orm import Session

from consortium.errors import ConfigError
from consortium.federation.aggregation import AggregateResult
from consortium.federation.config import FederationConfig
from consortium.federation.transport import UpdateBounds
from consortium.privacy.accounting import PrivacyEstimate, compose, estimate
from consortium.privacy.federated import RoundPlan, RunPrivacy, fingerprints
from consortium.privacy.mechanisms import DistributedDpSgdMechanism, DpSgdMechanism

logger = logging.getLogger(__name__)

__all__ = [
    "DATA_BOUND_CLIPS",
    "ENCODING_DELTA_FRACTION",
    "HEADROOM_SIGMAS",
    "SecAggDpSgdRunPrivacy",
    "rounding_tv",
]

DATA_BOUND_CLIPS = 2.0
"""L2 bound of one institution's normalised clipped sum, in units of C (its expectation is at most C)."""
HEADROOM_SIGMAS = 12.0
"""Encoding room for a share's noise: per coordinate, and beyond sqrt(d) in norm (tails ~1e-32)."""
ENCODING_DELTA_FRACTION = 1e-3
"""Largest encoding δ (bounds and rounding, whole run) accepted, as a fraction of the accounted δ."""


def rounding_tv(tau: float, shares: int) -> float:
    """Total-variation bound, per coordinate, between the stochastically rounded sum and a post-processed one.

    ``shares`` values each carry independent Gaussian noise of std ``tau`` encoding
    steps.  Given their (real) sum, the fractional parts of the first ``shares - 1``
    values are Gaussian with covariance ``tau²(I - 11ᵀ/shares)`` (smallest eigenvalue
    ``tau²/shares``) wrapped onto the torus; by Poisson summation they are within
    ``½ Σ_{m≠0} exp(-2π² tau² |m|² / shares)`` of uniform, which does not depend on
    the data.  With uniform fractional parts the integer sum is a data-independent
    randomisation of the real sum: a post-processing of the central Gaussian step.
    """
    if shares <= 1:
        return 0.0  # one share: its rounding is a post-processing of itself
    a = 2.0 * math.pi**2 * tau * tau / shares
    if a > 700.0:
        return 0.0  # below e^-700: nothing a float can hold
    per_axis = 2.0 / math.expm1(a)  # Σ_{j≠0} e^{-a j²} <= 2 e^{-a} / (1 - e^{-a})
    return min(1.0, 0.5 * math.expm1((shares - 1) * math.log1p(per_axis)))


@dataclass
class SecAggDpSgdRunPrivacy(RunPrivacy):
    """Privacy state of one ``dpsgd-secagg`` coordinator run (see the module docstring)."""

    expected_batch: float = 1.0
    """``q · N``: the public normaliser of the summed shares (N from the private statistics)."""
    dimension: int = 0
    delta_encoding: float = 0.0
    invited: int = 0
    history: dict[int, int] = field(default_factory=dict)
    """Round -> institutions whose shares were in the released sum."""
    statistics_releases: int = 0
    planned_collusion: float | None = None
    _collusion_cache: dict[tuple[tuple[int, int], ...], float] = field(default_factory=dict, repr=False)

    MODE = "dpsgd-secagg"

    @property
    def distributed(self) -> DistributedDpSgdMechanism:
        mech = self.mechanism
        if not isinstance(mech, DistributedDpSgdMechanism):  # pragma: no cover - plan() builds it
            raise ConfigError(f"dpsgd-secagg needs a DistributedDpSgdMechanism; got {type(mech).__name__}.")
        return mech

    @classmethod
    def base_mechanism(cls, config: FederationConfig, *, institutions: int) -> DpSgdMechanism:
        """k = the institutions of the run: each adds ``1/k`` of the noise variance every step."""
        if institutions < 1:
            raise ConfigError("dpsgd-secagg needs at least one institution to protect.")
        return DistributedDpSgdMechanism(
            noise_multiplier=config.dp_noise_multiplier or 1.0,
            clip_norm=config.dp_clip,
            sampling_rate=config.dp_sampling_rate,
            steps_per_round=1,
            participants=institutions,
        )

    def prepare(self, *, rows_per_institution: float, reference: Sequence[Any], planned: PrivacyEstimate) -> None:
        """Fix ``q·N`` and the encoding; refuse an encoding too coarse for the noise."""
        mech = self.distributed
        total_rows = max(float(rows_per_institution), 0.0) * mech.participants
        self.expected_batch = max(mech.sampling_rate * total_rows, 1.0)
        self.dimension = int(sum(int(np.asarray(r).size) for r in reference))
        if self.dimension < 1:
            raise ConfigError("dpsgd-secagg needs the model's tensors to size the secure-aggregation encoding.")
        self.delta_encoding = self.encoding_delta(planned.epsilon)
        if self.delta_encoding > ENCODING_DELTA_FRACTION * self.delta:
            raise ConfigError(
                f"dpsgd-secagg: the secure-aggregation encoding would add δ ≈ {self.delta_encoding:.3g} "
                f"(more than {ENCODING_DELTA_FRACTION:g} of δ = {self.delta:.3g}): its integer step is too coarse "
                f"for noise of std {self.value_std():.3g} per coordinate. Use a larger noise multiplier or a "
                "smaller sampling rate (q·N sets the scale)."
            )
        collude = self.planned_collusion = self.planned_collusion_epsilon()
        logger.warning(
            "dpsgd-secagg: %d institutions each add noise of std σC/sqrt(k) = %.4g to their clipped sums under "
            "secure aggregation; one DP-SGD step per round over q·N = %.1f expected rows; ε against a coordinator "
            "colluding with one institution: %s; encoding δ <= %.2g",
            mech.participants, mech.share_std(), self.expected_batch,
            "n/a (one institution)" if collude is None else f"{collude:.4f}", self.delta_encoding,
        )

    # -- the encoding -----------------------------------------------------------------

    def value_std(self) -> float:
        """Std of one share's noise per coordinate, in the sent (gradient-sized) units."""
        return self.distributed.share_std() / self.expected_batch

    @property
    def data_bound(self) -> float:
        """L2 bound of one institution's normalised clipped sum (it projects onto it)."""
        return DATA_BOUND_CLIPS * self.distributed.clip_norm

    def bounds(self) -> UpdateBounds:
        """What a noisy share is bounded by: the data bound plus room for its noise."""
        tau = self.value_std()
        coordinate = self.data_bound + HEADROOM_SIGMAS * tau
        norm = self.data_bound + tau * (math.sqrt(self.dimension) + HEADROOM_SIGMAS)
        return UpdateBounds(clip_norm=max(norm, coordinate), weight_cap=1.0, coordinate_bound=coordinate)

    def encoding_scale(self, invited: int) -> float:
        """Integer steps per unit of the update segment when ``invited`` institutions are asked."""
        from consortium.secagg.config import SecAggConfig  # noqa: PLC0415
        from consortium.secagg.contribution import UPDATE_SEGMENT, ContributionSpec  # noqa: PLC0415
        from consortium.secagg.quantize import QuantizationPlan  # noqa: PLC0415

        b = self.bounds()
        spec = ContributionSpec.create(
            SecAggConfig(clip_norm=b.clip_norm, weight_cap=b.weight_cap, coordinate_bound=b.coordinate_bound),
            [np.empty(self.dimension)],
        )
        plan = QuantizationPlan.create(spec.segments(), n_participants=max(invited, 1))
        return plan.segment(UPDATE_SEGMENT).scale

    def encoding_delta(self, epsilon: float) -> float:
        """Extra δ of the whole run from the encoding's bounds and rounding (worst case: all k invited).

        Per round and institution, the noise leaves the coordinate bound with probability
        ``<= d·erfc(H/sqrt 2)`` and the norm bound with ``<= exp(-H²/2)`` (Gaussian
        concentration of ``||Z||`` around at most sqrt(d)); the rounding adds
        ``d·rounding_tv``.  Total variation ``p`` over the run turns (ε, δ) into
        (ε, δ + (1 + e^ε)·p).
        """
        k = self.distributed.participants
        tail = k * (self.dimension * math.erfc(HEADROOM_SIGMAS / math.sqrt(2.0)) + math.exp(-HEADROOM_SIGMAS**2 / 2))
        tau_steps = self.value_std() * self.encoding_scale(k)
        per_round = tail + self.dimension * rounding_tv(tau_steps, k)
        return self.rounds * per_round * (1.0 + math.exp(min(epsilon, 700.0)))

    # -- the coordinator's calls -------------------------------------------------------

    def client_config(self) -> dict[str, int | float | str]:
        mech = self.distributed
        return {
            "dp": self.MODE,
            "dp-noise-multiplier": mech.noise_multiplier,
            "dp-clip": mech.clip_norm,
            "dp-sampling-rate": mech.sampling_rate,
            "dp-local-steps": 1,
            "dp-participants": mech.participants,
            "dp-negative-ratio": self.negative_ratio,
            "dp-expected-batch": self.expected_batch,
            "dp-data-bound": self.data_bound,
        }

    def begin_round(self, institutions: Sequence[str]) -> RoundPlan:
        """Refuse a round that would exceed a budget, with the noise the invited shares will carry."""
        k = self.distributed.participants
        self.invited = len(institutions)
        event = self.distributed.round_event(survivors=max(1, min(self.invited, k)))
        self.ledger.check_budgets(
            fingerprints(self.data_ids, institutions), event=event, delta=self.delta, budget_epsilon=self.budget
        )
        return RoundPlan(bounds=self.bounds())

    def release(self, agg: AggregateResult, rnd: int) -> AggregateResult:
        """The SGD step ``-dp_lr · Σ shares`` (weight 1: the server optimiser applies it as is)."""
        s = len(agg.participants)
        self.history[rnd] = s
        k = self.distributed.participants
        if 0 < s < k:
            logger.warning(
                "Round %d: %d of %d institutions' noise shares are in the sum, so it carries σ·sqrt(%d/%d) = %.4g; "
                "the round is charged with that (ε per round %.4g instead of %.4g).",
                rnd, s, k, s, k, self.distributed.effective_noise_multiplier(survivors=s),
                estimate(self.distributed.round_event(survivors=s), self.delta).epsilon,
                estimate(self.distributed.round_event(), self.delta).epsilon,
            )
        step = [(-self.lr * np.asarray(u, dtype=np.float64)) for u in agg.update_sum]
        return AggregateResult(update_sum=step, weight_total=1.0, metric_sums={},
                               participants=agg.participants, dropped=agg.dropped)

    def aggregate_bound(self, agg: AggregateResult) -> tuple[float, float]:
        """The released step's norm: ``lr·(s·data bound)`` plus the noise of ``s`` shares."""
        s = max(len(agg.participants), 1)
        noise = self.value_std() * math.sqrt(s) * (math.sqrt(self.dimension) + HEADROOM_SIGMAS)
        return self.lr * s * self.data_bound, self.lr * noise

    def charges_for(self, run_id: str, rnd: int, institutions: Sequence[str]) -> Callable[[Session], object]:
        """Charge every invited institution with the noise of the shares actually in the sum."""
        survivors = self.history.get(rnd, min(len(institutions), self.distributed.participants))
        if survivors < 1:

            def nothing(session: Session) -> None:  # nothing was released
                return None

            return nothing
        event = self.distributed.round_event(survivors=survivors)
        params = {
            **self.distributed.params(),
            "survivors": survivors,
            "invited": len(institutions),
            "effective_noise_multiplier": self.distributed.effective_noise_multiplier(survivors=survivors),
            "expected_batch": self.expected_batch,
        }

        def work(session: Session) -> None:
            self.ledger.charge_each(
                fingerprints(self.data_ids, institutions), run_id=run_id, round=rnd, mechanism=self.MODE,
                event=event, delta=self.delta, budget_epsilon=self.budget, params=params, session=session,
                # The sum was released before this charge: record it even if dropouts took it past the budget.
                enforce_budget=False,
            )

        return work

    def charge_statistics(self, run_id: str, institutions: Sequence[str], *, release: int = 1) -> None:
        super().charge_statistics(run_id, institutions, release=release)
        self.statistics_releases = max(self.statistics_releases, release)

    # -- collusion ---------------------------------------------------------------------

    def _collusion_epsilon(self, survivors: Mapping[int, int] | Sequence[int], releases: int) -> float | None:
        """ε against the coordinator plus one institution that removes its own shares (None: k = 1).

        A row of a surviving institution is worst off when the colluder is another
        survivor (``σ·sqrt((s-1)/k)`` left); alone in the sum (s = 1), it keeps ``σ·sqrt(1/k)``.
        """
        mech = self.distributed
        if mech.participants < 2:
            return None
        counts: dict[int, int] = {}
        for s in survivors.values() if isinstance(survivors, Mapping) else survivors:
            if s >= 1:
                counts[s] = counts.get(s, 0) + 1
        events: list[dpe.DpEvent] = []
        if self.stats is not None and releases > 0:  # each institution adds its full statistics noise
            events.append(dpe.SelfComposedDpEvent(self.stats.event(), releases))
        for s, n in sorted(counts.items()):
            events.append(dpe.SelfComposedDpEvent(mech.round_event(survivors=s, colluders=1 if s >= 2 else 0), n))
        if not events:
            return 0.0
        key = ((-1, releases), *sorted(counts.items()))  # describe() asks every round: compute each history once
        if key not in self._collusion_cache:
            self._collusion_cache[key] = estimate(compose(events), self.delta).epsilon
        return self._collusion_cache[key]

    def planned_collusion_epsilon(self) -> float | None:
        """``epsilon_if_one_colludes`` of the planned run (all k shares in every round)."""
        return self._collusion_epsilon([self.distributed.participants] * self.rounds, 1)

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["params"].update({
            "expected_batch": self.expected_batch,
            "data_bound": self.data_bound,
            "headroom_sigmas": HEADROOM_SIGMAS,
            "delta_encoding": self.delta_encoding,
        })
        out["survivors"] = {str(r): s for r, s in sorted(self.history.items())}
        out["statistics_releases"] = self.statistics_releases
        out["epsilon_if_one_colludes"] = self._collusion_epsilon(self.history, self.statistics_releases)
        out["epsilon_if_one_colludes_planned"] = self.planned_collusion
        return out

    def restore(self, recorded: Mapping[str, Any]) -> None:
        """Continue the collusion history from a checkpoint's recorded one (resumed runs)."""
        survivors = recorded.get("survivors")
        if isinstance(survivors, Mapping):
            for r, s in survivors.items():
                self.history.setdefault(int(r), int(s))
        releases = recorded.get("statistics_releases")
        if isinstance(releases, int):
            self.statistics_releases = max(self.statistics_releases, releases)

    def statement(self, institutions: Sequence[str] | None = None) -> dict[str, Any]:
        out = super().statement(institutions)
        out["epsilon_if_one_colludes"] = self._collusion_epsilon(self.history, self.statistics_releases)
        out["delta_encoding"] = self.delta_encoding
        out["unit"] = "record"
        return out
