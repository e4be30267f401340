"""Fixed-point encoding, the neighbour graph and the contribution layout."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from consortium.errors import ConfigError, DataError
from consortium.secagg import quantize
from consortium.secagg.config import SecAggConfig
from consortium.secagg.contribution import ContributionSpec, build_contribution, clip_by_l2
from consortium.secagg.graph import (
    build_graph,
    check_threshold,
    default_neighbours,
    default_threshold,
    neighbours_of,
)
from consortium.secagg.quantize import QuantizationPlan, SegmentSpec

# --------------------------------------------------------------------------- quantisation


@pytest.mark.parametrize(("n", "bits"), [(2, 8), (3, 16), (50, 32), (100, 32), (1000, 20)])
def test_plan_never_lets_a_sum_wrap(n: int, bits: int) -> None:
    plan = QuantizationPlan.create([SegmentSpec("u", 4, 2.5)], n_participants=n, modulus_bits=bits)
    seg = plan.segment("u")
    assert n * (2 * seg.max_int + 1) <= 2**bits
    assert seg.max_int >= 1
    assert seg.scale * 2.5 <= seg.max_int


def test_plan_rejects_too_small_modulus_and_bad_specs() -> None:
    with pytest.raises(ConfigError, match="modulus_bits"):
        QuantizationPlan.create([SegmentSpec("u", 1, 1.0)], n_participants=100, modulus_bits=8)
    with pytest.raises(ConfigError, match="uniquely named"):
        QuantizationPlan.create([SegmentSpec("u", 1, 1.0)] * 2, n_participants=2)
    with pytest.raises(ConfigError, match="bound"):
        SegmentSpec("u", 1, 0.0)
    with pytest.raises(ConfigError, match="length"):
        SegmentSpec("u", 0, 1.0)


@pytest.mark.parametrize("bits", [16, 32])
def test_extreme_inputs_sum_exactly_without_wrapping(bits: int) -> None:
    n = 7
    plan = QuantizationPlan.create(
        [SegmentSpec("u", 3, 1.5), SegmentSpec("w", 1, 1.0)], n_participants=n, modulus_bits=bits
    )
    rng = np.random.default_rng(0)
    for sign in (1.0, -1.0):
        encs = [plan.encode({"u": np.full(3, sign * 1.5), "w": [sign]}, rng=rng).values for _ in range(n)]
        total = np.zeros(plan.length, dtype=np.uint32)
        for e in encs:
            assert e.max() < 2**bits
            total += e
        total &= np.uint32(plan.modulus - 1)
        ints = plan.decode_integers(total)
        assert np.all(ints["u"] == sign * n * plan.segment("u").max_int)
        np.testing.assert_allclose(plan.decode(total)["u"], sign * 1.5 * n, rtol=1e-6)


def test_modular_sum_decodes_to_the_exact_integer_sum() -> None:
    n, d = 5, 1000
    plan = QuantizationPlan.create([SegmentSpec("u", d, 1.0)], n_participants=n)
    rng = np.random.default_rng(1)
    encs = [plan.encode({"u": rng.uniform(-1, 1, d)}, rng=rng).values for _ in range(n)]
    signed = [e.astype(np.int64) - (e >= 2**31) * 2**32 for e in encs]
    total = np.zeros(d, dtype=np.uint32)
    for e in encs:
        total += e
    assert np.array_equal(plan.decode_integers(total)["u"], np.sum(signed, axis=0))


def test_stochastic_rounding_is_unbiased() -> None:
    plan = QuantizationPlan.create([SegmentSpec("u", 200_000, 1.0)], n_participants=2)
    step = plan.segment("u").resolution
    value = 0.3 * step
    enc = plan.encode({"u": np.full(200_000, value)}, rng=np.random.default_rng(2)).values
    ints = enc.astype(np.int64)
    assert set(np.unique(ints)) == {0, 1}
    assert abs(ints.mean() - 0.3) < 0.005


def test_encoding_in_place_gives_the_same_vector_and_never_exceeds_m(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = QuantizationPlan.create([SegmentSpec("u", 1000, 1.0), SegmentSpec("w", 1, 1.0)], n_participants=3)
    v = np.random.default_rng(3).uniform(-1, 1, 1000)
    v[:2] = (1.0, -1.0)
    kept = plan.encode({"u": v, "w": [0.5]}, rng=np.random.default_rng(9)).values
    scratch = v.copy()
    reused = plan.encode({"u": scratch, "w": [0.5]}, rng=np.random.default_rng(9), overwrite=True).values
    assert np.array_equal(kept, reused)
    assert not np.array_equal(scratch, v)  # it was used as scratch space
    # With one participant M = 2**31 - 1, where float64 has 21 fractional bits: M + (1 - 2**-23)
    # rounds up to M + 1, which must be clamped back to M (it would wrap the sum).
    one = QuantizationPlan.create([SegmentSpec("u", 4, 1.0)], n_participants=1)
    m = one.segment("u").max_int
    monkeypatch.setattr(quantize, "uniform_words", lambda rng, n: np.full(n, 0xFFFFFFFF, dtype=np.uint32))
    top = one.encode({"u": [1.0, 1.0, 0.0, 0.5]}, rng=np.random.default_rng(0)).values
    assert one.decode_integers(top)["u"].tolist() == [m, m, 0, (m + 1) // 2]
    noisy = one.encode({"u": [1.0] * 4}, rng=np.random.default_rng(0), noise_fn=lambda *a: None).values
    assert one.decode_integers(noisy)["u"].tolist() == [m] * 4
    # bound * scale can exceed M by an ulp (bound 4.7, 3 participants): with U = 0 the floor
    # would give -M - 1.
    three = QuantizationPlan.create([SegmentSpec("u", 2, 4.7)], n_participants=3)
    seg = three.segment("u")
    assert 4.7 * seg.scale > seg.max_int
    monkeypatch.setattr(quantize, "uniform_words", lambda rng, n: np.zeros(n, dtype=np.uint32))
    low = three.encode({"u": [-4.7, 4.7]}, rng=np.random.default_rng(0)).values
    assert three.decode_integers(low)["u"].tolist() == [-seg.max_int, seg.max_int]


def test_uniform_words_are_uniform_32_bit_words() -> None:
    words = quantize.uniform_words(np.random.default_rng(4), 100_001)
    assert words.dtype == np.uint32 and words.shape == (100_001,) and words.flags.writeable
    counts = np.bincount(words >> 28, minlength=16)
    assert stats.chisquare(counts).pvalue > 1e-4


def test_encode_reports_bad_values_clearly() -> None:
    plan = QuantizationPlan.create([SegmentSpec("update", 3, 1.0), SegmentSpec("w", 1, 1.0)], n_participants=2)
    rng = np.random.default_rng(0)
    with pytest.raises(DataError, match=r"'update' value at index 1 is 2\.0, beyond its declared bound 1\.0"):
        plan.encode({"update": [0.0, 2.0, 0.0], "w": [1.0]}, rng=rng)
    with pytest.raises(DataError, match="non-finite value at index 2"):
        plan.encode({"update": [0.0, 0.0, np.nan], "w": [1.0]}, rng=rng)
    with pytest.raises(DataError, match="must have 3 values. Got 2"):
        plan.encode({"update": [0.0, 0.0], "w": [1.0]}, rng=rng)
    with pytest.raises(DataError, match=r"missing \['w'\]"):
        plan.encode({"update": [0.0, 0.0, 0.0]}, rng=rng)
    with pytest.raises(DataError, match="uint32 of shape"):
        plan.decode(np.zeros(4, dtype=np.int64))


def test_noise_hook_adds_integers_before_masking_and_clips_overflow() -> None:
    plan = QuantizationPlan.create(
        [SegmentSpec("update", 4, 1.0, headroom=1.0), SegmentSpec("w", 1, 1.0)], n_participants=2
    )
    calls = []

    def noise_fn(name: str, shape: tuple[int, ...], scale: float, rng: np.random.Generator) -> np.ndarray | None:
        calls.append((name, shape, scale))
        return np.array([5, -5, 0, 7], dtype=np.int64) if name == "update" else None

    enc = plan.encode({"update": np.zeros(4), "w": [0.0]}, rng=np.random.default_rng(0), noise_fn=noise_fn)
    assert plan.decode_integers(enc.values)["update"].tolist() == [5, -5, 0, 7]
    assert enc.noise_clipped == 0
    assert calls[0] == ("update", (4,), plan.segment("update").scale)
    m = plan.segment("update").max_int

    def huge(name: str, shape: tuple[int, ...], scale: float, rng: np.random.Generator) -> np.ndarray:
        return np.full(shape, 3 * m, dtype=np.int64)

    enc = plan.encode({"update": np.zeros(4), "w": [0.0]}, rng=np.random.default_rng(0), noise_fn=huge)
    assert enc.noise_clipped == 5
    assert plan.decode_integers(enc.values)["update"].tolist() == [m] * 4

    def wrong(name: str, shape: tuple[int, ...], scale: float, rng: np.random.Generator) -> np.ndarray:
        return np.zeros(3)

    with pytest.raises(DataError, match="noise hook must return integers"):
        plan.encode({"update": np.zeros(4), "w": [0.0]}, rng=np.random.default_rng(0), noise_fn=wrong)


# --------------------------------------------------------------------------- graph


def test_default_neighbours_and_threshold() -> None:
    assert [default_neighbours(n) for n in (2, 3, 5, 10, 50, 100)] == [1, 2, 4, 9, 13, 15]
    assert default_threshold(14) == 8
    assert default_threshold(3) == 2


@pytest.mark.parametrize(("n", "k", "expected_k"), [(30, 6, 6), (30, 7, 7), (31, 7, 8), (8, 13, 7), (5, 4, 4)])
def test_graph_is_symmetric_regular_and_seed_determined(n: int, k: int, expected_k: int) -> None:
    ids = [1000 + 17 * i for i in range(n)]
    g = build_graph(ids, k=k, seed=b"s" * 16)
    assert g.k == expected_k
    for u in ids:
        assert len(g.of(u)) == expected_k
        assert u not in g.of(u)
        assert all(u in g.of(v) for v in g.of(u))
        assert g.holders(u) == tuple(sorted((*g.of(u), u)))
    assert g == build_graph(list(reversed(ids)), k=k, seed=b"s" * 16)
    if expected_k < n - 1:
        assert g.neighbours != build_graph(ids, k=k, seed=b"t" * 16).neighbours
    assert sorted(g.x_of(u) for u in ids) == list(range(1, n + 1))


@pytest.mark.parametrize("n", [2, 3, 5, 8, 9, 30, 31, 50])
def test_a_nodes_own_row_matches_the_full_graph(n: int) -> None:
    ids = sorted({int(i) for i in np.random.default_rng(n).integers(0, 2**63, size=n, dtype=np.int64)})
    assert len(ids) == n
    for k in range(1, n + 1):
        g = build_graph(ids, k=k, seed=b"row-seed-0123456")
        for u in ids:
            assert neighbours_of(ids, k=k, seed=b"row-seed-0123456", node=u) == (g.k, g.of(u))
    with pytest.raises(ConfigError, match="'node' parameter"):
        neighbours_of(ids, k=1, seed=b"row-seed-0123456", node=-5)


def test_graph_and_threshold_validation() -> None:
    with pytest.raises(ConfigError, match="node_ids"):
        build_graph([1, 1], k=1, seed=b"s" * 16)
    with pytest.raises(ConfigError, match="seed"):
        build_graph([1, 2], k=1, seed=b"s")
    with pytest.raises(ConfigError, match="node_ids"):
        build_graph([-1, 2], k=1, seed=b"s" * 16)
    assert check_threshold(4, holders=7) == 4
    for bad in (1, 3, 8):
        with pytest.raises(ConfigError, match="'threshold' parameter"):
            check_threshold(bad, holders=7)


# --------------------------------------------------------------------------- contribution


def test_contribution_clips_weights_and_lays_out_segments() -> None:
    cfg = SecAggConfig(clip_norm=1.0, weight_cap=100.0, metric_bounds={"train-loss": 5.0})
    ref = [np.zeros((2, 2), np.float32), np.zeros(1, np.float32)]
    spec = ContributionSpec.create(cfg, ref)
    assert [s.name for s in spec.segments()] == ["update", "weight", "metric/train-loss"]
    assert ContributionSpec.from_record(spec.to_record()) == spec
    delta = [np.full((2, 2), 3.0, np.float32), np.array([4.0], np.float32)]
    c = build_contribution(delta, num_examples=250, metrics={"train-loss": 9.0, "secret": 1.0}, spec=spec)
    assert c.clipped and c.delta_norm == pytest.approx(np.sqrt(52))
    assert np.linalg.norm(c.values["update"]) == pytest.approx(1.0)
    assert c.values["weight"].tolist() == [1.0]
    assert c.values["metric/train-loss"].tolist() == [5.0]
    assert c.clipped_metrics == ("train-loss",)
    assert "metric/secret" not in c.values
    half = build_contribution([np.zeros((2, 2)), np.zeros(1)], num_examples=50, metrics={"train-loss": 2.0}, spec=spec)
    assert half.values["weight"].tolist() == [0.5]
    assert half.values["metric/train-loss"].tolist() == [1.0]
    flat, norm = clip_by_l2(np.array([3.0, 4.0]), 10.0)
    assert flat.tolist() == [3.0, 4.0] and norm == 5.0


def test_contribution_rejects_mismatched_or_broken_updates() -> None:
    spec = ContributionSpec.create(SecAggConfig(metric_bounds={"train-loss": 5.0}), [np.zeros(3, np.float32)])
    with pytest.raises(DataError, match=r"tensor sizes \[4\]"):
        build_contribution([np.zeros(4)], num_examples=1, metrics={"train-loss": 0.0}, spec=spec)
    with pytest.raises(DataError, match="NaN or inf"):
        build_contribution([np.array([0, np.inf, 0])], num_examples=1, metrics={"train-loss": 0.0}, spec=spec)
    with pytest.raises(DataError, match="example count"):
        build_contribution([np.zeros(3)], num_examples=-1, metrics={"train-loss": 0.0}, spec=spec)
    with pytest.raises(DataError, match="'train-loss' is declared"):
        build_contribution([np.zeros(3)], num_examples=1, metrics={}, spec=spec)


def test_contribution_of_a_norm_overflowing_delta_is_clipped_to_zero() -> None:
    spec = ContributionSpec.create(SecAggConfig(clip_norm=1.0), [np.zeros(2, np.float32)])
    c = build_contribution([np.array([1e200, -1e200])], num_examples=1, metrics={}, spec=spec)
    assert c.clipped and c.values["update"].tolist() == [0.0, 0.0]
    with pytest.raises(DataError, match="NaN or inf"):
        build_contribution([np.array([np.nan, 0.0], np.float32)], num_examples=1, metrics={}, spec=spec)


def test_secagg_config_validation() -> None:
    assert SecAggConfig().modulus_bits == 32
    for kwargs, name in [
        ({"clip_norm": 0.0}, "clip_norm"),
        ({"weight_cap": float("inf")}, "weight_cap"),
        ({"modulus_bits": 33}, "modulus_bits"),
        ({"neighbours": 0}, "neighbours"),
        ({"threshold": 1}, "threshold"),
        ({"stage_timeout": -1.0}, "stage_timeout"),
        ({"noise_headroom": -1.0}, "noise_headroom"),
        ({"metric_bounds": {"a/b": 1.0}}, "metric_bounds"),
        ({"metric_bounds": {"loss": 0.0}}, "metric_bounds"),
    ]:
        with pytest.raises(ConfigError, match=f"'{name}"):
            SecAggConfig(**kwargs)  # type: ignore[arg-type]


def test_coordinate_bound_tightens_the_encoding_and_clips_outliers() -> None:
    ref = [np.zeros(4, np.float32)]
    loose = ContributionSpec.create(SecAggConfig(clip_norm=4.0), ref)
    tight = ContributionSpec.create(SecAggConfig(clip_norm=4.0, coordinate_bound=0.5), ref)
    assert loose.segments()[0].bound == 4.0 and tight.segments()[0].bound == 0.5
    assert ContributionSpec.from_record(tight.to_record()) == tight
    c = build_contribution([np.array([0.1, -0.2, 0.9, -3.0])], num_examples=1e9, metrics={}, spec=tight)
    assert c.values["update"].tolist() == [0.1, -0.2, 0.5, -0.5]
    assert c.clipped_coordinates == 2 and not c.clipped
    plan_l = QuantizationPlan.create(loose.segments(), n_participants=10)
    plan_t = QuantizationPlan.create(tight.segments(), n_participants=10)
    assert plan_t.segment("update").resolution == pytest.approx(plan_l.segment("update").resolution / 8)
