"""Input checks shared by the models package: feature matrices and 0/1 labels.

Every check raises :class:`~consortium.errors.DataError` (or a ``ConfigError`` for
a wrong argument type) in the project's one message shape, naming the parameter,
the function it was passed to, what was expected and what was received.
"""

from __future__ import annotations

import numpy as np

from consortium.errors import DataError, param_error


def check_feature_matrix(
    matrix: object,
    owner: str,
    *,
    name: str = "X",
    allow_empty: bool = True,
    n_features: int | None = None,
) -> np.ndarray:
    """Return ``matrix`` if it is a finite numeric 2-D numpy array of the right width."""
    if not isinstance(matrix, np.ndarray):
        raise param_error(name, owner, "a 2-D numpy array", type(matrix).__name__)
    if matrix.ndim != 2:
        raise DataError(
            f"The '{name}' parameter of {owner} must be a 2-D array (rows, features). "
            f"Got shape {matrix.shape} instead."
        )
    if matrix.shape[0] == 0 and not allow_empty:
        raise DataError(
            f"The '{name}' parameter of {owner} must have at least one row. Got 0 rows instead."
        )
    if matrix.dtype.kind not in "fiub":
        raise DataError(
            f"The '{name}' parameter of {owner} must be numeric. Got dtype {matrix.dtype} instead."
        )
    if n_features is not None and matrix.shape[1] != n_features:
        raise DataError(
            f"The '{name}' parameter of {owner} must have {n_features} columns. "
            f"Got {matrix.shape[1]} columns instead."
        )
    if matrix.dtype.kind == "f":
        finite_rows = np.all(np.isfinite(matrix), axis=1)
        if not np.all(finite_rows):
            rows = np.flatnonzero(~finite_rows)
            raise DataError(
                f"The '{name}' parameter of {owner} must hold finite values. Got NaN/inf in "
                f"{rows.size} rows (first row index {int(rows[0])}) instead."
            )
    return matrix


def check_labels(labels: object, n_rows: int, owner: str, *, name: str = "y") -> np.ndarray:
    """Return ``labels`` if it is a 1-D numpy array of ``n_rows`` values in {0, 1}."""
    if not isinstance(labels, np.ndarray):
        raise param_error(name, owner, "a 1-D numpy array of 0/1 labels", type(labels).__name__)
    if labels.ndim != 1 or labels.shape[0] != n_rows:
        raise DataError(
            f"The '{name}' parameter of {owner} must have shape ({n_rows},) to match X. "
            f"Got shape {labels.shape} instead."
        )
    if labels.dtype.kind not in "biuf":
        raise DataError(
            f"The '{name}' parameter of {owner} must hold 0/1 numbers. "
            f"Got dtype {labels.dtype} instead."
        )
    is_binary = (labels == 0) | (labels == 1)
    if not np.all(is_binary):
        bad = np.unique(labels[~is_binary])[:5]
        raise DataError(
            f"The '{name}' parameter of {owner} must hold only 0 and 1. "
            f"Got values {bad.tolist()} instead."
        )
    return labels
