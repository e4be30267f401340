"""The SecAgg+ state machines driven in memory: exact sums, dropouts, misbehaviour."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from scipy import stats

from consortium.secagg import primitives as prim
from consortium.secagg import protocol
from consortium.secagg.errors import SecAggAbort, SecAggError
from consortium.secagg.messages import (
    MaskedInputRequest,
    SetupRequest,
    ShareKeysReply,
    Stage,
    UnmaskReply,
    UnmaskRequest,
    pack_ids,
    unpack_ids,
)
from consortium.secagg.protocol import ClientSession, SecureSum, ServerSession
from consortium.secagg.quantize import SegmentSpec

STAGES = list(Stage)
Tamper = Callable[[int, Stage, dict[str, Any]], dict[str, Any]]


@dataclass
class Harness:
    """n in-memory clients around one ServerSession; records every client->server record."""

    n: int
    d: int = 64
    neighbours: int | None = None
    threshold: int | None = None
    modulus_bits: int = 32
    seed: int = 0
    inputs: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    encoded: dict[int, np.ndarray] = field(default_factory=dict)
    clients: dict[int, ClientSession] = field(default_factory=dict)
    captured: list[tuple[int, Stage, dict[str, Any]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        self.ids = sorted(int(x) for x in rng.choice(2**62, size=self.n, replace=False))
        self.server = ServerSession(
            round_id="round-1",
            node_ids=self.ids,
            segments=[SegmentSpec("update", self.d, 1.0), SegmentSpec("weight", 1, 1.0)],
            modulus_bits=self.modulus_bits,
            neighbours=self.neighbours,
            threshold=self.threshold,
            graph_seed=b"graph-seed-0123456789",
        )
        plan = self.server.plan
        setup = self.server.requests()[self.ids[0]]
        for i, u in enumerate(self.ids):
            self.inputs[u] = {"update": rng.uniform(-1, 1, self.d), "weight": np.array([(i + 1) / self.n])}
            self.encoded[u] = plan.encode(self.inputs[u], rng=rng).values
            self.clients[u] = ClientSession.start(
                node_id=u, setup=setup, encoded=self.encoded[u], institution=f"bank-{i}"
            )

    def answer(self, u: int, stage: Stage, request: Any) -> dict[str, Any]:
        c = self.clients[u]
        if stage is Stage.ADVERTISE_KEYS:
            return c.advertise().to_record()
        if stage is Stage.SHARE_KEYS:
            return c.share_keys(request).to_record()
        if stage is Stage.MASKED_INPUT:
            return c.masked_input(request).to_record()
        return c.unmask(request).to_record()

    def run(
        self,
        drop: Mapping[int, Stage] | None = None,
        tamper: Tamper | None = None,
        late: Mapping[int, Stage] | None = None,
    ) -> SecureSum:
        """Run all stages; ``drop``: node -> first stage it misses; ``late``: reply withheld."""
        drop = drop or {}
        late = late or {}
        self.late_replies: dict[int, dict[str, Any]] = {}
        while not self.server.finished:
            stage = self.server.stage
            assert stage is not None
            replies = {}
            for u, req in self.server.requests().items():
                if u in drop and drop[u] <= stage:
                    continue
                rec = self.answer(u, stage, req)
                if tamper is not None:
                    rec = tamper(u, stage, rec)
                self.captured.append((u, stage, rec))
                if late.get(u) == stage:
                    self.late_replies[u] = rec
                    continue
                replies[u] = rec
            self.server.receive(replies)
        return self.server.outcome()

    def expected_raw(self, members: Any) -> np.ndarray:
        total = np.zeros(self.server.plan.length, dtype=np.uint32)
        for u in members:
            total += self.encoded[u]
        return total & np.uint32(self.server.plan.modulus - 1)


def survivors_of(h: Harness, drop: Mapping[int, Stage]) -> list[int]:
    """Nodes whose masked input reaches the server (dropping at unmask keeps you in)."""
    return [u for u in h.ids if u not in drop or drop[u] is Stage.UNMASK]


# --------------------------------------------------------------------------- exact sums


@pytest.mark.parametrize("bits", [32, 20])
def test_unmasked_sum_equals_sum_of_quantised_inputs_exactly(bits: int) -> None:
    h = Harness(n=6, d=300, modulus_bits=bits)
    result = h.run()
    assert result.participants == tuple(h.ids)
    assert np.array_equal(result.raw, h.expected_raw(h.ids))
    plain = sum(h.inputs[u]["update"] for u in h.ids)
    step = h.server.plan.segment("update").resolution
    assert np.max(np.abs(result.values["update"] - plain)) <= h.n * step
    assert result.values["weight"][0] == pytest.approx(sum((i + 1) / 6 for i in range(6)), abs=h.n * step)
    assert result.institutions[h.ids[0]] == "bank-0"
    assert result.dropped == {}


def test_sparse_graph_round_with_default_parameters() -> None:
    h = Harness(n=20, d=50)
    assert h.server.graph.k == 11 and h.server.threshold == 7
    drop = {h.ids[3]: Stage.SHARE_KEYS, h.ids[7]: Stage.MASKED_INPUT, h.ids[11]: Stage.UNMASK}
    result = h.run(drop=drop)
    assert np.array_equal(result.raw, h.expected_raw(survivors_of(h, drop)))
    assert result.dropped == {h.ids[3]: Stage.SHARE_KEYS, h.ids[7]: Stage.MASKED_INPUT}


# --------------------------------------------------------------------------- dropouts


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.label)
@pytest.mark.parametrize("n_drop", [1, 2])
def test_dropouts_up_to_n_minus_t_at_every_stage_give_the_survivors_sum(stage: Stage, n_drop: int) -> None:
    h = Harness(n=5)  # complete graph, k = 4, t = 3: up to n - t = 2 dropouts
    assert h.server.threshold == 3
    drop = {u: stage for u in h.ids[1 : 1 + n_drop]}
    result = h.run(drop=drop)
    members = survivors_of(h, drop)
    assert result.participants == tuple(members)
    assert np.array_equal(result.raw, h.expected_raw(members))
    if stage is not Stage.UNMASK:
        assert set(result.dropped) == set(drop)


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.label)
def test_more_than_n_minus_t_dropouts_abort_cleanly_naming_stage_and_counts(stage: Stage) -> None:
    h = Harness(n=5)
    drop = {u: stage for u in h.ids[:3]}
    with pytest.raises(SecAggAbort) as err:
        h.run(drop=drop)
    assert err.value.stage == stage.label
    assert err.value.counts["invited"] == 5 and err.value.counts["threshold"] == 3
    assert f"stage '{stage.label}'" in str(err.value) and "unchanged" in str(err.value)
    assert h.server.finished
    with pytest.raises(SecAggAbort):
        h.server.outcome()
    with pytest.raises(SecAggAbort):
        h.server.requests()


def test_late_masked_input_never_unmasks_the_late_node() -> None:
    h = Harness(n=5, d=4000)
    v = h.ids[2]
    result = h.run(late={v: Stage.MASKED_INPUT})
    assert v not in result.participants and result.dropped[v] is Stage.MASKED_INPUT
    assert np.array_equal(result.raw, h.expected_raw([u for u in h.ids if u != v]))
    # Nobody revealed a share of v's self-mask seed, so the coordinator cannot strip PRG(b_v) ...
    assert all(c.revealed.get(v) != "seed" for c in h.clients.values())
    unmask = [rec for _, st, rec in h.captured if st is Stage.UNMASK]
    assert all(v not in UnmaskReply.from_record(r).seed_owners for r in unmask)
    # ... and v's late vector minus all pairwise masks (which the coordinator *can* remove
    # with v's reconstructed mask key) is still uniform and unrelated to v's input.
    late = h.late_replies[v]["masked"]
    c = h.clients[v]
    stripped = late.copy()
    for u in h.ids:
        if u == v:
            continue
        seed = protocol.pairwise_seed(
            c._s.mask_keys.private, h.clients[u]._s.mask_keys.public, round_id="round-1", u=v, v=u
        )
        mask = prim.prg_uint32(seed, late.shape[0])
        stripped = stripped - mask if u < v else stripped + mask
    self_mask = prim.prg_uint32(protocol.self_mask_seed(c._s.seed, round_id="round-1", u=v), late.shape[0])
    assert np.array_equal(stripped - self_mask, h.encoded[v])  # only b_v would unmask it
    assert abs(stats.pearsonr(stripped[:-1].astype(float), h.encoded[v][:-1].astype(float))[0]) < 0.1


# --------------------------------------------------------------------------- what the coordinator sees


def _chi2_bytes(values: np.ndarray, shift: int) -> float:
    counts = np.bincount(((values >> shift) & 0xFF).astype(np.int64), minlength=256)
    return float(stats.chisquare(counts).pvalue)


def test_masked_vectors_are_uniform_and_independent_of_the_inputs() -> None:
    d = 20_000
    inputs = {
        "zeros": np.zeros(d),  # encodes to all-zero words
        "ramp": np.linspace(-1.0, 1.0, d),  # spans the whole encodable range
    }
    masked: dict[str, list[np.ndarray]] = {}
    encoded: dict[str, np.ndarray] = {}
    for seed, (name, x) in enumerate(inputs.items()):
        h = Harness(n=4, d=d, seed=seed)
        rng = np.random.default_rng(seed)
        for u in h.ids:
            h.encoded[u] = h.server.plan.encode({"update": x, "weight": [0.5]}, rng=rng).values
            h.clients[u]._s.encoded = h.encoded[u]
        result = h.run()
        assert np.array_equal(result.raw, h.expected_raw(h.ids))
        masked[name] = [rec["masked"] for _, st, rec in h.captured if st is Stage.MASKED_INPUT]
        encoded[name] = h.encoded[h.ids[0]]
    for name, ys in masked.items():
        assert len(ys) == 4
        x = encoded[name].astype(np.float64)
        for y in ys:
            assert y.dtype == np.uint32 and y.nbytes == 4 * (d + 1)
            assert _chi2_bytes(y, 0) > 1e-4 and _chi2_bytes(y, 24) > 1e-4  # low and high byte
            if np.ptp(x) > 0:
                assert abs(np.corrcoef(y.astype(np.float64), x)[0, 1]) < 4 / np.sqrt(d)
    # Two very different inputs give statistically indistinguishable masked vectors.
    y0 = np.concatenate(masked["zeros"]).astype(np.float64)
    y1 = np.concatenate(masked["ramp"]).astype(np.float64)
    assert stats.ks_2samp(y0, y1).pvalue > 1e-4
    assert stats.ks_2samp(y1, np.random.default_rng(9).uniform(0, 2**32, y1.size)).pvalue > 1e-4


def test_replies_never_carry_weights_or_metrics_in_the_clear() -> None:
    h = Harness(n=5, d=32)
    h.run()
    allowed = {
        Stage.ADVERTISE_KEYS: {"stage", "round-id", "mask-public", "share-public", "seed-commitment", "institution"},
        Stage.SHARE_KEYS: {"stage", "round-id", "receivers", "ciphertexts"},
        Stage.MASKED_INPUT: {"stage", "round-id", "masked"},
        Stage.UNMASK: {"stage", "round-id", "seed-owners", "seed-shares", "key-owners", "key-shares"},
    }
    weights = {float(h.inputs[u]["weight"][0]) for u in h.ids}
    for u, stage, rec in h.captured:
        assert set(rec) == allowed[stage]
        for value in rec.values():
            if isinstance(value, float):
                assert value not in weights
            if isinstance(value, np.ndarray):
                assert not np.array_equal(value, h.encoded[u])
                # the weight coordinate is masked as well
                assert value[-1] != h.encoded[u][-1] or value[-2] != h.encoded[u][-2]


# --------------------------------------------------------------------------- client refusals


def _to_unmask(h: Harness) -> None:
    while h.server.stage is not Stage.UNMASK:
        stage = h.server.stage
        assert stage is not None
        h.server.receive({u: h.answer(u, stage, r) for u, r in h.server.requests().items()})


def test_client_never_reveals_both_kinds_of_share_for_one_node() -> None:
    h = Harness(n=5)
    _to_unmask(h)
    u, v = h.ids[0], h.ids[3]
    c = h.clients[u]
    everyone = tuple(h.ids)
    first = c.unmask(UnmaskRequest(round_id="round-1", survivors=everyone, dropped=()))
    assert v in first.seed_owners and c.revealed[v] == "seed"
    again = c.unmask(UnmaskRequest(round_id="round-1", survivors=everyone, dropped=()))
    assert again.seed_shares == first.seed_shares  # a duplicate request is answered identically
    switched = UnmaskRequest(round_id="round-1", survivors=tuple(x for x in h.ids if x != v), dropped=(v,))
    with pytest.raises(SecAggError, match="other kind of share") as err:
        c.unmask(switched)
    assert err.value.stage == "unmask"
    assert c.revealed[v] == "seed"


@pytest.mark.parametrize(
    ("survivors", "dropped", "match"),
    [
        ("all", "first", "both as survivors and as dropped"),
        ("others", "", "not listed as a survivor"),
        ("two", "", "at least the threshold"),
        ("all+stranger", "", "not in the round"),
        ("dup", "", "must not repeat"),
    ],
)
def test_client_refuses_unsafe_unmask_requests(survivors: str, dropped: str, match: str) -> None:
    h = Harness(n=5)
    _to_unmask(h)
    u = h.ids[0]
    sets = {
        "all": tuple(h.ids),
        "others": tuple(h.ids[1:]),
        "two": (u, h.ids[1]),
        "all+stranger": (*h.ids, 12345),
        "dup": (u, u, *h.ids[1:]),
        "first": (u,),
        "": (),
    }
    with pytest.raises(SecAggError, match=match):
        h.clients[u].unmask(UnmaskRequest(round_id="round-1", survivors=sets[survivors], dropped=sets[dropped]))
    assert h.clients[u].revealed == {}


def test_client_rejects_out_of_order_and_foreign_requests() -> None:
    h = Harness(n=5)
    c = h.clients[h.ids[0]]
    with pytest.raises(SecAggError, match="Out-of-order") as err:
        c.masked_input(MaskedInputRequest(round_id="round-1", survivors=tuple(h.ids), senders=(), ciphertexts=()))
    assert err.value.stage == "masked_input"
    h.server.receive({u: h.answer(u, Stage.ADVERTISE_KEYS, r) for u, r in h.server.requests().items()})
    req = h.server.requests()[h.ids[0]]
    with pytest.raises(SecAggError, match="round"):
        c.share_keys(
            type(req)(
                round_id="other",
                neighbour_ids=req.neighbour_ids,
                mask_publics=req.mask_publics,
                share_publics=req.share_publics,
            )
        )
    with pytest.raises(SecAggError, match="neighbours in the public graph"):
        c.share_keys(
            type(req)(
                round_id="round-1",
                neighbour_ids=(*req.neighbour_ids[:-1], 999),
                mask_publics=req.mask_publics,
                share_publics=req.share_publics,
            )
        )
    assert c.stage is Stage.ADVERTISE_KEYS  # failed requests leave the session unchanged
    assert c.share_keys(req).receivers == req.neighbour_ids


def test_client_refuses_setup_it_is_not_part_of_or_with_unsafe_threshold() -> None:
    h = Harness(n=5)
    setup: SetupRequest = h.server.requests()[h.ids[0]]
    enc = h.encoded[h.ids[0]]
    with pytest.raises(SecAggError, match="not in the round's participant list"):
        ClientSession.start(node_id=7, setup=setup, encoded=enc, institution="x")
    weak = SetupRequest(**{**setup.__dict__, "threshold": 2})
    with pytest.raises(SecAggError, match="majority"):
        ClientSession.start(node_id=h.ids[0], setup=weak, encoded=enc, institution="x")
    with pytest.raises(SecAggError, match="uint32 of shape"):
        ClientSession.start(node_id=h.ids[0], setup=setup, encoded=enc[:-1], institution="x")


def test_client_state_survives_serialisation_between_stages() -> None:
    h = Harness(n=4)
    h.server.receive({u: h.answer(u, Stage.ADVERTISE_KEYS, r) for u, r in h.server.requests().items()})
    h.clients = {u: ClientSession.from_state(c.to_state()) for u, c in h.clients.items()}
    h.server.receive({u: h.answer(u, Stage.SHARE_KEYS, r) for u, r in h.server.requests().items()})
    h.clients = {u: ClientSession.from_state(c.to_state()) for u, c in h.clients.items()}
    result = h.run()
    assert np.array_equal(result.raw, h.expected_raw(h.ids))
    with pytest.raises(SecAggError, match="unreadable"):
        ClientSession.from_state({"stage": 0})


def test_node_ids_pack_as_big_endian_uint64() -> None:
    ids = (0, 1, 2**64 - 1, 0x0102030405060708, np.uint64(7))
    data = pack_ids(ids)
    assert data == np.asarray([int(i) for i in ids], dtype=">u8").tobytes()
    assert unpack_ids(data, stage=Stage.UNMASK, key="k") == (0, 1, 2**64 - 1, 0x0102030405060708, 7)
    assert pack_ids(()) == b""
    for bad in ([-1], [2**64]):
        with pytest.raises(OverflowError):
            pack_ids(bad)
    with pytest.raises(SecAggError, match="multiple of 8"):
        unpack_ids(b"1234567", stage=Stage.UNMASK, key="k")


def test_client_state_is_the_setup_plus_one_blob_and_rejects_corruption() -> None:
    h = Harness(n=4)
    h.server.receive({u: h.answer(u, Stage.ADVERTISE_KEYS, r) for u, r in h.server.requests().items()})
    u = h.ids[0]
    state = h.clients[u].to_state()
    assert set(state) == {"encoded", "session"} | {k for k in state if k.startswith("setup.")}
    again = ClientSession.from_state(state).to_state()
    assert again["session"] == state["session"] and np.array_equal(again["encoded"], state["encoded"])
    blob = state["session"]
    for bad in (blob[:-1], blob + b"x", b"\x01" + blob[1:], blob[:40], b"", "text"):
        with pytest.raises(SecAggError, match="unreadable"):
            ClientSession.from_state({**state, "session": bad})


# --------------------------------------------------------------------------- misbehaving clients


@pytest.mark.parametrize(
    ("mutation", "reason"),
    [
        (lambda y: y[:-1], "expected"),
        (lambda y: y.astype(np.int64), "uint32"),
        (lambda y: y.reshape(1, -1), "1-D"),
        (lambda y: "not an array", "wrong type"),
    ],
)
def test_malformed_masked_vector_is_rejected_and_the_round_completes(
    mutation: Callable[[np.ndarray], Any], reason: str
) -> None:
    h = Harness(n=5)
    bad = h.ids[1]

    def tamper(u: int, stage: Stage, rec: dict[str, Any]) -> dict[str, Any]:
        if u == bad and stage is Stage.MASKED_INPUT:
            return {**rec, "masked": mutation(rec["masked"])}
        return rec

    result = h.run(tamper=tamper)
    assert bad not in result.participants and result.dropped[bad] is Stage.MASKED_INPUT
    assert np.array_equal(result.raw, h.expected_raw([u for u in h.ids if u != bad]))
    rejection = [r for r in result.rejections if r.node == bad]
    assert rejection and reason in rejection[0].reason
    # its self-mask seed was never requested from anybody
    assert all(c.revealed.get(bad) != "seed" for c in h.clients.values())


def test_out_of_range_masked_vector_is_rejected_for_small_moduli() -> None:
    h = Harness(n=5, modulus_bits=16)
    bad = h.ids[0]

    def tamper(u: int, stage: Stage, rec: dict[str, Any]) -> dict[str, Any]:
        if u == bad and stage is Stage.MASKED_INPUT:
            return {**rec, "masked": rec["masked"] | np.uint32(2**20)}
        return rec

    result = h.run(tamper=tamper)
    assert bad not in result.participants
    assert any("2**16" in r.reason for r in result.rejections)


def test_garbage_share_bundles_abort_naming_the_sender() -> None:
    h = Harness(n=5)
    bad = h.ids[2]

    def tamper(u: int, stage: Stage, rec: dict[str, Any]) -> dict[str, Any]:
        if u == bad and stage is Stage.SHARE_KEYS:
            return {**rec, "ciphertexts": [bytes(len(c)) for c in rec["ciphertexts"]]}
        return rec

    with pytest.raises(SecAggAbort, match=r"self-mask seed of institution 'bank-2'") as err:
        h.run(tamper=tamper)
    assert err.value.stage == "unmask"
    assert all(c.stage is Stage.UNMASK for c in h.clients.values())  # nobody crashed


def test_one_garbage_bundle_is_tolerated_when_enough_holders_remain() -> None:
    h = Harness(n=5)
    bad = h.ids[2]

    def tamper(u: int, stage: Stage, rec: dict[str, Any]) -> dict[str, Any]:
        if u == bad and stage is Stage.SHARE_KEYS:
            cts = list(rec["ciphertexts"])
            cts[0] = cts[0][:-1] + bytes([cts[0][-1] ^ 1])
            return {**rec, "ciphertexts": cts}
        return rec

    result = h.run(tamper=tamper)
    assert np.array_equal(result.raw, h.expected_raw(h.ids))


@pytest.mark.parametrize("kind", ["short", "wrong-value"])
def test_garbage_unmask_shares_are_detected_and_the_round_completes(kind: str) -> None:
    h = Harness(n=5)
    bad = h.ids[4]
    rng = np.random.default_rng(3)

    def tamper(u: int, stage: Stage, rec: dict[str, Any]) -> dict[str, Any]:
        if u == bad and stage is Stage.UNMASK:
            if kind == "short":
                return {**rec, "seed-shares": [s[:10] for s in rec["seed-shares"]]}
            junk = [rng.integers(0, 256, prim.SHARE_BYTES - 1).astype(np.uint8).tobytes() for _ in rec["seed-shares"]]
            return {**rec, "seed-shares": [b"\x00" + j for j in junk]}
        return rec

    result = h.run(tamper=tamper)
    assert np.array_equal(result.raw, h.expected_raw(h.ids))
    if kind == "short":
        assert any(r.node == bad and r.stage is Stage.UNMASK for r in result.rejections)


def test_malformed_and_foreign_replies_are_rejected_with_reasons() -> None:
    h = Harness(n=5)

    def tamper(u: int, stage: Stage, rec: dict[str, Any]) -> dict[str, Any]:
        if stage is Stage.ADVERTISE_KEYS and u == h.ids[0]:
            return {**rec, "mask-public": rec["mask-public"][:31]}
        if stage is Stage.ADVERTISE_KEYS and u == h.ids[1]:
            return {k: v for k, v in rec.items() if k != "seed-commitment"}
        return rec

    result = h.run(tamper=tamper)
    reasons = {r.node: r.reason for r in result.rejections}
    assert "must be 32 bytes" in reasons[h.ids[0]]
    assert "'seed-commitment' is missing" in reasons[h.ids[1]]
    assert np.array_equal(result.raw, h.expected_raw(h.ids[2:]))


def test_duplicate_public_keys_and_unasked_nodes_are_rejected() -> None:
    h = Harness(n=5)
    replies = {u: h.answer(u, Stage.ADVERTISE_KEYS, r) for u, r in h.server.requests().items()}
    replies[h.ids[1]] = {**replies[h.ids[1]], "mask-public": replies[h.ids[0]]["mask-public"]}
    replies[424242] = replies[h.ids[2]]
    h.server.receive(replies)
    reasons = {r.node: r.reason for r in h.server.rejections}
    assert "already used" in reasons[h.ids[1]]
    assert "not asked" in reasons[424242]
    assert h.server.dropped == {h.ids[1]: Stage.ADVERTISE_KEYS}


def test_share_keys_reply_must_address_exactly_the_live_neighbours() -> None:
    h = Harness(n=5)
    h.server.receive({u: h.answer(u, Stage.ADVERTISE_KEYS, r) for u, r in h.server.requests().items()})
    replies = {u: h.answer(u, Stage.SHARE_KEYS, r) for u, r in h.server.requests().items()}
    r0 = ShareKeysReply.from_record(replies[h.ids[0]])
    replies[h.ids[0]] = ShareKeysReply(round_id="round-1", receivers=r0.receivers[:-1], ciphertexts=r0.ciphertexts[:-1])
    h.server.receive(replies)
    assert any("expected exactly" in r.reason for r in h.server.rejections)
    assert h.server.dropped == {h.ids[0]: Stage.SHARE_KEYS}


# --------------------------------------------------------------------------- cost


def test_coordinator_prg_work_is_linear_in_survivors_plus_dropped_times_k(monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness(n=16, d=10, neighbours=4)
    drop = {h.ids[0]: Stage.MASKED_INPUT, h.ids[5]: Stage.MASKED_INPUT}
    _to_unmask_with_drop(h, drop)
    calls = []
    real = prim.MaskExpander.add_into

    def counting(self: prim.MaskExpander, acc: np.ndarray, seed: bytes, **kw: Any) -> None:
        calls.append(self.n)
        real(self, acc, seed, **kw)

    monkeypatch.setattr(prim.MaskExpander, "add_into", counting)
    h.server.receive({u: h.answer(u, Stage.UNMASK, r) for u, r in h.server.requests().items()})
    S = set(h.ids) - set(drop)
    expected = len(S) + sum(len([u for u in h.server.graph.of(v) if u in S]) for v in drop)
    assert len(calls) == expected <= len(S) + len(drop) * h.server.graph.k
    assert np.array_equal(h.server.outcome().raw, h.expected_raw(sorted(S)))


def _to_unmask_with_drop(h: Harness, drop: Mapping[int, Stage]) -> None:
    while h.server.stage is not Stage.UNMASK:
        stage = h.server.stage
        assert stage is not None
        h.server.receive(
            {u: h.answer(u, stage, r) for u, r in h.server.requests().items() if not (u in drop and drop[u] <= stage)}
        )
