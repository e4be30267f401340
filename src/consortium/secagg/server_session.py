"""The coordinator's side of a secure-aggregation round (see :mod:`consortium.secagg.protocol`)."""

from __future__ import annotations

import itertools
import logging
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from consortium.errors import ConfigError
from consortium.secagg import primitives as prim
from consortium.secagg.derivation import (
    MAX_CIPHERTEXT_BYTES,
    MAX_ROUND_ID_CHARS,
    PAIRWISE_MASK,
    pair_keys,
    plan_for,
    seed_commitment,
    self_mask_seed,
)
from consortium.secagg.errors import CryptoError, SecAggAbort, SecAggError
from consortium.secagg.graph import build_graph, check_threshold, default_neighbours, default_threshold
from consortium.secagg.messages import (
    REPLY_TYPES,
    AdvertiseKeys,
    MaskedInputReply,
    MaskedInputRequest,
    Reply,
    SetupRequest,
    ShareKeysReply,
    ShareKeysRequest,
    Stage,
    UnmaskReply,
    UnmaskRequest,
)
from consortium.secagg.quantize import SegmentSpec

logger = logging.getLogger(__name__)

MAX_RECONSTRUCTION_ATTEMPTS = 256
"""Subsets of shares tried per secret when some shares are corrupt."""


@dataclass(frozen=True)
class Rejection:
    """A node's reply that was not accepted (or never came), with the reason."""

    node: int
    stage: Stage
    reason: str


@dataclass(frozen=True)
class SecureSum:
    """What the coordinator learns from one round: sums only.

    Attributes
    ----------
    raw : numpy.ndarray
        The unmasked modular sum of the survivors' encodings (``uint32``).
    values : dict of str to numpy.ndarray
        ``raw`` decoded per segment to float64 sums.
    participants : tuple of int
        Nodes whose input is in the sum (``S``), sorted.
    dropped : Mapping[int, Stage]
        Every other invited node and the stage at which it dropped out.
    institutions : Mapping[int, str]
        Names the nodes advertised at stage 0.
    rejections : tuple of Rejection
        Replies that were refused, and why.
    """

    raw: np.ndarray
    values: dict[str, np.ndarray]
    participants: tuple[int, ...]
    dropped: Mapping[int, Stage]
    institutions: Mapping[int, str]
    rejections: tuple[Rejection, ...] = ()


class ServerSession:
    """The coordinator's side of one round.

    Drive it with::

        while not session.finished:
            replies = deliver(session.requests())   # transport + timeout
            session.receive(replies, failures=...)  # missing node == dropped
        result = session.outcome()

    ``receive`` raises :class:`SecAggAbort` when too few nodes are left for the
    round to complete; the session then stays aborted.

    Parameters
    ----------
    round_id : str
        Unique id of this round (bound into every derived key).
    node_ids : sequence of int
        Invited nodes.
    segments : sequence of SegmentSpec
        Layout of the aggregated vector.
    modulus_bits : int
        Sums are computed modulo ``2**modulus_bits`` (<= 32).
    neighbours : int, optional
        Degree ``k`` of the neighbour graph; default :func:`default_neighbours`.
    threshold : int, optional
        Shamir threshold ``t``; default a majority of the ``k + 1`` holders.
    graph_seed : bytes, optional
        Public seed of the graph; default 32 fresh random bytes.
    """

    def __init__(
        self,
        *,
        round_id: str,
        node_ids: Sequence[int],
        segments: Sequence[SegmentSpec],
        modulus_bits: int = 32,
        neighbours: int | None = None,
        threshold: int | None = None,
        graph_seed: bytes | None = None,
    ) -> None:
        ids = tuple(sorted(int(i) for i in node_ids))
        if len(ids) < 2:
            raise ConfigError(
                f"Secure aggregation needs at least 2 institutions; got {len(ids)}. A sum over "
                "one institution would be its own update."
            )
        if not round_id or len(round_id) > MAX_ROUND_ID_CHARS:
            raise ConfigError(f"The round id must be 1 to {MAX_ROUND_ID_CHARS} characters. Got {round_id!r}.")
        k = default_neighbours(len(ids)) if neighbours is None else neighbours
        seed = graph_seed if graph_seed is not None else secrets.token_bytes(32)
        self.graph = build_graph(ids, k=k, seed=seed)
        holders = self.graph.k + 1
        t = default_threshold(holders) if threshold is None else threshold
        check_threshold(t, holders=holders)
        self.setup = SetupRequest(
            round_id=round_id,
            node_ids=ids,
            graph_seed=seed,
            neighbours=k,
            threshold=t,
            modulus_bits=modulus_bits,
            segments=tuple(segments),
        )
        self.plan = plan_for(self.setup)
        self.threshold = t
        self._stage: Stage | None = Stage.ADVERTISE_KEYS
        self._aborted: SecAggAbort | None = None
        self._keys: dict[int, AdvertiseKeys] = {}
        self._active: tuple[int, ...] = ids  # nodes asked at the current stage
        self._u1: tuple[int, ...] = ()
        self._u2: tuple[int, ...] = ()
        self._u3: tuple[int, ...] = ()
        self._bundles: dict[int, list[tuple[int, bytes]]] = {}
        self._masked: dict[int, np.ndarray] = {}
        self._dropped: dict[int, Stage] = {}
        self._rejections: list[Rejection] = []
        self._result: SecureSum | None = None

    # ------------------------------------------------------------------ state
    @property
    def round_id(self) -> str:
        return self.setup.round_id

    @property
    def stage(self) -> Stage | None:
        """Stage whose replies are awaited (``None`` once finished or aborted)."""
        return self._stage

    @property
    def finished(self) -> bool:
        return self._stage is None

    @property
    def rejections(self) -> tuple[Rejection, ...]:
        return tuple(self._rejections)

    @property
    def dropped(self) -> Mapping[int, Stage]:
        return dict(self._dropped)

    @property
    def institutions(self) -> dict[int, str]:
        return {u: k.institution for u, k in self._keys.items()}

    # ------------------------------------------------------------------ requests
    def requests(self) -> dict[int, Any]:
        """The request for each node still in the round at the current stage."""
        st = self._require_running()
        if st is Stage.ADVERTISE_KEYS:
            return {u: self.setup for u in self._active}
        if st is Stage.SHARE_KEYS:
            u1 = set(self._u1)
            out: dict[int, Any] = {}
            for u in self._u1:
                nb = [v for v in self.graph.of(u) if v in u1]
                out[u] = ShareKeysRequest(
                    round_id=self.round_id,
                    neighbour_ids=tuple(nb),
                    mask_publics=tuple(self._keys[v].mask_public for v in nb),
                    share_publics=tuple(self._keys[v].share_public for v in nb),
                )
            return out
        if st is Stage.MASKED_INPUT:
            u2 = set(self._u2)
            out = {}
            for u in self._u2:
                pairs = [(v, ct) for v, ct in self._bundles.get(u, []) if v in u2]
                out[u] = MaskedInputRequest(
                    round_id=self.round_id,
                    survivors=self._u2,
                    senders=tuple(v for v, _ in pairs),
                    ciphertexts=tuple(ct for _, ct in pairs),
                )
            return out
        dropped = tuple(sorted(set(self._u2) - set(self._u3)))
        req = UnmaskRequest(round_id=self.round_id, survivors=self._u3, dropped=dropped)
        return {u: req for u in self._u3}

    # ------------------------------------------------------------------ replies
    def receive(self, replies: Mapping[int, Any], *, failures: Mapping[int, str] | None = None) -> None:
        """Take the replies of the current stage; nodes without a valid reply drop out.

        Parameters
        ----------
        replies : Mapping[int, reply or record]
            Reply per node: the stage's reply dataclass or its record (dict).
        failures : Mapping[int, str], optional
            Nodes that answered with an error, and the error text (for the log).

        Raises
        ------
        SecAggAbort
            If too few nodes are left to complete the round.
        """
        st = self._require_running()
        accepted: dict[int, Any] = {}
        asked = set(self._active)
        for node, reason in (failures or {}).items():
            if node in asked:
                self._reject(node, st, f"error reply: {reason}")
        for node, reply in replies.items():
            if node not in asked:
                self._reject(node, st, "reply from a node that was not asked at this stage")
                continue
            if failures and node in failures:
                continue
            try:
                msg = self._parse(st, reply)
                accepted[node] = self._validate(st, node, msg)
            except (SecAggError, CryptoError, ConfigError) as exc:
                self._reject(node, st, str(exc))
        for node in asked - set(accepted):
            if not any(r.node == node and r.stage is st for r in self._rejections):
                self._reject(node, st, "no reply before the stage timeout")
            self._dropped[node] = st
        handler: dict[Stage, Callable[[dict[int, Any]], None]] = {
            Stage.ADVERTISE_KEYS: self._after_advertise,
            Stage.SHARE_KEYS: self._after_share_keys,
            Stage.MASKED_INPUT: self._after_masked_input,
            Stage.UNMASK: self._after_unmask,
        }
        try:
            handler[st](accepted)
        except SecAggAbort as exc:
            self._aborted = exc
            self._stage = None
            raise

    def outcome(self) -> SecureSum:
        """The unmasked sum; only after the unmask stage completed."""
        if self._aborted is not None:
            raise self._aborted
        if self._result is None:
            raise SecAggError(
                "The round has not finished; call requests()/receive() until `finished`.",
                stage=self._stage.label if self._stage is not None else "done",
            )
        return self._result

    # ------------------------------------------------------------------ internals
    def _require_running(self) -> Stage:
        if self._aborted is not None:
            raise self._aborted
        if self._stage is None:
            raise SecAggError("The round is already finished.", stage="done")
        return self._stage

    def _reject(self, node: int, stage: Stage, reason: str) -> None:
        self._rejections.append(Rejection(node=node, stage=stage, reason=reason))
        logger.warning("Round %s, stage %s: node %s left out: %s", self.round_id, stage.label, node, reason)

    def _parse(self, st: Stage, reply: Any) -> Reply:
        kind = REPLY_TYPES[st]
        msg: Reply = reply if isinstance(reply, kind) else kind.from_record(reply)
        if msg.round_id != self.round_id:
            raise SecAggError(f"Reply for round {msg.round_id!r}, expected {self.round_id!r}.", stage=st.label)
        return msg

    def _validate(self, st: Stage, node: int, msg: Any) -> Any:
        if st is Stage.SHARE_KEYS:
            u1 = set(self._u1)
            expected = {v for v in self.graph.of(node) if v in u1}
            if set(msg.receivers) != expected or len(msg.receivers) != len(expected):
                raise SecAggError(
                    f"Share bundles addressed to {sorted(msg.receivers)}, expected exactly {sorted(expected)}.",
                    stage=st.label,
                )
            if any(len(ct) > MAX_CIPHERTEXT_BYTES for ct in msg.ciphertexts):
                raise SecAggError("A share bundle is larger than allowed.", stage=st.label)
        elif st is Stage.MASKED_INPUT:
            y = msg.masked
            if y.shape != (self.plan.length,):
                raise SecAggError(
                    f"Masked vector has {y.shape[0]} values, expected {self.plan.length}.", stage=st.label
                )
            if self.plan.modulus_bits < 32 and y.size and int(y.max()) >= self.plan.modulus:
                raise SecAggError(f"Masked vector has values >= 2**{self.plan.modulus_bits}.", stage=st.label)
        elif st is Stage.UNMASK:
            S, D = set(self._u3), set(self._u2) - set(self._u3)
            holds = set(self.graph.of(node)) | {node}
            if not set(msg.seed_owners) <= (S & holds) or not set(msg.key_owners) <= (D & holds):
                raise SecAggError("Unmask reply holds shares for nodes it was not asked about.", stage=st.label)
            if len(set(msg.seed_owners)) != len(msg.seed_owners) or len(set(msg.key_owners)) != len(msg.key_owners):
                raise SecAggError("Unmask reply repeats an owner.", stage=st.label)
            x = self.graph.x_of(node)
            for data in (*msg.seed_shares, *msg.key_shares):
                prim.share_from_bytes(x, data)
        return msg

    def _abort(self, st: Stage, reason: str, **counts: int) -> SecAggAbort:
        return SecAggAbort(
            stage=st.label,
            counts={"invited": len(self.setup.node_ids), **counts, "threshold": self.threshold},
            reason=reason,
        )

    def _prune(self, alive: set[int], st: Stage) -> set[int]:
        """Drop nodes with fewer than ``t`` live holders until the set is stable."""
        t = self.threshold
        changed = True
        while changed:
            changed = False
            for u in sorted(alive):
                if sum(1 for v in self.graph.of(u) if v in alive) + 1 < t:
                    alive.discard(u)
                    self._dropped[u] = st
                    self._reject(u, st, f"fewer than {t} of its share holders are still in the round")
                    changed = True
        return alive

    def _after_advertise(self, accepted: dict[int, AdvertiseKeys]) -> None:
        st = Stage.ADVERTISE_KEYS
        seen: dict[bytes, int] = {}
        for u in sorted(accepted):
            keys = accepted[u]
            dup = [k for k in (keys.mask_public, keys.share_public) if k in seen]
            if dup or keys.mask_public == keys.share_public:
                self._reject(u, st, "advertised a public key already used by another node")
                self._dropped[u] = st
                continue
            seen[keys.mask_public] = u
            seen[keys.share_public] = u
            self._keys[u] = keys
        alive = self._prune(set(self._keys), st)
        if len(alive) < self.threshold:
            raise self._abort(st, "too few institutions advertised keys", answered=len(self._keys), usable=len(alive))
        self._u1 = tuple(sorted(alive))
        self._active = self._u1
        self._stage = Stage.SHARE_KEYS

    def _after_share_keys(self, accepted: dict[int, ShareKeysReply]) -> None:
        st = Stage.SHARE_KEYS
        alive = self._prune(set(accepted), st)
        if len(alive) < self.threshold:
            raise self._abort(st, "too few institutions shared their keys", answered=len(accepted), usable=len(alive))
        self._bundles = {}
        for u in sorted(alive):
            for v, ct in zip(accepted[u].receivers, accepted[u].ciphertexts, strict=True):
                self._bundles.setdefault(v, []).append((u, ct))
        self._u2 = tuple(sorted(alive))
        self._active = self._u2
        self._stage = Stage.MASKED_INPUT

    def _after_masked_input(self, accepted: dict[int, MaskedInputReply]) -> None:
        st = Stage.MASKED_INPUT
        S = set(accepted)
        D = set(self._u2) - S
        t = self.threshold
        if len(S) < t:
            raise self._abort(st, "too few masked inputs arrived", answered=len(S), expected=len(self._u2))
        for u in sorted(S):
            live = sum(1 for v in self.graph.of(u) if v in S) + 1
            if live < t:
                raise self._abort(
                    st,
                    f"institution {self._name(u)}'s self mask cannot be removed: only {live} of its "
                    "share holders are left",
                    answered=len(S),
                    holders_left=live,
                )
        for v in sorted(D):
            nb = [u for u in self.graph.of(v) if u in S]
            if nb and len(nb) < t:
                raise self._abort(
                    st,
                    f"dropped institution {self._name(v)}'s pairwise masks cannot be removed: only "
                    f"{len(nb)} of its share holders are left",
                    answered=len(S),
                    holders_left=len(nb),
                )
        self._masked = {u: accepted[u].masked for u in S}
        self._u3 = tuple(sorted(S))
        self._active = self._u3
        self._stage = Stage.UNMASK

    def _after_unmask(self, accepted: dict[int, UnmaskReply]) -> None:
        st = Stage.UNMASK
        S = self._u3
        D = tuple(sorted(set(self._u2) - set(S)))
        if len(accepted) < self.threshold:
            raise self._abort(st, "too few institutions returned shares", answered=len(accepted), expected=len(S))
        seed_shares: dict[int, list[prim.ShamirShare]] = {u: [] for u in S}
        key_shares: dict[int, list[prim.ShamirShare]] = {v: [] for v in D}
        for holder, reply in accepted.items():
            x = self.graph.x_of(holder)
            for owner, data in zip(reply.seed_owners, reply.seed_shares, strict=True):
                seed_shares[owner].append(prim.share_from_bytes(x, data))
            for owner, data in zip(reply.key_owners, reply.key_shares, strict=True):
                key_shares[owner].append(prim.share_from_bytes(x, data))
        n = self.plan.length
        total = np.zeros(n, dtype=np.uint32)
        for u in S:
            np.add(total, self._masked[u], out=total)
        expander = prim.MaskExpander(n)
        for u in S:
            seed = self._reconstruct(seed_shares[u], partial(self._is_seed_of, u))
            if seed is None:
                raise self._abort(
                    st,
                    f"the self-mask seed of institution {self._name(u)} could not be reconstructed "
                    f"from {len(seed_shares[u])} share(s) (missing, corrupt or fewer than the threshold)",
                    answered=len(accepted),
                    shares=len(seed_shares[u]),
                )
            expander.add_into(total, self_mask_seed(seed, round_id=self.round_id, u=u), subtract=True)
        s_set = set(S)
        for v in D:
            nb = [u for u in self.graph.of(v) if u in s_set]
            if not nb:
                continue
            sk = self._reconstruct(key_shares[v], partial(self._is_mask_key_of, v))
            if sk is None:
                raise self._abort(
                    st,
                    f"the mask key of dropped institution {self._name(v)} could not be reconstructed "
                    f"from {len(key_shares[v])} share(s)",
                    answered=len(accepted),
                    shares=len(key_shares[v]),
                )
            peers = [(u, self._keys[u].mask_public) for u in nb]
            seeds = pair_keys(sk, peers, label=PAIRWISE_MASK, round_id=self.round_id, me=v)
            for u, pseed in zip(nb, seeds, strict=True):
                # u added +mask if v < u and -mask if v > u; undo it.
                expander.add_into(total, pseed, subtract=v < u)
        if self.plan.modulus_bits < 32:
            np.bitwise_and(total, np.uint32(self.plan.modulus - 1), out=total)
        for u in set(S) - set(accepted):
            logger.info(
                "Round %s: %s sent its input but not its shares (it is still in the sum).", self.round_id, self._name(u)
            )
        self._result = SecureSum(
            raw=total,
            values=self.plan.decode(total),
            participants=tuple(S),
            dropped=dict(self._dropped_final(S)),
            institutions=self.institutions,
            rejections=tuple(self._rejections),
        )
        self._masked = {}
        self._stage = None

    def _dropped_final(self, S: Sequence[int]) -> dict[int, Stage]:
        members = set(S)
        return dict(sorted((u, st) for u, st in self._dropped.items() if u not in members))

    def _is_seed_of(self, u: int, seed: bytes) -> bool:
        return seed_commitment(seed, round_id=self.round_id, u=u) == self._keys[u].seed_commitment

    def _is_mask_key_of(self, v: int, private: bytes) -> bool:
        return prim.public_key_of(private) == self._keys[v].mask_public

    def _reconstruct(self, shares: list[prim.ShamirShare], verify: Callable[[bytes], bool]) -> bytes | None:
        t = self.threshold
        if len(shares) < t:
            return None
        combos = itertools.islice(itertools.combinations(shares, t), MAX_RECONSTRUCTION_ATTEMPTS)
        for combo in combos:
            try:
                secret = prim.shamir_reconstruct(combo, secret_len=prim.KEY_BYTES)
            except CryptoError:
                continue
            if verify(secret):
                return secret
        return None

    def _name(self, u: int) -> str:
        keys = self._keys.get(u)
        return f"'{keys.institution}' (node {u})" if keys else f"node {u}"
