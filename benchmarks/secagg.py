"""Secure aggregation cost: plain FedAvg vs. consortium's SecAgg+ vs. Flower's SecAgg+.

Every mode runs through the same in-process Grid
(:class:`consortium.secagg.inprocess.InProcessGrid`): real Flower ``Message``s,
a real ``ClientApp``, every message body serialised to Flower's protobuf wire
format and parsed back in both directions. Clients run one after the other in
this process, so a round's process CPU time is the *total* CPU of coordinator +
all clients; the *critical path* (an ideal deployment where clients run in
parallel) is the coordinator's own time + the slowest client of each stage +
its share of serialisation.

Modes
-----
plain           Message-API FedAvg round: ``train`` messages with the model, clear-text
                deltas + counts back, :func:`weighted_sum` on the coordinator (what
                consortium's plain transport does).
ours            :func:`consortium.secagg.flower.run_secure_round` + ``secagg_mod``.
ours-drop-*     ours with 10 % of the institutions vanishing at one stage.
flower-plain    Flower's legacy ``DefaultWorkflow`` FedAvg (context for the reference numbers).
flower-k7       Flower's ``SecAggPlusWorkflow`` (num_shares=7, reconstruction_threshold=4)
                + ``secaggplus_mod`` (legacy ``LegacyContext`` server path).
flower-full     the same with full sharing (num_shares=1.0 -> all N, threshold 0.5 N);
                only where N^2 d <= 50^2 * 100k (it grows ~N^3 on the coordinator).

Every institution returns a fixed pseudo-random float32 delta (uniform in
[-0.5, 0.5]) and an example count in 50..150, so results are checked against the
exact weighted mean of the survivors' deltas.

    python benchmarks/secagg.py              # N in {10, 50, 100}, d in {10k, 100k, 1M}
    python benchmarks/secagg.py --quick      # N = 20, d = 100k (< 60 s)
    python benchmarks/secagg.py --json out.json
    python benchmarks/secagg.py --quick --no-write   # print the summary, leave results/ alone

``--focus`` is a short, repeated measurement of the two target ratios at one
size (default N = 50, d = 100k): plain, ours and flower-k7 interleaved
``--repeat`` times (medians), plus the *floor* of our protocol on this machine:
the irreducible cryptography of a round (2 X25519 key generations, 2k
agreements and k + 1 AES-CTR expansions of d words per institution, |S|
expansions on the coordinator) and the cost of three extra protocol-sized
message round trips per institution through the same Grid. It never writes
``results/``:

    python benchmarks/secagg.py --focus --n 50 --d 100000 --repeat 5
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # clients run one after the other

import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import flwr  # noqa: E402
import numpy as np  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, json_safe, parser, write_results  # noqa: E402

from consortium.federation.aggregation import AggregateResult, weighted_sum  # noqa: E402
from consortium.secagg.errors import SecAggAbort  # noqa: E402
from consortium.secagg.flower import SecAggConfig, run_secure_round, secagg_mod  # noqa: E402
from consortium.secagg.inprocess import GridStats, InProcessGrid  # noqa: E402
from consortium.secagg.messages import Stage  # noqa: E402

logger = logging.getLogger("benchmarks.secagg")

FULL_N = (10, 50, 100)
FULL_D = (10_000, 100_000, 1_000_000)
QUICK_N = (20,)
QUICK_D = (100_000,)
SUMMARY_FULL = (50, 100_000)
SUMMARY_QUICK = (20, 100_000)
FULL_SHARING_BUDGET = 50**2 * 100_000
DROP_FRACTION = 0.10
DROP_TIMEOUT_S = 0.02
FLOWER_STAGES = ("setup", "share_keys", "collect_masked_vectors", "unmask")


# --------------------------------------------------------------------------- workload


def model_shapes(d: int) -> list[tuple[int, ...]]:
    """A dense layer (out x in) + bias (+ remainder) with exactly ``d`` parameters."""
    out = max(1, d // 100)
    inp = (d - out) // out
    rest = d - out * inp - out
    shapes: list[tuple[int, ...]] = [(out, inp), (out,)]
    if rest:
        shapes.append((rest,))
    return shapes


def initial_params(d: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.uniform(-0.1, 0.1, s).astype(np.float32) for s in model_shapes(d)]


def client_delta(index: int, rnd: int, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    rng = np.random.default_rng(1_000_003 * rnd + index)
    return [rng.uniform(-0.5, 0.5, s).astype(np.float32) for s in shapes]


def client_num_examples(index: int) -> int:
    return 50 + (index * 37) % 101


def node_ids(n: int) -> list[int]:
    rng = random.Random(42)
    return [rng.getrandbits(63) for _ in range(n)]


def secagg_config(d: int) -> SecAggConfig:
    # Deltas are uniform in [-0.5, 0.5]: L2 norm <= 0.5 sqrt(d), coordinates <= 0.5,
    # so neither bound clips and the result is exact up to quantisation.
    return SecAggConfig(
        clip_norm=0.5 * math.sqrt(d) * 1.01,
        coordinate_bound=0.5,
        weight_cap=150.0,
        stage_timeout=60.0,
    )


def expected_mean(indices: Sequence[int], shapes: Sequence[tuple[int, ...]], rnd: int = 1) -> list[np.ndarray]:
    total = sum(client_num_examples(i) for i in indices)
    acc = [np.zeros(s) for s in shapes]
    for i in indices:
        w = client_num_examples(i)
        for a, delta in zip(acc, client_delta(i, rnd, shapes), strict=True):
            a += w * delta.astype(np.float64)
    return [a / total for a in acc]


def errors(got: Sequence[np.ndarray], want: Sequence[np.ndarray]) -> tuple[float, float]:
    """(max absolute error, max absolute error / max |want|)."""
    err = max(float(np.max(np.abs(g.astype(np.float64) - w))) for g, w in zip(got, want, strict=True))
    scale = max(float(np.max(np.abs(w))) for w in want)
    return err, err / scale


# --------------------------------------------------------------------------- apps


def message_api_app(*, secure: bool) -> ClientApp:
    """The Message-API institution: returns a fixed delta and count (no real training)."""
    app = ClientApp(mods=[secagg_mod] if secure else [])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        index = int(context.node_config["partition-id"])
        shapes = [a.shape for a in msg.content.array_records["arrays"].values()]
        content = RecordDict(
            {
                "update": ArrayRecord(client_delta(index, 1, shapes)),
                "metrics": MetricRecord({"num-examples": client_num_examples(index)}),
            }
        )
        return Message(content, reply_to=msg)

    return app


def flower_app(*, secure: bool) -> ClientApp:
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod

    class BenchClient(NumPyClient):
        def __init__(self, index: int) -> None:
            self.index = index

        def fit(self, parameters, config):  # type: ignore[no-untyped-def, override]
            delta = client_delta(self.index, 1, [p.shape for p in parameters])
            return (
                [(p + q).astype(np.float32) for p, q in zip(parameters, delta, strict=True)],
                client_num_examples(self.index),
                {},
            )

    def client_fn(context: Context):  # type: ignore[no-untyped-def]
        return BenchClient(int(context.node_config["partition-id"])).to_client()

    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod] if secure else [])


def make_grid(
    app: ClientApp, n: int, *, drop: dict[int, str] | None = None, order: Sequence[str] = ()
) -> InProcessGrid:
    ids = node_ids(n)
    drop = drop or {}

    def policy(node: int, label: str) -> str:
        if node in drop and label in order and order.index(label) >= order.index(drop[node]):
            return "drop"
        return "deliver"

    return InProcessGrid(
        app,
        node_ids=ids,
        node_configs={u: {"partition-id": i, "institution": f"bank-{i}"} for i, u in enumerate(ids)},
        policy=policy,
    )


# --------------------------------------------------------------------------- measurement


def _timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def _costs(stats: GridStats, wall: float, cpu: float, n: int) -> dict[str, Any]:
    client_total = sum(sum(v) for v in stats.client_seconds.values())
    wire = sum(stats.wire_seconds.values())
    server = max(0.0, cpu - client_total - wire)
    per_stage = {
        label: {
            "client_s_sum": sum(v),
            "client_s_max": max(v) if v else 0.0,
            "bytes_up_per_client": stats.bytes_up.get(label, 0) / n,
            "bytes_down_per_client": stats.bytes_down.get(label, 0) / n,
        }
        for label, v in stats.client_seconds.items()
    }
    return {
        "round_cpu_s": cpu,
        "round_wall_s": wall,
        "coordinator_s": server,
        "critical_path_s": server + sum(s["client_s_max"] for s in per_stage.values()) + wire / n,
        "bytes_up_per_client": sum(stats.bytes_up.values()) / n,
        "bytes_down_per_client": sum(stats.bytes_down.values()) / n,
        "per_stage": per_stage,
    }


def _content(ref: Sequence[np.ndarray]) -> RecordDict:
    return RecordDict({"arrays": ArrayRecord(list(ref)), "config": ConfigRecord({"server-round": 1})})


def run_plain(n: int, d: int) -> dict[str, Any]:
    """Message-API FedAvg: clear-text deltas and counts, summed by ``weighted_sum``."""
    grid = make_grid(message_api_app(secure=False), n)
    ref = initial_params(d)

    def round_() -> AggregateResult:
        msgs = [Message(_content(ref), dst_node_id=u, message_type="train") for u in grid.node_ids]
        replies = list(grid.pull_messages(list(grid.push_messages(msgs))))
        contributions = []
        for r in replies:
            rec = r.content
            contributions.append(
                (
                    str(r.metadata.src_node_id),
                    rec.array_records["update"].to_numpy_ndarrays(),
                    float(rec.metric_records["metrics"]["num-examples"]),  # type: ignore[arg-type]
                    {},
                )
            )
        return weighted_sum(contributions, reference=ref)

    result, wall, cpu = _timed(round_)
    err = errors(result.mean_update(), expected_mean(range(n), model_shapes(d)))
    return {"completed": True, "max_abs_error": err[0], "max_rel_error": err[1], **_costs(grid.stats, wall, cpu, n)}


def run_ours(n: int, d: int, *, drop_stage: str | None = None) -> dict[str, Any]:
    order = [s.label for s in Stage]
    ids = node_ids(n)
    n_drop = math.ceil(DROP_FRACTION * n) if drop_stage else 0
    drop = {u: drop_stage for u in ids[1 : 1 + n_drop]} if drop_stage else {}
    grid = make_grid(message_api_app(secure=True), n, drop=drop, order=order)
    ref = initial_params(d)
    cfg = secagg_config(d)

    def round_() -> AggregateResult:
        return run_secure_round(
            grid,
            node_ids=grid.node_ids,
            node_names={},
            train_content=_content(ref),
            reference=ref,
            config=cfg,
            timeout_per_stage=DROP_TIMEOUT_S if drop_stage else cfg.stage_timeout,
        )

    try:
        result, wall, cpu = _timed(round_)
    except SecAggAbort as exc:
        return {"completed": False, "error": str(exc), "n_dropped": n_drop}
    survivors = [i for i, u in enumerate(ids) if u not in drop or drop_stage == "unmask"]
    err = errors(result.mean_update(), expected_mean(survivors, model_shapes(d)))
    out = {"completed": True, "max_abs_error": err[0], "max_rel_error": err[1], **_costs(grid.stats, wall, cpu, n)}
    out.update(n_dropped=n_drop, participants=len(result.participants), dtype=str(result.update_sum[0].dtype))
    return out


def run_flower(
    n: int, d: int, *, num_shares: float | int | None, threshold: float | int | None, drop_stage: str | None = None
) -> dict[str, Any]:
    """Flower's legacy FedAvg, with or without ``SecAggPlusWorkflow``, one round."""
    from flwr.common import ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
    from flwr.server.workflow.default_workflows import default_fit_workflow

    secure = num_shares is not None
    ids = node_ids(n)
    n_drop = math.ceil(DROP_FRACTION * n) if drop_stage else 0
    drop = {u: drop_stage for u in ids[1 : 1 + n_drop]} if drop_stage else {}
    grid = make_grid(flower_app(secure=secure), n, drop=drop, order=FLOWER_STAGES)
    init = initial_params(d)
    strategy = FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=n - n_drop if drop_stage else n,
        min_available_clients=n,
        initial_parameters=ndarrays_to_parameters(init),
    )
    ctx = LegacyContext(
        context=Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        config=ServerConfig(num_rounds=1),
        strategy=strategy,
    )
    inner = (
        SecAggPlusWorkflow(num_shares=num_shares, reconstruction_threshold=threshold)
        if secure
        else default_fit_workflow
    )
    timing: dict[str, float] = {}

    def fit_workflow(g: Any, context: Any) -> None:
        grid.stats = GridStats()
        w0, c0 = time.perf_counter(), time.process_time()
        inner(g, context)
        timing["wall"], timing["cpu"] = time.perf_counter() - w0, time.process_time() - c0

    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.ERROR)
    try:
        DefaultWorkflow(fit_workflow=fit_workflow)(grid, ctx)
        new = ctx.state.array_records[MAIN_PARAMS_RECORD].to_numpy_ndarrays()
    except Exception as exc:  # Flower aborts on some dropouts: record it
        return {"completed": False, "error": f"{type(exc).__name__}: {exc}", "n_dropped": n_drop}
    finally:
        flwr_logger.setLevel(level)
    survivors = [i for i, u in enumerate(ids) if u not in drop or drop_stage == "unmask"]
    delta = [a.astype(np.float64) - b for a, b in zip(new, init, strict=True)]
    err = errors(delta, expected_mean(survivors, model_shapes(d)))
    changed = any(not np.array_equal(a, b) for a, b in zip(new, init, strict=True))
    out = {
        "completed": changed and err[1] < 1e-2,
        "max_abs_error": err[0],
        "max_rel_error": err[1],
        **_costs(grid.stats, timing.get("wall", 0.0), timing.get("cpu", 0.0), n),
    }
    out.update(n_dropped=n_drop, dtype=str(new[0].dtype), client_errors=len(grid.client_errors))
    return out


# --------------------------------------------------------------------------- floor


def crypto_floor(n: int, d: int) -> dict[str, float]:
    """Process CPU seconds of the cryptography no SecAgg+ round can skip, all parties together.

    Per institution: two X25519 key generations, ``2k`` agreements (share keys
    and mask keys with each neighbour of the default graph) and ``k + 1``
    AES-CTR expansions of ``d`` ``uint32`` words added into its input; on the
    coordinator, one expansion per survivor (self masks). No HKDF, Shamir,
    encoding, state or messages: a lower bound for ``ours - plain``.
    """
    from consortium.secagg import primitives as prim
    from consortium.secagg.graph import build_graph, default_neighbours

    ids = node_ids(n)
    graph = build_graph(ids, k=default_neighbours(n), seed=b"floor-graph-seed")
    x = np.zeros(d, dtype=np.uint32)
    c0 = time.process_time()
    mask_keys = {u: prim.generate_keypair() for u in ids}
    share_keys = {u: prim.generate_keypair() for u in ids}
    c1 = time.process_time()
    seeds = {}
    for u in ids:
        nb = graph.of(u)
        prim.agree_many(share_keys[u].private, [share_keys[v].public for v in nb])
        seeds[u] = prim.agree_many(mask_keys[u].private, [mask_keys[v].public for v in nb])
    c2 = time.process_time()
    for u in ids:
        y = np.empty(d, dtype=np.uint32)
        expander = prim.MaskExpander(d)
        expander.add_into(y, mask_keys[u].private, base=x)  # the self mask (any 32-byte seed)
        for seed in seeds[u]:
            expander.add_into(y, seed)
    total = np.zeros(d, dtype=np.uint32)
    expander = prim.MaskExpander(d)
    for u in ids:
        expander.add_into(total, mask_keys[u].private, subtract=True)
    c3 = time.process_time()
    return {
        "keygen_s": c1 - c0,
        "agreements_s": c2 - c1,
        "prg_s": c3 - c2,
        "total_s": c3 - c0,
        "k": float(graph.k),
    }


def messaging_floor(n: int, *, stages: int = 3) -> float:
    """Process CPU seconds of ``stages`` extra protocol-sized message round trips per institution.

    Each round trip is what a SecAgg+ stage without any computation costs over
    the in-process Grid: the coordinator builds one Message per node with a
    small ``secagg`` ConfigRecord (a stage, a round id, 13 x 176-byte
    ciphertexts), the Grid serialises it both ways, a mod answers with a record
    of the same shape.
    """
    payload = [bytes(176)] * 13

    def echo_mod(msg: Message, context: Context, call_next: Any) -> Message:
        rec = msg.content["secagg"]
        reply = ConfigRecord({"stage": rec["stage"], "round-id": rec["round-id"], "ciphertexts": payload})
        return Message(RecordDict({"secagg": reply}), reply_to=msg)

    app = ClientApp(mods=[echo_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:  # never reached
        return Message(RecordDict(), reply_to=msg)

    grid = make_grid(app, n)
    c0 = time.process_time()
    for stage in range(stages):
        msgs = [
            Message(
                RecordDict(
                    {
                        "secagg": ConfigRecord(
                            {"stage": f"s{stage}", "round-id": "floor", "ciphertexts": payload, "ids": bytes(8 * 13)}
                        )
                    }
                ),
                dst_node_id=u,
                message_type="train",
            )
            for u in grid.node_ids
        ]
        replies = grid.pull_messages(list(grid.push_messages(msgs)))
        assert len(list(replies)) == n
    return time.process_time() - c0


def run_focus(n: int, d: int, *, repeat: int) -> dict[str, Any]:
    """Medians of plain, ours and flower-k7 (interleaved ``repeat`` times) and the protocol floor."""
    fns: dict[str, Callable[[], dict[str, Any]]] = {
        "plain": lambda: run_plain(n, d),
        "ours": lambda: run_ours(n, d),
        "flower-k7": lambda: run_flower(n, d, num_shares=7, threshold=4),
    }
    for fn in fns.values():  # warm-up (imports, allocator)
        fn()
    cpu: dict[str, list[float]] = {m: [] for m in fns}
    floors: list[dict[str, float]] = []
    messaging: list[float] = []
    for _ in range(repeat):
        for mode, fn in fns.items():
            res = fn()
            if not res.get("completed"):
                raise RuntimeError(f"{mode} did not complete: {res.get('error')}")
            cpu[mode].append(res["round_cpu_s"])
        floors.append(crypto_floor(n, d))
        messaging.append(messaging_floor(n))
    med = {m: float(np.median(v)) for m, v in cpu.items()}
    crypto = {k: float(np.median([f[k] for f in floors])) for k in floors[0]}
    msg_s = float(np.median(messaging))
    return {
        "n": n,
        "d": d,
        "repeat": repeat,
        "cpu_s": cpu,
        "median_cpu_s": med,
        "secagg_over_plain": med["ours"] / med["plain"],
        "flower_over_ours": med["flower-k7"] / med["ours"],
        "crypto_floor_s": crypto,
        "messaging_floor_s": msg_s,
        "floor_secagg_over_plain_crypto_only": (med["plain"] + crypto["total_s"]) / med["plain"],
        "floor_secagg_over_plain": (med["plain"] + crypto["total_s"] + msg_s) / med["plain"],
        "floor_flower_over_ours": med["flower-k7"] / (med["plain"] + crypto["total_s"] + msg_s),
    }


def focus_report(r: dict[str, Any]) -> str:
    m, c = r["median_cpu_s"], r["crypto_floor_s"]
    return "\n".join(
        [
            f"N = {r['n']}, d = {r['d']:,}, k = {int(c['k'])}, medians of {r['repeat']} interleaved rounds "
            "(process CPU, all parties):",
            f"  plain {m['plain']:.4f} s | ours {m['ours']:.4f} s | flower-k7 {m['flower-k7']:.4f} s",
            f"  secagg_over_plain {r['secagg_over_plain']:.2f} (target <= 1.5) | "
            f"flower_over_ours {r['flower_over_ours']:.2f} (target >= 6)",
            f"  crypto floor {c['total_s']:.4f} s = keygen {c['keygen_s']:.4f} + X25519 agreements "
            f"{c['agreements_s']:.4f} + AES-CTR expansions {c['prg_s']:.4f}",
            f"  messaging floor (3 extra round trips per institution) {r['messaging_floor_s']:.4f} s",
            f"  floor secagg_over_plain: {r['floor_secagg_over_plain_crypto_only']:.2f} (crypto only), "
            f"{r['floor_secagg_over_plain']:.2f} (crypto + messages); "
            f"flower_over_ours at that floor: {r['floor_flower_over_ours']:.2f}",
        ]
    )


# --------------------------------------------------------------------------- driver


def run_all(
    ns: Sequence[int], ds: Sequence[int], *, summary_at: tuple[int, int], flower_dropouts: bool
) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []

    def record(mode: str, n: int, d: int, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        t0 = time.perf_counter()
        res = {"mode": mode, "n": n, "d": d, **fn()}
        runs.append(res)
        logger.info(
            "%-22s N=%-4d d=%-8d cpu=%8.3fs crit=%7.3fs up=%10.0fB ok=%s (%.0fs)",
            mode,
            n,
            d,
            res.get("round_cpu_s", float("nan")),
            res.get("critical_path_s", float("nan")),
            res.get("bytes_up_per_client", float("nan")),
            res.get("completed"),
            time.perf_counter() - t0,
        )
        return res

    for n in ns:
        for d in ds:
            record("plain", n, d, lambda n=n, d=d: run_plain(n, d))
            record("ours", n, d, lambda n=n, d=d: run_ours(n, d))
            for st in Stage:
                record(f"ours-drop-{st.label}", n, d, lambda n=n, d=d, st=st: run_ours(n, d, drop_stage=st.label))
            record("flower-plain", n, d, lambda n=n, d=d: run_flower(n, d, num_shares=None, threshold=None))
            record("flower-k7", n, d, lambda n=n, d=d: run_flower(n, d, num_shares=7, threshold=4))
            if n * n * d <= FULL_SHARING_BUDGET:
                record("flower-full", n, d, lambda n=n, d=d: run_flower(n, d, num_shares=1.0, threshold=0.5))
            if flower_dropouts and (n, d) == summary_at:
                for st in FLOWER_STAGES:
                    record(
                        f"flower-k7-drop-{st}",
                        n,
                        d,
                        lambda n=n, d=d, st=st: run_flower(n, d, num_shares=7, threshold=4, drop_stage=st),
                    )

    def pick(mode: str) -> dict[str, Any]:
        return next(r for r in runs if r["mode"] == mode and (r["n"], r["d"]) == summary_at)

    plain, ours, flower = pick("plain"), pick("ours"), pick("flower-k7")
    summary = {
        "n": summary_at[0],
        "d": summary_at[1],
        "plain_round_s": plain["round_cpu_s"],
        "secagg_round_s": ours["round_cpu_s"],
        "flower_secaggplus_round_s": flower["round_cpu_s"],
        "secagg_over_plain": ours["round_cpu_s"] / plain["round_cpu_s"],
        "flower_over_ours": flower["round_cpu_s"] / ours["round_cpu_s"],
        "uplink_bytes_over_plain": ours["bytes_up_per_client"] / plain["bytes_up_per_client"],
        "max_abs_error": ours["max_abs_error"],
        "max_rel_error": ours["max_rel_error"],
        "secagg_critical_path_s": ours["critical_path_s"],
        "plain_critical_path_s": plain["critical_path_s"],
        "flower_critical_path_s": flower["critical_path_s"],
        "secagg_over_plain_critical_path": ours["critical_path_s"] / plain["critical_path_s"],
        "flower_over_ours_critical_path": flower["critical_path_s"] / ours["critical_path_s"],
        "flower_plain_round_s": pick("flower-plain")["round_cpu_s"],
        "dropouts_completed": {st.label: pick(f"ours-drop-{st.label}")["completed"] for st in Stage},
    }
    targets = {
        "secagg_over_plain <= 1.5": summary["secagg_over_plain"] <= 1.5,
        "flower_over_ours >= 6": summary["flower_over_ours"] >= 6,
        "uplink_bytes_over_plain <= 1.1": summary["uplink_bytes_over_plain"] <= 1.1,
        "max_rel_error <= 1e-5": summary["max_rel_error"] <= 1e-5,
    }
    return {"summary": summary, "targets_met": targets, "runs": runs}


def markdown(result: dict[str, Any]) -> str:
    s = result["summary"]
    lines = [
        "# Secure aggregation benchmark",
        "",
        f"flwr {result['flwr']}, Python {result['environment']['python']}, {result['environment']['cpus']} CPUs, "
        f"{result['environment']['time']}; in-process Grid with protobuf round trips, clients sequential.",
        "Times are process CPU seconds of one round (coordinator + all clients); *critical path* = "
        "coordinator + slowest client per stage + its share of serialisation.",
        "",
        f"## Summary (N = {s['n']}, d = {s['d']:,})",
        "",
        "| metric | value |",
        "| --- | --- |",
    ]
    for k in (
        "plain_round_s",
        "secagg_round_s",
        "flower_secaggplus_round_s",
        "flower_plain_round_s",
        "secagg_over_plain",
        "flower_over_ours",
        "uplink_bytes_over_plain",
        "max_abs_error",
        "max_rel_error",
        "plain_critical_path_s",
        "secagg_critical_path_s",
        "flower_critical_path_s",
        "secagg_over_plain_critical_path",
        "flower_over_ours_critical_path",
    ):
        v = s[k]
        lines.append(f"| {k} | {v:.4g} |")
    lines += [
        "",
        "Targets (on total CPU time): "
        + ", ".join(f"{k}: {'met' if ok else 'NOT met'}" for k, ok in result["targets_met"].items())
        + ". The `*_critical_path` ratios compare the same rounds when institutions run in parallel, "
        "as in a deployment.",
        "",
    ]
    lines += [
        "## All runs",
        "",
        "| mode | N | d | CPU s | critical path s | coordinator s | up B/client | down B/client | rel. error "
        "| completed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["runs"]:
        if not r.get("completed") and "round_cpu_s" not in r:
            lines.append(
                f"| {r['mode']} | {r['n']} | {r['d']:,} | - | - | - | - | - | - | no: {r.get('error', '')[:90]} |"
            )
            continue
        lines.append(
            f"| {r['mode']} | {r['n']} | {r['d']:,} | {r['round_cpu_s']:.3f} | {r['critical_path_s']:.3f} | "
            f"{r['coordinator_s']:.3f} | {r['bytes_up_per_client']:,.0f} | {r['bytes_down_per_client']:,.0f} | "
            f"{r['max_rel_error']:.1e} | {r['completed']} |"
        )
    lines += [
        "",
        "Notes:",
        f"* `ours-drop-<stage>`: {int(DROP_FRACTION * 100)} % of the institutions vanish at that stage "
        f"(per-stage timeout {DROP_TIMEOUT_S} s, not counted in CPU time); the sum covers the survivors "
        "(institutions dropping at `unmask` already sent their input and are in the sum).",
        f"* `flower-full` (num_shares = N) runs only where N^2 d <= {FULL_SHARING_BUDGET:,} "
        "(its coordinator cost grows ~N^3: N = 100 with d >= 100k and N = 50 with d = 1M would take tens "
        "of minutes each).",
        "* `flower-k7-drop-<stage>` (full run only): Flower's SecAgg+ with the same 10 % dropouts; whether it "
        "completes depends on which nodes of its random share graph drop, and it aborts when they drop "
        "before key sharing completes.",
        "* Flower's SecAgg+ sends int64 masked vectors (8 bytes per parameter) and returns float64 "
        "parameters for a float32 model; ours sends uint32 and keeps float32.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=None, help="Override the numbers of institutions.")
    p.add_argument("--d", type=int, nargs="+", default=None, help="Override the numbers of parameters.")
    p.add_argument("--no-write", action="store_true", help="Do not write results/ (log the summary only).")
    p.add_argument(
        "--focus",
        action="store_true",
        help="Only the target ratios and the protocol floor at --n/--d (default 50, 100k); never writes results/.",
    )
    p.add_argument("--repeat", type=int, default=3, help="Interleaved repetitions for --focus (medians).")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("consortium").setLevel(logging.ERROR)
    if args.focus:
        logging.getLogger("flwr").setLevel(logging.ERROR)
        for n in args.n or (SUMMARY_FULL[0],):
            for d in args.d or (SUMMARY_FULL[1],):
                focus = run_focus(n, d, repeat=max(1, args.repeat))
                logger.info("%s", focus_report(focus))
                if args.json_path:
                    Path(args.json_path).write_text(json.dumps(json_safe(focus), indent=2))
        return
    ns = args.n or (QUICK_N if args.quick else FULL_N)
    ds = args.d or (QUICK_D if args.quick else FULL_D)
    summary_at = SUMMARY_QUICK if args.quick else SUMMARY_FULL
    if summary_at not in {(n, d) for n in ns for d in ds}:
        summary_at = (ns[0], ds[0])
    t0 = time.perf_counter()
    result = run_all(ns, ds, summary_at=summary_at, flower_dropouts=not args.quick)
    result.update(
        flwr=flwr.__version__, quick=args.quick, environment=environment(), duration_s=time.perf_counter() - t0
    )
    logger.info("summary: %s", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result["summary"].items()})
    if args.no_write:
        logger.info("targets: %s (%.0f s; results/ not written)", result["targets_met"], result["duration_s"])
        return
    out = write_results("secagg", result, markdown(result), json_path=args.json_path)
    logger.info("wrote %s (%.0f s)", out, result["duration_s"])


if __name__ == "__main__":
    main()
