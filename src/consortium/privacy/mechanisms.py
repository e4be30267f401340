"""Privacy mechanisms behind one small interface, selected by name.

A :class:`Mechanism` knows its parameters, validates them when it is built (before
any training), adds its noise, and describes one round of itself as a DpEvent
(:meth:`Mechanism.round_event`).  The accountant composes those events; nothing
else decides ε.  A new mechanism is one new class plus
``register_mechanism("name", Cls)``.

Mechanisms
----------
``dpsgd``
    Record-level DP-SGD: Poisson-sampled rows, per-row clipping, Gaussian noise
    (Abadi et al. 2016).  One round is ``steps_per_round`` sampled Gaussian steps.
``dpsgd-secagg``
    Record-level DP-SGD with the noise *split* across institutions under secure
    aggregation: each step, every institution adds ``1/k`` of the noise variance to
    its clipped gradient sum before masking, so the released sum is exactly a
    central DP-SGD step over the union of the institutions' rows (Kairouz et al.
    2021's distributed DP).  It trusts the aggregation: a coordinator colluding
    with ``m`` institutions can remove their shares (:meth:`DistributedDpSgdMechanism.round_event`
    with ``colluders=m`` gives that ε), and dropouts leave less noise, charged as such.
``dpfedavg``
    Institution-level DP-FedAvg with central Gaussian noise on the sum of clipped
    updates (McMahan et al. 2018), optional adaptive clipping (Andrew et al. 2021)
    whose noisy clipped-count query is accounted as its own Gaussian event.
``skellam``
    Institution-level DP-FedAvg with *distributed* integer noise under secure
    aggregation: every institution adds Skellam noise to its quantised update
    before masking (Agarwal et al. 2021).  Sums of Skellam variables are Skellam, so
    the aggregate carries the sum of the survivors' variances; dropouts lower it
    and the round is accounted with the variance actually present (see
    :meth:`SkellamMechanism.round_event`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, ClassVar, Self

import numpy as np
from dp_accounting import dp_event as dpe

from consortium.errors import ConfigError, param_error
from consortium.privacy.accounting import (
    calibrate_noise_multiplier,
    check_noise_multiplier,
    check_positive,
    check_sampling_rate,
)

__all__ = [
    "DpFedAvgMechanism",
    "DistributedDpSgdMechanism",
    "DpSgdMechanism",
    "Mechanism",
    "SkellamMechanism",
    "clip_by_l2",
    "create_mechanism",
    "known_mechanisms",
    "register_mechanism",
]


class Mechanism(ABC):
    """One noise mechanism: parameters, noise, and its DpEvent per round."""

    name: ClassVar[str]
    unit: ClassVar[str]
    """What one neighbouring dataset differs by: ``"record"`` or ``"institution"``."""

    @abstractmethod
    def round_event(self, **observed: Any) -> dpe.DpEvent:
        """The DpEvent of one round (``observed`` carries e.g. the survivor count)."""

    def event(self, rounds: int) -> dpe.DpEvent:
        """``rounds`` rounds composed (planning before training)."""
        if rounds < 1:
            raise param_error("rounds", f"{type(self).__name__}.event", "an int >= 1", rounds)
        return dpe.SelfComposedDpEvent(self.round_event(), rounds)

    def params(self) -> dict[str, Any]:
        """JSON-ready parameters (stored with every charge and saved model)."""
        return {k: v for k, v in asdict(self).items()}  # type: ignore[call-overload]

    @classmethod
    def calibrated(cls, *, target_epsilon: float, delta: float, rounds: int, **params: Any) -> Self:
        """An instance whose ``rounds`` rounds spend at most ``target_epsilon`` at ``delta``.

        Searches the ``noise_multiplier`` field of the (dataclass) mechanism with the PLD
        accountant; a mechanism that needs another accountant overrides this.
        """
        base = cls(noise_multiplier=1.0, **params)  # type: ignore[call-arg]
        sigma = calibrate_noise_multiplier(
            lambda s: replace(base, noise_multiplier=s).event(rounds),  # type: ignore[type-var]
            target_epsilon=target_epsilon,
            delta=delta,
            owner=cls.__name__,
        )
        return replace(base, noise_multiplier=sigma)  # type: ignore[type-var]


def clip_by_l2(vectors: np.ndarray, clip_norm: float) -> tuple[np.ndarray, np.ndarray]:
    """Scale each row of ``vectors`` to L2 norm ≤ ``clip_norm``; also return the pre-clip norms."""
    norms = np.linalg.norm(vectors, axis=-1)
    factors = np.minimum(1.0, clip_norm / np.maximum(norms, 1e-12))
    return vectors * factors[..., None], norms


# -- record level ------------------------------------------------------------------


@dataclass(frozen=True)
class DpSgdMechanism(Mechanism):
    """Record-level DP-SGD inside one institution's local training.

    Attributes
    ----------
    noise_multiplier : float
        σ: noise std divided by ``clip_norm``.
    clip_norm : float
        Per-row gradient L2 bound C.
    sampling_rate : float
        Poisson sampling probability of a row per step.  With class-stratified
        sampling this is the *largest* per-class rate (the one the accountant
        must use: amplification is monotone in q).
    steps_per_round : int
        Local optimiser steps per federated round.
    """

    noise_multiplier: float
    clip_norm: float
    sampling_rate: float
    steps_per_round: int

    name: ClassVar[str] = "dpsgd"
    unit: ClassVar[str] = "record"

    def __post_init__(self) -> None:
        owner = "DpSgdMechanism"
        check_noise_multiplier(self.noise_multiplier, owner)
        check_positive("clip_norm", self.clip_norm, owner, why="the per-row sensitivity bound")
        check_sampling_rate(self.sampling_rate, owner)
        if (
            isinstance(self.steps_per_round, bool)
            or not isinstance(self.steps_per_round, int)
            or self.steps_per_round < 1
        ):
            raise param_error("steps_per_round", owner, "an int >= 1", self.steps_per_round)

    def round_event(self, **observed: Any) -> dpe.DpEvent:
        steps = int(observed.get("steps", self.steps_per_round))
        inner: dpe.DpEvent = dpe.GaussianDpEvent(self.noise_multiplier)
        if self.sampling_rate < 1:
            inner = dpe.PoissonSampledDpEvent(self.sampling_rate, inner)
        return dpe.SelfComposedDpEvent(inner, steps)


@dataclass(frozen=True)
class DistributedDpSgdMechanism(DpSgdMechanism):
    """Record-level DP-SGD whose noise the institutions add in shares under secure aggregation.

    Every step, each of the ``participants`` institutions Poisson-samples its rows
    with rate ``sampling_rate``, clips each row's gradient to ``clip_norm``, sums
    them and adds Gaussian noise of std ``noise_multiplier * clip_norm /
    sqrt(participants)`` (:meth:`share_std`) before masking.  Secure aggregation
    releases only the sum, which then carries std ``noise_multiplier * clip_norm``
    on the clipped sum over a Poisson sample of the *union* of rows: the event is
    the central ``PoissonSampled(q, Gaussian(σ))`` per step, with a noise-to-data
    ratio ``sqrt(k)`` times better than each institution protecting itself
    (:class:`DpSgdMechanism`).

    The price is trust, stated by :meth:`round_event`'s arguments:

    * ``survivors=s``: only ``s`` of ``k`` shares arrived (dropouts), so the sum
      carries ``σ·sqrt(s/k)``; the round is charged with that, never with σ.
    * ``colluders=m``: a coordinator that colludes with ``m`` institutions can
      subtract their shares; ε against that coalition uses ``σ·sqrt((s-m)/k)``.

    Attributes
    ----------
    participants : int
        k, the institutions whose shares make up the full noise.
    """

    participants: int = 1

    name: ClassVar[str] = "dpsgd-secagg"
    unit: ClassVar[str] = "record"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.participants, bool) or not isinstance(self.participants, int) or self.participants < 1:
            raise param_error("participants", type(self).__name__, "an int >= 1", self.participants)

    def share_std(self) -> float:
        """Std of the Gaussian noise one institution adds to its clipped sum per step."""
        return self.noise_multiplier * self.clip_norm / math.sqrt(self.participants)

    def effective_noise_multiplier(self, *, survivors: int | None = None, colluders: int = 0) -> float:
        """σ of the released sum with ``survivors`` shares, against ``colluders`` who know theirs."""
        s = self.participants if survivors is None else int(survivors)
        owner = f"{type(self).__name__}.round_event"
        if not 0 < s <= self.participants:
            raise param_error("survivors", owner, f"an int in [1, {self.participants}]", survivors)
        if not 0 <= colluders < s:
            raise param_error(
                "colluders", owner, f"an int in [0, {s - 1}] (at least one share must stay secret)", colluders
            )
        return self.noise_multiplier * math.sqrt((s - colluders) / self.participants)

    def round_event(self, **observed: Any) -> dpe.DpEvent:
        sigma = self.effective_noise_multiplier(
            survivors=observed.get("survivors"), colluders=int(observed.get("colluders", 0))
        )
        central = DpSgdMechanism(
            noise_multiplier=sigma,
            clip_norm=self.clip_norm,
            sampling_rate=self.sampling_rate,
            steps_per_round=self.steps_per_round,
        )
        return central.round_event(steps=observed.get("steps", self.steps_per_round))

    def collusion_event(self, rounds: int, *, colluders: int) -> dpe.DpEvent:
        """``rounds`` full rounds as seen by a coordinator colluding with ``colluders`` institutions."""
        return dpe.SelfComposedDpEvent(self.round_event(colluders=colluders), rounds)


# -- institution level, central noise ----------------------------------------------


@dataclass(frozen=True)
class DpFedAvgMechanism(Mechanism):
    """Institution-level DP-FedAvg with Gaussian noise on the sum of clipped updates.

    Attributes
    ----------
    noise_multiplier : float
        σ of the update sum, in units of ``clip_norm``.
    clip_norm : float
        L2 bound on one institution's update (initial bound when adaptive).
    sampling_rate : float
        Probability an institution takes part in a round (1 = all).
    adaptive : bool
        Adaptive clipping (Andrew et al. 2021): the bound follows the
        ``target_quantile`` of update norms, learnt from a noisy count of clipped
        updates; the count query is accounted as its own Gaussian event.
    count_noise_multiplier : float
        σ_b: std of the noise on the sum of centred bits ``b - 1/2 ∈ {-1/2, 1/2}``
        (one institution changes it by 1/2, so it is a Gaussian event with
        multiplier ``2 σ_b``), adaptive only.
    target_quantile, clip_lr : float
        Adaptive clipping's quantile γ and geometric step η.
    """

    noise_multiplier: float
    clip_norm: float
    sampling_rate: float = 1.0
    adaptive: bool = False
    count_noise_multiplier: float = 20.0
    target_quantile: float = 0.5
    clip_lr: float = 0.2

    name: ClassVar[str] = "dpfedavg"
    unit: ClassVar[str] = "institution"

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_noise_multiplier(self.noise_multiplier, owner)
        check_positive("clip_norm", self.clip_norm, owner, why="one institution's sensitivity bound")
        check_sampling_rate(self.sampling_rate, owner)
        if self.adaptive:
            check_noise_multiplier(self.count_noise_multiplier, owner)
            if not 0 < self.target_quantile < 1:
                raise param_error("target_quantile", owner, "a float in (0, 1)", self.target_quantile)
            check_positive("clip_lr", self.clip_lr, owner)

    def round_event(self, **observed: Any) -> dpe.DpEvent:
        events: list[dpe.DpEvent] = [dpe.GaussianDpEvent(self.noise_multiplier)]
        if self.adaptive:
            events.append(dpe.GaussianDpEvent(2.0 * self.count_noise_multiplier))
        inner: dpe.DpEvent = events[0] if len(events) == 1 else dpe.ComposedDpEvent(events)
        if self.sampling_rate < 1:
            inner = dpe.PoissonSampledDpEvent(self.sampling_rate, inner)
        return inner

    def noise_std(self) -> float:
        """Std of the Gaussian noise added to the update *sum*."""
        return self.noise_multiplier * self.clip_norm

    def add_noise(self, update_sum: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Central Gaussian noise on a clipped-update sum (plain transport)."""
        return update_sum + rng.normal(0.0, self.noise_std(), size=update_sum.shape)

    def next_clip(self, clipped_fraction_noisy: float) -> DpFedAvgMechanism:
        """Adaptive clipping's geometric update from the noisy fraction of unclipped updates."""
        if not self.adaptive:
            return self
        unclipped = 1.0 - clipped_fraction_noisy
        new = self.clip_norm * math.exp(-self.clip_lr * (unclipped - self.target_quantile))
        return replace(self, clip_norm=float(new))



# -- institution level, distributed integer noise -----------------------------------

POISSON_LAMBDA_MAX = 1e13
"""Largest λ of one numpy Poisson draw; its variance was checked to be λ within 0.1 % up to here."""
MAX_POISSON_CHUNKS = 64
"""Most Poisson(λ/m) chunks one share is drawn from (beyond this, the encoding's scale is too large)."""


@dataclass(frozen=True)
class SkellamMechanism(Mechanism):
    """Distributed Skellam noise added by each institution to its quantised update.

    Each of the ``expected_participants`` adds symmetric Skellam noise of variance
    ``(noise_multiplier * clip_norm * scale)**2 / expected_participants`` to the
    integers it masks, so a full round's sum carries variance
    ``(noise_multiplier * clip_norm * scale)**2`` in integer units.

    Accounting (Agarwal, Kairouz, Liu 2021, Thm. 3.5): the Skellam mechanism with
    total variance μ and integer sensitivities Δ₁, Δ₂ is (α, ε(α))-RDP with
    ε(α) ≤ αΔ₂²/(2μ) + 3Δ₁/(2μ) (the looser branch of the theorem's minimum), i.e.
    ρ-zCDP with ρ = Δ₂²/(2μ) plus ξ = 3Δ₁/(2μ), which dp-accounting composes as a
    ``ZCDpEvent``.  Δ₂ is the quantised clip ``clip_norm·scale`` inflated by
    unbiased stochastic rounding, bounded deterministically by ``+ sqrt(d)``, and
    Δ₁ ≤ min(Δ₂², sqrt(d)·Δ₂).  When only ``k`` of ``n`` institutions survive a
    round, μ is ``k/n`` of the planned variance and the round is charged with that
    smaller μ (no silent shortfall).  PLD cannot compose zCDP events, so the ledger's
    ε for these charges is the RDP conversion (an upper bound).
    """

    noise_multiplier: float
    clip_norm: float
    scale: float
    dimension: int
    expected_participants: int

    name: ClassVar[str] = "skellam"
    unit: ClassVar[str] = "institution"

    def __post_init__(self) -> None:
        owner = "SkellamMechanism"
        check_noise_multiplier(self.noise_multiplier, owner)
        check_positive("clip_norm", self.clip_norm, owner)
        check_positive("scale", self.scale, owner, why="integer steps per unit of the encoding")
        for name in ("dimension", "expected_participants"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise param_error(name, owner, "an int >= 1", v)

    def total_variance(self, survivors: int | None = None) -> float:
        """Integer-unit variance of the aggregate noise with ``survivors`` institutions."""
        k = self.expected_participants if survivors is None else survivors
        full = (self.noise_multiplier * self.clip_norm * self.scale) ** 2
        return full * k / self.expected_participants

    def sensitivities(self) -> tuple[float, float]:
        """(Δ₁, Δ₂) of one institution's quantised, clipped update."""
        d2 = self.clip_norm * self.scale + math.sqrt(self.dimension)
        d1 = min(d2 * d2, math.sqrt(self.dimension) * d2)
        return d1, d2

    def round_event(self, **observed: Any) -> dpe.DpEvent:
        survivors = int(observed.get("survivors", self.expected_participants))
        if survivors < 1:
            raise ConfigError("A Skellam round with no surviving institution released nothing to account.")
        mu = self.total_variance(survivors)
        d1, d2 = self.sensitivities()
        return dpe.ZCDpEvent(rho=d2 * d2 / (2 * mu), xi=3 * d1 / (2 * mu))

    def share_lambda(self, scale: float | None = None) -> float:
        """λ of each of the two Poisson draws of one institution's share (integer units)."""
        s = self.scale if scale is None else scale
        return (self.noise_multiplier * self.clip_norm * s) ** 2 / self.expected_participants / 2.0

    def noise_fn(
        self, segment: str, shape: tuple[int, ...], scale: float, rng: np.random.Generator
    ) -> np.ndarray | None:
        """The secagg noise hook: this institution's Skellam share on the update segment.

        numpy's Poisson sampler loses its variance for large λ (+0.8 % at 1e14, +40 % at 1e16),
        so a share with λ above :data:`POISSON_LAMBDA_MAX` is drawn exactly as a sum of
        Poisson(λ/m) chunks of at most that size (sums of independent Poissons are Poisson).

        Raises
        ------
        ConfigError
            More than :data:`MAX_POISSON_CHUNKS` chunks would be needed: encode with fewer
            modulus bits (a smaller scale) instead.
        """
        if segment != "update":
            return None
        # Variance in integer units of *this* encoding (``scale`` comes from the quantisation plan and
        # must equal ``self.scale``, which the accounting uses).
        lam = self.share_lambda(scale)
        chunks = max(1, math.ceil(lam / POISSON_LAMBDA_MAX))
        if chunks > MAX_POISSON_CHUNKS:
            raise ConfigError(
                f"Skellam share λ = {lam:.3g} needs {chunks} Poisson draws of at most {POISSON_LAMBDA_MAX:.0e} per "
                f"value (numpy's sampler is not exact above that); use fewer modulus bits for this encoding "
                "(a smaller scale)."
            )
        part = lam / chunks
        out = np.zeros(shape, dtype=np.int64)
        for _ in range(chunks):
            out += rng.poisson(part, size=shape).astype(np.int64) - rng.poisson(part, size=shape).astype(np.int64)
        return out

    @classmethod
    def calibrated(cls, *, target_epsilon: float, delta: float, rounds: int, **params: Any) -> Self:
        """As :meth:`Mechanism.calibrated`, with the RDP accountant (PLD cannot bound Skellam here)."""
        base = cls(noise_multiplier=1.0, **params)
        from consortium.privacy.accounting import epsilon_rdp  # noqa: PLC0415

        lo, hi = 1e-3, 1e3
        if epsilon_rdp(replace(base, noise_multiplier=hi).event(rounds), delta) > target_epsilon:
            raise param_error("target_epsilon", cls.__name__, "reachable with σ <= 1000", target_epsilon)
        for _ in range(60):
            mid = math.sqrt(lo * hi)
            if epsilon_rdp(replace(base, noise_multiplier=mid).event(rounds), delta) > target_epsilon:
                lo = mid
            else:
                hi = mid
        return replace(base, noise_multiplier=hi)


# -- registry ----------------------------------------------------------------------

_BUILTIN: dict[str, type[Mechanism]] = {
    "dpsgd": DpSgdMechanism,
    "dpsgd-secagg": DistributedDpSgdMechanism,
    "dpfedavg": DpFedAvgMechanism,
    "skellam": SkellamMechanism,
}


class MechanismRegistry:
    """Name → mechanism class; unknown names list the known ones."""

    def __init__(self) -> None:
        self._classes: dict[str, type[Mechanism]] = dict(_BUILTIN)

    def register(self, name: str, cls: type[Mechanism], *, force: bool = False) -> None:
        if name in self._classes and not force:
            raise ConfigError(f"Mechanism '{name}' is already registered; pass force=True to replace it.")
        if not (isinstance(cls, type) and issubclass(cls, Mechanism)):
            raise param_error("cls", "register_mechanism", "a Mechanism subclass", cls)
        self._classes[name] = cls

    def get(self, name: str) -> type[Mechanism]:
        if name not in self._classes:
            raise ConfigError(f"Unknown privacy mechanism '{name}'. Known: {sorted(self._classes)} (or 'none').")
        return self._classes[name]

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._classes))


DEFAULT_REGISTRY = MechanismRegistry()
"""The registry ``create_mechanism`` uses; extensions register into it at import."""


def register_mechanism(name: str, cls: type[Mechanism], *, force: bool = False) -> None:
    """Make ``cls`` selectable as ``--dp name``."""
    DEFAULT_REGISTRY.register(name, cls, force=force)


def known_mechanisms() -> tuple[str, ...]:
    """Registered mechanism names."""
    return DEFAULT_REGISTRY.names()


def create_mechanism(
    name: str,
    *,
    target_epsilon: float | None = None,
    delta: float | None = None,
    rounds: int = 1,
    params: Mapping[str, Any],
) -> Mechanism:
    """Build mechanism ``name`` from explicit parameters, or calibrated to ``target_epsilon``."""
    cls = DEFAULT_REGISTRY.get(name)
    if target_epsilon is None:
        return cls(**params)
    if delta is None:
        raise param_error("delta", "create_mechanism", "a float when target_epsilon is given", delta)
    return cls.calibrated(target_epsilon=target_epsilon, delta=delta, rounds=rounds, **params)
