"""Distributed Skellam noise of DP-FedAvg, from the round's config to the institution's noise hook.

Under secure aggregation the coordinator never holds an un-noised aggregate:
each institution adds its share of Skellam noise to its *quantised* update
before masking (:class:`~consortium.privacy.mechanisms.SkellamMechanism`).  The
parameters are chosen per round by the coordinator (they depend on the clip
bound, the number of invited institutions and the quantisation scale) and travel
in the round's ``config`` record; :func:`noise_for_message` turns them into the
``noise_fn`` of :func:`consortium.secagg.flower.make_secagg_mod` on the node.

The node checks that the scale the coordinator accounted with is the scale of the
encoding it actually uses (both derive it from the same public parameters); a
mismatch means the accounting would not describe the noise, so the node refuses
the round (it then counts as dropped) instead of adding the wrong noise.

Only numpy and the mechanisms are imported: the secure-aggregation stages run
without PyTorch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message

from consortium.errors import ConfigError
from consortium.privacy.mechanisms import SkellamMechanism

logger = logging.getLogger(__name__)

__all__ = [
    "COUNT_METRIC",
    "SkellamNoise",
    "noise_config",
    "noise_for_message",
]

CONFIG_RECORD = "config"
"""Record of the training message that carries the round's options (``consortium.federation.messages.CONFIG``)."""
UPDATE_SEGMENT = "update"
COUNT_METRIC = "unclipped"
"""Adaptive clipping's centred bit ``1[||Δ|| <= C] - 1/2``, aggregated as training metric ``unclipped``."""
COUNT_SEGMENT = f"metric/{COUNT_METRIC}"
SCALE_TOLERANCE = 1e-9
"""Relative difference allowed between the accounted and the actual quantisation scale (float round-off)."""

_UPDATE_PREFIX = "dp-skellam-"
_COUNT_PREFIX = "dp-skellam-count-"


def _fields(mech: SkellamMechanism, prefix: str) -> dict[str, int | float]:
    return {
        f"{prefix}noise-multiplier": float(mech.noise_multiplier),
        f"{prefix}clip-norm": float(mech.clip_norm),
        f"{prefix}scale": float(mech.scale),
        f"{prefix}dimension": int(mech.dimension),
        f"{prefix}participants": int(mech.expected_participants),
    }


def noise_config(update: SkellamMechanism, count: SkellamMechanism | None = None) -> dict[str, int | float | str]:
    """The round-config keys that ask every institution for its Skellam share (update, and count if adaptive)."""
    out: dict[str, int | float | str] = {"dp-noise": "skellam", **_fields(update, _UPDATE_PREFIX)}
    if count is not None:
        out.update(_fields(count, _COUNT_PREFIX))
    return out


def _mechanism(config: Mapping[str, Any], prefix: str) -> SkellamMechanism:
    try:
        return SkellamMechanism(
            noise_multiplier=float(config[f"{prefix}noise-multiplier"]),
            clip_norm=float(config[f"{prefix}clip-norm"]),
            scale=float(config[f"{prefix}scale"]),
            dimension=int(config[f"{prefix}dimension"]),
            expected_participants=int(config[f"{prefix}participants"]),
        )
    except KeyError as exc:
        raise ConfigError(
            f"The round asks for Skellam noise but its config lacks {exc.args[0]!r}; coordinator and node "
            "versions differ."
        ) from None


@dataclass(frozen=True)
class SkellamNoise:
    """The institution's noise hook for one round: Skellam shares on the update (and the count)."""

    update: SkellamMechanism
    count: SkellamMechanism | None = None

    def __call__(
        self, segment: str, shape: tuple[int, ...], scale: float, rng: np.random.Generator
    ) -> np.ndarray | None:
        if segment == UPDATE_SEGMENT:
            return self._share(self.update, segment, shape, scale, rng)
        if segment == COUNT_SEGMENT and self.count is not None:
            return self._share(self.count, segment, shape, scale, rng)
        return None

    @staticmethod
    def _share(
        mech: SkellamMechanism, segment: str, shape: tuple[int, ...], scale: float, rng: np.random.Generator
    ) -> np.ndarray | None:
        if not math.isclose(scale, mech.scale, rel_tol=SCALE_TOLERANCE):
            raise ConfigError(
                f"Segment '{segment}' is encoded with scale {scale!r}, but the round's privacy accounting assumes "
                f"scale {mech.scale!r}; refusing to add noise the accountant does not describe."
            )
        if tuple(shape) != (mech.dimension,):
            raise ConfigError(
                f"Segment '{segment}' has shape {tuple(shape)}, but the round's privacy accounting assumes "
                f"dimension {mech.dimension}."
            )
        # SkellamMechanism.noise_fn draws one institution's share for its (update) segment.
        return mech.noise_fn(UPDATE_SEGMENT, shape, scale, rng)


def noise_for_message(msg: Message) -> SkellamNoise | None:
    """The Skellam hook a training message's config asks for, or None (no distributed noise).

    Raises
    ------
    ConfigError
        The config asks for noise with missing or invalid parameters (the node sits out the round).
    """
    if not msg.has_content():
        return None
    config = msg.content.get(CONFIG_RECORD)
    if not isinstance(config, ConfigRecord) or config.get("dp-noise") != "skellam":
        return None
    update = _mechanism(config, _UPDATE_PREFIX)
    count = _mechanism(config, _COUNT_PREFIX) if f"{_COUNT_PREFIX}scale" in config else None
    logger.info(
        "Adding this institution's Skellam share (σ = %.4g, C = %.4g, %d institutions%s) before masking.",
        update.noise_multiplier, update.clip_norm, update.expected_participants,
        "" if count is None else ", and to the clipped count",
    )
    return SkellamNoise(update=update, count=count)
