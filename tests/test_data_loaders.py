"""Dataset validation and the npz / CSV loaders: round trips and clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from consortium.data import (
    Dataset,
    check_same_features,
    concat,
    load_csv,
    load_npz,
    save_npz,
)
from consortium.errors import ConfigError, DataError


def _dataset(n: int = 50, d: int = 3, *, name: str = "bank_a", seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    y = np.zeros(n, dtype=np.int64)
    y[:: max(n // 5, 1)] = 1
    return Dataset(
        X=rng.normal(size=(n, d)),
        y=y,
        feature_names=tuple(f"c{i}" for i in range(d)),
        name=name,
    )


# -- Dataset ----------------------------------------------------------------------------
def test_dataset_coerces_dtypes_and_reports_summary() -> None:
    ds = Dataset(
        X=np.arange(12, dtype=np.int32).reshape(4, 3),
        y=np.array([0.0, 1.0, 1.0, 0.0]),
        feature_names=["a", "b", "c"],
        name="t",
    )
    assert ds.X.dtype == np.float32 and ds.y.dtype == np.int64
    assert ds.feature_names == ("a", "b", "c")
    assert (ds.n_rows, ds.n_features, ds.n_positives) == (4, 3, 2)
    assert ds.positive_rate == pytest.approx(0.5)
    assert "n_rows=4" in repr(ds)


def test_empty_dataset_is_allowed() -> None:
    ds = Dataset(X=np.zeros((0, 2)), y=np.zeros(0), feature_names=("a", "b"), name="empty")
    assert ds.n_rows == 0 and ds.positive_rate == 0.0


def test_nan_features_are_reported_with_column_and_rows() -> None:
    x = np.ones((60, 4))
    x[10, 3] = np.nan
    x[52, 3] = np.inf
    with pytest.raises(DataError) as err:
        Dataset(X=x, y=np.zeros(60), feature_names=("a", "b", "c", "amount"), name="bank_a")
    msg = str(err.value)
    assert "Dataset 'bank_a'" in msg
    assert "feature column 'amount' (index 3)" in msg
    assert "2 NaN/inf values in rows [10, 52]" in msg
    assert "expected finite numbers" in msg


def test_values_beyond_float32_range_are_refused() -> None:
    with pytest.raises(DataError, match="index 0"):
        Dataset(X=np.array([[1e300]]), y=np.array([0]), feature_names=("a",), name="big")


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"X": np.ones((3, 2, 1))}, "X must be 2-D"),
        ({"X": np.array([["a", "b"]] * 3)}, "expected real numbers"),
        ({"y": np.array([0, 1])}, "X has 3 rows but y has 2 labels"),
        ({"y": np.array([0, 2, 5])}, "values [2, 5]"),
        ({"y": np.array([[0], [1], [0]])}, "y must be 1-D"),
        ({"feature_names": ("a",)}, "feature_names has 1 names"),
        ({"feature_names": ("a", "a")}, "duplicated: ['a']"),
        ({"feature_names": "ab"}, "feature_names must be a sequence of str"),
    ],
)
def test_dataset_rejects_bad_fields(kwargs: dict, fragment: str) -> None:
    args = {"X": np.ones((3, 2)), "y": np.array([0, 1, 0]), "feature_names": ("a", "b")}
    args.update(kwargs)
    with pytest.raises(DataError) as err:
        Dataset(**args, name="bank_x")
    assert "Dataset 'bank_x'" in str(err.value)
    assert fragment in str(err.value)


def test_subset_by_indices_and_mask() -> None:
    ds = _dataset(10)
    sub = ds.subset([3, 1], name="pick")
    assert sub.name == "pick" and sub.n_rows == 2
    np.testing.assert_array_equal(sub.X, ds.X[[3, 1]])
    mask = np.zeros(10, dtype=bool)
    mask[[0, 9]] = True
    np.testing.assert_array_equal(ds.subset(mask).y, ds.y[[0, 9]])
    assert ds.subset(np.array([], dtype=np.int64)).n_rows == 0
    with pytest.raises(DataError, match="out of range"):
        ds.subset([10])
    with pytest.raises(DataError, match="mask has shape"):
        ds.subset(np.ones(3, dtype=bool))


def test_concat_stacks_rows() -> None:
    a, b = _dataset(10, name="a"), _dataset(7, name="b", seed=1)
    both = concat([a, b], name="pooled")
    assert both.n_rows == 17 and both.name == "pooled"
    np.testing.assert_array_equal(both.X[10:], b.X)


def test_concat_refuses_feature_mismatch_naming_both() -> None:
    a = _dataset(5, d=6, name="a")
    b = _dataset(5, d=7, name="b")
    with pytest.raises(DataError) as err:
        concat([a, b], name="pooled")
    assert "feature count mismatch between institutions: 'a' has 6, 'b' has 7" in str(err.value)
    c = Dataset(X=a.X, y=a.y, feature_names=("c0", "c1", "amt", "c3", "c4", "c5"), name="c")
    with pytest.raises(DataError) as err:
        check_same_features([a, c])
    assert "'a' and 'c'" in str(err.value) and "'c2' vs 'amt'" in str(err.value)
    with pytest.raises(ConfigError, match="non-empty"):
        concat([], name="x")


# -- npz --------------------------------------------------------------------------------
def test_npz_round_trip(tmp_path) -> None:
    ds = _dataset(40, d=4)
    path = save_npz(ds, tmp_path / "sub" / "bank_a")
    assert path.name == "bank_a.npz" and path.exists()
    back = load_npz(path)
    np.testing.assert_array_equal(back.X, ds.X)
    np.testing.assert_array_equal(back.y, ds.y)
    assert back.feature_names == ds.feature_names and back.name == ds.name
    assert load_npz(path, name="other").name == "other"


def test_npz_in_adbench_format_gets_default_names(tmp_path) -> None:
    rng = np.random.default_rng(1)
    path = tmp_path / "cardio.npz"
    np.savez(path, X=rng.normal(size=(20, 3)), y=np.r_[np.zeros(18), np.ones(2)].astype(np.int64))
    ds = load_npz(path)
    assert ds.name == "cardio" and ds.feature_names == ("f0", "f1", "f2")
    assert ds.X.dtype == np.float32 and ds.n_positives == 2


def _npz(tmp_path, **arrays) -> str:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return str(path)


def test_npz_missing_file(tmp_path) -> None:
    with pytest.raises(DataError, match="does not exist") as err:
        load_npz(tmp_path / "nope.npz")
    assert "nope.npz" in str(err.value)


def test_npz_missing_key_lists_present_keys(tmp_path) -> None:
    path = _npz(tmp_path, X=np.ones((3, 2)), labels=np.zeros(3))
    with pytest.raises(DataError) as err:
        load_npz(path)
    msg = str(err.value)
    assert "bad.npz" in msg and "no 'y' array" in msg and "['X', 'labels']" in msg


@pytest.mark.parametrize(
    ("arrays", "fragment"),
    [
        ({"X": np.ones(3), "y": np.zeros(3)}, "'X' must be 2-D"),
        ({"X": np.ones((3, 2)), "y": np.zeros(4)}, "'X' has 3 rows but 'y' has 4 labels"),
        ({"X": np.array([["a", "b"]] * 3), "y": np.zeros(3)}, "array 'X' has dtype <U1"),
        ({"X": np.array([[1.0, np.nan]] * 3), "y": np.zeros(3)}, "'f1' (index 1) has 3 NaN/inf"),
        ({"X": np.ones((3, 2)), "y": np.array([0, 2, 3])}, "values [2, 3]"),
        (
            {"X": np.ones((3, 2)), "y": np.zeros(3), "feature_names": np.array(["a"])},
            "'feature_names' must be a 1-D string array of length 2",
        ),
    ],
)
def test_npz_bad_content_names_file_and_field(tmp_path, arrays: dict, fragment: str) -> None:
    path = _npz(tmp_path, **arrays)
    with pytest.raises(DataError) as err:
        load_npz(path)
    assert "bad.npz" in str(err.value)
    assert fragment in str(err.value)


def test_npz_corrupt_file(tmp_path) -> None:
    path = tmp_path / "corrupt.npz"
    path.write_bytes(b"PK\x03\x04 definitely not a zip archive" * 3)
    with pytest.raises(DataError, match="not a readable .npz archive") as err:
        load_npz(path)
    assert "corrupt.npz" in str(err.value)


def test_npz_with_pickled_object_array_is_refused(tmp_path) -> None:
    path = tmp_path / "obj.npz"
    names = np.array(["a", 1], dtype=object)
    np.savez(path, X=np.ones((2, 2)), y=np.zeros(2), feature_names=names)
    with pytest.raises(DataError, match="object arrays") as err:
        load_npz(path)
    assert "obj.npz" in str(err.value)


def test_npy_instead_of_npz_is_refused(tmp_path) -> None:
    path = tmp_path / "single.npz"
    with open(path, "wb") as fh:
        np.save(fh, np.ones((2, 2)))
    with pytest.raises(DataError, match="single array"):
        load_npz(path)


# -- csv --------------------------------------------------------------------------------
def _csv(tmp_path, text: str, name: str = "bank.csv") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_csv_loads_features_in_file_order(tmp_path) -> None:
    path = _csv(tmp_path, "amount,is_fraud,hour\n10.5,0,3\n\n-2,1,23\n1e3,0, 7 \n")
    ds = load_csv(path, label_column="is_fraud")
    assert ds.name == "bank" and ds.feature_names == ("amount", "hour")
    np.testing.assert_allclose(ds.X, [[10.5, 3], [-2, 23], [1000, 7]])
    np.testing.assert_array_equal(ds.y, [0, 1, 0])


def test_csv_feature_columns_select_and_order(tmp_path) -> None:
    path = _csv(tmp_path, "a,b,c,label\n1,2,x,0\n4,5,y,1\n")
    ds = load_csv(path, label_column="label", feature_columns=["b", "a"], name="sel")
    assert ds.name == "sel" and ds.feature_names == ("b", "a")
    np.testing.assert_allclose(ds.X, [[2, 1], [5, 4]])


def test_csv_round_trips_with_npz(tmp_path) -> None:
    ds = _dataset(12, d=2)
    rows = ["c0,c1,y"] + [f"{a!r},{b!r},{t}" for (a, b), t in zip(ds.X.tolist(), ds.y, strict=True)]
    back = load_csv(_csv(tmp_path, "\n".join(rows) + "\n"), label_column="y")
    np.testing.assert_array_equal(back.X, ds.X)
    np.testing.assert_array_equal(back.y, ds.y)


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("a,b,y\n1,2,0\n3,x,1\n", ["line 3", "column 'b'", "'x' is not a number"]),
        ("a,b,y\n1,2,0\n3,4,1\n5,,0\n", ["line 4", "column 'b'", "cell is empty"]),
        ("a,b,y\n1,nan,0\n", ["line 2", "column 'b'", "NaN"]),
        ("a,b,y\n1,inf,0\n", ["line 2", "column 'b'", "infinite"]),
        ("a,b,y\n1,2,0\n3,4\n", ["line 3", "row has 2 cells; expected 3"]),
        (
            "a,b,y\n1,2,0\n3,4,2\n5,6,-1\n",
            ["column 'y'", "not 0 or 1", "'-1'", "'2'", "lines [3, 4]"],
        ),
        ("a,b,y\n1,2,yes\n", ["line 2", "column 'y'", "'yes' is not a number"]),
        ("a,b,y\n1,2,\n", ["line 2", "column 'y'", "label cell is empty"]),
        ("a,b,label\n1,2,0\n", ["label column 'y' is not in the header", "['a', 'b', 'label']"]),
        ("1,2,3\n4,5,6\n", ["line 1", "looks like data", "expected a header row"]),
        ("", ["is empty"]),
        ("a,a,y\n1,2,0\n", ["duplicate column names ['a']"]),
    ],
)
def test_csv_errors_name_file_line_and_column(tmp_path, text: str, fragments: list[str]) -> None:
    path = _csv(tmp_path, text)
    with pytest.raises(DataError) as err:
        load_csv(path, label_column="y")
    msg = str(err.value)
    assert "bank.csv" in msg
    for fragment in fragments:
        assert fragment in msg


def test_csv_unknown_feature_column_lists_header(tmp_path) -> None:
    path = _csv(tmp_path, "a,b,y\n1,2,0\n")
    with pytest.raises(DataError) as err:
        load_csv(path, label_column="y", feature_columns=["a", "zz"])
    assert "['zz']" in str(err.value) and "['a', 'b', 'y']" in str(err.value)


def test_csv_missing_file_and_non_utf8(tmp_path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_csv(tmp_path / "none.csv", label_column="y")
    path = tmp_path / "latin.csv"
    path.write_bytes("a,b,y\n1,\xff,0\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8") as err:
        load_csv(path, label_column="y")
    assert "latin.csv" in str(err.value)
