"""The one error type of :mod:`consortium.continual`.

Detectors raise :class:`DriftInputError` for input they cannot judge (a window
too small for the test to mean anything, a reference in which every feature is
constant, a matrix of the wrong width).  The edge-facing
:class:`~consortium.continual.monitor.DriftMonitor` catches it and counts it in
its summary instead: a bad window must never stop an agent from scoring.
"""

from __future__ import annotations

from consortium.errors import DataError


class DriftInputError(DataError):
    """A window or reference cannot be tested for drift; the message says why and what was expected."""
