"""One institution's side of a secure-aggregation round (see :mod:`consortium.secagg.protocol`)."""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from consortium.errors import ConfigError
from consortium.secagg import primitives as prim
from consortium.secagg.derivation import (
    BUNDLE_BYTES,
    MAX_CIPHERTEXT_BYTES,
    MAX_ROUND_ID_CHARS,
    PAIRWISE_MASK,
    SHARE_ENCRYPTION,
    bundle_associated_data,
    neighbours_for,
    pair_keys,
    plan_for,
    seed_commitment,
    self_mask_seed,
)
from consortium.secagg.errors import CryptoError, SecAggError
from consortium.secagg.messages import (
    AdvertiseKeys,
    MaskedInputReply,
    MaskedInputRequest,
    SetupRequest,
    ShareKeysReply,
    ShareKeysRequest,
    Stage,
    UnmaskReply,
    UnmaskRequest,
    pack_ids,
    unpack_ids,
)

logger = logging.getLogger(__name__)

CLIENT_TRANSITIONS: dict[Stage | None, frozenset[Stage]] = {
    None: frozenset({Stage.ADVERTISE_KEYS}),
    Stage.ADVERTISE_KEYS: frozenset({Stage.SHARE_KEYS}),
    Stage.SHARE_KEYS: frozenset({Stage.MASKED_INPUT}),
    Stage.MASKED_INPUT: frozenset({Stage.UNMASK}),
    Stage.UNMASK: frozenset({Stage.UNMASK}),  # repeated unmask requests are answered consistently
}
"""Stage a client may move to from its last completed stage."""


@dataclass
class _ClientState:
    node_id: int
    institution: str
    setup: SetupRequest
    encoded: np.ndarray | None
    mask_keys: prim.KeyPair
    share_keys: prim.KeyPair
    seed: bytes
    graph_neighbours: tuple[int, ...] = ()
    stage: Stage | None = None
    neighbour_ids: tuple[int, ...] = ()
    neighbour_mask_publics: tuple[bytes, ...] = ()
    bundle_keys: tuple[bytes, ...] = ()
    own_seed_share: bytes = b""
    own_key_share: bytes = b""
    senders: tuple[int, ...] = ()
    sender_seed_shares: tuple[bytes, ...] = ()
    sender_key_shares: tuple[bytes, ...] = ()
    survivors: tuple[int, ...] = ()
    revealed_seed: tuple[int, ...] = ()
    revealed_key: tuple[int, ...] = ()


class ClientSession:
    """One institution's side of one secure-aggregation round.

    Create it with :meth:`start` once the local contribution is encoded, then
    answer each coordinator request with :meth:`advertise`, :meth:`share_keys`,
    :meth:`masked_input` and :meth:`unmask`. Every method either returns the
    reply and advances the stage, or raises :class:`SecAggError` and leaves the
    session unchanged. :meth:`to_state`/:meth:`from_state` persist it between
    messages (Flower's ``context.state``).
    """

    def __init__(self, state: _ClientState) -> None:
        self._s = state

    @property
    def _x(self) -> dict[int, int]:
        """Shamir evaluation point of every node: its 1-based rank among all node ids."""
        return {v: i + 1 for i, v in enumerate(sorted(self._s.setup.node_ids))}

    # ------------------------------------------------------------------ creation
    @classmethod
    def start(cls, *, node_id: int, setup: SetupRequest, encoded: np.ndarray, institution: str) -> ClientSession:
        """Validate the round's public parameters and draw fresh keys and seed.

        Raises
        ------
        SecAggError
            If the parameters are inconsistent or unsafe (this node not invited,
            threshold not a majority of holders, encoded vector of the wrong
            length or range).
        """
        st = Stage.ADVERTISE_KEYS
        if not setup.round_id or len(setup.round_id) > MAX_ROUND_ID_CHARS:
            raise SecAggError(
                f"The round id must be 1 to {MAX_ROUND_ID_CHARS} characters. Got {setup.round_id!r}.",
                stage=st.label,
            )
        if node_id not in setup.node_ids:
            raise SecAggError(f"This node ({node_id}) is not in the round's participant list.", stage=st.label)
        if len(setup.graph_seed) < prim.MIN_SEED_BYTES:
            raise SecAggError("The graph seed must be at least 16 bytes.", stage=st.label)
        try:
            plan = plan_for(setup)
        except ConfigError as exc:
            raise SecAggError(f"Invalid quantisation parameters: {exc}", stage=st.label) from exc
        arr = np.asarray(encoded)
        if arr.dtype != np.uint32 or arr.shape != (plan.length,):
            raise SecAggError(
                f"The encoded input must be uint32 of shape ({plan.length},). "
                f"Got {arr.dtype} of shape {arr.shape} instead.",
                stage=st.label,
            )
        if plan.modulus_bits < 32 and arr.size and int(arr.max()) >= plan.modulus:
            raise SecAggError(f"The encoded input has values >= 2**{plan.modulus_bits}.", stage=st.label)
        graph_neighbours = neighbours_for(setup, st, int(node_id))
        state = _ClientState(
            node_id=int(node_id),
            institution=str(institution),
            setup=setup,
            encoded=arr,
            mask_keys=prim.generate_keypair(),
            share_keys=prim.generate_keypair(),
            seed=os.urandom(prim.KEY_BYTES),
            graph_neighbours=graph_neighbours,
        )
        return cls(state)

    # ------------------------------------------------------------------ properties
    @property
    def stage(self) -> Stage | None:
        """Last completed stage (``None`` before :meth:`advertise`)."""
        return self._s.stage

    @property
    def round_id(self) -> str:
        return self._s.setup.round_id

    @property
    def node_id(self) -> int:
        return self._s.node_id

    @property
    def revealed(self) -> Mapping[int, str]:
        """Which kind of share (``"seed"`` or ``"key"``) was revealed for which node."""
        out = {v: "seed" for v in self._s.revealed_seed}
        out.update({v: "key" for v in self._s.revealed_key})
        return out

    def _enter(self, target: Stage, round_id: str) -> None:
        if target not in CLIENT_TRANSITIONS[self._s.stage]:
            done = self._s.stage.label if self._s.stage is not None else "none"
            raise SecAggError(
                f"Out-of-order request: cannot answer '{target.label}' after stage '{done}'. "
                "The coordinator must run the stages in order within one round.",
                stage=target.label,
            )
        if round_id != self._s.setup.round_id:
            raise SecAggError(
                f"Request for round {round_id!r} but this session is in round {self._s.setup.round_id!r}.",
                stage=target.label,
            )

    # ------------------------------------------------------------------ stage 0
    def advertise(self) -> AdvertiseKeys:
        """Stage 0: public keys and the commitment to the self-mask seed."""
        s = self._s
        self._enter(Stage.ADVERTISE_KEYS, s.setup.round_id)
        s.stage = Stage.ADVERTISE_KEYS
        return AdvertiseKeys(
            round_id=s.setup.round_id,
            mask_public=s.mask_keys.public,
            share_public=s.share_keys.public,
            seed_commitment=seed_commitment(s.seed, round_id=s.setup.round_id, u=s.node_id),
            institution=s.institution,
        )

    # ------------------------------------------------------------------ stage 1
    def share_keys(self, request: ShareKeysRequest) -> ShareKeysReply:
        """Stage 1: Shamir-share ``b_u`` and the mask key among live holders, encrypted."""
        st = Stage.SHARE_KEYS
        s = self._s
        self._enter(st, request.round_id)
        ids = request.neighbour_ids
        mine = set(s.graph_neighbours)
        if len(set(ids)) != len(ids) or not set(ids) <= mine:
            raise SecAggError(
                f"The coordinator listed {sorted(set(ids) - mine)} as neighbours (or repeated ids), "
                f"but this node's neighbours in the public graph are {sorted(mine)}.",
                stage=st.label,
            )
        t = s.setup.threshold
        if len(ids) + 1 < t:
            raise SecAggError(
                f"Only {len(ids)} neighbour(s) are left; at least {t - 1} are needed so that this "
                f"node's secrets stay recoverable (threshold {t}).",
                stage=st.label,
            )
        for v, mpk, spk in zip(ids, request.mask_publics, request.share_publics, strict=True):
            if len(mpk) != prim.KEY_BYTES or len(spk) != prim.KEY_BYTES:
                raise SecAggError(f"Neighbour {v} has a public key that is not 32 bytes.", stage=st.label)
            if mpk in (s.mask_keys.public, s.share_keys.public) or spk in (
                s.mask_keys.public,
                s.share_keys.public,
            ):
                raise SecAggError(f"Neighbour {v} advertised this node's own public key.", stage=st.label)
        x_of = self._x
        xs = [x_of[v] for v in ids]
        own_x = x_of[s.node_id]
        seed_shares = prim.shamir_split(s.seed, threshold=t, xs=[*xs, own_x])
        key_shares = prim.shamir_split(s.mask_keys.private, threshold=t, xs=[*xs, own_x])
        ciphertexts = []
        try:
            bundle_keys = pair_keys(
                s.share_keys.private,
                list(zip(ids, request.share_publics, strict=True)),
                label=SHARE_ENCRYPTION,
                round_id=s.setup.round_id,
                me=s.node_id,
            )
            for i, (v, key) in enumerate(zip(ids, bundle_keys, strict=True)):
                plaintext = (
                    pack_ids((s.node_id, v)) + prim.share_to_bytes(seed_shares[i]) + prim.share_to_bytes(key_shares[i])
                )
                ciphertexts.append(
                    prim.encrypt(key, plaintext, associated_data=bundle_associated_data(s.setup.round_id, s.node_id, v))
                )
        except CryptoError as exc:
            raise SecAggError(str(exc), stage=st.label) from exc
        s.neighbour_ids = tuple(ids)
        s.neighbour_mask_publics = tuple(request.mask_publics)
        s.bundle_keys = tuple(bundle_keys)  # the same key decrypts the neighbour's bundle
        s.own_seed_share = prim.share_to_bytes(seed_shares[-1])
        s.own_key_share = prim.share_to_bytes(key_shares[-1])
        s.stage = st
        return ShareKeysReply(round_id=s.setup.round_id, receivers=tuple(ids), ciphertexts=tuple(ciphertexts))

    # ------------------------------------------------------------------ stage 2
    def masked_input(self, request: MaskedInputRequest) -> MaskedInputReply:
        """Stage 2: decrypt the received shares and send the doubly masked input."""
        st = Stage.MASKED_INPUT
        s = self._s
        self._enter(st, request.round_id)
        u = s.node_id
        survivors = set(request.survivors)
        t = s.setup.threshold
        if len(survivors) != len(request.survivors) or u not in survivors:
            raise SecAggError("The survivor list must hold distinct ids and include this node.", stage=st.label)
        if not survivors <= set(s.setup.node_ids):
            raise SecAggError("The survivor list names nodes outside the round.", stage=st.label)
        known = set(s.neighbour_ids)
        graph_nbrs = set(s.graph_neighbours)
        unknown = sorted((survivors & graph_nbrs) - known)
        if unknown:
            raise SecAggError(
                f"Survivors {unknown} are neighbours whose keys this node never received.",
                stage=st.label,
            )
        alive = [v for v in s.neighbour_ids if v in survivors]
        if len(alive) + 1 < t:
            raise SecAggError(
                f"Only {len(alive)} neighbour(s) survived; this node's secrets would not be "
                f"recoverable (threshold {t}).",
                stage=st.label,
            )
        if len(set(request.senders)) != len(request.senders):
            raise SecAggError("A share bundle sender appears twice.", stage=st.label)
        senders, seed_sh, key_sh = [], [], []
        if not set(request.senders) <= known:
            raise SecAggError(
                f"Received share bundles from non-neighbours {sorted(set(request.senders) - known)}.",
                stage=st.label,
            )
        # The pair keys of stage 1 decrypt too: X25519 agreement is symmetric.
        bundle_keys = dict(zip(s.neighbour_ids, s.bundle_keys, strict=True))
        for v, ct in zip(request.senders, request.ciphertexts, strict=True):
            try:
                pair = self._open_bundle(v, ct, bundle_keys[v])
            except CryptoError as exc:
                logger.warning("Round %s: share bundle from node %s rejected: %s", s.setup.round_id, v, exc)
                continue
            senders.append(v)
            seed_sh.append(pair[0])
            key_sh.append(pair[1])
        missing = [v for v in alive if v not in request.senders]
        if missing:
            logger.warning("Round %s: no share bundle from surviving neighbours %s.", s.setup.round_id, missing)
        masked = self._mask(alive)
        s.senders, s.sender_seed_shares, s.sender_key_shares = tuple(senders), tuple(seed_sh), tuple(key_sh)
        s.survivors = tuple(sorted(survivors))
        s.encoded = None  # not needed any more; do not keep the clear input around
        s.stage = st
        return MaskedInputReply(round_id=s.setup.round_id, masked=masked)

    def _open_bundle(self, v: int, ciphertext: bytes, key: bytes) -> tuple[bytes, bytes]:
        s = self._s
        if len(ciphertext) > MAX_CIPHERTEXT_BYTES:
            raise CryptoError(f"Share bundle of {len(ciphertext)} bytes is too large.")
        plain = prim.decrypt(key, ciphertext, associated_data=bundle_associated_data(s.setup.round_id, v, s.node_id))
        if len(plain) != BUNDLE_BYTES or plain[:16] != pack_ids((v, s.node_id)):
            raise CryptoError("Share bundle has the wrong layout or names the wrong sender/receiver.")
        seed_share, key_share = plain[16 : 16 + prim.SHARE_BYTES], plain[16 + prim.SHARE_BYTES :]
        for part in (seed_share, key_share):
            prim.share_from_bytes(1, part)  # range check
        return seed_share, key_share

    def _mask(self, alive: Sequence[int]) -> np.ndarray:
        s = self._s
        length = sum(int(seg.length) for seg in s.setup.segments)
        if s.encoded is None or s.encoded.dtype != np.uint32 or s.encoded.shape != (length,):
            raise SecAggError(
                "This node's encoded input is missing or damaged in its stored state; it sits out this round.",
                stage=Stage.MASKED_INPUT.label,
            )
        n, modulus = length, 2**s.setup.modulus_bits
        u, rid = s.node_id, s.setup.round_id
        peers = [(v, s.neighbour_mask_publics[s.neighbour_ids.index(v)]) for v in alive]
        try:
            seeds = pair_keys(s.mask_keys.private, peers, label=PAIRWISE_MASK, round_id=rid, me=u)
        except CryptoError as exc:
            raise SecAggError(f"A neighbour's mask key is unusable: {exc}", stage=Stage.MASKED_INPUT.label) from exc
        y = np.empty(n, dtype=np.uint32)
        expander = prim.MaskExpander(n)
        # y = x + PRG(b_u): the self mask is added while copying the (possibly read-only) input.
        expander.add_into(y, self_mask_seed(s.seed, round_id=rid, u=u), base=s.encoded)
        for v, pseed in zip(alive, seeds, strict=True):
            expander.add_into(y, pseed, subtract=v > u)
        if modulus < 2**32:
            np.bitwise_and(y, np.uint32(modulus - 1), out=y)
        return y

    # ------------------------------------------------------------------ stage 3
    def unmask(self, request: UnmaskRequest) -> UnmaskReply:
        """Stage 3: reveal ``b`` shares of survivors and mask-key shares of dropped nodes.

        Refuses (raises) if the sets overlap, if this node is not a survivor, if
        fewer than ``threshold`` survived, or if the request would reveal, for
        some node, the other kind of share than one revealed before.
        """
        st = Stage.UNMASK
        s = self._s
        self._enter(st, request.round_id)
        S, D = set(request.survivors), set(request.dropped)
        t = s.setup.threshold
        if len(S) != len(request.survivors) or len(D) != len(request.dropped):
            raise SecAggError("Survivor and dropped lists must not repeat ids.", stage=st.label)
        if S & D:
            raise SecAggError(
                f"Nodes {sorted(S & D)} are listed both as survivors and as dropped; refusing to "
                "reveal any share (this would unmask them).",
                stage=st.label,
            )
        if s.node_id not in S:
            raise SecAggError("This node sent its masked input but is not listed as a survivor.", stage=st.label)
        if len(S) < t:
            raise SecAggError(f"Only {len(S)} survivor(s); at least the threshold {t} are required.", stage=st.label)
        if not (S | D) <= set(s.survivors):
            raise SecAggError(
                f"Nodes {sorted((S | D) - set(s.survivors))} were not in the round at the masked-input stage.",
                stage=st.label,
            )
        revealed = self.revealed
        conflicts = sorted(v for v in S if revealed.get(v) == "key") + sorted(v for v in D if revealed.get(v) == "seed")
        if conflicts:
            raise SecAggError(
                f"The coordinator asks for the other kind of share of nodes {conflicts} than it "
                "asked for before; refusing (revealing both would unmask them).",
                stage=st.label,
            )
        held_seed = dict(zip(s.senders, s.sender_seed_shares, strict=True))
        held_key = dict(zip(s.senders, s.sender_key_shares, strict=True))
        held_seed[s.node_id] = s.own_seed_share
        seed_owners = sorted(v for v in S if v in held_seed)
        key_owners = sorted(v for v in D if v in held_key)
        s.revealed_seed = tuple(sorted(set(s.revealed_seed) | set(seed_owners)))
        s.revealed_key = tuple(sorted(set(s.revealed_key) | set(key_owners)))
        s.stage = st
        return UnmaskReply(
            round_id=s.setup.round_id,
            seed_owners=tuple(seed_owners),
            seed_shares=tuple(held_seed[v] for v in seed_owners),
            key_owners=tuple(key_owners),
            key_shares=tuple(held_key[v] for v in key_owners),
        )

    # ------------------------------------------------------------------ persistence
    def to_state(self) -> dict[str, Any]:
        """The whole session as a record: the setup fields, one ``"session"`` blob and the uint32 input.

        The setup travels as its own record fields (``setup.*``, written once);
        everything else is packed into the ``"session"`` bytes value (a version
        byte, the field lengths as big-endian uint32, then the fields in
        :data:`_SESSION_FIELDS` order), so persisting a stage rewrites one value
        instead of re-validating ~20. The encoded input (key ``"encoded"``) is
        present only until the masked input has been sent; afterwards the
        session forgets it.
        """
        s = self._s
        extra: dict[str, Any] = {} if s.encoded is None else {"encoded": s.encoded}
        parts = (
            pack_ids((s.node_id,)),
            s.institution.encode(),
            s.mask_keys.private,
            s.mask_keys.public,
            s.share_keys.private,
            s.share_keys.public,
            s.seed,
            b"" if s.stage is None else bytes((int(s.stage),)),
            pack_ids(s.graph_neighbours),
            pack_ids(s.neighbour_ids),
            b"".join(s.neighbour_mask_publics),
            b"".join(s.bundle_keys),
            s.own_seed_share,
            s.own_key_share,
            pack_ids(s.senders),
            b"".join(s.sender_seed_shares),
            b"".join(s.sender_key_shares),
            pack_ids(s.survivors),
            pack_ids(s.revealed_seed),
            pack_ids(s.revealed_key),
        )
        blob = b"".join([_STATE_VERSION, _LENGTHS.pack(*map(len, parts)), *parts])
        return {**extra, **{f"setup.{k}": v for k, v in s.setup.to_record().items()}, "session": blob}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> ClientSession:
        """Rebuild a session saved with :meth:`to_state`."""
        st = Stage.ADVERTISE_KEYS
        try:
            setup = SetupRequest.from_record(
                {k[len("setup.") :]: v for k, v in state.items() if k.startswith("setup.")}
            )
            f = dict(zip(_SESSION_FIELDS, _unpack_parts(state["session"]), strict=True))

            def ids(key: str) -> tuple[int, ...]:
                return unpack_ids(f[key], stage=st, key=key)

            def chunks(key: str, size: int) -> tuple[bytes, ...]:
                data = f[key]
                if len(data) % size:
                    raise ValueError(f"'{key}' is not a multiple of {size} bytes")
                return tuple(data[i : i + size] for i in range(0, len(data), size))

            encoded = state.get("encoded")
            s = _ClientState(
                node_id=ids("node-id")[0],
                institution=f["institution"].decode(),
                setup=setup,
                encoded=None if encoded is None else np.asarray(encoded),
                mask_keys=prim.KeyPair(private=f["mask-private"], public=f["mask-public"]),
                share_keys=prim.KeyPair(private=f["share-private"], public=f["share-public"]),
                seed=f["seed"],
                stage=Stage(f["stage"][0]) if f["stage"] else None,
                graph_neighbours=ids("graph-neighbours"),
                neighbour_ids=ids("neighbour-ids"),
                neighbour_mask_publics=chunks("neighbour-mask-publics", prim.KEY_BYTES),
                bundle_keys=chunks("bundle-keys", prim.KEY_BYTES),
                own_seed_share=f["own-seed-share"],
                own_key_share=f["own-key-share"],
                senders=ids("senders"),
                sender_seed_shares=chunks("sender-seed-shares", prim.SHARE_BYTES),
                sender_key_shares=chunks("sender-key-shares", prim.SHARE_BYTES),
                survivors=ids("survivors"),
                revealed_seed=ids("revealed-seed"),
                revealed_key=ids("revealed-key"),
            )
        except (KeyError, TypeError, ValueError, IndexError, UnicodeDecodeError, SecAggError) as exc:
            raise SecAggError(
                f"The stored secure-aggregation state is unreadable ({exc!r}); the node must rejoin in the next round.",
                stage="state",
            ) from exc
        return cls(s)


_STATE_VERSION = b"\x02"
_SESSION_FIELDS = (
    "node-id",
    "institution",
    "mask-private",
    "mask-public",
    "share-private",
    "share-public",
    "seed",
    "stage",
    "graph-neighbours",
    "neighbour-ids",
    "neighbour-mask-publics",
    "bundle-keys",
    "own-seed-share",
    "own-key-share",
    "senders",
    "sender-seed-shares",
    "sender-key-shares",
    "survivors",
    "revealed-seed",
    "revealed-key",
)
"""Order of the fields in the ``"session"`` blob of :meth:`ClientSession.to_state`."""
_LENGTHS = struct.Struct(f">{len(_SESSION_FIELDS)}I")


def _unpack_parts(blob: object) -> list[bytes]:
    if not isinstance(blob, bytes) or blob[:1] != _STATE_VERSION or len(blob) < 1 + _LENGTHS.size:
        raise ValueError("the session blob is missing or of another version")
    parts, pos = [], 1 + _LENGTHS.size
    for n in _LENGTHS.unpack_from(blob, 1):
        parts.append(blob[pos : pos + n])
        pos += n
    if pos != len(blob):
        raise ValueError("the session blob has the wrong length")
    return parts
