"""Differential privacy for federated boosting: Gaussian noise on every summed histogram.

Mechanism (per tree level, and once for binning): every institution adds
Gaussian noise of standard deviation ``z * sensitivity / sqrt(n_institutions)`` to
each entry of the vector it contributes, *before* secure aggregation masks it;
the sum the coordinator unmasks therefore carries noise of standard deviation
``z * sensitivity`` (distributed Gaussian; it assumes the institutions follow
the protocol, and every level needs all of them, so the full noise is present).

Sensitivity (one training row added or removed), in the units institutions send
(gradients and hessians divided by the largest class weight, so ``|g| <= 1``,
``0 <= h <= 1/4``): a row sits in exactly one node per level and in one bin per
feature, so one level changes ``d`` gradient, ``d`` hessian and ``d`` count
entries: ``sqrt(d * (1 + 1/16 + 1))``. Binning: one count per feature,
``sqrt(d)``. A validation row changes one histogram bin, the capped loss and the
weight term by at most 1 each: ``sqrt(3)``, below the level sensitivity, and
validation rows are disjoint from training rows. Each release is a Gaussian
mechanism with noise multiplier ``z``; a run composes ``n_trees * max_depth + 2``
of them (:func:`histogram_event`), which the privacy layer's PLD accountant turns
into ε and :func:`charge_run` writes to the privacy ledger. Choosing which
nodes to request and early stopping are post-processing of noisy sums.

Not covered: the federated count, positive count and feature means / standard
deviations of the standardisation round travel as exact secure sums without
noise (as in the MLP pipeline); see docs/gbdt.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from dp_accounting import dp_event as dpe

from consortium.errors import param_error
from consortium.models.gbdt import GBDTParams
from consortium.privacy.accounting import calibrate_noise_multiplier, estimate
from consortium.registry import RunStore

MECHANISM = "gbdt-histogram-gaussian"


def level_sensitivity(n_features: int) -> float:
    """L2 sensitivity of one level's histograms (units: g / max weight, h / max weight, counts)."""
    return math.sqrt(n_features * (1.0 + 1.0 / 16.0 + 1.0))


def releases(params: GBDTParams) -> int:
    """Gaussian releases a run can make at most: every level of every tree, binning, final validation."""
    return params.n_trees * params.max_depth + 2


def histogram_event(noise_multiplier: float, n_releases: int) -> dpe.DpEvent:
    """The run's privacy event: ``n_releases`` Gaussian mechanisms with multiplier ``z``."""
    return dpe.SelfComposedDpEvent(dpe.GaussianDpEvent(noise_multiplier), int(n_releases))


@dataclass(frozen=True)
class HistogramDP:
    """Calibrated noise for one run.

    Attributes
    ----------
    noise_multiplier : float
        ``z``: noise standard deviation over sensitivity, per release.
    level_std : float
        Standard deviation of the noise in each summed level histogram entry.
    binning_std : float
        Standard deviation of the noise in each summed binning count.
    target_epsilon, delta : float
        The guarantee the calibration meets (for the planned number of releases).
    n_releases : int
        Planned releases (upper bound; early stopping spends fewer).
    """

    noise_multiplier: float
    level_std: float
    binning_std: float
    target_epsilon: float
    delta: float
    n_releases: int

    def per_institution(self, std: float, n_institutions: int) -> float:
        """Each institution's share of the noise: ``std / sqrt(n)``."""
        return std / math.sqrt(max(n_institutions, 1))

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def calibrate(params: GBDTParams, *, n_features: int, epsilon: float, delta: float) -> HistogramDP:
    """The smallest noise whose composed ε over the run's planned releases is at most ``epsilon``."""
    if not isinstance(n_features, int) or n_features < 1:
        raise param_error("n_features", "gbdt_privacy.calibrate", "an int >= 1", n_features)
    n = releases(params)
    z = calibrate_noise_multiplier(lambda s: histogram_event(s, n), target_epsilon=epsilon, delta=delta,
                                   owner="gbdt_privacy.calibrate")
    return HistogramDP(noise_multiplier=z, level_std=z * level_sensitivity(n_features),
                       binning_std=z * math.sqrt(n_features), target_epsilon=float(epsilon), delta=float(delta),
                       n_releases=n)


def spent(dp: HistogramDP, n_releases: int) -> float:
    """ε actually spent after ``n_releases`` releases (PLD)."""
    return estimate(histogram_event(dp.noise_multiplier, n_releases), dp.delta).epsilon


def charge_run(store: RunStore, *, run_id: str, institutions: tuple[str, ...], dp: HistogramDP,
               n_releases: int, budget_epsilon: float | None = None) -> float:
    """Charge every institution's ledger for the releases the run made; return the run's ε."""
    from consortium.privacy.ledger import PrivacyLedger  # noqa: PLC0415

    ledger = PrivacyLedger(store)
    event = histogram_event(dp.noise_multiplier, n_releases)
    for inst in institutions:
        ledger.charge(run_id=run_id, institution=inst, data_id=inst, round=1, mechanism=MECHANISM, event=event,
                      delta=dp.delta, budget_epsilon=budget_epsilon,
                      params={"noise_multiplier": dp.noise_multiplier, "releases": n_releases})
    return spent(dp, n_releases)
