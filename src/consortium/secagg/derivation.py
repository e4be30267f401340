"""Per-round derivations shared by both sides of the protocol.

Every key and seed of a round is bound to the round id and to the node ids it
belongs to (HKDF ``info``), so nothing derived for one round, pair or purpose
can be replayed in another.
"""

from __future__ import annotations

from collections.abc import Sequence

from consortium.errors import ConfigError
from consortium.secagg import primitives as prim
from consortium.secagg.errors import SecAggError
from consortium.secagg.graph import NeighbourGraph, build_graph, check_threshold, neighbours_of
from consortium.secagg.messages import SetupRequest, Stage, pack_ids
from consortium.secagg.quantize import QuantizationPlan

MAX_ROUND_ID_CHARS = 128
MAX_CIPHERTEXT_BYTES = 1024
BUNDLE_BYTES = 16 + 2 * prim.SHARE_BYTES
"""Plaintext of a share bundle: sender and receiver ids, a seed share, a key share."""
PAIRWISE_MASK = "pairwise-mask"
SHARE_ENCRYPTION = "share-encryption"


def pair_context(round_id: str, u: int, v: int) -> bytes:
    return round_id.encode() + b"\x00" + pack_ids(sorted((u, v)))


def node_context(round_id: str, u: int) -> bytes:
    return round_id.encode() + b"\x00" + pack_ids((u,))


def bundle_associated_data(round_id: str, sender: int, receiver: int) -> bytes:
    return b"share-bundle\x00" + round_id.encode() + b"\x00" + pack_ids((sender, receiver))


def pair_keys(private: bytes, peers: Sequence[tuple[int, bytes]], *, label: str, round_id: str, me: int) -> list[bytes]:
    """``HKDF(X25519(private, peer_public), label, round, {me, peer})`` for each ``(peer, peer_public)``.

    Both ends of a pair derive the same key. ``label`` separates the two uses:
    ``"pairwise-mask"`` (PRG seeds, from the mask key pairs) and
    ``"share-encryption"`` (AES-GCM keys, from the share key pairs).
    """
    shared = prim.agree_many(private, [pk for _, pk in peers])
    return [
        prim.derive_key(dh, label=label, context=pair_context(round_id, me, v))
        for (v, _), dh in zip(peers, shared, strict=True)
    ]


def pairwise_seed(mask_private: bytes, peer_public: bytes, *, round_id: str, u: int, v: int) -> bytes:
    """PRG seed of the pairwise mask between ``u`` (owner of ``mask_private``) and ``v``."""
    return pair_keys(mask_private, [(v, peer_public)], label=PAIRWISE_MASK, round_id=round_id, me=u)[0]


def self_mask_seed(seed: bytes, *, round_id: str, u: int) -> bytes:
    """PRG seed of ``u``'s self mask, derived from its shared secret ``b_u``."""
    return prim.derive_key(seed, label="self-mask", context=node_context(round_id, u))


def seed_commitment(seed: bytes, *, round_id: str, u: int) -> bytes:
    """Public commitment to ``b_u`` (checks the coordinator's reconstruction)."""
    return prim.commitment(seed, context=node_context(round_id, u))


def plan_for(setup: SetupRequest) -> QuantizationPlan:
    """The quantisation plan all parties derive from the public setup."""
    return QuantizationPlan.create(setup.segments, n_participants=len(setup.node_ids), modulus_bits=setup.modulus_bits)


def graph_for(setup: SetupRequest, stage: Stage) -> NeighbourGraph:
    try:
        graph = build_graph(setup.node_ids, k=setup.neighbours, seed=setup.graph_seed)
        check_threshold(setup.threshold, holders=graph.k + 1)
    except ConfigError as exc:
        raise SecAggError(f"Invalid round parameters: {exc}", stage=stage.label) from exc
    return graph


def neighbours_for(setup: SetupRequest, stage: Stage, node: int) -> tuple[int, ...]:
    """``graph_for(setup, stage).of(node)``, computing only that node's row of the graph."""
    try:
        k, nbrs = neighbours_of(setup.node_ids, k=setup.neighbours, seed=setup.graph_seed, node=node)
        check_threshold(setup.threshold, holders=k + 1)
    except ConfigError as exc:
        raise SecAggError(f"Invalid round parameters: {exc}", stage=stage.label) from exc
    return nbrs
