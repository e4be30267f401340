"""Names of institutions and the rule that keeps them safe as directory names.

Institutions appear as directory names in a saved split (``DIR/bank_a/train.npz``)
and in log lines and dashboards, so every name must be a short, path-safe token.
The default names ``bank_a``, ``bank_b``, ... are shared by the synthetic
generator and the partitioners so that the same federation looks the same
whichever way it was built.
"""

from __future__ import annotations

import re
import string

from consortium.errors import param_error

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def institution_name(index: int) -> str:
    """The default name of the ``index``-th institution (0 -> ``bank_a``).

    After ``bank_z`` the suffix grows like spreadsheet columns (``bank_aa``,
    ``bank_ab``, ...) so that names stay unique for any number of institutions.

    Parameters
    ----------
    index : int
        Zero-based position of the institution.

    Returns
    -------
    str
        The institution's name.
    """
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise param_error("index", "institution_name", "an int >= 0", index)
    letters = string.ascii_lowercase
    suffix = ""
    n = index + 1
    while n > 0:
        n, rem = divmod(n - 1, 26)
        suffix = letters[rem] + suffix
    return f"bank_{suffix}"


def institution_names(n_institutions: int) -> list[str]:
    """The default names of ``n_institutions`` institutions, in order.

    Parameters
    ----------
    n_institutions : int
        How many names to make (>= 1).

    Returns
    -------
    list of str
        ``["bank_a", "bank_b", ...]``.
    """
    if (
        isinstance(n_institutions, bool)
        or not isinstance(n_institutions, int)
        or n_institutions < 1
    ):
        raise param_error("n_institutions", "institution_names", "an int >= 1", n_institutions)
    return [institution_name(i) for i in range(n_institutions)]


def check_institution_name(name: object, *, owner: str) -> str:
    """Make sure ``name`` can serve as an institution and directory name.

    A valid name starts with a letter or digit and holds only letters, digits,
    ``_``, ``.`` and ``-`` (at most 64 characters), so that it can never escape
    the split directory (``../x``) or collide with hidden files.

    Parameters
    ----------
    name : object
        The candidate name.
    owner : str
        The function or class asking, used in the error message.

    Returns
    -------
    str
        ``name`` unchanged.

    Raises
    ------
    ConfigError
        If the name is not a path-safe token.
    """
    if not isinstance(name, str) or not _SAFE_NAME.match(name):
        raise param_error(
            "name",
            owner,
            "a path-safe institution name (letters, digits, '_', '.', '-'; "
            "starting with a letter or digit; at most 64 characters)",
            name,
        )
    return name
