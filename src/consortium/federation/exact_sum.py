"""Exact sums of real numbers through an integer-only summation channel.

Secure aggregation adds numbers modulo 2^32 after fixed-point encoding with a
per-segment scale, which is ideal for bounded model deltas but too coarse for
statistics whose range is not known in advance (sums of squares of raw amounts).
Here each value becomes a 96-bit fixed-point integer (24 fractional bits), split
into eight 12-bit *limbs*; each limb is a small non-negative integer, so the
limbs of up to a few hundred institutions add up without overflow and are
decoded exactly. The coordinator recombines the limb sums with Python integers:
the result equals the sum of the fixed-point values exactly, whatever their
magnitudes (up to 2^70).
"""

from __future__ import annotations

import math

import numpy as np

from consortium.errors import DataError

FRAC_BITS = 24
"""Fractional bits: values are rounded to multiples of 2^-24 (about 6e-8)."""
LIMB_BITS = 12
N_LIMBS = 8
_TOTAL_BITS = LIMB_BITS * N_LIMBS
_OFFSET = 1 << (_TOTAL_BITS - 1)
LIMB_BOUND = float(1 << LIMB_BITS)
"""Every limb lies in [0, LIMB_BOUND)."""
MAX_ABS = float(1 << (_TOTAL_BITS - 1 - FRAC_BITS - 1))
"""Largest magnitude one institution's value may have."""


def encode_limbs(values: np.ndarray) -> np.ndarray:
    """Split each value into ``N_LIMBS`` limbs (float32, exact small integers), value-major."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(v)):
        bad = np.flatnonzero(~np.isfinite(v))[:5].tolist()
        raise DataError(f"Cannot encode non-finite statistics (positions {bad}); expected finite numbers.")
    if v.size and np.max(np.abs(v)) >= MAX_ABS:
        raise DataError(
            f"A statistic has magnitude {np.max(np.abs(v)):.3g}; the exact-sum encoding holds up to {MAX_ABS:.3g}."
        )
    out = np.empty((v.size, N_LIMBS), dtype=np.float32)
    mask = (1 << LIMB_BITS) - 1
    for i, x in enumerate(v.tolist()):
        fixed = int(round(x * (1 << FRAC_BITS))) + _OFFSET
        for j in range(N_LIMBS):
            out[i, j] = (fixed >> (LIMB_BITS * j)) & mask
    return out.reshape(-1)


def decode_limb_sums(limb_sums: np.ndarray, *, n_participants: int) -> np.ndarray:
    """Recombine summed limbs of ``n_participants`` institutions into float64 sums.

    Limb sums may carry small rounding noise from fixed-point transport; each is
    rounded to the nearest integer first (valid while that noise stays below 0.5).
    """
    s = np.asarray(limb_sums, dtype=np.float64).reshape(-1)
    if s.size % N_LIMBS:
        raise DataError(f"Limb sums have length {s.size}, not a multiple of {N_LIMBS}.")
    if n_participants < 1:
        raise DataError(f"n_participants must be >= 1. Got {n_participants} instead.")
    rounded = np.rint(s)
    if np.max(np.abs(s - rounded), initial=0.0) > 0.25:
        raise DataError("Limb sums are not close to integers: the statistics were not summed exactly.")
    limbs = rounded.reshape(-1, N_LIMBS)
    out = np.empty(limbs.shape[0], dtype=np.float64)
    scale = math.ldexp(1.0, -FRAC_BITS)
    for i, row in enumerate(limbs.tolist()):
        total = sum(int(c) << (LIMB_BITS * j) for j, c in enumerate(row)) - n_participants * _OFFSET
        out[i] = total * scale
    return out
