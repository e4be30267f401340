"""Errors of secure aggregation, tagged with the protocol stage they happened in.

All of them are :class:`~consortium.errors.FederationError` subclasses, so a
coordinator loop that already handles failed rounds handles these too.
"""

from __future__ import annotations

from collections.abc import Mapping

from consortium.errors import FederationError


class CryptoError(FederationError):
    """A cryptographic check failed (bad key, tampered ciphertext, bad share)."""


class SecAggError(FederationError):
    """A protocol rule was violated at a given stage.

    Parameters
    ----------
    message : str
        What went wrong and how to fix it.
    stage : str
        Name of the protocol stage (``"advertise_keys"``, ``"share_keys"``,
        ``"masked_input"``, ``"unmask"``).
    """

    def __init__(self, message: str, *, stage: str) -> None:
        super().__init__(f"[secagg stage '{stage}'] {message}")
        self.stage = stage


class SecAggAbort(SecAggError):  # noqa: N818 - the name the federation layer expects
    """Too few institutions survived a stage: the round is abandoned cleanly.

    The global model must stay unchanged; no individual contribution was or
    can be unmasked from what the coordinator holds.

    Parameters
    ----------
    stage : str
        The stage at which the round could not continue.
    counts : Mapping[str, int]
        Numbers that explain the decision, e.g. ``{"invited": 5, "answered": 2,
        "threshold": 3}``.
    reason : str
        One sentence explaining the decision.
    """

    def __init__(self, *, stage: str, counts: Mapping[str, int], reason: str) -> None:
        shown = ", ".join(f"{k}={v}" for k, v in counts.items())
        super().__init__(
            f"Round aborted: {reason} ({shown}). The global model is unchanged; "
            "no individual contribution can be unmasked from what the coordinator holds.",
            stage=stage,
        )
        self.counts = dict(counts)
        self.reason = reason
