"""Split data into institutions and into train / validation / test / holdout sets.

Two situations occur in practice:

* one dataset (an ADBench file, a public fraud dataset) must be *simulated* as a
  federation: :func:`federate` carves out a global holdout, partitions the rest
  over institutions — IID, with label skew (Dirichlet over each class) or with
  quantity skew (Dirichlet over sizes) — and splits each institution's share;
* the institutions are already separate (the synthetic generator, real per-bank
  files): :func:`federate_institutions` splits each one and pools a stratified
  slice of every institution into the holdout.

Every split is stratified by label, deterministic by seed, keeps at least one
positive per part where the data allows and never produces an empty part
(a :class:`DataError` names the part instead).  Row order inside every part
follows the input order, so time-ordered data stays time-ordered.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np

from consortium.data.dataset import Dataset, check_same_features, concat
from consortium.data.federated_split import FederatedSplit, InstitutionSplit
from consortium.data.naming import check_institution_name, institution_names
from consortium.data.split_store import load_institution, load_split, save_split
from consortium.errors import DataError, param_error

__all__ = [
    "FederatedSplit",
    "InstitutionSplit",
    "federate",
    "federate_institutions",
    "holdout_split",
    "load_institution",
    "load_split",
    "partition_dirichlet",
    "partition_iid",
    "partition_quantity",
    "save_split",
]

logger = logging.getLogger(__name__)

Scheme = Literal["iid", "dirichlet", "quantity"]
SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "quantity")
MAX_TRIES = 10_000
"""Dirichlet draws tried before a partitioner gives up on its minimum sizes."""

_STREAM_HOLDOUT = 0
_STREAM_PARTITION = 1
_STREAM_LOCAL = 2


# -- parameter checks -------------------------------------------------------------------
def _check_dataset(ds: object, owner: str) -> Dataset:
    if not isinstance(ds, Dataset):
        raise param_error("ds", owner, "a Dataset", type(ds).__name__)
    return ds


def _check_int(value: object, name: str, owner: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise param_error(name, owner, f"an int >= {low}", value)
    return int(value)


def _check_fraction(value: object, name: str, owner: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float | np.floating)
        or not 0.0 < float(value) < 1.0
    ):
        raise param_error(name, owner, "a float in (0, 1)", value)
    return float(value)


def _check_local_fractions(
    val_fraction: object, test_fraction: object, owner: str
) -> tuple[float, float]:
    v = _check_fraction(val_fraction, "val_fraction", owner)
    t = _check_fraction(test_fraction, "test_fraction", owner)
    if v + t >= 1.0:
        raise param_error(
            "val_fraction",
            owner,
            f"a float such that val_fraction + test_fraction < 1 (test_fraction={t})",
            v,
        )
    return v, t


def _check_alpha(alpha: object, owner: str) -> float:
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, int | float | np.floating)
        or not math.isfinite(float(alpha))
        or float(alpha) <= 0
    ):
        raise param_error("alpha", owner, "a finite float > 0", alpha)
    return float(alpha)


def _rng(seed: object, owner: str, *stream: int) -> np.random.Generator:
    s = _check_int(seed, "seed", owner, 0)
    return np.random.default_rng([s, *stream])


# -- index-level building blocks --------------------------------------------------------
def _allocate(n: int, shares: np.ndarray) -> np.ndarray:
    """Integer counts summing to ``n``, proportional to ``shares`` (largest remainder)."""
    raw = n * shares / shares.sum()
    counts = np.floor(raw).astype(np.int64)
    short = n - int(counts.sum())
    if short > 0:
        counts[np.argsort(-(raw - counts), kind="stable")[:short]] += 1
    return counts


def _at_least_one_each(counts: np.ndarray) -> np.ndarray:
    """Move single rows from the largest parts into empty ones, where enough rows exist."""
    counts = counts.copy()
    if counts.sum() < counts.size:
        return counts
    for k in np.flatnonzero(counts == 0):
        counts[int(np.argmax(counts))] -= 1
        counts[k] += 1
    return counts


def _split_class(idx: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    return np.split(idx, np.cumsum(counts)[:-1])


def _class_indices(y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled indices of negatives and positives."""
    return rng.permutation(np.flatnonzero(y == 0)), rng.permutation(np.flatnonzero(y == 1))


def _combine(neg_parts: list[np.ndarray], pos_parts: list[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(np.concatenate([a, b])) for a, b in zip(neg_parts, pos_parts, strict=True)]


def _stratified_counts(n_neg: int, n_pos: int, shares: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-part counts of negatives and positives, proportional to ``shares``.

    Part sizes are allocated first (so sizes are as even as the shares allow,
    with no empty part when there are at least as many rows as parts), then
    positives (at least one per part when there are enough); negatives fill the
    rest of each part.
    """
    total = _at_least_one_each(_allocate(n_neg + n_pos, shares))
    c_pos = np.minimum(_at_least_one_each(_allocate(n_pos, shares)), total)
    for _ in range(n_pos - int(c_pos.sum())):
        c_pos[int(np.argmax(total - c_pos))] += 1
    return total - c_pos, c_pos


def _stratified(
    y: np.ndarray, shares: Sequence[float] | np.ndarray, rng: np.random.Generator
) -> list[np.ndarray]:
    """Indices of parts with the given shares, each class split in the same proportions."""
    neg, pos = _class_indices(y, rng)
    c_neg, c_pos = _stratified_counts(neg.size, pos.size, np.asarray(shares, dtype=np.float64))
    return _combine(_split_class(neg, c_neg), _split_class(pos, c_pos))


def _refuse_empty(
    parts: Sequence[np.ndarray], names: Sequence[str], *, source: Dataset, how: str
) -> None:
    empty = [name for part, name in zip(parts, names, strict=True) if part.size == 0]
    if empty:
        which = ", ".join(f"'{name}'" for name in empty)
        raise DataError(
            f"{how} of dataset '{source.name}' ({source.n_rows} rows, {source.n_positives} "
            f"positives) would leave partition {which} with no rows; use fewer parts or "
            "more data."
        )


def _datasets(ds: Dataset, parts: Sequence[np.ndarray], names: Sequence[str]) -> list[Dataset]:
    return [ds.subset(p, name=n) for p, n in zip(parts, names, strict=True)]


def _holdout_indices(
    ds: Dataset, fraction: float, rng: np.random.Generator, *, how: str
) -> tuple[np.ndarray, np.ndarray]:
    rest, held = _stratified(ds.y, [1.0 - fraction, fraction], rng)
    _refuse_empty([rest, held], ["rest", "holdout"], source=ds, how=how)
    return rest, held


def _iid_indices(ds: Dataset, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    return _stratified(ds.y, np.ones(n), rng)


def _dirichlet_indices(
    ds: Dataset,
    n: int,
    *,
    alpha: float,
    min_rows: int,
    min_positives: int,
    rng: np.random.Generator,
    owner: str,
    names: Sequence[str],
) -> list[np.ndarray]:
    neg, pos = _class_indices(ds.y, rng)
    if pos.size < n * min_positives or ds.n_rows < n * min_rows:
        raise DataError(
            f"{owner}: dataset '{ds.name}' has {ds.n_rows} rows and {pos.size} positives, too few "
            f"to give each of {n} institutions >= {min_rows} rows and >= {min_positives} "
            "positives; lower min_rows / min_positives or use fewer institutions."
        )
    ones = np.ones(n)
    c_neg = c_pos = np.zeros(n, dtype=np.int64)
    for _ in range(MAX_TRIES):
        p_neg, p_pos = rng.dirichlet(alpha * ones), rng.dirichlet(alpha * ones)
        if not (np.isfinite(p_neg).all() and np.isfinite(p_pos).all()):
            continue
        c_neg, c_pos = _allocate(neg.size, p_neg), _allocate(pos.size, p_pos)
        if ((c_neg + c_pos) >= min_rows).all() and (c_pos >= min_positives).all():
            return _combine(_split_class(neg, c_neg), _split_class(pos, c_pos))
    worst = int(
        np.argmin(np.minimum((c_neg + c_pos) / max(min_rows, 1), c_pos / max(min_positives, 1)))
    )
    raise DataError(
        f"{owner}: could not give each of {n} institutions >= {min_rows} rows and >= "
        f"{min_positives} positives from dataset '{ds.name}' ({ds.n_rows} rows, {pos.size} "
        f"positives) in {MAX_TRIES} Dirichlet(alpha={alpha}) draws (in the last one, "
        f"'{names[worst]}' got {int(c_neg[worst] + c_pos[worst])} rows and {int(c_pos[worst])} "
        "positives); increase alpha, lower min_rows / min_positives or use fewer institutions."
    )


def _quantity_indices(
    ds: Dataset,
    n: int,
    *,
    alpha: float,
    min_rows: int,
    rng: np.random.Generator,
    owner: str,
    names: Sequence[str],
) -> list[np.ndarray]:
    if ds.n_rows < n * min_rows:
        raise DataError(
            f"{owner}: dataset '{ds.name}' has {ds.n_rows} rows, too few to give each of {n} "
            f"institutions >= {min_rows} rows."
        )
    neg, pos = _class_indices(ds.y, rng)
    ones = np.ones(n)
    c_neg = c_pos = np.zeros(n, dtype=np.int64)
    for _ in range(MAX_TRIES):
        share = rng.dirichlet(alpha * ones)
        if not np.isfinite(share).all():
            continue
        c_neg, c_pos = _stratified_counts(neg.size, pos.size, share)
        if ((c_neg + c_pos) >= min_rows).all():
            return _combine(_split_class(neg, c_neg), _split_class(pos, c_pos))
    worst = int(np.argmin(c_neg + c_pos))
    raise DataError(
        f"{owner}: could not give each of {n} institutions >= {min_rows} rows from dataset "
        f"'{ds.name}' ({ds.n_rows} rows) in {MAX_TRIES} Dirichlet(alpha={alpha}) draws (in the "
        f"last one, partition '{names[worst]}' got {int(c_neg[worst] + c_pos[worst])} rows); "
        "increase alpha or use fewer institutions."
    )


# -- public partitioners ----------------------------------------------------------------
def holdout_split(ds: Dataset, *, test_fraction: float = 0.2, seed: int) -> tuple[Dataset, Dataset]:
    """Stratified split of ``ds`` into (rest, holdout).

    Parameters
    ----------
    ds : Dataset
        The data to split.
    test_fraction : float
        Share of rows (of each class) in the holdout, in (0, 1).
    seed : int
        Seed (>= 0).

    Returns
    -------
    tuple of Dataset
        ``(rest, holdout)``, named ``"<name>_rest"`` and ``"<name>_holdout"``;
        disjoint, together all rows.

    Raises
    ------
    DataError
        If either side would be empty.
    """
    owner = "holdout_split"
    ds = _check_dataset(ds, owner)
    frac = _check_fraction(test_fraction, "test_fraction", owner)
    rest, held = _holdout_indices(ds, frac, _rng(seed, owner, _STREAM_HOLDOUT), how=owner)
    return ds.subset(rest, name=f"{ds.name}_rest"), ds.subset(held, name=f"{ds.name}_holdout")


def partition_iid(ds: Dataset, n_institutions: int, *, seed: int) -> list[Dataset]:
    """Split ``ds`` into equal, stratified parts (the IID federation).

    Parameters
    ----------
    ds : Dataset
        The data to partition.
    n_institutions : int
        Number of parts (>= 1), named ``bank_a``, ``bank_b``, ...
    seed : int
        Seed (>= 0).

    Returns
    -------
    list of Dataset
        Disjoint parts covering all rows, each with (nearly) the same label rate.

    Raises
    ------
    DataError
        If a part would be empty.
    """
    owner = "partition_iid"
    ds = _check_dataset(ds, owner)
    n = _check_int(n_institutions, "n_institutions", owner, 1)
    names = institution_names(n)
    parts = _iid_indices(ds, n, _rng(seed, owner, _STREAM_PARTITION))
    _refuse_empty(parts, names, source=ds, how=owner)
    return _datasets(ds, parts, names)


def partition_dirichlet(
    ds: Dataset,
    n_institutions: int,
    *,
    alpha: float,
    seed: int,
    min_rows: int = 20,
    min_positives: int = 2,
) -> list[Dataset]:
    """Label-skewed partition: each class is spread over institutions by Dir(alpha).

    Negatives and positives get independent Dirichlet proportions, so
    institutions differ in size *and* label rate; small ``alpha`` means strong
    skew.  Draws are repeated (at most :data:`MAX_TRIES` times) until every part
    has at least ``min_rows`` rows and ``min_positives`` positives.

    Parameters
    ----------
    ds : Dataset
        The data to partition.
    n_institutions : int
        Number of parts (>= 1), named ``bank_a``, ``bank_b``, ...
    alpha : float
        Dirichlet concentration (> 0).
    seed : int
        Seed (>= 0).
    min_rows : int
        Minimum rows per part (>= 1).
    min_positives : int
        Minimum positives per part (>= 0).

    Returns
    -------
    list of Dataset
        Disjoint parts covering all rows.

    Raises
    ------
    DataError
        If the minimums are impossible or were not met within the allowed draws.
    """
    owner = "partition_dirichlet"
    ds = _check_dataset(ds, owner)
    n = _check_int(n_institutions, "n_institutions", owner, 1)
    a = _check_alpha(alpha, owner)
    min_rows = _check_int(min_rows, "min_rows", owner, 1)
    min_positives = _check_int(min_positives, "min_positives", owner, 0)
    names = institution_names(n)
    parts = _dirichlet_indices(
        ds,
        n,
        alpha=a,
        min_rows=min_rows,
        min_positives=min_positives,
        rng=_rng(seed, owner, _STREAM_PARTITION),
        owner=owner,
        names=names,
    )
    return _datasets(ds, parts, names)


def partition_quantity(
    ds: Dataset,
    n_institutions: int,
    *,
    alpha: float = 1.0,
    seed: int,
    min_rows: int = 1,
) -> list[Dataset]:
    """Quantity-skewed partition: sizes ~ Dir(alpha), label rate kept by stratification.

    Parameters
    ----------
    ds : Dataset
        The data to partition.
    n_institutions : int
        Number of parts (>= 1), named ``bank_a``, ``bank_b``, ...
    alpha : float
        Dirichlet concentration of the size shares (> 0); small = very unequal.
    seed : int
        Seed (>= 0).
    min_rows : int
        Minimum rows per part (>= 1); draws are repeated until it holds.

    Returns
    -------
    list of Dataset
        Disjoint parts covering all rows.

    Raises
    ------
    DataError
        If the minimum is impossible or was not met within the allowed draws.
    """
    owner = "partition_quantity"
    ds = _check_dataset(ds, owner)
    n = _check_int(n_institutions, "n_institutions", owner, 1)
    a = _check_alpha(alpha, owner)
    min_rows = _check_int(min_rows, "min_rows", owner, 1)
    names = institution_names(n)
    parts = _quantity_indices(
        ds,
        n,
        alpha=a,
        min_rows=min_rows,
        rng=_rng(seed, owner, _STREAM_PARTITION),
        owner=owner,
        names=names,
    )
    return _datasets(ds, parts, names)


# -- whole federations ------------------------------------------------------------------
def _local_split(
    ds: Dataset, name: str, *, val: float, test: float, rng: np.random.Generator
) -> InstitutionSplit:
    parts = _stratified(ds.y, [1.0 - val - test, val, test], rng)
    names = [f"{name}/train", f"{name}/val", f"{name}/test"]
    _refuse_empty(parts, names, source=ds, how="train/val/test split")
    train, val_ds, test_ds = _datasets(ds, parts, names)
    return InstitutionSplit(name=name, train=train, val=val_ds, test=test_ds)


def federate(
    ds: Dataset,
    n_institutions: int,
    *,
    scheme: Scheme = "dirichlet",
    alpha: float = 0.5,
    holdout_fraction: float = 0.2,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
    min_rows: int = 20,
    min_positives: int = 2,
) -> FederatedSplit:
    """Simulate a federation from one dataset.

    Steps: a stratified global holdout first; the rest is partitioned over
    ``n_institutions`` by ``scheme``; each institution's share is split
    (stratified) into train / val / test.

    Parameters
    ----------
    ds : Dataset
        The whole dataset.
    n_institutions : int
        Number of institutions (>= 1), named ``bank_a``, ``bank_b``, ...
    scheme : {"iid", "dirichlet", "quantity"}
        Equal stratified parts, label skew, or size skew.
    alpha : float
        Dirichlet concentration for ``"dirichlet"`` / ``"quantity"`` (> 0).
    holdout_fraction : float
        Share of all rows in the global holdout, in (0, 1).
    val_fraction, test_fraction : float
        Shares of each institution's rows for validation and local test, each in
        (0, 1), summing to < 1.
    seed : int
        Seed (>= 0).
    min_rows, min_positives : int
        Minimum rows per institution for ``"dirichlet"`` and ``"quantity"``, and
        minimum positives for ``"dirichlet"`` (``"iid"`` parts are equal anyway).

    Returns
    -------
    FederatedSplit
        Institutions' splits and the holdout: disjoint, together all rows.

    Raises
    ------
    ConfigError
        If a parameter is invalid.
    DataError
        If some part would be empty or the minimums cannot be met.
    """
    owner = "federate"
    ds = _check_dataset(ds, owner)
    n = _check_int(n_institutions, "n_institutions", owner, 1)
    if scheme not in SCHEMES:
        raise param_error("scheme", owner, f"one of {list(SCHEMES)}", scheme)
    a = _check_alpha(alpha, owner)
    hold = _check_fraction(holdout_fraction, "holdout_fraction", owner)
    val, test = _check_local_fractions(val_fraction, test_fraction, owner)
    min_rows = _check_int(min_rows, "min_rows", owner, 1)
    min_positives = _check_int(min_positives, "min_positives", owner, 0)
    _check_int(seed, "seed", owner, 0)

    rest_idx, held_idx = _holdout_indices(ds, hold, _rng(seed, owner, _STREAM_HOLDOUT), how=owner)
    rest = ds.subset(rest_idx)
    names = institution_names(n)
    rng = _rng(seed, owner, _STREAM_PARTITION)
    if scheme == "iid":
        parts = _iid_indices(rest, n, rng)
        _refuse_empty(parts, names, source=rest, how=f"{owner} (iid)")
    elif scheme == "dirichlet":
        parts = _dirichlet_indices(
            rest,
            n,
            alpha=a,
            min_rows=min_rows,
            min_positives=min_positives,
            rng=rng,
            owner=owner,
            names=names,
        )
    else:
        parts = _quantity_indices(
            rest, n, alpha=a, min_rows=min_rows, rng=rng, owner=owner, names=names
        )
    institutions = tuple(
        _local_split(
            rest.subset(p), name, val=val, test=test, rng=_rng(seed, owner, _STREAM_LOCAL, i)
        )
        for i, (p, name) in enumerate(zip(parts, names, strict=True))
    )
    split = FederatedSplit(institutions=institutions, holdout=ds.subset(held_idx, name="holdout"))
    logger.debug("federated %r into %s (%s)", ds, names, scheme)
    return split


def federate_institutions(
    parts: Mapping[str, Dataset],
    *,
    holdout_fraction: float = 0.2,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> FederatedSplit:
    """Build the split of institutions whose data is already separate.

    Each institution gives a stratified ``holdout_fraction`` of its rows to the
    global holdout (their union); the rest is split (stratified) into train / val
    / test with the given fractions.

    Parameters
    ----------
    parts : Mapping[str, Dataset]
        Institution name (path-safe) -> its data; all with the same features.
    holdout_fraction : float
        Share of each institution's rows in the holdout, in (0, 1).
    val_fraction, test_fraction : float
        Shares of each institution's remaining rows, each in (0, 1), sum < 1.
    seed : int
        Seed (>= 0).

    Returns
    -------
    FederatedSplit
        Institutions in mapping order and the pooled holdout.

    Raises
    ------
    ConfigError
        If a parameter or an institution name is invalid.
    DataError
        If features differ between institutions or some part would be empty.
    """
    owner = "federate_institutions"
    if not isinstance(parts, Mapping) or not parts:
        raise param_error("parts", owner, "a non-empty mapping name -> Dataset", parts)
    for name, ds in parts.items():
        check_institution_name(name, owner=owner)
        if not isinstance(ds, Dataset):
            raise param_error(
                "parts", owner, "a mapping name -> Dataset", f"{type(ds).__name__} for {name!r}"
            )
    check_same_features(list(parts.values()))
    hold = _check_fraction(holdout_fraction, "holdout_fraction", owner)
    val, test = _check_local_fractions(val_fraction, test_fraction, owner)
    _check_int(seed, "seed", owner, 0)
    institutions = []
    held = []
    for i, (name, ds) in enumerate(parts.items()):
        rest_idx, held_idx = _holdout_indices(
            ds, hold, _rng(seed, owner, _STREAM_HOLDOUT, i), how=f"{owner} (holdout of '{name}')"
        )
        held.append(ds.subset(held_idx, name=f"{name}/holdout"))
        institutions.append(
            _local_split(
                ds.subset(rest_idx, name=name),
                name,
                val=val,
                test=test,
                rng=_rng(seed, owner, _STREAM_LOCAL, i),
            )
        )
    return FederatedSplit(institutions=tuple(institutions), holdout=concat(held, name="holdout"))
