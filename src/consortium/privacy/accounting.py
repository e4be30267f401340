"""Privacy accounting: DpEvents in, (ε, δ) out, computed by ``dp-accounting``.

Every mechanism in :mod:`consortium.privacy.mechanisms` describes what it did as
a :class:`dp_accounting.DpEvent`; this module composes events and turns them into
ε at a given δ.  The privacy loss distribution (PLD) accountant is the primary
number (tight); the RDP accountant is reported beside it (looser, but a second,
independent method).  Events are serialised to plain JSON (:func:`event_to_dict`)
so that the ledger can store them and recompose them after a restart.

Noise calibration (:func:`calibrate_noise_multiplier`) searches the smallest
noise multiplier whose ε does not exceed the target, and then re-checks the
result with the fine PLD accountant: a calibrated σ never overshoots.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from dp_accounting import dp_event as dpe
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from consortium.errors import ConfigError, param_error

# dp-accounting's RDP accountant logs a warning for every order whose series does not
# converge (it then excludes that order, which only makes ε more conservative); in a
# calibration that is hundreds of lines per run, none of them actionable.
logging.getLogger("absl").setLevel(logging.ERROR)

__all__ = [
    "PrivacyEstimate",
    "calibrate_noise_multiplier",
    "check_delta",
    "check_noise_multiplier",
    "check_positive",
    "check_sampling_rate",
    "compose",
    "default_delta",
    "dpsgd_event",
    "epsilon_pld",
    "epsilon_rdp",
    "estimate",
    "event_from_dict",
    "event_to_dict",
]

PLD_DISCRETIZATION = 1e-4
"""Value discretisation of the reported PLD ε (dp-accounting's default)."""

MAX_NOISE_MULTIPLIER = 1_000.0
"""Calibration gives up above this σ: the target ε is then called unreachable."""


@dataclass(frozen=True)
class PrivacyEstimate:
    """ε at one δ by both accountants.

    Attributes
    ----------
    epsilon : float
        PLD accountant (the number consortium reports).
    epsilon_rdp : float
        RDP accountant, for comparison (never smaller up to discretisation).
    delta : float
        The δ both are computed at.
    """

    epsilon: float
    epsilon_rdp: float
    delta: float


# -- validation ----------------------------------------------------------------------


def _finite(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(float(value))


def check_noise_multiplier(value: object, owner: str) -> float:
    """σ must be a finite float > 0 (σ = 0 releases unnoised gradients: no guarantee)."""
    if not _finite(value) or float(value) <= 0:  # type: ignore[arg-type]
        raise param_error(
            "noise_multiplier", owner, "a finite float > 0 (without noise there is no DP guarantee)", value
        )
    return float(value)  # type: ignore[arg-type]


def check_positive(name: str, value: object, owner: str, *, why: str = "") -> float:
    """A finite float > 0 (clipping norms, budgets)."""
    if not _finite(value) or float(value) <= 0:  # type: ignore[arg-type]
        expected = "a finite float > 0" + (f" ({why})" if why else "")
        raise param_error(name, owner, expected, value)
    return float(value)  # type: ignore[arg-type]


def check_sampling_rate(value: object, owner: str, name: str = "sampling_rate") -> float:
    """Poisson sampling rate q in (0, 1]."""
    if not _finite(value) or not 0 < float(value) <= 1:  # type: ignore[arg-type]
        raise param_error(name, owner, "a float in (0, 1] (Poisson sampling probability)", value)
    return float(value)  # type: ignore[arg-type]


def check_delta(delta: object, owner: str, *, n_protected: int | None = None) -> float:
    """δ in (0, 1), and δ < 1/n when the protected unit count n is known.

    δ ≥ 1/n allows a mechanism that publishes one whole record in the clear
    and still claims (0, δ)-DP, so it is refused.
    """
    if not _finite(delta) or not 0 < float(delta) < 1:  # type: ignore[arg-type]
        raise param_error("delta", owner, "a float in (0, 1)", delta)
    d = float(delta)  # type: ignore[arg-type]
    if n_protected is not None:
        if n_protected < 1:
            raise param_error("n_protected", owner, "an int >= 1", n_protected)
        if d >= 1.0 / n_protected:
            raise param_error(
                "delta",
                owner,
                f"< 1/n = {1.0 / n_protected:.3g} for n = {n_protected} protected units "
                "(δ >= 1/n permits publishing a whole record in the clear)",
                d,
            )
    return d


def default_delta(n_protected: int) -> float:
    """δ = 1/(10·n) of the protected unit count."""
    if n_protected < 1:
        raise param_error("n_protected", "default_delta", "an int >= 1", n_protected)
    return 1.0 / (10.0 * n_protected)


# -- events --------------------------------------------------------------------------


def dpsgd_event(*, noise_multiplier: float, sampling_rate: float, steps: int) -> dpe.DpEvent:
    """``steps`` compositions of the Poisson-sampled Gaussian mechanism."""
    owner = "dpsgd_event"
    sigma = check_noise_multiplier(noise_multiplier, owner)
    q = check_sampling_rate(sampling_rate, owner)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise param_error("steps", owner, "an int >= 1", steps)
    inner: dpe.DpEvent = dpe.GaussianDpEvent(sigma)
    if q < 1:
        inner = dpe.PoissonSampledDpEvent(q, inner)
    return dpe.SelfComposedDpEvent(inner, steps)


def compose(events: Iterable[dpe.DpEvent]) -> dpe.DpEvent:
    """One event for a sequence of events (a NoOp when empty)."""
    items = [e for e in events if not isinstance(e, dpe.NoOpDpEvent)]
    if not items:
        return dpe.NoOpDpEvent()
    if len(items) == 1:
        return items[0]
    return dpe.ComposedDpEvent(items)


def event_to_dict(event: dpe.DpEvent) -> dict[str, Any]:
    """JSON form of the DpEvents consortium uses (inverse of :func:`event_from_dict`)."""
    if isinstance(event, dpe.NoOpDpEvent):
        return {"type": "noop"}
    if isinstance(event, dpe.GaussianDpEvent):
        return {"type": "gaussian", "noise_multiplier": float(event.noise_multiplier)}
    if isinstance(event, dpe.LaplaceDpEvent):
        return {"type": "laplace", "noise_multiplier": float(event.noise_multiplier)}
    if isinstance(event, dpe.PoissonSampledDpEvent):
        return {
            "type": "poisson",
            "sampling_probability": float(event.sampling_probability),
            "event": event_to_dict(event.event),
        }
    if isinstance(event, dpe.SelfComposedDpEvent):
        return {"type": "self_composed", "count": int(event.count), "event": event_to_dict(event.event)}
    if isinstance(event, dpe.ComposedDpEvent):
        return {"type": "composed", "events": [event_to_dict(e) for e in event.events]}
    if isinstance(event, dpe.NonPrivateDpEvent):
        return {"type": "non_private"}
    if isinstance(event, dpe.ZCDpEvent):
        return {"type": "zcdp", "rho": float(event.rho), "xi": float(event.xi)}
    raise ConfigError(f"The DpEvent {type(event).__name__} cannot be stored in the privacy ledger.")


def event_from_dict(data: Mapping[str, Any]) -> dpe.DpEvent:
    """Rebuild a DpEvent from :func:`event_to_dict` output."""
    kind = data.get("type")
    builders: dict[str, Callable[[], dpe.DpEvent]] = {
        "noop": dpe.NoOpDpEvent,
        "non_private": dpe.NonPrivateDpEvent,
        "gaussian": lambda: dpe.GaussianDpEvent(float(data["noise_multiplier"])),
        "laplace": lambda: dpe.LaplaceDpEvent(float(data["noise_multiplier"])),
        "poisson": lambda: dpe.PoissonSampledDpEvent(
            float(data["sampling_probability"]), event_from_dict(data["event"])
        ),
        "self_composed": lambda: dpe.SelfComposedDpEvent(event_from_dict(data["event"]), int(data["count"])),
        "composed": lambda: dpe.ComposedDpEvent([event_from_dict(e) for e in data["events"]]),
    }
    builders["zcdp"] = lambda: dpe.ZCDpEvent(rho=float(data["rho"]), xi=float(data.get("xi", 0.0)))
    if kind not in builders:
        raise ConfigError(f"Unknown stored DpEvent type {kind!r}; known: {sorted(builders)}.")
    return builders[str(kind)]()


# -- ε -------------------------------------------------------------------------------


def epsilon_pld(event: dpe.DpEvent, delta: float, *, discretization: float = PLD_DISCRETIZATION) -> float:
    """ε of ``event`` at ``delta`` by the PLD accountant (add-or-remove-one)."""
    if isinstance(event, dpe.NoOpDpEvent):
        return 0.0
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=discretization)
    if not acc.supports(event):
        # zCDP events (distributed Skellam) have no PLD: the RDP conversion is the honest bound.
        return epsilon_rdp(event, delta)
    acc.compose(event)
    return float(acc.get_epsilon(delta))


def epsilon_rdp(event: dpe.DpEvent, delta: float) -> float:
    """ε of ``event`` at ``delta`` by the RDP accountant."""
    if isinstance(event, dpe.NoOpDpEvent):
        return 0.0
    acc = rdp_privacy_accountant.RdpAccountant()
    acc.compose(event)
    return float(acc.get_epsilon(delta))


def estimate(event: dpe.DpEvent, delta: float) -> PrivacyEstimate:
    """Both accountants' ε for ``event`` at ``delta``."""
    check_delta(delta, "estimate")
    return PrivacyEstimate(epsilon=epsilon_pld(event, delta), epsilon_rdp=epsilon_rdp(event, delta), delta=delta)


def calibrate_noise_multiplier(
    make_event: Callable[[float], dpe.DpEvent],
    *,
    target_epsilon: float,
    delta: float,
    max_noise_multiplier: float = MAX_NOISE_MULTIPLIER,
    owner: str = "calibrate_noise_multiplier",
) -> float:
    """Smallest σ (to 0.1 %) whose PLD ε at ``delta`` is at most ``target_epsilon``.

    The bisection runs with a coarse (pessimistic) PLD grid and the result is
    then checked with the fine grid, stepping σ up until the reported ε is within
    budget, so the returned σ never overshoots the target.

    Raises
    ------
    ConfigError
        Target ε not > 0, δ invalid, or unreachable with σ ≤ ``max_noise_multiplier``
        (the message says what would help).
    """
    target = check_positive("target_epsilon", target_epsilon, owner)
    check_delta(delta, owner)
    if epsilon_pld(make_event(max_noise_multiplier), delta, discretization=1e-3) > target:
        raise param_error(
            "target_epsilon",
            owner,
            f"reachable with a noise multiplier <= {max_noise_multiplier:g} (fewer steps/rounds, a "
            "lower sampling rate or a larger δ would help)",
            target_epsilon,
        )

    # 1. RDP bisection (fast, a little pessimistic) brackets the answer from above.
    lo, hi = 1e-2, max_noise_multiplier
    for _ in range(40):
        mid = math.sqrt(lo * hi)
        if epsilon_rdp(make_event(mid), delta) > target:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1.001:
            break
    # 2. Coarse (pessimistic) PLD bisection below it: PLD is tighter, so σ shrinks.
    lo, hi = hi / 2.0, hi
    if epsilon_pld(make_event(lo), delta, discretization=1e-3) <= target:
        lo = lo / 2.0
    while hi / lo > 1.001:
        mid = math.sqrt(lo * hi)
        if epsilon_pld(make_event(mid), delta, discretization=1e-3) > target:
            lo = mid
        else:
            hi = mid
    sigma = hi
    # 3. The reported (fine) ε must be within budget: step up until it is.
    for _ in range(200):
        if epsilon_pld(make_event(sigma), delta) <= target:
            return sigma
        sigma *= 1.001
    raise ConfigError(f"Noise calibration did not converge for target ε = {target}; report this as a bug.")
