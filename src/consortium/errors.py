"""One root exception for the whole package, with one error shape.

Every error that bad input can cause is a :class:`ConsortiumError` subclass whose
message names the problem: which file, field or parameter, what was expected and
what was received ("The 'alpha' parameter of partition_dirichlet must be > 0.
Got -1 instead.").  Callers can catch the root class at a trust boundary (CLI,
node, edge agent) and report the message without a traceback.
"""

from __future__ import annotations


class ConsortiumError(Exception):
    """Root of every error consortium raises on purpose."""


class ConfigError(ConsortiumError, ValueError):
    """A parameter or configuration value is invalid."""


class DataError(ConsortiumError, ValueError):
    """Input data (file, array, column, partition) is malformed or unusable."""


class StoreError(ConsortiumError):
    """The run store cannot be reached or holds inconsistent data."""


class FederationError(ConsortiumError):
    """A federated round could not be completed (too few nodes, bad replies)."""


def param_error(name: str, owner: str, expected: str, got: object) -> ConfigError:
    """Build a :class:`ConfigError` in the project's one message shape.

    Parameters
    ----------
    name : str
        The parameter's name.
    owner : str
        The function or class the parameter belongs to.
    expected : str
        What a valid value looks like, e.g. ``"a float in (0, 1)"``.
    got : object
        The value that was received.
    """
    return ConfigError(f"The '{name}' parameter of {owner} must be {expected}. Got {got!r} instead.")
