"""The Flower glue: ``secagg_mod`` in a real ClientApp, ``run_secure_round`` over a Grid.

Most tests use :class:`InProcessGrid` (real messages, protobuf round trips, real
``ClientApp``); one runs through Flower's simulation engine.
"""

from __future__ import annotations

import random
import struct
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from consortium.federation.aggregation import AggregateResult, weighted_sum
from consortium.secagg.contribution import ContributionSpec, build_contribution
from consortium.secagg.flower import (
    SECAGG_ARRAYS,
    SECAGG_RECORD,
    STATE_ARRAYS,
    STATE_RECORD,
    SecAggAbort,
    SecAggConfig,
    array_of,
    make_secagg_mod,
    numpy_of,
    run_secure_round,
    secagg_mod,
)
from consortium.secagg.inprocess import Decision, InProcessGrid
from consortium.secagg.messages import Stage
from consortium.secagg.quantize import QuantizationPlan

SHAPES = [(40, 25), (40,), (7,)]
REFERENCE = [np.zeros(s, dtype=np.float32) for s in SHAPES]
D = sum(int(np.prod(s)) for s in SHAPES)
LOSS = {i: 0.123456789 + i / 1000 for i in range(10)}
CONFIG = SecAggConfig(clip_norm=2.0, weight_cap=200.0, metric_bounds={"train-loss": 10.0}, stage_timeout=5.0)


def node_ids(n: int) -> list[int]:
    rng = random.Random(42)  # full unsigned 64-bit range, like Flower's node ids
    return [rng.getrandbits(64) for _ in range(n)]


def known_delta(index: int, rnd: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(1000 * rnd + index)
    return [rng.uniform(-0.01, 0.01, s).astype(np.float32) for s in SHAPES]


def num_examples(index: int) -> int:
    return 60 + 37 * index


def make_app(*, mod: Any = secagg_mod, bad_index: int | None = None) -> ClientApp:
    app = ClientApp(mods=[mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        i = int(context.node_config["index"])
        rnd = int(msg.content.config_records["config"]["round"])
        delta = known_delta(i, rnd)
        if i == bad_index:
            delta = delta[:-1]  # wrong model
        content = RecordDict(
            {
                "update": ArrayRecord(delta),
                "metrics": MetricRecord({"num-examples": num_examples(i), "train-loss": LOSS[i], "private-auc": 0.777}),
            }
        )
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"metrics": MetricRecord({"auc": 0.5})}), reply_to=msg)

    return app


def make_grid(n: int, **kwargs: Any) -> InProcessGrid:
    ids = node_ids(n)
    app = kwargs.pop("app", None) or make_app()
    return InProcessGrid(
        app,
        node_ids=ids,
        node_configs={u: {"index": i, "institution": f"bank-{i}"} for i, u in enumerate(ids)},
        **kwargs,
    )


def train_content(rnd: int = 1) -> RecordDict:
    return RecordDict({"arrays": ArrayRecord(REFERENCE), "config": ConfigRecord({"round": rnd})})


def run(grid: InProcessGrid, *, timeout: float = 2.0, round_id: str | None = None, rnd: int = 1) -> AggregateResult:
    return run_secure_round(
        grid,
        node_ids=grid.node_ids,
        node_names={},
        train_content=train_content(rnd),
        reference=REFERENCE,
        config=CONFIG,
        timeout_per_stage=timeout,
        round_id=round_id,
    )


def oracle(indices: list[int], rnd: int = 1) -> AggregateResult:
    return weighted_sum(
        [
            (f"bank-{i}", known_delta(i, rnd), min(num_examples(i), CONFIG.weight_cap), {"train-loss": LOSS[i]})
            for i in indices
        ],
        reference=REFERENCE,
    )


def assert_close(result: AggregateResult, expected: AggregateResult, n: int) -> None:
    plan = QuantizationPlan.create(ContributionSpec.create(CONFIG, REFERENCE).segments(), n_participants=n)
    tol = n * plan.segment("update").resolution * CONFIG.weight_cap
    for got, want in zip(result.update_sum, expected.update_sum, strict=True):
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=tol + 1e-6)
    assert result.weight_total == pytest.approx(expected.weight_total, abs=tol)
    assert result.metric_sums["train-loss"] == pytest.approx(expected.metric_sums["train-loss"], abs=10 * tol)
    assert set(result.metric_sums) == {"train-loss"}
    assert sorted(result.participants) == sorted(expected.participants)


# --------------------------------------------------------------------------- happy path


def test_secure_round_matches_the_clear_text_oracle_and_keeps_float32() -> None:
    grid = make_grid(5)
    result = run(grid)
    assert_close(result, oracle(list(range(5))), 5)
    assert result.dropped == ()
    assert grid.client_errors == []


def test_secure_round_is_exact_on_quantised_values() -> None:
    seed = 123
    mod = make_secagg_mod(rng_factory=lambda: np.random.default_rng(seed))
    grid = make_grid(4, app=make_app(mod=mod))
    result = run(grid)
    spec = ContributionSpec.create(CONFIG, REFERENCE)
    plan = QuantizationPlan.create(spec.segments(), n_participants=4)
    total = np.zeros(plan.length, dtype=np.uint32)
    for i in range(4):
        c = build_contribution(known_delta(i), num_examples=num_examples(i), metrics={"train-loss": LOSS[i]}, spec=spec)
        total += plan.encode(c.values, rng=np.random.default_rng(seed)).values
    exact = plan.decode(total)
    flat = np.concatenate([a.reshape(-1) for a in result.update_sum])
    assert np.array_equal(flat, (exact["update"] * CONFIG.weight_cap).astype(np.float32))
    assert result.weight_total == exact["weight"][0] * CONFIG.weight_cap
    assert result.metric_sums["train-loss"] == exact["metric/train-loss"][0] * CONFIG.weight_cap


def test_uplink_stays_within_4_bytes_per_parameter() -> None:
    grid = make_grid(5)
    run(grid)
    masked_up = grid.stats.bytes_up["masked_input"] / 5
    assert masked_up <= 4 * (D + 3) + 1024  # uint32 vector + record overhead
    total_up = sum(grid.stats.bytes_up.values()) / 5
    plain_up = 4 * D + 200  # float32 delta + metrics in a plain round
    assert total_up / plain_up <= 1.1 + 4096 / plain_up  # + a few KiB of keys and shares


def test_coordinator_never_receives_an_update_count_or_metric_in_the_clear() -> None:
    grid = make_grid(5, capture=True)
    run(grid)
    assert {label for _, label, _ in grid.captured_up} == {s.label for s in Stage}
    for i, _ in enumerate(grid.node_ids):
        secrets_as_bytes = [
            struct.pack("<d", LOSS[i]),
            struct.pack("<d", 0.777),
            known_delta(i)[0].tobytes()[:64],
        ]
        for node, _label, raw in grid.captured_up:
            if node == grid.node_ids[i]:
                assert not any(s in raw for s in secrets_as_bytes)
    # Structurally: every reply holds just the secagg records, never a MetricRecord or "update".
    grid2 = make_grid(3, tamper=_assert_only_secagg_records)
    run(grid2)


def _assert_only_secagg_records(node: int, label: str, reply: Message) -> Message:
    assert not reply.has_error()
    assert set(reply.content) <= {SECAGG_RECORD, SECAGG_ARRAYS}
    assert not reply.content.metric_records
    return reply


@pytest.mark.parametrize(
    "arr",
    [
        np.arange(10, dtype=np.uint32),
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.array([True, False]),
        np.zeros((0,), dtype=np.float64),
        np.array(3.5),
        np.arange(6, dtype=">i8"),
        np.arange(20, dtype=np.float64).reshape(4, 5)[:, 1],  # not contiguous
        np.array([(1, 2.0)], dtype=[("a", "i4"), ("b", "f8")]),  # structured
    ],
)
def test_fast_array_serialisation_is_byte_identical_to_flowers(arr: np.ndarray) -> None:
    ours, flowers = array_of(arr), Array(arr if arr.flags.c_contiguous else np.ascontiguousarray(arr))
    assert (ours.dtype, ours.shape, ours.stype) == (flowers.dtype, flowers.shape, flowers.stype)
    assert ours.data == flowers.data
    back = numpy_of(flowers)
    assert back.dtype == arr.dtype and back.shape == arr.shape and np.array_equal(back, arr)


def test_fast_array_parsing_falls_back_to_np_load_for_anything_unusual() -> None:
    good = Array(np.arange(5, dtype=np.uint32))
    assert not numpy_of(good).flags.writeable  # a view of the record's bytes
    lying = Array(dtype="float32", shape=(5,), stype=good.stype, data=good.data)  # header says uint32
    assert numpy_of(lying).dtype == np.uint32  # np.load trusts the header, as Flower does
    with pytest.raises(ValueError):
        numpy_of(Array(dtype="uint32", shape=(5,), stype=good.stype, data=good.data[:-1]))


def test_session_state_is_written_once_and_the_input_dropped_after_masking() -> None:
    grid = make_grid(3)
    seen: dict[str, tuple[set[str], bool]] = {}
    u = grid.node_ids[0]

    def tamper(node: int, label: str, reply: Message) -> Message:
        if node == u:
            state = grid.contexts[u].state
            seen[label] = (set(state[STATE_RECORD]), STATE_ARRAYS in state)
        return reply

    grid.tamper = tamper
    run(grid)
    keys, has_input = seen["advertise_keys"]
    assert has_input and keys == {"session"} | {k for k in keys if k.startswith("setup.")}
    assert seen["share_keys"] == (keys, True)
    assert seen["masked_input"] == (keys, False) and seen["unmask"] == (keys, False)


def test_messages_without_secagg_pass_through_unchanged() -> None:
    grid = make_grid(2)
    u = grid.node_ids[0]
    out = grid.app(Message(train_content(), u, "train"), grid.contexts[u])
    assert "update" in out.content and out.content.metric_records["metrics"]["num-examples"] == 60
    out = grid.app(Message(RecordDict(), u, "evaluate"), grid.contexts[u])
    assert out.content.metric_records["metrics"]["auc"] == 0.5


def test_two_consecutive_rounds_use_fresh_state() -> None:
    grid = make_grid(3)
    for rnd in (1, 2):
        assert_close(run(grid, rnd=rnd), oracle([0, 1, 2], rnd), 3)


def test_any_message_type_can_carry_a_secure_round() -> None:
    """E.g. additive feature statistics through ``query.stats`` (float64 kept float64)."""
    app = ClientApp(mods=[secagg_mod])
    stats_ref = [np.zeros(3, np.float64), np.zeros(2, np.float64)]

    def stats_of(i: int) -> list[np.ndarray]:
        return [np.array([1.0, -2.0, 0.5]) * (i + 1) / 10, np.array([0.25, i / 10])]

    @app.query("stats")
    def stats(msg: Message, context: Context) -> Message:
        i = int(context.node_config["index"])
        content = RecordDict({"update": ArrayRecord(stats_of(i)), "metrics": MetricRecord({"num-examples": 1})})
        return Message(content, reply_to=msg)

    grid = make_grid(4, app=app)
    cfg = SecAggConfig(clip_norm=5.0, weight_cap=1.0)
    result = run_secure_round(
        grid,
        node_ids=grid.node_ids,
        node_names={},
        train_content=RecordDict(),
        reference=stats_ref,
        config=cfg,
        timeout_per_stage=2.0,
        message_type="query.stats",
    )
    expected = [sum(stats_of(i)[j] for i in range(4)) for j in range(2)]
    for got, want in zip(result.update_sum, expected, strict=True):
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, want, atol=1e-6)
    assert result.weight_total == pytest.approx(4.0, abs=1e-6)


# --------------------------------------------------------------------------- dropouts


def _policy(drop: Mapping[int, str]) -> Any:
    gone: set[int] = set()
    order = [s.label for s in Stage]

    def policy(node: int, label: str) -> Decision:
        if node in drop and label in order and order.index(label) >= order.index(drop[node]):
            gone.add(node)
            return "drop"
        return "deliver"

    return policy


@pytest.mark.parametrize("stage", list(Stage), ids=lambda s: s.label)
def test_dropouts_at_each_stage_through_the_grid(stage: Stage) -> None:
    ids = node_ids(5)
    drop = {ids[1]: stage.label, ids[3]: stage.label}  # n - t = 2
    grid = make_grid(5, policy=_policy(drop))
    result = run(grid, timeout=0.05)
    survivors = [i for i in range(5) if stage is Stage.UNMASK or ids[i] not in drop]
    dropped = [i for i in range(5) if i not in survivors]
    expected = weighted_sum(
        [
            (f"bank-{i}", known_delta(i), min(num_examples(i), CONFIG.weight_cap), {"train-loss": LOSS[i]})
            for i in survivors
        ],
        reference=REFERENCE,
    )
    assert_close(result, expected, 5)
    names = {f"bank-{i}" for i in dropped} if stage is not Stage.ADVERTISE_KEYS else {str(ids[i]) for i in dropped}
    assert set(result.dropped) == names


@pytest.mark.parametrize("stage", list(Stage), ids=lambda s: s.label)
def test_too_many_dropouts_abort_and_name_the_stage(stage: Stage) -> None:
    ids = node_ids(5)
    grid = make_grid(5, policy=_policy({u: stage.label for u in ids[:3]}))
    with pytest.raises(SecAggAbort, match=f"stage '{stage.label}'") as err:
        run(grid, timeout=0.05)
    assert err.value.counts["threshold"] == 3


# --------------------------------------------------------------------------- misbehaviour


def test_bad_training_output_becomes_an_error_reply_and_the_round_completes() -> None:
    grid = make_grid(5, app=make_app(bad_index=2))
    result = run(grid)
    assert_close(result, oracle([0, 1, 3, 4]), 5)
    assert any("advertise_keys" in e and "tensor sizes" in e for e in grid.client_errors)
    assert "bank-2" not in result.participants
    assert result.dropped == (str(grid.node_ids[2]),)  # it never advertised a name


def test_malformed_masked_vector_is_left_out_without_leaking() -> None:
    ids = node_ids(5)

    def tamper(node: int, label: str, reply: Message) -> Message:
        if node == ids[0] and label == "masked_input":
            arrays = reply.content[SECAGG_ARRAYS]
            reply.content[SECAGG_ARRAYS] = ArrayRecord({"masked": Array(arrays["masked"].numpy()[:-5])})
        return reply

    grid = make_grid(5, tamper=tamper)
    result = run(grid)
    assert_close(result, oracle([1, 2, 3, 4]), 5)
    assert "bank-0" in result.dropped


def test_protocol_message_for_a_node_without_session_gets_an_error_reply() -> None:
    grid = make_grid(2)
    u = grid.node_ids[0]
    content = RecordDict(
        {SECAGG_RECORD: ConfigRecord({"stage": "unmask", "round-id": "r", "survivors": b"", "dropped": b""})}
    )
    out = grid.app(Message(content, u, "train"), grid.contexts[u])
    assert out.has_error()
    assert "stage 'unmask'" in str(out.error.reason) and "next round" in str(out.error.reason)
    garbage = RecordDict({SECAGG_RECORD: ConfigRecord({"stage": "advertise_keys", "round-id": "r"})})
    out = grid.app(Message(garbage, u, "train"), grid.contexts[u])
    assert out.has_error() and "missing" in str(out.error.reason)


def test_a_round_id_is_never_joined_twice() -> None:
    grid = make_grid(3)
    run(grid, round_id="same-round")
    with pytest.raises(SecAggAbort, match="advertise_keys"):
        run(grid, round_id="same-round")
    assert all("already joined" in e for e in grid.client_errors)


# --------------------------------------------------------------------------- simulation engine


@pytest.mark.slow
def test_secure_rounds_through_flowers_simulation_engine() -> None:
    import logging

    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    rounds: list[AggregateResult] = []
    errors: list[BaseException] = []
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            ids: list[int] = []
            for _ in range(600):  # nodes register asynchronously
                ids = sorted(grid.get_node_ids())
                if len(ids) == 3:
                    break
                time.sleep(0.05)
            for rnd in (1, 2):
                rounds.append(
                    run_secure_round(
                        grid,
                        node_ids=ids,
                        node_names={},
                        train_content=train_content(rnd),
                        reference=REFERENCE,
                        config=CONFIG,
                        timeout_per_stage=60.0,
                    )
                )
        except BaseException as exc:  # surfaced below; the engine would only log it
            errors.append(exc)

    sim_app = ClientApp(mods=[secagg_mod])

    @sim_app.train()
    def train(msg: Message, context: Context) -> Message:
        i = int(context.node_config["partition-id"])
        rnd = int(msg.content.config_records["config"]["round"])
        content = RecordDict(
            {
                "update": ArrayRecord(known_delta(i, rnd)),
                "metrics": MetricRecord({"num-examples": num_examples(i), "train-loss": LOSS[i]}),
            }
        )
        return Message(content, reply_to=msg)

    run_simulation(
        server_app=server,
        client_app=sim_app,
        num_supernodes=3,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {
                "num_cpus": 2,
                "include_dashboard": False,
                "logging_level": logging.ERROR,
                "log_to_driver": False,
            },
        },
    )
    assert not errors, errors
    assert len(rounds) == 2
    for rnd, result in zip((1, 2), rounds, strict=True):
        expected = oracle([0, 1, 2], rnd)
        plan = QuantizationPlan.create(ContributionSpec.create(CONFIG, REFERENCE).segments(), n_participants=3)
        tol = 3 * plan.segment("update").resolution * CONFIG.weight_cap + 1e-6
        for got, want in zip(result.update_sum, expected.update_sum, strict=True):
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, want, atol=tol)
        assert result.weight_total == pytest.approx(expected.weight_total, abs=tol)
        assert len(result.participants) == 3 and result.dropped == ()
