"""Fixed-point encoding of real vectors into ``Z_{2^b}`` so that sums never wrap.

Secure aggregation adds integers modulo ``2**b``. A contribution is a
concatenation of named *segments* (the weighted model delta, the weight, each
weighted metric), each with a declared bound ``|value| <= bound`` and its own
scale. For ``n`` participants every encoded coordinate lies in ``[-M, M]`` with

    M = ((2**b // n) - 1) // 2,   scale = M / (bound + headroom),

so any sum of at most ``n`` encodings lies in ``[-nM, nM]`` and
``n * (2M + 1) <= 2**b``: the modular sum decodes to the exact integer sum.
Values are rounded *stochastically* (``floor(v*s)`` plus a Bernoulli of the
fractional part), which makes the encoding unbiased: ``E[q] = v * scale``.

The *noise hook* lets the privacy layer add integer noise (e.g. a distributed
discrete Gaussian or Skellam) to the encoded integers before masking; it must
size ``headroom`` (in value units) so that its noise fits, otherwise the few
coordinates that would leave ``[-M, M]`` are clipped and counted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from consortium.errors import DataError, param_error
from consortium.secagg.primitives import MAX_MODULUS_BITS

logger = logging.getLogger(__name__)

NoiseFn = Callable[[str, tuple[int, ...], float, np.random.Generator], "npt.NDArray[np.int64] | None"]
"""``noise_fn(segment_name, shape, scale, rng) -> int array or None``.

Called once per segment after rounding; the returned integers (in units of
``1 / scale``) are added to the encoding. ``None`` means no noise for that segment.
"""

BOUND_TOLERANCE = 1e-9
"""Relative slack on bounds for float round-off (values are then clipped onto the bound)."""


@dataclass(frozen=True)
class SegmentSpec:
    """A named part of the aggregated vector.

    Attributes
    ----------
    name : str
        Unique name, e.g. ``"update"``, ``"weight"``, ``"metric/train-loss"``.
    length : int
        Number of coordinates.
    bound : float
        Every coordinate satisfies ``|value| <= bound``.
    headroom : float
        Extra magnitude (value units) reserved per participant for noise added
        by the privacy hook.
    """

    name: str
    length: int
    bound: float
    headroom: float = 0.0

    def __post_init__(self) -> None:
        owner = "SegmentSpec"
        if not isinstance(self.name, str) or not self.name:
            raise param_error("name", owner, "a non-empty string", self.name)
        if not isinstance(self.length, int | np.integer) or self.length < 1:
            raise param_error("length", owner, "an int >= 1", self.length)
        if not (isinstance(self.bound, int | float) and np.isfinite(self.bound) and self.bound > 0):
            raise param_error("bound", owner, "a finite float > 0", self.bound)
        if not (isinstance(self.headroom, int | float) and np.isfinite(self.headroom) and self.headroom >= 0):
            raise param_error("headroom", owner, "a finite float >= 0", self.headroom)


@dataclass(frozen=True)
class SegmentPlan:
    """Where a segment lives in the vector and how it is scaled."""

    name: str
    offset: int
    length: int
    bound: float
    headroom: float
    scale: float
    max_int: int

    @property
    def resolution(self) -> float:
        """Value of one integer step, ``1 / scale``."""
        return 1.0 / self.scale


@dataclass(frozen=True)
class EncodedVector:
    """A participant's encoded contribution (before masking).

    Attributes
    ----------
    values : numpy.ndarray
        ``uint32`` array in ``[0, 2**b)``.
    noise_clipped : int
        Coordinates whose noisy value had to be clipped into ``[-M, M]``.
    """

    values: np.ndarray
    noise_clipped: int = 0


@dataclass(frozen=True)
class QuantizationPlan:
    """The scales of all segments for ``n_participants`` and a modulus ``2**modulus_bits``.

    Every participant and the coordinator build the same plan from the same
    public parameters; use :meth:`create`.
    """

    segments: tuple[SegmentPlan, ...]
    modulus_bits: int
    n_participants: int

    @classmethod
    def create(
        cls,
        specs: Sequence[SegmentSpec],
        *,
        n_participants: int,
        modulus_bits: int = MAX_MODULUS_BITS,
    ) -> QuantizationPlan:
        """Lay segments out one after the other and pick each one's scale.

        Raises
        ------
        ConfigError
            If the names repeat, or ``2**modulus_bits`` is too small to give each
            of ``n_participants`` at least the integers ``{-1, 0, 1}``.
        """
        owner = "QuantizationPlan.create"
        if not isinstance(modulus_bits, int) or not 2 <= modulus_bits <= MAX_MODULUS_BITS:
            raise param_error("modulus_bits", owner, f"an int in [2, {MAX_MODULUS_BITS}]", modulus_bits)
        if not isinstance(n_participants, int) or n_participants < 1:
            raise param_error("n_participants", owner, "an int >= 1", n_participants)
        names = [s.name for s in specs]
        if not specs or len(set(names)) != len(names):
            raise param_error("specs", owner, "a non-empty list of uniquely named segments", names)
        max_int = ((2**modulus_bits // n_participants) - 1) // 2
        if max_int < 1:
            raise param_error(
                "modulus_bits",
                owner,
                f"large enough that 2**b >= 3 * n_participants (= {3 * n_participants})",
                modulus_bits,
            )
        plans, offset = [], 0
        for s in specs:
            scale = max_int / (float(s.bound) + float(s.headroom))
            plans.append(
                SegmentPlan(
                    name=s.name,
                    offset=offset,
                    length=int(s.length),
                    bound=float(s.bound),
                    headroom=float(s.headroom),
                    scale=scale,
                    max_int=max_int,
                )
            )
            offset += int(s.length)
        return cls(segments=tuple(plans), modulus_bits=modulus_bits, n_participants=n_participants)

    @property
    def length(self) -> int:
        """Total number of coordinates."""
        last = self.segments[-1]
        return last.offset + last.length

    @property
    def modulus(self) -> int:
        """``2**modulus_bits``."""
        return 1 << self.modulus_bits

    def segment(self, name: str) -> SegmentPlan:
        """The plan of one segment, by name."""
        for s in self.segments:
            if s.name == name:
                return s
        raise param_error("name", "QuantizationPlan.segment", f"one of {[s.name for s in self.segments]}", name)

    def encode(
        self,
        values: Mapping[str, npt.ArrayLike],
        *,
        rng: np.random.Generator,
        noise_fn: NoiseFn | None = None,
        overwrite: bool = False,
    ) -> EncodedVector:
        """Encode one participant's segments (stochastic rounding, optional noise).

        Parameters
        ----------
        values : Mapping[str, array_like]
            One flat array per segment name, of the declared length.
        rng : numpy.random.Generator
            Source of rounding randomness (and of the noise hook's randomness).
        noise_fn : NoiseFn, optional
            Privacy hook adding integer noise per segment before masking.
        overwrite : bool
            The caller gives up ``values``: writable float64 arrays are used as
            scratch space (saves one ``d``-sized temporary).

        Raises
        ------
        DataError
            If a segment is missing, has the wrong length, contains NaN/inf or
            exceeds its declared bound.
        """
        missing = [s.name for s in self.segments if s.name not in values]
        extra = sorted(set(values) - {s.name for s in self.segments})
        if missing or extra:
            raise DataError(
                f"Encoding needs exactly the segments {[s.name for s in self.segments]}; "
                f"missing {missing}, unexpected {extra}."
            )
        out = np.empty(self.length, dtype=np.uint32)
        out_signed = out.view(np.int32)  # |q| <= M < 2**31: int32 holds every encoded integer
        clipped = 0
        for seg in self.segments:
            v = np.asarray(values[seg.name], dtype=np.float64).reshape(-1)
            if v.shape[0] != seg.length:
                raise DataError(f"Segment '{seg.name}' must have {seg.length} values. Got {v.shape[0]} instead.")
            inside = _check_bound(seg, v)
            scratch = v if overwrite and v.flags.writeable else None
            rounded = _stochastic_round(v, seg, rng, clip=not inside, out=scratch)  # float64 integers in [-M, M]
            target = out_signed[seg.offset : seg.offset + seg.length]
            if noise_fn is None:
                target[...] = rounded  # float -> int32, exact; viewed as uint32 this is q mod 2**32
                continue
            q = rounded.astype(np.int64)
            noise = noise_fn(seg.name, (seg.length,), seg.scale, rng)
            if noise is not None:
                q = _add_noise(seg, q, noise)
                over = np.abs(q) > seg.max_int
                n_over = int(np.count_nonzero(over))
                if n_over:
                    clipped += n_over
                    np.clip(q, -seg.max_int, seg.max_int, out=q)
                    logger.warning(
                        "Noise pushed %d coordinate(s) of segment '%s' beyond the "
                        "encodable range; they were clipped (raise its headroom).",
                        n_over,
                        seg.name,
                    )
            target[...] = q  # in [-M, M] after clipping: fits int32
        if self.modulus_bits < MAX_MODULUS_BITS:
            np.bitwise_and(out, np.uint32(self.modulus - 1), out=out)
        return EncodedVector(values=out, noise_clipped=clipped)

    def decode_integers(self, total: npt.NDArray[np.uint32]) -> dict[str, np.ndarray]:
        """Signed integer sums per segment from a modular sum of encodings."""
        total = self._check_vector(total)
        signed = total.astype(np.int64)
        half = self.modulus // 2
        signed[signed >= half] -= self.modulus
        return {s.name: signed[s.offset : s.offset + s.length] for s in self.segments}

    def decode(self, total: npt.NDArray[np.uint32]) -> dict[str, np.ndarray]:
        """Real-valued (float64) sums per segment from a modular sum of encodings."""
        return {
            name: ints.astype(np.float64) / self.segment(name).scale
            for name, ints in self.decode_integers(total).items()
        }

    def _check_vector(self, total: npt.NDArray[np.uint32]) -> np.ndarray:
        arr = np.asarray(total)
        if arr.dtype != np.uint32 or arr.shape != (self.length,):
            raise DataError(
                f"An encoded vector must be uint32 of shape ({self.length},). "
                f"Got {arr.dtype} of shape {arr.shape} instead."
            )
        return arr


def _check_bound(seg: SegmentPlan, v: np.ndarray) -> bool:
    """Raise DataError unless ``|v| <= bound`` (up to float slack); return whether ``|v| <= bound`` exactly."""
    if v.size == 0:
        return True
    hi, lo = float(v.max()), float(v.min())
    if max(hi, -lo) <= seg.bound:  # NaN fails this test too
        return True
    limit = seg.bound * (1.0 + BOUND_TOLERANCE)
    if max(hi, -lo) <= limit:
        return False  # within the float slack: clipped onto the bound while rounding
    if not np.all(np.isfinite(v)):
        bad = int(np.flatnonzero(~np.isfinite(v))[0])
        raise DataError(f"Segment '{seg.name}' has a non-finite value at index {bad}: {float(v[bad])!r}.")
    over = np.abs(v) > limit
    i = int(np.flatnonzero(over)[0])
    raise DataError(
        f"Segment '{seg.name}' value at index {i} is {float(v[i])!r}, beyond its declared bound "
        f"{seg.bound!r} ({int(np.count_nonzero(over))} value(s) out of bound). Clip before "
        "encoding or raise the bound."
    )


def uniform_words(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` uniform ``uint32`` words (a fresh, writable array): raw bit-generator output, two words per draw.

    About twice as fast as ``rng.random(n, dtype=np.float32)``.
    """
    return rng.bit_generator.random_raw((n + 1) // 2).view(np.uint32)[:n]


def _stochastic_round(
    v: np.ndarray, seg: SegmentPlan, rng: np.random.Generator, *, clip: bool = True, out: np.ndarray | None = None
) -> np.ndarray:
    """Unbiased stochastic rounding of ``v * scale``, as a float64 array of integers in ``[-M, M]``.

    ``floor(x + U)`` with ``U ~ Uniform[0, 1)`` equals ``floor(x) + 1`` with
    probability ``frac(x)`` and ``floor(x)`` otherwise, so ``E[q] = x``. ``U`` is
    built in place from 23 random bits of the raw generator output (the mantissa
    of a float32 in ``[1, 2)``, minus one: no float64 temporary, half the RNG
    cost of ``rng.random``). Its 2**-23 grid and the float64 rounding of ``x + U``
    (``|x| < 2**31``) bias the rounding by at most ~2**-22 of one integer step.
    The result is clamped to ``[-M, M]``: float rounding can otherwise give
    ``M + 1`` (``x`` within half an ulp of ``M``) or ``-M - 1`` (``bound * scale``
    can exceed ``M`` by an ulp, and ``U = 0``), which could wrap the sum and, for
    one participant, overflow int32. ``clip`` is only needed when ``v`` may
    exceed the bound by float slack; ``out`` (float64, may be ``v``) receives the result.
    """
    scaled = np.multiply(v, seg.scale, out=out)
    if clip:
        limit = seg.bound * seg.scale
        np.clip(scaled, -limit, limit, out=scaled)
    words = uniform_words(rng, seg.length)
    words >>= 9
    words |= 0x3F800000  # float32 bit pattern of 1 + 23 random mantissa bits
    uniform = words.view(np.float32)
    uniform -= 1.0  # exact: uniform on the grid k * 2**-23 in [0, 1)
    scaled += uniform
    np.floor(scaled, out=scaled)
    np.clip(scaled, -seg.max_int, seg.max_int, out=scaled)
    return scaled


def _add_noise(seg: SegmentPlan, q: np.ndarray, noise: npt.ArrayLike) -> np.ndarray:
    arr = np.asarray(noise)
    if arr.shape != (seg.length,) or not np.issubdtype(arr.dtype, np.integer):
        raise DataError(
            f"The noise hook must return integers of shape ({seg.length},) for segment "
            f"'{seg.name}'. Got {arr.dtype} of shape {arr.shape} instead."
        )
    return q + arr.astype(np.int64)
