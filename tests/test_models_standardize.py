"""Tests for consortium.models.standardize: federated mean/std from additive stats."""
# ruff: noqa: N806  (X, X_val: the conventional names of feature matrices)

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from consortium.errors import ConfigError, DataError
from consortium.models import FeatureStats, Standardizer, combine_stats


@st.composite
def split_matrices(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """A small matrix with labels, and cut points splitting it into institutions."""
    n = draw(st.integers(min_value=1, max_value=30))
    d = draw(st.integers(min_value=1, max_value=4))
    X = draw(
        hnp.arrays(
            np.float32,
            (n, d),
            elements=st.floats(-1e3, 1e3, allow_nan=False, width=32),
        )
    )
    y = draw(hnp.arrays(np.int64, (n,), elements=st.integers(0, 1)))
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=4)))
    return X, y, cuts


@settings(max_examples=60, deadline=None)
@given(split_matrices())
def test_combined_stats_equal_pooled_stats(data: tuple[np.ndarray, np.ndarray, list[int]]) -> None:
    X, y, cuts = data
    bounds = [0, *cuts, X.shape[0]]
    parts = [
        FeatureStats.from_data(X[a:b], y[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    combined = combine_stats(parts)
    pooled = FeatureStats.from_data(X, y)
    assert combined.count == pooled.count == X.shape[0]
    assert combined.positives == pooled.positives == int(y.sum())
    np.testing.assert_allclose(combined.sum, pooled.sum, rtol=1e-9, atol=1e-6)
    np.testing.assert_allclose(combined.sumsq, pooled.sumsq, rtol=1e-9, atol=1e-6)
    # And the scaler equals numpy's population mean/std on the pooled rows.
    scaler = combined.standardizer()
    X64 = X.astype(np.float64)
    std = X64.std(axis=0)
    np.testing.assert_allclose(scaler.mean, X64.mean(axis=0), rtol=1e-5, atol=1e-3)
    varying = std > 1e-3 * np.maximum(1.0, np.abs(X64.mean(axis=0)))
    np.testing.assert_allclose(scaler.std[varying], std[varying], rtol=1e-4)


def test_vector_round_trip_and_vector_sums_match_stat_sums() -> None:
    rng = np.random.default_rng(0)
    a = FeatureStats.from_data(rng.normal(size=(20, 3)).astype(np.float32), rng.integers(0, 2, 20))
    b = FeatureStats.from_data(rng.normal(size=(7, 3)).astype(np.float32), rng.integers(0, 2, 7))
    v = a.to_vector()
    assert v.dtype == np.float64 and v.shape == (2 + 2 * 3,)
    assert v[0] == a.count and v[1] == a.positives
    back = FeatureStats.from_vector(v, 3)
    assert back.count == a.count and back.positives == a.positives
    np.testing.assert_array_equal(back.sum, a.sum)
    np.testing.assert_array_equal(back.sumsq, a.sumsq)
    # Secure aggregation sums vectors; decoding the sum gives the sum of the stats.
    summed = FeatureStats.from_vector(a.to_vector() + b.to_vector(), 3)
    expected = a + b
    np.testing.assert_allclose(summed.to_vector(), expected.to_vector())


def test_from_vector_rejects_wrong_length() -> None:
    with pytest.raises(DataError, match=r"'v' parameter of FeatureStats.from_vector.*\(8,\)"):
        FeatureStats.from_vector(np.zeros(7), 3)
    with pytest.raises(ConfigError, match="'n_features'"):
        FeatureStats.from_vector(np.zeros(2), 0)


def test_constant_feature_gets_unit_std_and_standardises_to_zero() -> None:
    rng = np.random.default_rng(1)
    X = np.column_stack(
        [rng.normal(size=500), np.full(500, 3.0), np.full(500, 12345.678), rng.normal(size=500)]
    ).astype(np.float32)
    scaler = FeatureStats.from_data(X).standardizer()
    assert scaler.std[1] == 1.0
    assert scaler.std[2] == 1.0  # large constant: no blow-up from cancellation noise
    Z = scaler.transform(X)
    assert Z.dtype == np.float32
    np.testing.assert_allclose(Z[:, 1:3], 0.0, atol=1e-3)
    np.testing.assert_allclose(Z[:, [0, 3]].mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(Z[:, [0, 3]].std(axis=0), 1.0, atol=1e-4)


def test_positive_rate_and_labels() -> None:
    X = np.zeros((10, 2), dtype=np.float32)
    y = np.array([1, 0, 0, 0, 1, 0, 0, 0, 0, 0])
    stats = FeatureStats.from_data(X, y)
    assert stats.positives == 2.0
    assert stats.positive_rate == pytest.approx(0.2)
    assert FeatureStats.from_data(X).positives == 0.0
    with pytest.raises(DataError, match="zero rows"):
        _ = FeatureStats.zeros(2).positive_rate


def test_builtin_sum_works_and_mismatched_widths_fail() -> None:
    a = FeatureStats.from_data(np.ones((2, 3), dtype=np.float32))
    b = FeatureStats.from_data(np.ones((4, 3), dtype=np.float32))
    assert sum([a, b]).count == 6.0  # type: ignore[union-attr]
    c = FeatureStats.from_data(np.ones((4, 2), dtype=np.float32))
    with pytest.raises(DataError, match="expected 3. Got 2"):
        _ = a + c
    with pytest.raises(ConfigError, match="'stats' parameter of combine_stats"):
        combine_stats([])


def test_from_data_validates_input() -> None:
    X = np.ones((4, 2), dtype=np.float32)
    X_nan = X.copy()
    X_nan[2, 1] = np.nan
    with pytest.raises(DataError, match=r"finite values.*first row index 2"):
        FeatureStats.from_data(X_nan)
    with pytest.raises(DataError, match=r"'X' parameter .* 2-D"):
        FeatureStats.from_data(np.ones(4, dtype=np.float32))
    with pytest.raises(DataError, match=r"'y' parameter .*shape \(4,\)"):
        FeatureStats.from_data(X, np.zeros(3, dtype=np.int64))
    with pytest.raises(DataError, match=r"only 0 and 1. Got values \[2\]"):
        FeatureStats.from_data(X, np.array([0, 1, 2, 0]))


def test_stats_are_immutable_and_consistent() -> None:
    stats = FeatureStats.from_data(np.ones((3, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="read-only"):
        stats.sum[0] = 5.0
    with pytest.raises(ConfigError, match="'positives'"):
        FeatureStats(count=2, sum=np.zeros(1), sumsq=np.zeros(1), positives=3)
    with pytest.raises(DataError, match="'sumsq'"):
        FeatureStats(count=2, sum=np.zeros(2), sumsq=np.zeros(3), positives=0)


def test_standardizer_needs_rows() -> None:
    with pytest.raises(DataError, match="count 0"):
        FeatureStats.zeros(3).standardizer()


def test_standardizer_arrays_round_trip_and_inverse() -> None:
    rng = np.random.default_rng(2)
    X = (rng.normal(size=(50, 3)) * [1.0, 10.0, 100.0] + [0.0, 5.0, -50.0]).astype(np.float32)
    scaler = FeatureStats.from_data(X).standardizer()
    mean, std = scaler.to_arrays()
    assert mean.dtype == np.float32 and std.dtype == np.float32
    restored = Standardizer.from_arrays([mean, std])
    np.testing.assert_array_equal(restored.transform(X), scaler.transform(X))
    np.testing.assert_allclose(
        scaler.inverse_transform(scaler.transform(X)), X, rtol=1e-5, atol=1e-4
    )


def test_standardizer_validates() -> None:
    scaler = Standardizer(mean=np.zeros(3), std=np.ones(3))
    with pytest.raises(DataError, match="must have 3 columns. Got 2"):
        scaler.transform(np.zeros((4, 2), dtype=np.float32))
    with pytest.raises(DataError, match="'std'.*> 0"):
        Standardizer(mean=np.zeros(2), std=np.array([1.0, 0.0]))
    with pytest.raises(DataError, match="shape of 'mean'"):
        Standardizer(mean=np.zeros(2), std=np.ones(3))
    with pytest.raises(ConfigError, match="'arrays' parameter of Standardizer.from_arrays"):
        Standardizer.from_arrays([np.zeros(2)])
