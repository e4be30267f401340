"""Model arrays to bytes and back, exactly, without pickle.

A checkpoint is the global model's list of arrays after a round.  The run store
keeps it as one uncompressed ``.npz`` blob: ``.npz`` records every array's dtype,
shape and memory order, so a float32 tensor comes back as float32 with the same
shape, and it is loaded with ``allow_pickle=False`` so that a tampered database
cannot execute code in the coordinator.  Arrays that need pickle (object or
custom dtypes) are refused when encoding instead of failing at resume time.
Compression is left out on purpose: model weights barely compress and the
blob is written once per round while the coordinator waits.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Sequence

import numpy as np

from consortium.errors import DataError

_KEY_PREFIX = "arr_"


def _key(index: int) -> str:
    return f"{_KEY_PREFIX}{index}"


def encode_arrays(arrays: Sequence[np.ndarray]) -> bytes:
    """Serialise a list of arrays into one ``.npz`` byte blob.

    Parameters
    ----------
    arrays : sequence of numpy.ndarray
        The arrays in model order.  Any shape (including 0-d and empty) and any
        plain dtype (numeric, bool, fixed-width string, structured) is kept exactly.

    Returns
    -------
    bytes
        The blob; :func:`decode_arrays` gives the arrays back in the same order.

    Raises
    ------
    DataError
        If an element is not a numpy array, or its dtype can only be stored with
        pickle (object dtype, ``StringDType``), naming the element's index.
    """
    if isinstance(arrays, np.ndarray) or not isinstance(arrays, Sequence):
        raise DataError(
            f"Checkpoint arrays must be a sequence (list or tuple) of numpy arrays. "
            f"Got {type(arrays).__name__} instead."
        )
    named: dict[str, np.ndarray] = {}
    for index, array in enumerate(arrays):
        if not isinstance(array, np.ndarray):
            raise DataError(
                f"Checkpoint array {index} must be a numpy.ndarray. "
                f"Got {type(array).__name__} instead."
            )
        if array.dtype.hasobject:
            raise DataError(
                f"Checkpoint array {index} has dtype {array.dtype} (shape {array.shape}), "
                f"which can only be stored with pickle; the store refuses pickle. "
                f"Convert it to a numeric, bool or fixed-width string dtype."
            )
        named[_key(index)] = array
    buffer = io.BytesIO()
    try:
        np.savez(buffer, allow_pickle=False, **named)
    except ValueError as exc:  # a dtype that slipped past the hasobject check
        raise DataError(f"Checkpoint arrays cannot be serialised without pickle: {exc}") from exc
    return buffer.getvalue()


def decode_arrays(blob: bytes) -> list[np.ndarray]:
    """Read back the arrays written by :func:`encode_arrays`.

    Parameters
    ----------
    blob : bytes
        An ``.npz`` blob from :func:`encode_arrays`.

    Returns
    -------
    list of numpy.ndarray
        The arrays in their original order, dtype, shape and memory order.

    Raises
    ------
    DataError
        If the blob is not a valid ``.npz`` archive of ``arr_0 .. arr_{n-1}`` or an
        entry would need pickle to load.
    """
    try:
        with np.load(io.BytesIO(bytes(blob)), allow_pickle=False) as archive:
            names = set(archive.files)
            expected = {_key(i) for i in range(len(names))}
            if names != expected:
                raise DataError(
                    f"Checkpoint blob must hold entries {sorted(expected)}. "
                    f"Got {sorted(names)} instead."
                )
            return [archive[_key(i)] for i in range(len(names))]
    except DataError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"Checkpoint blob is not a readable .npz archive: {exc}") from exc
