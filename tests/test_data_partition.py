"""Partitioners, federations, holdouts and the split directory format."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consortium.data import (
    Dataset,
    FederatedSplit,
    federate,
    federate_institutions,
    holdout_split,
    load_institution,
    load_split,
    partition_dirichlet,
    partition_iid,
    partition_quantity,
    save_split,
)
from consortium.errors import ConfigError, DataError


def _data(n: int = 1_000, rate: float = 0.1, *, seed: int = 0, name: str = "src") -> Dataset:
    """Column 0 holds the row id, so every part can be traced back to its rows."""
    rng = np.random.default_rng(seed)
    y = np.zeros(n, dtype=np.int64)
    y[rng.choice(n, size=int(round(rate * n)), replace=False)] = 1
    x = np.column_stack([np.arange(n), rng.normal(size=n), y + rng.normal(size=n)])
    return Dataset(X=x, y=y, feature_names=("row_id", "noise", "signal"), name=name)


def _ids(*datasets: Dataset) -> np.ndarray:
    return np.concatenate([d.X[:, 0].astype(np.int64) for d in datasets])


def _assert_disjoint_cover(n: int, *datasets: Dataset) -> None:
    ids = _ids(*datasets)
    assert ids.size == n
    np.testing.assert_array_equal(np.sort(ids), np.arange(n))


def _split_parts(split: FederatedSplit) -> list[Dataset]:
    parts = [split.holdout]
    for inst in split.institutions:
        parts += [inst.train, inst.val, inst.test]
    return parts


def _assert_labels_follow_rows(ds: Dataset, *parts: Dataset) -> None:
    for part in parts:
        np.testing.assert_array_equal(part.y, ds.y[part.X[:, 0].astype(np.int64)])


# -- holdout and simple partitioners ----------------------------------------------------
def test_holdout_split_is_stratified_disjoint_and_deterministic() -> None:
    ds = _data(1_000, 0.05)
    rest, held = holdout_split(ds, test_fraction=0.2, seed=1)
    _assert_disjoint_cover(ds.n_rows, rest, held)
    _assert_labels_follow_rows(ds, rest, held)
    assert held.n_rows == 200 and held.n_positives == 10 and rest.n_positives == 40
    assert (rest.name, held.name) == ("src_rest", "src_holdout")
    again = holdout_split(ds, test_fraction=0.2, seed=1)[1]
    np.testing.assert_array_equal(again.X, held.X)
    other = holdout_split(ds, test_fraction=0.2, seed=2)[1]
    assert not np.array_equal(other.X, held.X)
    assert np.all(np.diff(held.X[:, 0]) > 0), "rows keep the input order"


def test_holdout_keeps_a_positive_on_each_side_when_possible() -> None:
    ds = _data(100, 0.02)
    rest, held = holdout_split(ds, test_fraction=0.05, seed=0)
    assert rest.n_positives == 1 and held.n_positives == 1


def test_partition_iid_is_balanced_and_stratified() -> None:
    ds = _data(999, 0.1)
    parts = partition_iid(ds, 3, seed=0)
    assert [p.name for p in parts] == ["bank_a", "bank_b", "bank_c"]
    _assert_disjoint_cover(ds.n_rows, *parts)
    _assert_labels_follow_rows(ds, *parts)
    assert [p.n_rows for p in parts] == [333, 333, 333]
    assert [p.n_positives for p in parts] == [34, 33, 33]


def test_partition_dirichlet_skews_label_rates_and_respects_minimums() -> None:
    ds = _data(4_000, 0.1)
    skewed = partition_dirichlet(ds, 8, alpha=0.2, seed=0, min_rows=30, min_positives=3)
    iid = partition_iid(ds, 8, seed=0)
    _assert_disjoint_cover(ds.n_rows, *skewed)
    _assert_labels_follow_rows(ds, *skewed)
    assert all(p.n_rows >= 30 and p.n_positives >= 3 for p in skewed)
    spread_skewed = np.std([p.positive_rate for p in skewed])
    spread_iid = np.std([p.positive_rate for p in iid])
    assert spread_skewed > 5 * spread_iid
    sizes = [p.n_rows for p in skewed]
    assert max(sizes) > 3 * min(sizes)
    again = partition_dirichlet(ds, 8, alpha=0.2, seed=0, min_rows=30, min_positives=3)
    assert [p.n_rows for p in again] == sizes


def test_partition_dirichlet_large_alpha_approaches_iid() -> None:
    ds = _data(4_000, 0.1)
    parts = partition_dirichlet(ds, 4, alpha=1_000.0, seed=0)
    assert np.ptp([p.positive_rate for p in parts]) < 0.03


def test_partition_dirichlet_impossible_requests_explain_why() -> None:
    ds = _data(200, 0.05)  # 10 positives
    with pytest.raises(DataError) as err:
        partition_dirichlet(ds, 6, alpha=1.0, seed=0, min_positives=2)
    msg = str(err.value)
    assert "'src'" in msg and "10 positives" in msg and ">= 2 positives" in msg
    with pytest.raises(DataError) as err:
        partition_dirichlet(_data(2_000, 0.1), 10, alpha=0.01, seed=0, min_rows=50)
    msg = str(err.value)
    assert "Dirichlet(alpha=0.01)" in msg and "increase alpha" in msg and "'bank_" in msg


def test_partition_quantity_skews_sizes_not_label_rates() -> None:
    ds = _data(3_000, 0.1)
    parts = partition_quantity(ds, 5, alpha=0.5, seed=3, min_rows=50)
    _assert_disjoint_cover(ds.n_rows, *parts)
    sizes = [p.n_rows for p in parts]
    assert min(sizes) >= 50 and max(sizes) > 3 * min(sizes)
    assert np.ptp([p.positive_rate for p in parts]) < 0.03
    assert all(p.n_positives >= 1 for p in parts)


def test_partitioners_refuse_empty_parts_naming_them() -> None:
    ds = _data(4, 0.25)
    with pytest.raises(DataError, match="partition 'bank_e' with no rows"):
        partition_iid(ds, 5, seed=0)
    with pytest.raises(DataError, match="too few to give each of 5 institutions"):
        partition_quantity(ds, 5, seed=0)
    with pytest.raises(DataError, match="'holdout' with no rows"):
        holdout_split(_data(1, 0.0), seed=0)


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda ds: partition_iid(ds, 0, seed=0), "'n_institutions' parameter of partition_iid"),
        (lambda ds: partition_iid(ds, 2.5, seed=0), "must be an int >= 1"),
        (lambda ds: partition_dirichlet(ds, 2, alpha=0, seed=0), "'alpha' parameter"),
        (lambda ds: partition_dirichlet(ds, 2, alpha=float("nan"), seed=0), "finite float > 0"),
        (lambda ds: partition_quantity(ds, 2, alpha=-1, seed=0), "Got -1 instead"),
        (lambda ds: holdout_split(ds, test_fraction=1.0, seed=0), "'test_fraction'"),
        (lambda ds: holdout_split(ds, test_fraction=0.2, seed=-1), "'seed'"),
        (lambda ds: federate(ds, 2, holdout_fraction=0.0), "'holdout_fraction'"),
        (lambda ds: federate(ds, 2, val_fraction=0.5, test_fraction=0.5), "val_fraction + test"),
        (lambda ds: federate(ds, 2, scheme="random"), "'scheme' parameter of federate"),
        (lambda ds: federate(ds, 2, min_rows=0), "'min_rows'"),
        (lambda ds: federate_institutions({}), "'parts' parameter"),
        (lambda ds: federate_institutions({"a b": ds}), "path-safe"),
        (lambda ds: federate_institutions({"a": ds}, test_fraction=0), "'test_fraction'"),
        (lambda ds: partition_iid("not data", 2, seed=0), "'ds' parameter"),
    ],
)
def test_parameter_validation(call, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        call(_data(100))
    assert fragment in str(err.value)


# -- federations ------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "quantity"])
def test_federate_covers_all_rows_once(scheme: str) -> None:
    ds = _data(2_000, 0.08)
    split = federate(ds, 4, scheme=scheme, alpha=0.8, seed=1)
    assert split.names() == ["bank_a", "bank_b", "bank_c", "bank_d"]
    parts = _split_parts(split)
    _assert_disjoint_cover(ds.n_rows, *parts)
    _assert_labels_follow_rows(ds, *parts)
    assert split.holdout.name == "holdout" and split.holdout.n_rows == 400
    assert split.holdout.n_positives == 32
    for inst in split.institutions:
        assert inst.train.name == f"{inst.name}/train"
        assert inst.val.n_positives >= 1 and inst.test.n_positives >= 1
        assert inst.val.n_rows == pytest.approx(0.2 * inst.n_rows, abs=2)
    pooled = split.pooled_train()
    assert pooled.n_rows == sum(i.train.n_rows for i in split.institutions)
    assert split.pooled_val().n_rows == sum(i.val.n_rows for i in split.institutions)
    again = federate(ds, 4, scheme=scheme, alpha=0.8, seed=1)
    np.testing.assert_array_equal(_ids(*_split_parts(again)), _ids(*parts))


def test_federate_institutions_pools_a_slice_of_each() -> None:
    banks = {
        "bank_a": _data(500, 0.02, seed=1, name="a"),
        "bank_b": _data(300, 0.2, seed=2, name="b"),
    }
    split = federate_institutions(banks, holdout_fraction=0.2, seed=0)
    assert split.names() == ["bank_a", "bank_b"]
    assert split.holdout.n_rows == 160 and split.holdout.n_positives == 2 + 12
    a = split.institution("bank_a")
    held_a, held_b = _holdout_slices(split, [500, 300])
    assert held_a.n_rows == 100 and held_b.n_rows == 60
    _assert_disjoint_cover(500, a.train, a.val, a.test, held_a)
    _assert_labels_follow_rows(banks["bank_a"], a.train, a.val, a.test, held_a)
    assert a.train.positive_rate == pytest.approx(0.02, abs=0.01)
    with pytest.raises(DataError, match="No institution named 'bank_z'"):
        split.institution("bank_z")


def test_federate_institutions_refuses_feature_mismatch() -> None:
    a = _data(100, name="a")
    b = Dataset(X=a.X[:, :2], y=a.y, feature_names=("row_id", "noise"), name="b")
    with pytest.raises(DataError, match="'a' has 3, 'b' has 2"):
        federate_institutions({"bank_a": a, "bank_b": b})


def test_tiny_institution_cannot_be_split() -> None:
    with pytest.raises(DataError, match="'bank_a/test' with no rows"):
        federate_institutions({"bank_a": _data(3, 0.0)}, holdout_fraction=0.3)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(40, 300),
    rate=st.floats(0.0, 0.5),
    n_inst=st.integers(1, 4),
    scheme=st.sampled_from(["iid", "dirichlet", "quantity"]),
    alpha=st.floats(0.3, 5.0),
    hold=st.floats(0.05, 0.4),
    seed=st.integers(0, 2**16),
)
def test_property_federate_holdout_and_parts_partition_the_rows(
    n: int, rate: float, n_inst: int, scheme: str, alpha: float, hold: float, seed: int
) -> None:
    ds = _data(n, rate, seed=seed)
    split = federate(
        ds,
        n_inst,
        scheme=scheme,
        alpha=alpha,
        holdout_fraction=hold,
        seed=seed,
        min_rows=3,
        min_positives=0,
    )
    parts = _split_parts(split)
    _assert_disjoint_cover(n, *parts)
    _assert_labels_follow_rows(ds, *parts)
    assert all(p.n_rows > 0 for p in parts)
    if ds.n_positives >= 2:
        assert split.holdout.n_positives >= 1


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(8, 120), min_size=1, max_size=4),
    rate=st.floats(0.0, 0.5),
    seed=st.integers(0, 2**16),
)
def test_property_federate_institutions_partitions_each_institution(
    sizes: list[int], rate: float, seed: int
) -> None:
    banks = {f"b{i}": _data(n, rate, seed=seed + i, name=f"b{i}") for i, n in enumerate(sizes)}
    split = federate_institutions(banks, seed=seed)
    assert split.names() == list(banks)
    held = _holdout_slices(split, sizes)
    for (name, ds), inst, h in zip(banks.items(), split.institutions, held, strict=True):
        parts = [inst.train, inst.val, inst.test, h]
        _assert_disjoint_cover(ds.n_rows, *parts)
        _assert_labels_follow_rows(ds, *parts)
        assert all(p.n_rows > 0 for p in parts), name


def _holdout_slices(split: FederatedSplit, sizes: list[int]) -> list[Dataset]:
    """Holdout rows of each institution: the holdout stacks them in institution order."""
    counts = [n - inst.n_rows for n, inst in zip(sizes, split.institutions, strict=True)]
    bounds = np.cumsum([0, *counts])
    return [split.holdout.subset(np.arange(bounds[i], bounds[i + 1])) for i in range(len(sizes))]


# -- split directories ------------------------------------------------------------------
def test_save_and_load_split_round_trip(tmp_path) -> None:
    split = federate(_data(600, 0.1), 3, scheme="quantity", seed=0)
    root = save_split(split, tmp_path / "split")
    assert sorted(p.name for p in root.iterdir()) == [
        "bank_a",
        "bank_b",
        "bank_c",
        "holdout.npz",
        "split.json",
    ]
    assert sorted(p.name for p in (root / "bank_b").iterdir()) == [
        "test.npz",
        "train.npz",
        "val.npz",
    ]
    manifest = json.loads((root / "split.json").read_text())
    assert manifest["institutions"][0]["train"]["rows"] == split.institutions[0].train.n_rows
    back = load_split(root)
    assert back.names() == split.names()
    for old, new in zip(split.institutions, back.institutions, strict=True):
        for part in ("train", "val", "test"):
            np.testing.assert_array_equal(getattr(new, part).X, getattr(old, part).X)
            np.testing.assert_array_equal(getattr(new, part).y, getattr(old, part).y)
            assert getattr(new, part).name == getattr(old, part).name
    np.testing.assert_array_equal(back.holdout.X, split.holdout.X)
    node = load_institution(root / "bank_c")
    assert node.name == "bank_c" and node.train.n_rows == split.institutions[2].train.n_rows


def test_load_split_detects_missing_and_changed_files(tmp_path) -> None:
    with pytest.raises(DataError, match="split.json' is missing"):
        load_split(tmp_path)
    split = federate(_data(600, 0.1), 2, scheme="iid", seed=0)
    root = save_split(split, tmp_path / "s")
    (root / "bank_b" / "val.npz").unlink()
    with pytest.raises(DataError) as err:
        load_split(root)
    assert "lacks ['val.npz']" in str(err.value) and "bank_b" in str(err.value)
    save_split(split, root)
    manifest = json.loads((root / "split.json").read_text())
    manifest["institutions"][0]["train"]["rows"] += 1
    (root / "split.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="manifest records"):
        load_split(root)
    (root / "split.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_split(root)
    with pytest.raises(DataError, match="does not exist"):
        load_institution(tmp_path / "nowhere")
