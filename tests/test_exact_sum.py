"""Exact summation of statistics through limbs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consortium.errors import DataError
from consortium.federation.exact_sum import (
    FRAC_BITS,
    LIMB_BOUND,
    decode_limb_sums,
    encode_limbs,
)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.floats(-1e12, 1e12, allow_nan=False), min_size=3, max_size=3), min_size=1, max_size=20))
def test_sum_of_limbs_decodes_to_sum_of_values(rows: list[list[float]]) -> None:
    values = np.array(rows)
    limb_sum = sum(encode_limbs(r).astype(np.float64) for r in values)
    decoded = decode_limb_sums(limb_sum, n_participants=len(rows))
    exact = np.array([sum(round(x * 2**FRAC_BITS) for x in col) / 2**FRAC_BITS for col in values.T])
    np.testing.assert_array_equal(decoded, exact)


def test_limbs_are_small_exact_integers() -> None:
    limbs = encode_limbs(np.array([-3.5, 0.0, 1e15, 123.456]))
    assert limbs.dtype == np.float32
    assert np.all(limbs >= 0) and np.all(limbs < LIMB_BOUND)
    assert np.all(limbs == np.round(limbs))


def test_small_transport_noise_is_rounded_away_but_large_is_refused() -> None:
    s = encode_limbs(np.array([2.5])).astype(np.float64) + encode_limbs(np.array([-1.0]))
    assert decode_limb_sums(s + 0.2, n_participants=2)[0] == pytest.approx(1.5)
    with pytest.raises(DataError, match="not close to integers"):
        decode_limb_sums(s + 0.5, n_participants=2)


def test_non_finite_values_are_refused() -> None:
    with pytest.raises(DataError, match="non-finite"):
        encode_limbs(np.array([1.0, np.nan]))
