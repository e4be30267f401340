"""Per-feature distribution shift between a reference window and a current window.

Two complementary statistics are computed for every feature:

* the **population stability index** (PSI), ``sum((c - r) * ln(c / r))`` over
  bins cut at the reference's quantiles — an effect size that does not grow with
  the window (credit-scoring practice: < 0.1 stable, 0.1-0.25 moderate, > 0.25
  large);
* the **two-sample Kolmogorov-Smirnov test** — a significance test whose
  p-value says whether the difference could be chance at this window size.

A feature is flagged only when *both* agree (PSI above its threshold and KS
p-value below ``alpha`` divided by the number of features, Bonferroni): large
windows make every tiny, harmless shift "significant", and small windows make
PSI noisy; requiring both keeps the false-alarm rate on stationary data low
(measured in ``benchmarks/drift.py`` and ``tests/test_continual_detectors.py``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy import stats

from consortium.continual.errors import DriftInputError
from consortium.errors import param_error

logger = logging.getLogger(__name__)

DriftStatus = Literal["ok", "warning", "drift"]
"""Verdict of one window: nothing, a moderate shift, or a confirmed shift."""

MIN_WINDOW_ROWS = 100
"""Fewer rows than this make both PSI and KS meaningless; windows this small are refused."""
PSI_EPS = 1e-4
"""Bin shares are floored at this so that an empty bin gives a large but finite PSI."""


def _check_real(value: object, name: str, owner: str, *, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise param_error(name, owner, f"a number in ({low}, {high})", value)
    v = float(value)
    if not (low < v < high):
        raise param_error(name, owner, f"a number in ({low}, {high})", value)
    return v


def _as_vector(values: object, *, name: str, owner: str, min_rows: int) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise DriftInputError(f"The '{name}' window of {owner} must be 1-D. Got shape {arr.shape} instead.")
    arr = arr[np.isfinite(arr)]
    if arr.size < min_rows:
        raise DriftInputError(
            f"The '{name}' window of {owner} must hold at least {min_rows} finite values. "
            f"Got {arr.size} instead."
        )
    return arr


def quantile_edges(reference: np.ndarray, *, bins: int = 10) -> np.ndarray:
    """Interior bin edges at the reference's quantiles, duplicates removed.

    A constant feature gets the single edge at its value, i.e. two bins: "equal
    to the reference value" and "above it" (and values below fall in the first).
    """
    qs = np.quantile(reference, np.linspace(0.0, 1.0, bins + 1)[1:-1])
    edges = np.unique(qs)
    if edges.size == 0:
        edges = np.array([float(reference[0])])
    return edges


def bin_shares(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Share of ``values`` in each of the ``len(edges) + 1`` bins (bin i holds ``edges[i-1] < x <= edges[i]``)."""
    idx = np.searchsorted(edges, values, side="left")
    counts = np.bincount(idx, minlength=edges.size + 1).astype(np.float64)
    return counts / max(values.size, 1)


def psi_from_shares(reference: np.ndarray, current: np.ndarray) -> float:
    """PSI of two share vectors over the same bins (shares floored at :data:`PSI_EPS`)."""
    r = np.maximum(reference, PSI_EPS)
    c = np.maximum(current, PSI_EPS)
    return float(np.sum((c - r) * np.log(c / r)))


def population_stability_index(
    reference: np.ndarray, current: np.ndarray, *, bins: int = 10, min_rows: int = MIN_WINDOW_ROWS
) -> float:
    """PSI of one feature between a reference and a current window.

    Parameters
    ----------
    reference, current : numpy.ndarray
        1-D samples; non-finite values are ignored.
    bins : int
        Number of reference-quantile bins (>= 2).
    min_rows : int
        Smallest window accepted.

    Returns
    -------
    float
        >= 0; about ``(bins - 1) * (1/n_ref + 1/n_cur)`` by chance alone.

    Raises
    ------
    DriftInputError
        A window with fewer than ``min_rows`` finite values, or not 1-D.
    """
    owner = "population_stability_index"
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
        raise param_error("bins", owner, "an int >= 2", bins)
    ref = _as_vector(reference, name="reference", owner=owner, min_rows=min_rows)
    cur = _as_vector(current, name="current", owner=owner, min_rows=min_rows)
    edges = quantile_edges(ref, bins=bins)
    return psi_from_shares(bin_shares(ref, edges), bin_shares(cur, edges))


def ks_test(reference: np.ndarray, current: np.ndarray, *, min_rows: int = MIN_WINDOW_ROWS) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov statistic and (asymptotic) p-value of one feature."""
    owner = "ks_test"
    ref = _as_vector(reference, name="reference", owner=owner, min_rows=min_rows)
    cur = _as_vector(current, name="current", owner=owner, min_rows=min_rows)
    res = stats.ks_2samp(ref, cur, method="asymp")
    return float(res.statistic), float(res.pvalue)


@dataclass(frozen=True)
class FeatureDriftResult:
    """Outcome of testing one window against the reference.

    Attributes
    ----------
    status : {"ok", "warning", "drift"}
        ``"drift"`` if any feature passed both the PSI threshold and the
        corrected KS test, ``"warning"`` if any passed the warning PSI and the test.
    psi, ks_statistic, ks_pvalue : dict
        Per monitored feature.
    drifted, warned : tuple of str
        Features at the drift / warning level.
    n_rows : int
        Finite rows of the window that were tested.
    dropped_rows : int
        Rows of the window with a NaN/inf value (ignored, counted).
    constant_features : tuple of str
        Features constant in the reference (tested on the share of other values).
    """

    status: DriftStatus
    psi: dict[str, float]
    ks_statistic: dict[str, float]
    ks_pvalue: dict[str, float]
    drifted: tuple[str, ...]
    warned: tuple[str, ...]
    n_rows: int
    dropped_rows: int = 0
    constant_features: tuple[str, ...] = field(default_factory=tuple)

    @property
    def max_psi(self) -> float:
        """Largest PSI over the monitored features."""
        return max(self.psi.values()) if self.psi else 0.0

    def statistics(self, *, prefix: str = "") -> dict[str, float]:
        """Flat ``{name: value}`` statistics for a :class:`~consortium.edge.messages.DriftReport`."""
        out = {f"{prefix}psi.{k}": v for k, v in self.psi.items() if k in self.warned or k in self.drifted}
        out[f"{prefix}max_psi"] = self.max_psi
        out[f"{prefix}n_drifted"] = float(len(self.drifted))
        out[f"{prefix}n_rows"] = float(self.n_rows)
        return out


class FeatureDriftDetector:
    """PSI + KS drift test of windows of a feature matrix against a fixed reference.

    Parameters
    ----------
    reference : numpy.ndarray
        ``(n, d)`` reference window (e.g. the validation rows the deployed model
        was chosen on); rows with NaN/inf are dropped.
    feature_names : sequence of str, optional
        Names of the ``d`` columns (default ``f0 .. f{d-1}``).
    bins : int
        Quantile bins of the PSI.
    psi_threshold, psi_warning : float
        PSI at which a (significant) feature counts as drifted / as a warning.
    alpha : float
        Family-wise significance level of the KS tests (divided by ``d``).
    min_rows : int
        Smallest reference and window accepted.
    exclude : sequence of str
        Features not to monitor (e.g. calendar features when windows are
        shorter than a week).

    Raises
    ------
    DriftInputError
        Reference not 2-D, smaller than ``min_rows`` after dropping bad rows, or
        with every monitored feature constant (nothing to learn a distribution from).
    """

    def __init__(
        self,
        reference: np.ndarray,
        *,
        feature_names: Sequence[str] | None = None,
        bins: int = 10,
        psi_threshold: float = 0.2,
        psi_warning: float = 0.1,
        alpha: float = 0.01,
        min_rows: int = MIN_WINDOW_ROWS,
        exclude: Sequence[str] = (),
    ) -> None:
        owner = "FeatureDriftDetector"
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
            raise param_error("bins", owner, "an int >= 2", bins)
        if isinstance(min_rows, bool) or not isinstance(min_rows, int) or min_rows < 10:
            raise param_error("min_rows", owner, "an int >= 10", min_rows)
        self.psi_threshold = _check_real(psi_threshold, "psi_threshold", owner, low=0.0)
        self.psi_warning = _check_real(psi_warning, "psi_warning", owner, low=0.0, high=self.psi_threshold + 1e-12)
        self.alpha = _check_real(alpha, "alpha", owner, low=0.0, high=1.0)
        self.bins = bins
        self.min_rows = min_rows
        ref = np.asarray(reference, dtype=np.float64)
        if ref.ndim != 2:
            raise DriftInputError(f"The 'reference' of {owner} must be a 2-D matrix. Got shape {ref.shape} instead.")
        d = ref.shape[1]
        names = tuple(feature_names) if feature_names is not None else tuple(f"f{i}" for i in range(d))
        if len(names) != d:
            raise DriftInputError(
                f"The 'feature_names' of {owner} must name the {d} reference columns. Got {len(names)} names instead."
            )
        unknown = [f for f in exclude if f not in names]
        if unknown:
            raise param_error("exclude", owner, f"feature names among {list(names)[:6]}...", unknown)
        ref = ref[np.isfinite(ref).all(axis=1)]
        if ref.shape[0] < min_rows:
            raise DriftInputError(
                f"The 'reference' window of {owner} must hold at least {min_rows} finite rows. "
                f"Got {ref.shape[0]} instead."
            )
        self.feature_names = names
        self.columns = [j for j, n in enumerate(names) if n not in set(exclude)]
        self.constant_features = tuple(names[j] for j in self.columns if np.ptp(ref[:, j]) == 0.0)
        if len(self.constant_features) == len(self.columns):
            raise DriftInputError(
                f"Every monitored feature of the {owner} reference is constant "
                f"({list(self.constant_features)[:6]}); a reference must vary to describe a distribution."
            )
        if self.constant_features:
            logger.info("reference has constant features %s (tested on the share of other values)",
                        list(self.constant_features))
        self._reference = ref[:, self.columns]
        self._edges = [quantile_edges(self._reference[:, k], bins=bins) for k in range(len(self.columns))]
        self._ref_shares = [bin_shares(self._reference[:, k], e) for k, e in enumerate(self._edges)]

    @property
    def n_features(self) -> int:
        """Width of the matrices this detector accepts."""
        return len(self.feature_names)

    def test(self, window: np.ndarray) -> FeatureDriftResult:
        """Test one ``(m, d)`` window; rows with NaN/inf are dropped and counted.

        Raises
        ------
        DriftInputError
            Window not ``(m, d)`` or fewer than ``min_rows`` finite rows.
        """
        owner = "FeatureDriftDetector.test"
        win = np.asarray(window, dtype=np.float64)
        if win.ndim != 2 or win.shape[1] != self.n_features:
            raise DriftInputError(
                f"The 'window' of {owner} must have shape (rows, {self.n_features}). Got {win.shape} instead."
            )
        finite = np.isfinite(win).all(axis=1)
        dropped = int((~finite).sum())
        win = win[finite][:, self.columns]
        if win.shape[0] < self.min_rows:
            raise DriftInputError(
                f"The 'window' of {owner} must hold at least {self.min_rows} finite rows. Got {win.shape[0]} "
                f"instead ({dropped} dropped for NaN/inf)."
            )
        level = self.alpha / len(self.columns)
        psi: dict[str, float] = {}
        ks_stat: dict[str, float] = {}
        ks_p: dict[str, float] = {}
        drifted: list[str] = []
        warned: list[str] = []
        for k, j in enumerate(self.columns):
            name = self.feature_names[j]
            value = psi_from_shares(self._ref_shares[k], bin_shares(win[:, k], self._edges[k]))
            res = stats.ks_2samp(self._reference[:, k], win[:, k], method="asymp")
            psi[name], ks_stat[name], ks_p[name] = value, float(res.statistic), float(res.pvalue)
            significant = ks_p[name] < level
            if significant and value >= self.psi_threshold:
                drifted.append(name)
            elif significant and value >= self.psi_warning:
                warned.append(name)
        status: DriftStatus = "drift" if drifted else "warning" if warned else "ok"
        return FeatureDriftResult(
            status=status,
            psi=psi,
            ks_statistic=ks_stat,
            ks_pvalue=ks_p,
            drifted=tuple(drifted),
            warned=tuple(warned),
            n_rows=int(win.shape[0]),
            dropped_rows=dropped,
            constant_features=self.constant_features,
        )


class ScoreDriftDetector:
    """PSI + KS test of the model's score distribution, plus the alert-rate change.

    The score is what the edge sees without labels and what the threshold acts
    on: a shifted score distribution moves the alert rate even when no single
    feature moved much.

    Parameters
    ----------
    reference_scores : numpy.ndarray
        Scores of the reference window.
    threshold : float, optional
        Decision threshold, to report the reference and current alert rates.
    bins, psi_threshold, psi_warning, alpha, min_rows :
        As for :class:`FeatureDriftDetector`.
    """

    def __init__(
        self,
        reference_scores: np.ndarray,
        *,
        threshold: float | None = None,
        bins: int = 10,
        psi_threshold: float = 0.2,
        psi_warning: float = 0.1,
        alpha: float = 0.01,
        min_rows: int = MIN_WINDOW_ROWS,
    ) -> None:
        ref = np.asarray(reference_scores, dtype=np.float64).reshape(-1, 1)
        self._inner = FeatureDriftDetector(
            ref, feature_names=("score",), bins=bins, psi_threshold=psi_threshold, psi_warning=psi_warning,
            alpha=alpha, min_rows=min_rows,
        )
        self.threshold = threshold
        finite = ref[np.isfinite(ref[:, 0]), 0]
        self.reference_alert_rate = float(np.mean(finite >= threshold)) if threshold is not None else math.nan

    def test(self, scores: np.ndarray) -> FeatureDriftResult:
        """Test a window of scores (1-D)."""
        arr = np.asarray(scores, dtype=np.float64)
        if arr.ndim != 1:
            raise DriftInputError(f"The 'scores' of ScoreDriftDetector.test must be 1-D. Got shape {arr.shape}.")
        return self._inner.test(arr.reshape(-1, 1))

    def alert_rate(self, scores: np.ndarray) -> float:
        """Share of finite ``scores`` at or above the threshold (NaN without a threshold)."""
        arr = np.asarray(scores, dtype=np.float64)
        arr = arr[np.isfinite(arr)]
        if self.threshold is None or arr.size == 0:
            return math.nan
        return float(np.mean(arr >= self.threshold))
