"""Save and load a :class:`FederatedSplit` as a directory deployed nodes can read.

Layout::

    DIR/split.json              manifest: institutions, row and positive counts, features
    DIR/holdout.npz             global holdout (coordinator side only)
    DIR/<name>/train.npz        one directory per institution, so that a node
    DIR/<name>/val.npz          only needs its own folder:
    DIR/<name>/test.npz             consortium node --data DIR/bank_a

The manifest lets :func:`load_split` detect a folder that was changed or only
partly copied, instead of silently training on different data.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from consortium.data.dataset import Dataset
from consortium.data.federated_split import FederatedSplit, InstitutionSplit
from consortium.data.loaders import load_npz, save_npz
from consortium.data.naming import check_institution_name
from consortium.errors import ConfigError, DataError, param_error

logger = logging.getLogger(__name__)

MANIFEST = "split.json"
HOLDOUT_FILE = "holdout.npz"
PARTS = ("train", "val", "test")
_FORMAT = "consortium.federated-split"
_VERSION = 1


def _summary(ds: Dataset) -> dict[str, int]:
    return {"rows": ds.n_rows, "positives": ds.n_positives}


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".split.", suffix=".json.tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, indent=2)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_split(split: FederatedSplit, directory: str | Path) -> Path:
    """Write ``split`` under ``directory`` (created if needed) and return the directory.

    Parameters
    ----------
    split : FederatedSplit
        The split to store.
    directory : str or Path
        Target directory; existing files of the same names are replaced.

    Returns
    -------
    Path
        ``directory``.
    """
    if not isinstance(split, FederatedSplit):
        raise param_error("split", "save_split", "a FederatedSplit", type(split).__name__)
    root = Path(directory)
    if root.exists() and not root.is_dir():
        raise DataError(f"Split directory '{root}' exists but is not a directory.")
    root.mkdir(parents=True, exist_ok=True)
    institutions = []
    for inst in split.institutions:
        check_institution_name(inst.name, owner="save_split")
        for part in PARTS:
            save_npz(getattr(inst, part), root / inst.name / f"{part}.npz")
        institutions.append({"name": inst.name, **{p: _summary(getattr(inst, p)) for p in PARTS}})
    save_npz(split.holdout, root / HOLDOUT_FILE)
    _write_json(
        root / MANIFEST,
        {
            "format": _FORMAT,
            "version": _VERSION,
            "feature_names": list(split.feature_names),
            "holdout": _summary(split.holdout),
            "institutions": institutions,
        },
    )
    logger.info("saved split with %d institutions to %s", len(institutions), root)
    return root


def load_institution(directory: str | Path, *, name: str | None = None) -> InstitutionSplit:
    """Load one institution's ``train.npz``, ``val.npz`` and ``test.npz``.

    Parameters
    ----------
    directory : str or Path
        The institution's folder, e.g. ``DIR/bank_a``.
    name : str, optional
        Institution name; defaults to the folder's name.

    Returns
    -------
    InstitutionSplit
        The institution's data.

    Raises
    ------
    DataError
        If the folder or one of the files is missing (listing what is there) or
        a file is invalid.
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise DataError(f"Institution directory '{folder}' does not exist or is not a directory.")
    missing = [f"{p}.npz" for p in PARTS if not (folder / f"{p}.npz").is_file()]
    if missing:
        present = sorted(p.name for p in folder.iterdir())
        raise DataError(
            f"Institution directory '{folder}' lacks {missing}; expected train.npz, val.npz and "
            f"test.npz, found {present}."
        )
    inst_name = folder.resolve().name if name is None else name
    parts = {p: load_npz(folder / f"{p}.npz") for p in PARTS}
    try:
        return InstitutionSplit(name=inst_name, **parts)
    except (ConfigError, DataError) as exc:
        raise DataError(f"Institution directory '{folder}': {exc}") from exc


def _read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not path.is_file():
        raise DataError(
            f"'{root}' is not a saved federated split: '{MANIFEST}' is missing "
            "(write one with save_split)."
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"Manifest '{path}' is not valid JSON ({exc}).") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
        raise DataError(f'Manifest \'{path}\' has no "format": "{_FORMAT}" entry.')
    if manifest.get("version") != _VERSION:
        raise DataError(
            f"Manifest '{path}' has version {manifest.get('version')!r}; this release reads "
            f"version {_VERSION}."
        )
    insts = manifest.get("institutions")
    if (
        not isinstance(insts, list)
        or not insts
        or not all(isinstance(i, dict) and isinstance(i.get("name"), str) for i in insts)
    ):
        raise DataError(
            f"Manifest '{path}': 'institutions' must be a non-empty list of objects with a 'name'."
        )
    return manifest


def _check_counts(ds: Dataset, expected: object, where: str) -> None:
    if isinstance(expected, dict) and expected.get("rows") != ds.n_rows:
        raise DataError(
            f"{where} has {ds.n_rows} rows but the manifest records {expected.get('rows')}; "
            "the split directory was modified or partly copied."
        )


def load_split(directory: str | Path) -> FederatedSplit:
    """Load a split written by :func:`save_split`.

    Parameters
    ----------
    directory : str or Path
        The split directory.

    Returns
    -------
    FederatedSplit
        The institutions (in manifest order) and the holdout.

    Raises
    ------
    DataError
        Missing or invalid manifest, missing files, or row counts that differ
        from the manifest.
    """
    root = Path(directory)
    if not root.is_dir():
        raise DataError(f"Split directory '{root}' does not exist or is not a directory.")
    manifest = _read_manifest(root)
    institutions = []
    for entry in manifest["institutions"]:
        name = entry["name"]
        try:
            check_institution_name(name, owner="load_split")
        except ConfigError as exc:
            raise DataError(f"Manifest '{root / MANIFEST}': {exc}") from exc
        inst = load_institution(root / name, name=name)
        for part in PARTS:
            _check_counts(
                getattr(inst, part), entry.get(part), f"'{root / name / (part + '.npz')}'"
            )
        institutions.append(inst)
    holdout_path = root / HOLDOUT_FILE
    if not holdout_path.is_file():
        raise DataError(f"Split directory '{root}' lacks '{HOLDOUT_FILE}'.")
    holdout = load_npz(holdout_path)
    _check_counts(holdout, manifest.get("holdout"), f"'{holdout_path}'")
    try:
        split = FederatedSplit(institutions=tuple(institutions), holdout=holdout)
    except (ConfigError, DataError) as exc:
        raise DataError(f"Split directory '{root}': {exc}") from exc
    if list(split.feature_names) != manifest.get("feature_names"):
        raise DataError(
            f"Split directory '{root}': feature names of the files differ from the manifest."
        )
    return split
