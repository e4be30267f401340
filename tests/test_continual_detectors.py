"""Drift detectors: they fire on real shifts, stay quiet on stationary data (measured), and refuse bad input clearly."""

from __future__ import annotations

import numpy as np
import pytest

from consortium.continual import (
    DelayedLabelMonitor,
    DriftInputError,
    FeatureDriftDetector,
    ScoreDriftDetector,
    ks_test,
    population_stability_index,
)
from consortium.data import FEATURE_NAMES, generate_federation
from consortium.errors import ConfigError


def _stationary(rng: np.random.Generator, n: int, d: int = 5) -> np.ndarray:
    X = rng.normal(size=(n, d))
    X[:, 1] = rng.exponential(2.0, size=n)  # skewed, like amounts
    X[:, 2] = rng.random(n) < 0.3  # binary, like is_night
    return X


def test_psi_is_small_for_same_distribution_and_large_for_a_shift() -> None:
    rng = np.random.default_rng(0)
    ref, same = rng.normal(size=5000), rng.normal(size=5000)
    assert population_stability_index(ref, same) < 0.02
    assert population_stability_index(ref, rng.normal(1.0, 1.0, size=5000)) > 0.5
    stat, p = ks_test(ref, rng.normal(0.3, 1.0, size=5000))
    assert stat > 0.08 and p < 1e-10


def test_feature_detector_false_alarm_rate_on_stationary_windows_is_below_alpha() -> None:
    """200 stationary windows against one reference: measured false-alarm rate (documented in docs/continual.md)."""
    rng = np.random.default_rng(1)
    det = FeatureDriftDetector(_stationary(rng, 5000), alpha=0.01)
    statuses = [det.test(_stationary(rng, 1000)).status for _ in range(200)]
    assert statuses.count("drift") / 200 <= 0.01
    assert (200 - statuses.count("ok")) / 200 <= 0.02


def test_feature_detector_names_the_shifted_feature() -> None:
    rng = np.random.default_rng(2)
    det = FeatureDriftDetector(_stationary(rng, 5000), feature_names=["a", "amount", "night", "d", "e"])
    window = _stationary(rng, 2000)
    window[:, 1] *= 1.8  # customers spend more
    res = det.test(window)
    assert res.status == "drift" and res.drifted == ("amount",)
    assert res.psi["amount"] > 0.2 and res.ks_pvalue["amount"] < 1e-6
    assert res.statistics()["n_drifted"] == 1.0


def test_constant_reference_feature_is_reported_and_still_watched() -> None:
    rng = np.random.default_rng(3)
    ref = _stationary(rng, 3000)
    ref[:, 4] = 0.0
    det = FeatureDriftDetector(ref)
    assert det.constant_features == ("f4",)
    win = _stationary(rng, 1000)
    win[:, 4] = 0.0
    assert det.test(win).status == "ok"
    win[:300, 4] = 1.0  # the constant starts to vary: a drift
    assert "f4" in det.test(win).drifted


def test_bad_windows_get_clear_errors() -> None:
    rng = np.random.default_rng(4)
    with pytest.raises(DriftInputError, match="at least 100 finite rows. Got 50"):
        FeatureDriftDetector(_stationary(rng, 50))
    with pytest.raises(DriftInputError, match="Every monitored feature .* is constant"):
        FeatureDriftDetector(np.ones((500, 3)))
    det = FeatureDriftDetector(_stationary(rng, 1000))
    with pytest.raises(DriftInputError, match=r"shape \(rows, 5\). Got \(200, 4\)"):
        det.test(_stationary(rng, 200, d=4))
    win = _stationary(rng, 150)
    win[:100, 0] = np.nan
    with pytest.raises(DriftInputError, match="at least 100 finite rows. Got 50 instead \\(100 dropped"):
        det.test(win)
    with pytest.raises(ConfigError, match="'alpha' parameter of FeatureDriftDetector"):
        FeatureDriftDetector(_stationary(rng, 500), alpha=2.0)
    with pytest.raises(DriftInputError, match="at least 100 finite values"):
        population_stability_index(np.zeros(10), np.zeros(500))


def test_score_detector_sees_a_score_shift_and_reports_alert_rates() -> None:
    rng = np.random.default_rng(5)
    ref = rng.beta(1, 30, size=5000)
    det = ScoreDriftDetector(ref, threshold=0.1)
    assert det.test(rng.beta(1, 30, size=2000)).status == "ok"
    shifted = rng.beta(1.5, 20, size=2000)
    assert det.test(shifted).status == "drift"
    assert det.alert_rate(shifted) > 2 * det.reference_alert_rate


def test_no_false_alarm_on_stationary_synthetic_weeks() -> None:
    """Day-aligned weekly windows of the generator's stationary period, 5 institutions x 4 weeks."""
    fed = generate_federation(5, transactions_per_institution=20_000, seed=3, n_days=84)
    alarms = tests = 0
    for inst in fed.values():
        det = FeatureDriftDetector(inst.between_days(42, 56).dataset.X, feature_names=FEATURE_NAMES)
        for w in range(56, 84, 7):
            tests += 1
            alarms += det.test(inst.between_days(w, w + 7).dataset.X).status == "drift"
    assert tests == 20 and alarms == 0


def _feed(mon: DelayedLabelMonitor, miss_rate: float, n: int, rng: np.random.Generator, start: int) -> None:
    for i in range(start, start + n):
        alerted = rng.random() > miss_rate
        mon.record(i, 0.9 if alerted else 0.1, alerted=alerted)
        mon.label(i, 1)


@pytest.mark.parametrize("method", ["adwin", "page_hinkley"])
def test_performance_detector_fires_on_a_recall_drop_only(method: str) -> None:
    rng = np.random.default_rng(6)
    mon = DelayedLabelMonitor(method=method)  # type: ignore[arg-type]
    _feed(mon, 0.3, 400, rng, 0)
    assert mon.detections()["miss"] == 0 and not mon.drift_active
    _feed(mon, 0.8, 300, rng, 400)
    assert mon.detections()["miss"] >= 1 and mon.drift_active
    better = DelayedLabelMonitor(method=method)  # type: ignore[arg-type]
    _feed(better, 0.8, 400, rng, 0)
    _feed(better, 0.2, 300, rng, 400)
    assert better.detections()["miss"] == 0  # an improvement is not drift


@pytest.mark.parametrize("method", ["adwin", "page_hinkley"])
def test_performance_detector_false_alarm_rate_on_stationary_streams(method: str) -> None:
    """50 stationary streams of 500 labelled frauds each: at most 2 streams with an alarm (measured: see docs)."""
    rng = np.random.default_rng(7)
    alarmed = 0
    for _ in range(50):
        mon = DelayedLabelMonitor(method=method)  # type: ignore[arg-type]
        _feed(mon, 0.35, 500, rng, 0)
        alarmed += mon.detections()["miss"] > 0
    assert alarmed <= 2


def test_labels_for_unknown_ids_are_counted_not_raised() -> None:
    mon = DelayedLabelMonitor(max_pending=3)
    for i in range(5):
        mon.record(f"tx{i}", 0.5, alerted=False)
    assert mon.label("tx4", 1) is True
    assert mon.label("tx4", 0) is False  # second label for the same id
    assert mon.label("nope", 1) is False
    assert mon.label("tx0", 1) is False  # evicted (max_pending=3)
    assert mon.label("tx3", "yes") is False
    c = mon.counts()
    assert (c.labelled, c.unknown_ids, c.duplicate_labels, c.evicted, c.invalid_labels) == (1, 2, 1, 2, 1)
    stats = mon.statistics()
    assert stats["labels_unknown_id"] == 2.0 and stats["labels_invalid"] == 1.0
