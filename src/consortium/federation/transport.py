"""How the coordinator obtains the *sum* of the institutions' contributions.

A :class:`Transport` turns "send this to these nodes" into an
:class:`~consortium.federation.aggregation.AggregateResult`.  The
:class:`SecureTransport` (default) runs consortium's secure aggregation so the
coordinator learns nothing but sums; :class:`PlainTransport` sums clear-text
replies and exists for trusted set-ups, debugging and as the baseline that
benchmarks compare against.
"""

from __future__ import annotations

import dataclasses
import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from consortium.errors import FederationError
from consortium.federation import messages as m
from consortium.federation.aggregation import AggregateResult, weighted_sum
from consortium.federation.config import FederationConfig
from consortium.federation.robust import robust_aggregate
from consortium.federation.validation import InvalidUpdateError, contribution_from_reply

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UpdateBounds:
    """One round's bounds on what an institution sends, set by institution-level DP.

    Attributes
    ----------
    clip_norm : float
        L2 bound of one update (the sensitivity the noise is calibrated to).
    weight_cap : float
        Cap of the reported weight; DP-FedAvg institutions report weight 1 with cap 1
        (unweighted: example counts would leak un-noised).
    noise_headroom : float
        Room (value units) reserved in the secure-aggregation encoding for distributed noise.
    metric_bounds : Mapping[str, float]
        The only training metrics summed (the privacy layer's own, e.g. the noisy clipped count).
    modulus_bits : int, optional
        Bits of the secure-aggregation encoding (default the maximum); the privacy
        layer lowers it to keep the integer noise in the range its sampler is exact.
    coordinate_bound : float, optional
        Bound on each coordinate of a contribution, replacing the config's
        ``coordinate_bound`` (at most ``clip_norm``); set when the contribution
        already carries its noise (``dpsgd-secagg``) and the encoding must hold it.
    """

    clip_norm: float
    weight_cap: float = 1.0
    noise_headroom: float = 0.0
    metric_bounds: Mapping[str, float] = field(default_factory=dict)
    modulus_bits: int | None = None
    coordinate_bound: float | None = None


class Transport(ABC):
    """Sums institution contributions for the coordinator."""

    name: str = "base"

    @abstractmethod
    def sum_updates(
        self,
        grid: Grid,
        *,
        node_ids: Sequence[int],
        names: Mapping[int, str],
        content: RecordDict,
        reference: Sequence[np.ndarray],
        config: FederationConfig,
        bounds: UpdateBounds | None = None,
    ) -> AggregateResult:
        """Send a ``train`` message to each node and return the sum of weighted deltas.

        ``bounds`` (institution-level DP) replaces the config's clip bound, weight
        cap and aggregated metrics for this round.
        """

    @abstractmethod
    def sum_statistics(
        self,
        grid: Grid,
        *,
        node_ids: Sequence[int],
        names: Mapping[int, str],
        config: FederationConfig,
        n_features: int,
        request: Mapping[str, int | float | str] | None = None,
    ) -> AggregateResult:
        """Ask each node for its feature statistics (exact limbs) and return their sum.

        ``request`` is the statistics query's config (e.g. the noise of private statistics).
        """


class PlainTransport(Transport):
    """Clear-text replies summed on the coordinator (no secure aggregation)."""

    name = "plain"

    def _collect(
        self,
        grid: Grid,
        messages: list[Message],
        names: Mapping[int, str],
        reference: Sequence[np.ndarray] | None,
        timeout: float,
        config: FederationConfig | None = None,
    ) -> AggregateResult:
        """Collect replies, validate each, and combine them (weighted sum or a robust rule).

        ``config`` (training rounds only) supplies the norm bound and the
        aggregation rule; statistics rounds pass ``None``.
        """
        asked = {msg.metadata.dst_node_id for msg in messages}
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        contributions: list[tuple[str, list[np.ndarray], float, dict[str, float]]] = []
        for r in replies:
            node = r.metadata.src_node_id
            name = names.get(node, str(node))
            if r.has_error():
                logger.warning("Institution %s replied with an error: %s", name, r.error.reason)
                continue
            max_norm = config.max_update_norm if config is not None else None
            try:
                # Statistics rounds have no reference: the first valid reply sets the shapes.
                ref = reference if reference is not None else (contributions[0][1] if contributions else None)
                arrays, weight, metrics = contribution_from_reply(
                    r.content, institution=name, reference=ref, max_norm=max_norm,
                    update_key=m.UPDATE, metrics_key=m.METRICS, weight_key=m.WEIGHT,
                )
            except InvalidUpdateError as exc:
                logger.warning("%s; it is left out of this round.", exc)
                continue
            contributions.append((name, arrays, weight, metrics))
        got = {names.get(r.metadata.src_node_id, str(r.metadata.src_node_id)) for r in replies}
        included = {c[0] for c in contributions}
        dropped = sorted({names.get(n, str(n)) for n in asked} - included)
        if not contributions:
            raise FederationError(
                f"No institution returned a usable contribution (asked {len(asked)}, replies {len(got)})."
            )
        ref = reference if reference is not None else contributions[0][1]
        if config is None or reference is None:
            return weighted_sum(contributions, reference=ref, dropped=dropped)
        return robust_aggregate(
            contributions, rule=config.aggregation, reference=ref, dropped=dropped,
            trim_fraction=config.trim_fraction, byzantine_nodes=config.byzantine_nodes,
        )

    def sum_updates(self, grid, *, node_ids, names, content, reference, config, bounds=None):  # type: ignore[no-untyped-def]
        messages = [Message(content, dst_node_id=n, message_type=m.TRAIN) for n in node_ids]
        if bounds is not None:  # each update must arrive clipped: the noise assumes it
            config = dataclasses.replace(config, max_update_norm=bounds.clip_norm)
        return self._collect(grid, messages, names, reference, config.round_timeout, config)

    def sum_statistics(self, grid, *, node_ids, names, config, n_features, request=None):  # type: ignore[no-untyped-def]
        messages = [
            Message(RecordDict({m.CONFIG: ConfigRecord(dict(request or {}))}), dst_node_id=n, message_type=m.STATS)
            for n in node_ids
        ]
        return self._collect(grid, messages, names, None, config.round_timeout)


def create_transport(config: FederationConfig) -> Transport:
    """Secure aggregation when ``config.secure_aggregation`` is set, else clear-text sums."""
    if config.secure_aggregation:
        from consortium.federation.secure_transport import SecureTransport  # noqa: PLC0415

        return SecureTransport()
    return PlainTransport()
