"""Read and write datasets: ADBench-style ``.npz`` archives and headed CSV files.

An institution's data enters the system through these functions, so each check
reports the file and the exact place of the problem (key, line, column) in words
an operator can act on, instead of a NumPy traceback.  Only NumPy and the
standard ``csv`` module are used so that edge nodes need nothing else.
"""

from __future__ import annotations

import csv
import logging
import os
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from consortium.data.dataset import Dataset, _listed
from consortium.errors import DataError, param_error

logger = logging.getLogger(__name__)

_NPZ_KEYS = ("X", "y")


def _existing_file(path: str | Path, *, kind: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise DataError(f"{kind} file '{p}' does not exist.")
    if not p.is_file():
        raise DataError(f"{kind} file '{p}' is not a regular file (is it a directory?).")
    return p


def _build(path: Path, x: np.ndarray, y: np.ndarray, names: Sequence[str], name: str) -> Dataset:
    """Construct the dataset, prefixing any validation error with the file."""
    try:
        return Dataset(X=x, y=y, feature_names=tuple(names), name=name)
    except DataError as exc:
        raise DataError(f"File '{path}': {exc}") from exc


# -- npz --------------------------------------------------------------------------------
def load_npz(path: str | Path, *, name: str | None = None) -> Dataset:
    """Load a dataset stored as a NumPy ``.npz`` archive (ADBench format).

    The archive must hold ``X`` (2-D, numeric) and ``y`` (1-D, labels 0/1).
    Optional entries: ``feature_names`` (1-D string array, one per column) and
    ``name`` (as written by :func:`save_npz`).

    Parameters
    ----------
    path : str or Path
        The ``.npz`` file.
    name : str, optional
        Name of the dataset; defaults to the stored ``name`` entry, else the file
        stem.

    Returns
    -------
    Dataset
        Features as ``float32``, labels as ``int64``; columns are named
        ``f0 .. f{d-1}`` unless the file stores ``feature_names``.

    Raises
    ------
    DataError
        Missing or corrupt file, missing key (the message lists the keys that are
        present), wrong shapes, non-numeric values, NaN/inf, labels outside {0, 1}.
    """
    p = _existing_file(path, kind="Dataset")
    try:
        archive = np.load(p, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(
            f"File '{p}' is not a readable .npz archive ({type(exc).__name__}: {exc})."
        ) from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(
            f"File '{p}' holds a single array (.npy), not an .npz archive with keys 'X' and 'y'."
        )
    with archive:
        present = list(archive.files)
        missing = [k for k in _NPZ_KEYS if k not in present]
        if missing:
            raise DataError(
                f"File '{p}' has no {', '.join(repr(k) for k in missing)} array; "
                f"expected keys 'X' and 'y', found {_listed(sorted(present))}."
            )
        try:
            x = archive["X"]
            y = archive["y"]
            stored_names = archive["feature_names"] if "feature_names" in present else None
            stored_name = archive["name"] if "name" in present else None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise DataError(
                f"File '{p}' is corrupt or holds object arrays that cannot be loaded safely "
                f"({type(exc).__name__}: {exc})."
            ) from exc
    if x.dtype.kind not in "biuf":
        raise DataError(f"File '{p}': array 'X' has dtype {x.dtype}; expected numbers.")
    if x.ndim != 2:
        raise DataError(
            f"File '{p}': array 'X' must be 2-D (rows x features); got shape {x.shape}."
        )
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.dtype.kind not in "biuf":
        raise DataError(f"File '{p}': array 'y' has dtype {y.dtype}; expected integer labels.")
    if y.ndim != 1:
        raise DataError(f"File '{p}': array 'y' must be 1-D; got shape {y.shape}.")
    if x.shape[0] != y.shape[0]:
        raise DataError(
            f"File '{p}': 'X' has {x.shape[0]} rows but 'y' has {y.shape[0]} labels; "
            "expected the same length."
        )
    if stored_names is None:
        names = [f"f{i}" for i in range(x.shape[1])]
    else:
        if stored_names.dtype.kind not in "US" or stored_names.shape != (x.shape[1],):
            raise DataError(
                f"File '{p}': array 'feature_names' must be a 1-D string array of length "
                f"{x.shape[1]} (one per column of 'X'); got dtype {stored_names.dtype}, "
                f"shape {stored_names.shape}."
            )
        names = [str(n) for n in stored_names.astype(str)]
    if name is None:
        name = (
            str(stored_name.astype(str))
            if stored_name is not None and stored_name.ndim == 0
            else p.stem
        )
    return _build(p, x, y, names, name)


def save_npz(dataset: Dataset, path: str | Path) -> Path:
    """Write ``dataset`` as a compressed ``.npz`` that :func:`load_npz` reads back.

    The file holds ``X``, ``y``, ``feature_names`` and ``name``.  It is written to
    a temporary file first and then renamed, so a crash never leaves a
    half-written archive that a node would later load.

    Parameters
    ----------
    dataset : Dataset
        The data to write.
    path : str or Path
        Target file; ``.npz`` is appended if missing.  Parent directories are
        created.

    Returns
    -------
    Path
        The path actually written.
    """
    if not isinstance(dataset, Dataset):
        raise param_error("dataset", "save_npz", "a Dataset", type(dataset).__name__)
    p = Path(path)
    if p.suffix != ".npz":
        p = p.with_name(p.name + ".npz")
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.stem}.", suffix=".npz.tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez_compressed(
                fh,
                X=dataset.X,
                y=dataset.y,
                feature_names=np.asarray(dataset.feature_names, dtype=str),
                name=np.asarray(dataset.name, dtype=str),
            )
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    logger.debug("wrote %r to %s", dataset, p)
    return p


# -- csv --------------------------------------------------------------------------------
def _parse_labels(p: Path, label_column: str, cells: list[str], lines: list[int]) -> np.ndarray:
    values = np.empty(len(cells), dtype=np.float64)
    for i, cell in enumerate(cells):
        try:
            values[i] = float(cell)
        except ValueError:
            raise DataError(
                f"File '{p}', line {lines[i]}, column '{label_column}': label {cell!r} is not "
                "a number; expected 0 or 1."
            ) from None
    bad = ~np.isin(values, (0.0, 1.0))
    if bad.any():
        bad_values = sorted({cells[i].strip() for i in np.flatnonzero(bad)})
        first_lines = [lines[i] for i in np.flatnonzero(bad)]
        raise DataError(
            f"File '{p}', column '{label_column}': {int(bad.sum())} labels are not 0 or 1 "
            f"(values {_listed(bad_values)}, lines {_listed(first_lines)}); expected only 0 and 1."
        )
    return values.astype(np.int64)


def _parse_features(
    p: Path, columns: list[str], cells: list[list[str]], lines: list[int]
) -> np.ndarray:
    """Convert the feature cells to float64, naming the first bad cell on failure."""
    d = len(columns)
    if not cells:
        return np.zeros((0, d), dtype=np.float64)
    try:
        x = np.asarray(cells, dtype=str).astype(np.float64)
    except ValueError:
        x = None
    if x is None:
        x = np.empty((len(cells), d), dtype=np.float64)
        for r, row in enumerate(cells):
            for c, cell in enumerate(row):
                if not cell.strip():
                    raise DataError(
                        f"File '{p}', line {lines[r]}, column '{columns[c]}': the cell is empty; "
                        "expected a number."
                    )
                try:
                    x[r, c] = float(cell)
                except ValueError:
                    raise DataError(
                        f"File '{p}', line {lines[r]}, column '{columns[c]}': {cell!r} is not "
                        "a number."
                    ) from None
    bad = ~np.isfinite(x) | (np.abs(x) > np.finfo(np.float32).max)
    if bad.any():
        r, c = (int(v) for v in np.argwhere(bad)[0])
        raise DataError(
            f"File '{p}', line {lines[r]}, column '{columns[c]}': value {cells[r][c]!r} is "
            f"NaN, infinite or beyond float32 range ({int(bad.sum())} such cells in the file); "
            "expected finite numbers."
        )
    return x


def load_csv(
    path: str | Path,
    *,
    label_column: str,
    name: str | None = None,
    feature_columns: Sequence[str] | None = None,
) -> Dataset:
    """Load a dataset from a comma-separated file with a header row.

    Parameters
    ----------
    path : str or Path
        The CSV file (UTF-8, optional byte-order mark).  Blank lines are skipped.
    label_column : str
        Header name of the 0/1 label column.
    name : str, optional
        Name of the dataset; defaults to the file stem.
    feature_columns : sequence of str, optional
        Columns to use as features, in this order; defaults to every column but
        the label, in file order.

    Returns
    -------
    Dataset
        Features as ``float32`` named after the header, labels as ``int64``.

    Raises
    ------
    DataError
        Missing/empty file, missing header, unknown label or feature column (the
        message lists the header), duplicate column names, ragged rows, empty,
        non-numeric or NaN/inf cells (with line and column), labels outside {0, 1}.
    """
    p = _existing_file(path, kind="CSV")
    if not isinstance(label_column, str) or not label_column:
        raise param_error("label_column", "load_csv", "a non-empty column name", label_column)
    try:
        with p.open("r", newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header: list[str] | None = None
            header_line = 0
            rows: list[list[str]] = []
            lines: list[int] = []
            for row in reader:
                if not row or all(not cell.strip() for cell in row):
                    continue
                if header is None:
                    header = [cell.strip() for cell in row]
                    header_line = reader.line_num
                    continue
                rows.append(row)
                lines.append(reader.line_num)
    except UnicodeDecodeError as exc:
        raise DataError(f"File '{p}' is not UTF-8 text ({exc}).") from exc
    except csv.Error as exc:
        raise DataError(f"File '{p}' is not valid CSV ({exc}).") from exc
    if header is None:
        raise DataError(f"CSV file '{p}' is empty; expected a header row and data rows.")
    if all(_is_number(cell) for cell in header):
        raise DataError(
            f"File '{p}', line {header_line}: the first row {_listed(header)} looks like data; "
            "expected a header row with column names."
        )
    dupes = sorted({c for c in header if header.count(c) > 1})
    if dupes:
        raise DataError(f"File '{p}': header has duplicate column names {_listed(dupes)}.")
    if label_column not in header:
        raise DataError(
            f"File '{p}': label column '{label_column}' is not in the header; "
            f"columns are {_listed(header, limit=50)}."
        )
    if feature_columns is None:
        features = [c for c in header if c != label_column]
    else:
        features = list(feature_columns)
        unknown = [c for c in features if c not in header]
        if unknown:
            raise DataError(
                f"File '{p}': feature columns {_listed(unknown)} are not in the header; "
                f"columns are {_listed(header, limit=50)}."
            )
        if label_column in features:
            raise DataError(
                f"File '{p}': the label column '{label_column}' cannot also be a feature column."
            )
    if not features:
        raise DataError(f"File '{p}': no feature columns besides the label '{label_column}'.")
    width = len(header)
    for row, line in zip(rows, lines, strict=True):
        if len(row) != width:
            raise DataError(
                f"File '{p}', line {line}: row has {len(row)} cells; expected {width} "
                f"(one per header column)."
            )
    label_idx = header.index(label_column)
    feat_idx = [header.index(c) for c in features]
    for r, row in enumerate(rows):
        if not row[label_idx].strip():
            raise DataError(
                f"File '{p}', line {lines[r]}, column '{label_column}': the label cell is empty; "
                "expected 0 or 1."
            )
    y = _parse_labels(p, label_column, [row[label_idx] for row in rows], lines)
    x = _parse_features(p, features, [[row[i] for i in feat_idx] for row in rows], lines)
    logger.debug("read %d rows x %d features from %s", x.shape[0], x.shape[1], p)
    return _build(p, x, y, features, p.stem if name is None else name)


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True
