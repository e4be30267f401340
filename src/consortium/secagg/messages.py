"""Messages of the secure-aggregation protocol, one frozen dataclass per stage and direction.

Each message converts to and from a *record*: a plain ``dict`` whose values are
``int``, ``float``, ``str``, ``bytes``, lists of those, or ``numpy`` arrays. The
Flower glue maps records 1:1 onto a ``ConfigRecord`` (scalars and lists) and an
``ArrayRecord`` (arrays); the in-memory tests pass them around directly.
``from_record`` validates every field and raises a stage-tagged
:class:`~consortium.secagg.errors.SecAggError` naming the field, so a malformed
or hostile message never turns into an unexplained ``KeyError`` or a crash.

Node ids are packed as 8-byte big-endian unsigned integers in one ``bytes``
value (Flower node ids use the full unsigned 64-bit range).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np

from consortium.secagg.errors import SecAggError
from consortium.secagg.quantize import SegmentSpec

Record = dict[str, Any]
"""A message as a plain dict of int/float/str/bytes/lists/numpy arrays."""

STAGE_KEY = "stage"
ROUND_KEY = "round-id"


class Stage(enum.IntEnum):
    """Protocol stages, in order."""

    ADVERTISE_KEYS = 0
    SHARE_KEYS = 1
    MASKED_INPUT = 2
    UNMASK = 3

    @property
    def label(self) -> str:
        """Lower-case name used in records and error messages."""
        return self.name.lower()

    @classmethod
    def from_label(cls, label: object) -> Stage:
        """Parse :attr:`label`; raise SecAggError naming the valid labels otherwise."""
        for s in cls:
            if s.label == label:
                return s
        raise SecAggError(f"Unknown stage {label!r}; expected one of {[s.label for s in cls]}.", stage="unknown")


def pack_ids(ids: Sequence[int]) -> bytes:
    """Node ids as concatenated 8-byte big-endian unsigned integers."""
    try:
        return struct.pack(f">{len(ids)}Q", *ids)
    except struct.error as exc:  # a negative id, one >= 2**64, or not an integer
        raise OverflowError(f"Node ids must be integers in [0, 2**64): {exc}") from exc


def unpack_ids(data: object, *, stage: Stage, key: str) -> tuple[int, ...]:
    """Inverse of :func:`pack_ids`, with a stage-tagged error on malformed input."""
    if not isinstance(data, bytes) or len(data) % 8:
        raise SecAggError(
            f"Field '{key}' must be bytes whose length is a multiple of 8 (packed node ids). "
            f"Got {_describe(data)} instead.",
            stage=stage.label,
        )
    return struct.unpack(f">{len(data) // 8}Q", data)


T = TypeVar("T")


def _describe(value: object) -> str:
    if isinstance(value, bytes):
        return f"{len(value)} bytes"
    if isinstance(value, np.ndarray):
        return f"array {value.dtype}{value.shape}"
    return f"{type(value).__name__} {value!r}"[:80]


def _field(record: Mapping[str, Any], key: str, kind: type[T] | tuple[type, ...], stage: Stage) -> Any:
    if not isinstance(record, Mapping):
        raise SecAggError(f"A message record must be a mapping. Got {_describe(record)} instead.", stage=stage.label)
    if key not in record:
        raise SecAggError(
            f"Field '{key}' is missing from the {stage.label} message "
            f"(present: {sorted(record)}). Both sides must run the same consortium version.",
            stage=stage.label,
        )
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise SecAggError(
            f"Field '{key}' has the wrong type: expected {kind}, got {_describe(value)}.",
            stage=stage.label,
        )
    return value


def _bytes_list(record: Mapping[str, Any], key: str, stage: Stage) -> tuple[bytes, ...]:
    value = _field(record, key, list, stage)
    if not all(isinstance(v, bytes) for v in value):
        raise SecAggError(f"Field '{key}' must be a list of bytes.", stage=stage.label)
    return tuple(value)


def _check_header(record: Mapping[str, Any], stage: Stage) -> str:
    got = _field(record, STAGE_KEY, str, stage)
    if got != stage.label:
        raise SecAggError(f"Expected a '{stage.label}' message, got a '{got}' message.", stage=stage.label)
    return str(_field(record, ROUND_KEY, str, stage))


def _header(stage: Stage, round_id: str) -> Record:
    return {STAGE_KEY: stage.label, ROUND_KEY: round_id}


@dataclass(frozen=True)
class SetupRequest:
    """Stage 0, coordinator -> every invited node: the public parameters of the round."""

    STAGE: ClassVar[Stage] = Stage.ADVERTISE_KEYS
    round_id: str
    node_ids: tuple[int, ...]
    graph_seed: bytes
    neighbours: int
    threshold: int
    modulus_bits: int
    segments: tuple[SegmentSpec, ...]

    def to_record(self) -> Record:
        return {
            **_header(self.STAGE, self.round_id),
            "node-ids": pack_ids(self.node_ids),
            "graph-seed": self.graph_seed,
            "neighbours": self.neighbours,
            "threshold": self.threshold,
            "modulus-bits": self.modulus_bits,
            "segment-names": [s.name for s in self.segments],
            "segment-lengths": [int(s.length) for s in self.segments],
            "segment-bounds": [float(s.bound) for s in self.segments],
            "segment-headrooms": [float(s.headroom) for s in self.segments],
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> SetupRequest:
        st = cls.STAGE
        round_id = _check_header(record, st)
        names = _field(record, "segment-names", list, st)
        lengths = _field(record, "segment-lengths", list, st)
        bounds = _field(record, "segment-bounds", list, st)
        headrooms = _field(record, "segment-headrooms", list, st)
        if not len(names) == len(lengths) == len(bounds) == len(headrooms) or not names:
            raise SecAggError("The segment lists must be non-empty and of equal length.", stage=st.label)
        try:
            segments = tuple(
                SegmentSpec(name=n, length=int(ln), bound=float(b), headroom=float(h))
                for n, ln, b, h in zip(names, lengths, bounds, headrooms, strict=True)
            )
        except (TypeError, ValueError) as exc:
            raise SecAggError(f"Invalid segment layout: {exc}", stage=st.label) from exc
        return cls(
            round_id=round_id,
            node_ids=unpack_ids(_field(record, "node-ids", bytes, st), stage=st, key="node-ids"),
            graph_seed=_field(record, "graph-seed", bytes, st),
            neighbours=_field(record, "neighbours", int, st),
            threshold=_field(record, "threshold", int, st),
            modulus_bits=_field(record, "modulus-bits", int, st),
            segments=segments,
        )


@dataclass(frozen=True)
class AdvertiseKeys:
    """Stage 0 reply: a node's two public keys and its commitment to the self-mask seed."""

    STAGE: ClassVar[Stage] = Stage.ADVERTISE_KEYS
    round_id: str
    mask_public: bytes
    share_public: bytes
    seed_commitment: bytes
    institution: str

    def to_record(self) -> Record:
        return {
            **_header(self.STAGE, self.round_id),
            "mask-public": self.mask_public,
            "share-public": self.share_public,
            "seed-commitment": self.seed_commitment,
            "institution": self.institution,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> AdvertiseKeys:
        st = cls.STAGE
        round_id = _check_header(record, st)
        keys = {k: _field(record, k, bytes, st) for k in ("mask-public", "share-public", "seed-commitment")}
        for k, v in keys.items():
            if len(v) != 32:
                raise SecAggError(f"Field '{k}' must be 32 bytes. Got {len(v)} bytes instead.", stage=st.label)
        return cls(
            round_id=round_id,
            mask_public=keys["mask-public"],
            share_public=keys["share-public"],
            seed_commitment=keys["seed-commitment"],
            institution=str(_field(record, "institution", str, st))[:200],
        )


@dataclass(frozen=True)
class ShareKeysRequest:
    """Stage 1, coordinator -> node: public keys of the node's neighbours still in the round."""

    STAGE: ClassVar[Stage] = Stage.SHARE_KEYS
    round_id: str
    neighbour_ids: tuple[int, ...]
    mask_publics: tuple[bytes, ...]
    share_publics: tuple[bytes, ...]

    def to_record(self) -> Record:
        return {
            **_header(self.STAGE, self.round_id),
            "neighbour-ids": pack_ids(self.neighbour_ids),
            "mask-publics": list(self.mask_publics),
            "share-publics": list(self.share_publics),
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> ShareKeysRequest:
        st = cls.STAGE
        round_id = _check_header(record, st)
        ids = unpack_ids(_field(record, "neighbour-ids", bytes, st), stage=st, key="neighbour-ids")
        mpk = _bytes_list(record, "mask-publics", st)
        spk = _bytes_list(record, "share-publics", st)
        if not len(ids) == len(mpk) == len(spk):
            raise SecAggError(
                f"neighbour-ids ({len(ids)}), mask-publics ({len(mpk)}) and share-publics "
                f"({len(spk)}) must have the same length.",
                stage=st.label,
            )
        return cls(round_id=round_id, neighbour_ids=ids, mask_publics=mpk, share_publics=spk)


@dataclass(frozen=True)
class ShareKeysReply:
    """Stage 1 reply: one encrypted share bundle per neighbour (opaque to the coordinator)."""

    STAGE: ClassVar[Stage] = Stage.SHARE_KEYS
    round_id: str
    receivers: tuple[int, ...]
    ciphertexts: tuple[bytes, ...]

    def to_record(self) -> Record:
        return {
            **_header(self.STAGE, self.round_id),
            "receivers": pack_ids(self.receivers),
            "ciphertexts": list(self.ciphertexts),
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> ShareKeysReply:
        st = cls.STAGE
        round_id = _check_header(record, st)
        receivers = unpack_ids(_field(record, "receivers", bytes, st), stage=st, key="receivers")
        cts = _bytes_list(record, "ciphertexts", st)
        if len(receivers) != len(cts):
            raise SecAggError(
                f"receivers ({len(receivers)}) and ciphertexts ({len(cts)}) differ in length.",
                stage=st.label,
            )
        return cls(round_id=round_id, receivers=receivers, ciphertexts=cts)


@dataclass(frozen=True)
class MaskedInputRequest:
    """Stage 2, coordinator -> node: who is still in, and the share bundles addressed to it."""

    STAGE: ClassVar[Stage] = Stage.MASKED_INPUT
    round_id: str
    survivors: tuple[int, ...]
    senders: tuple[int, ...]
    ciphertexts: tuple[bytes, ...]

    def to_record(self) -> Record:
        return {
            **_header(self.STAGE, self.round_id),
            "survivors": pack_ids(self.survivors),
            "senders": pack_ids(self.senders),
            "ciphertexts": list(self.ciphertexts),
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> MaskedInputRequest:
        st = cls.STAGE
        round_id = _check_header(record, st)
        senders = unpack_ids(_field(record, "senders", bytes, st), stage=st, key="senders")
        cts = _bytes_list(record, "ciphertexts", st)
        if len(senders) != len(cts):
            raise SecAggError(
                f"senders ({len(senders)}) and ciphertexts ({len(cts)}) differ in length.",
                stage=st.label,
            )
        return cls(
            round_id=round_id,
            survivors=unpack_ids(_field(record, "survivors", bytes, st), stage=st, key="survivors"),
            senders=senders,
            ciphertexts=cts,
        )


@dataclass(frozen=True)
class MaskedInputReply:
    """Stage 2 reply: the doubly masked, encoded contribution (``uint32`` in ``[0, 2**b)``)."""

    STAGE: ClassVar[Stage] = Stage.MASKED_INPUT
    round_id: str
    masked: np.ndarray = field(repr=False)

    def to_record(self) -> Record:
        return {**_header(self.STAGE, self.round_id), "masked": self.masked}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> MaskedInputReply:
        st = cls.STAGE
        round_id = _check_header(record, st)
        masked = _field(record, "masked", np.ndarray, st)
        if masked.dtype != np.uint32 or masked.ndim != 1:
            raise SecAggError(
                f"Field 'masked' must be a 1-D uint32 array. Got {_describe(masked)} instead.",
                stage=st.label,
            )
        return cls(round_id=round_id, masked=masked)


@dataclass(frozen=True)
class UnmaskRequest:
    """Stage 3, coordinator -> node: which nodes sent a masked input (S) and which did not (D)."""

    STAGE: ClassVar[Stage] = Stage.UNMASK
    round_id: str
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]

    def to_record(self) -> Record:
        return {
            **_header(self.STAGE, self.round_id),
            "survivors": pack_ids(self.survivors),
            "dropped": pack_ids(self.dropped),
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> UnmaskRequest:
        st = cls.STAGE
        round_id = _check_header(record, st)
        return cls(
            round_id=round_id,
            survivors=unpack_ids(_field(record, "survivors", bytes, st), stage=st, key="survivors"),
            dropped=unpack_ids(_field(record, "dropped", bytes, st), stage=st, key="dropped"),
        )


@dataclass(frozen=True)
class UnmaskReply:
    """Stage 3 reply: self-mask-seed shares of survivors, mask-key shares of dropped nodes."""

    STAGE: ClassVar[Stage] = Stage.UNMASK
    round_id: str
    seed_owners: tuple[int, ...]
    seed_shares: tuple[bytes, ...] = field(repr=False)
    key_owners: tuple[int, ...]
    key_shares: tuple[bytes, ...] = field(repr=False)

    def to_record(self) -> Record:
        return {
            **_header(self.STAGE, self.round_id),
            "seed-owners": pack_ids(self.seed_owners),
            "seed-shares": list(self.seed_shares),
            "key-owners": pack_ids(self.key_owners),
            "key-shares": list(self.key_shares),
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> UnmaskReply:
        st = cls.STAGE
        round_id = _check_header(record, st)
        so = unpack_ids(_field(record, "seed-owners", bytes, st), stage=st, key="seed-owners")
        ss = _bytes_list(record, "seed-shares", st)
        ko = unpack_ids(_field(record, "key-owners", bytes, st), stage=st, key="key-owners")
        ks = _bytes_list(record, "key-shares", st)
        if len(so) != len(ss) or len(ko) != len(ks):
            raise SecAggError("Share owner and share lists differ in length.", stage=st.label)
        return cls(round_id=round_id, seed_owners=so, seed_shares=ss, key_owners=ko, key_shares=ks)


RequestType = type[SetupRequest] | type[ShareKeysRequest] | type[MaskedInputRequest] | type[UnmaskRequest]
ReplyType = type[AdvertiseKeys] | type[ShareKeysReply] | type[MaskedInputReply] | type[UnmaskReply]
Request = SetupRequest | ShareKeysRequest | MaskedInputRequest | UnmaskRequest
Reply = AdvertiseKeys | ShareKeysReply | MaskedInputReply | UnmaskReply

REQUEST_TYPES: dict[Stage, RequestType] = {
    Stage.ADVERTISE_KEYS: SetupRequest,
    Stage.SHARE_KEYS: ShareKeysRequest,
    Stage.MASKED_INPUT: MaskedInputRequest,
    Stage.UNMASK: UnmaskRequest,
}
REPLY_TYPES: dict[Stage, ReplyType] = {
    Stage.ADVERTISE_KEYS: AdvertiseKeys,
    Stage.SHARE_KEYS: ShareKeysReply,
    Stage.MASKED_INPUT: MaskedInputReply,
    Stage.UNMASK: UnmaskReply,
}


def stage_of(record: Mapping[str, Any]) -> Stage:
    """The stage a record belongs to (raises SecAggError if absent or unknown)."""
    if not isinstance(record, Mapping) or not isinstance(record.get(STAGE_KEY), str):
        raise SecAggError(f"A secure-aggregation record needs a string '{STAGE_KEY}' field.", stage="unknown")
    return Stage.from_label(record[STAGE_KEY])
