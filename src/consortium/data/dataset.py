"""The one in-memory form of tabular fraud data: features, binary labels, names.

Every loader, generator and partitioner produces a :class:`Dataset`, and every
model consumes one.  Validation happens once, at construction, so that code
further down (training loops, secure aggregation, ONNX export) can rely on
``X`` being finite ``float32`` of shape ``(n, d)`` and ``y`` being ``int64``
zeros and ones, and so that a bad file is reported where it enters the system
rather than as a NaN loss ten rounds later.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from consortium.errors import DataError, param_error

_MAX_LISTED = 10


def _listed(values: Sequence[object] | np.ndarray, *, limit: int = _MAX_LISTED) -> str:
    """Render at most ``limit`` values as ``[a, b, ...]`` for error messages."""
    items = [v.item() if isinstance(v, np.generic) else v for v in list(values)[:limit]]
    text = ", ".join(repr(v) if isinstance(v, str) else str(v) for v in items)
    more = f", ... ({len(values)} in total)" if len(values) > limit else ""
    return f"[{text}{more}]"


@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """Features and binary labels of one institution, split or file.

    Parameters
    ----------
    X : numpy.ndarray
        Feature matrix of shape ``(n, d)``; any real numeric dtype is accepted and
        stored as ``float32``.  All values must be finite.
    y : numpy.ndarray
        Labels of shape ``(n,)``; values must be 0 (legitimate) or 1 (fraud /
        anomaly).  Stored as ``int64``.
    feature_names : tuple of str
        One unique name per column of ``X``.
    name : str
        Human-readable name used in every error and log message.

    Raises
    ------
    DataError
        If shapes, dtypes, values or names are invalid.  The message names the
        dataset, the field, what was expected and what was found.

    Notes
    -----
    Datasets with zero rows are valid objects (an institution may have nothing
    yet); the partitioners refuse to *produce* empty parts.  Arrays are not
    copied when they already have the target dtype, so do not mutate them after
    construction.
    """

    X: np.ndarray
    y: np.ndarray
    feature_names: tuple[str, ...]
    name: str = "dataset"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise param_error("name", "Dataset", "a non-empty str", self.name)
        x = self._checked_features()
        y = self._checked_labels(n_rows=x.shape[0])
        names = self._checked_names(n_features=x.shape[1])
        object.__setattr__(self, "X", x)
        object.__setattr__(self, "y", y)
        object.__setattr__(self, "feature_names", names)

    # -- validation -------------------------------------------------------------------
    def _fail(self, message: str) -> DataError:
        return DataError(f"Dataset '{self.name}': {message}")

    def _checked_features(self) -> np.ndarray:
        x = np.asarray(self.X)
        if x.dtype.kind not in "biuf":
            raise self._fail(f"X has dtype {x.dtype}; expected real numbers (bool, int or float).")
        if x.ndim != 2:
            raise self._fail(
                f"X must be 2-D (rows x features); got {x.ndim}-D with shape {x.shape}."
            )
        with np.errstate(over="ignore", invalid="ignore"):
            x32 = x.astype(np.float32, copy=False)
        bad = ~np.isfinite(x32)
        if bad.any():
            col = int(np.flatnonzero(bad.any(axis=0))[0])
            rows = np.flatnonzero(bad[:, col])
            col_name = self._column_name(col)
            n_cols = int(bad.any(axis=0).sum())
            also = f" ({n_cols} columns are affected in total)" if n_cols > 1 else ""
            raise self._fail(
                f"feature column {col_name} (index {col}) has {rows.size} NaN/inf values "
                f"in rows {_listed(rows)}{also}; expected finite numbers "
                "(that fit in float32)."
            )
        return x32

    def _column_name(self, col: int) -> str:
        names = self.feature_names
        if isinstance(names, Sequence) and not isinstance(names, str) and col < len(names):
            return repr(names[col])
        return f"'f{col}'"

    def _checked_labels(self, *, n_rows: int) -> np.ndarray:
        y = np.asarray(self.y)
        if y.dtype.kind not in "biuf":
            raise self._fail(f"y has dtype {y.dtype}; expected integer labels 0 and 1.")
        if y.ndim != 1:
            raise self._fail(f"y must be 1-D; got shape {y.shape}.")
        if y.shape[0] != n_rows:
            raise self._fail(
                f"X has {n_rows} rows but y has {y.shape[0]} labels; expected one label per row."
            )
        bad = ~np.isin(y, (0, 1))
        if bad.any():
            values = np.unique(y[bad])
            rows = np.flatnonzero(bad)
            raise self._fail(
                f"y has {rows.size} labels outside {{0, 1}} (values {_listed(values)}, "
                f"first rows {_listed(rows)}); expected 0 (legitimate) or 1 (fraud)."
            )
        return y.astype(np.int64, copy=False)

    def _checked_names(self, *, n_features: int) -> tuple[str, ...]:
        raw = self.feature_names
        if isinstance(raw, str) or not isinstance(raw, Sequence | np.ndarray):
            raise self._fail(f"feature_names must be a sequence of str; got {type(raw).__name__}.")
        names = tuple(str(n) if isinstance(n, np.str_) else n for n in raw)
        not_str = [n for n in names if not isinstance(n, str) or not n]
        if not_str:
            raise self._fail(f"feature_names must be non-empty strings; got {_listed(not_str)}.")
        if len(names) != n_features:
            raise self._fail(
                f"X has {n_features} feature columns but feature_names has {len(names)} "
                "names; expected one name per column."
            )
        uniq, counts = np.unique(np.asarray(names, dtype=str), return_counts=True)
        dupes = [str(n) for n in uniq[counts > 1]]
        if dupes:
            raise self._fail(f"feature_names must be unique; duplicated: {_listed(dupes)}.")
        return names

    # -- summary ----------------------------------------------------------------------
    @property
    def n_rows(self) -> int:
        """Number of rows (examples)."""
        return int(self.X.shape[0])

    @property
    def n_features(self) -> int:
        """Number of feature columns."""
        return int(self.X.shape[1])

    @property
    def n_positives(self) -> int:
        """Number of rows labelled 1."""
        return int(self.y.sum())

    @property
    def positive_rate(self) -> float:
        """Share of rows labelled 1; 0.0 for an empty dataset."""
        return float(self.y.mean()) if self.n_rows else 0.0

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, n_rows={self.n_rows}, n_features={self.n_features}, "
            f"positive_rate={self.positive_rate:.4g})"
        )

    # -- derived datasets -------------------------------------------------------------
    def subset(self, idx: np.ndarray | Sequence[int], *, name: str | None = None) -> Dataset:
        """The rows selected by ``idx``, as a new dataset.

        Parameters
        ----------
        idx : array-like
            Integer row indices (any order, repeats allowed) or a boolean mask of
            length ``n_rows``.
        name : str, optional
            Name of the result; defaults to this dataset's name.

        Returns
        -------
        Dataset
            A dataset holding copies of the selected rows.

        Raises
        ------
        DataError
            If the indices are not integers / a mask of the right length, or are
            out of range.
        """
        sel = np.asarray(idx)
        if sel.dtype == bool:
            if sel.shape != (self.n_rows,):
                raise self._fail(f"subset mask has shape {sel.shape}; expected ({self.n_rows},).")
            sel = np.flatnonzero(sel)
        elif sel.size == 0:
            sel = np.zeros(0, dtype=np.int64)
        elif sel.dtype.kind not in "iu":
            raise self._fail(f"subset indices have dtype {sel.dtype}; expected integers.")
        sel = sel.reshape(-1)
        out_of_range = (sel < -self.n_rows) | (sel >= self.n_rows)
        if out_of_range.any():
            raise self._fail(
                f"subset indices {_listed(sel[out_of_range])} are out of range for "
                f"{self.n_rows} rows."
            )
        return Dataset(
            X=self.X[sel],
            y=self.y[sel],
            feature_names=self.feature_names,
            name=self.name if name is None else name,
        )


def check_same_features(datasets: Sequence[Dataset]) -> None:
    """Make sure all datasets have the same feature columns in the same order.

    Parameters
    ----------
    datasets : sequence of Dataset
        Datasets that are about to be combined or trained together.

    Raises
    ------
    DataError
        Naming the first pair of datasets that differ and how (count or names).
    """
    items = list(datasets)
    if not items:
        return
    first = items[0]
    for other in items[1:]:
        if other.n_features != first.n_features:
            raise DataError(
                f"feature count mismatch between institutions: '{first.name}' has "
                f"{first.n_features}, '{other.name}' has {other.n_features}."
            )
        if other.feature_names != first.feature_names:
            diff = [
                i
                for i, (a, b) in enumerate(
                    zip(first.feature_names, other.feature_names, strict=True)
                )
                if a != b
            ]
            i = diff[0]
            raise DataError(
                f"feature name mismatch between institutions: '{first.name}' and "
                f"'{other.name}' differ at {len(diff)} position(s), first at index {i} "
                f"({first.feature_names[i]!r} vs {other.feature_names[i]!r})."
            )


def concat(datasets: Sequence[Dataset], *, name: str) -> Dataset:
    """Stack datasets row-wise (e.g. the pooled training data of all institutions).

    Parameters
    ----------
    datasets : sequence of Dataset
        At least one dataset; all must share feature names and order.
    name : str
        Name of the result.

    Returns
    -------
    Dataset
        Rows of the inputs, in the given order.

    Raises
    ------
    ConfigError
        If ``datasets`` is empty.
    DataError
        If the feature columns differ (see :func:`check_same_features`).
    """
    items = list(datasets)
    if not items:
        raise param_error("datasets", "concat", "a non-empty sequence of Dataset", datasets)
    not_ds = [type(d).__name__ for d in items if not isinstance(d, Dataset)]
    if not_ds:
        raise param_error("datasets", "concat", "a sequence of Dataset", f"items of type {not_ds}")
    check_same_features(items)
    return Dataset(
        X=np.concatenate([d.X for d in items], axis=0),
        y=np.concatenate([d.y for d in items], axis=0),
        feature_names=items[0].feature_names,
        name=name,
    )
