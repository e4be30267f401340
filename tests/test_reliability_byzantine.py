"""Update validation and Byzantine-robust aggregation: one of 10 institutions misbehaves.

The real ClientApp runs behind the in-process Grid (every message through
Flower's protobuf wire format); one institution's training reply is rewritten
(scaled x1e4, sign-flipped x-10, or replaced by N(0, 5^2) noise). With the
plain mean the global holdout AUPRC collapses; with a robust rule it stays
within 5 % of the clean run. Under secure aggregation the attacker's update is
clipped client-side before masking, which bounds it the same way.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, Context, Message

from consortium.data import Dataset, FederatedSplit, federate, save_split
from consortium.errors import ConfigError, FederationError
from consortium.federation import messages as m
from consortium.federation.aggregation import AggregateResult
from consortium.federation.client_app import build_client_app
from consortium.federation.config import FederationConfig
from consortium.federation.coordinator import Coordinator
from consortium.federation.robust import robust_aggregate
from consortium.federation.validation import InvalidUpdateError, UpdateValidator, check_aggregate_norm
from consortium.registry import RunStore
from consortium.secagg.flower import secagg_mod
from consortium.secagg.inprocess import InProcessGrid

N = 10
NODES = [1000 + i for i in range(N)]
BAD = NODES[3]
ROUNDS = 4


def toy_split(n: int = 10_000, d: int = 12, seed: int = 7) -> FederatedSplit:
    """A learnable 10 %-positive problem split IID over N institutions (a stable AUPRC)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.1).astype(np.int64)
    X = rng.normal(size=(n, d)) + np.outer(y, np.linspace(1.2, 0.2, d))
    X[:, :3] += 0.8 * y[:, None] * rng.normal(size=(n, 1))
    return federate(Dataset(X, y, tuple(f"f{i}" for i in range(d)), name="toy"), N, scheme="iid", seed=5)


def corrupt(kind: str, arrays: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """What the Byzantine institution sends instead of its honest update."""
    if kind == "scaled":
        return [a * 1e4 for a in arrays]
    if kind == "sign-flipped":
        return [a * -10 for a in arrays]
    if kind == "random":
        return [rng.normal(0, 5.0, a.shape).astype(a.dtype) for a in arrays]
    if kind == "nan":
        return [np.full_like(a, np.nan) for a in arrays]
    if kind == "wrong-shape":
        return [a[..., :1] for a in arrays]
    raise AssertionError(kind)


def tamper(kind: str | None):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)

    def rewrite(node: int, label: str, reply: Message) -> Message:
        if kind is None or node != BAD or label != m.TRAIN or reply.has_error():
            return reply
        arrays = reply.content.array_records[m.UPDATE].to_numpy_ndarrays()
        reply.content[m.UPDATE] = ArrayRecord.from_numpy_ndarrays(corrupt(kind, arrays, rng))
        return reply

    return rewrite


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> tuple[FederatedSplit, dict[int, dict[str, object]]]:
    split = toy_split()
    root = Path(save_split(split, tmp_path_factory.mktemp("byz")))
    dirs = {n: {"data-path": str(root / name), "institution": name}
            for n, name in zip(NODES, split.names(), strict=True)}
    return split, dirs


def run_plain(federation, kind: str | None, aggregation: str, **options: object) -> float:  # type: ignore[no-untyped-def]
    split, dirs = federation
    cfg = FederationConfig(num_rounds=ROUNDS, min_nodes=N - 1, secure_aggregation=False, aggregation=aggregation,
                           strategy="fedavg", store_url="sqlite://", round_timeout=30, **options)  # type: ignore[arg-type]
    grid = InProcessGrid(build_client_app(), node_ids=NODES, node_configs=dirs, tamper=tamper(kind))
    with RunStore("sqlite://") as store:
        result = Coordinator(cfg, store=store, holdout=split.holdout).run(grid)
    return float(result.rounds[-1].global_metrics["auprc"])


@pytest.fixture(scope="module")
def clean_auprc(federation) -> float:  # type: ignore[no-untyped-def]
    auprc = run_plain(federation, None, "mean")
    assert auprc > 0.6  # the toy problem is learnable: the comparisons below mean something
    return auprc


@pytest.mark.parametrize(
    ("attack", "defence"),
    [("scaled", "median"), ("sign-flipped", "trimmed-mean"), ("random", "multi-krum"), ("scaled", "krum")],
)
def test_one_byzantine_institution_of_ten_is_contained_by_a_robust_rule(
    federation, clean_auprc: float, attack: str, defence: str  # type: ignore[no-untyped-def]
) -> None:
    undefended = run_plain(federation, attack, "mean")
    defended = run_plain(federation, attack, defence)
    assert defended >= 0.95 * clean_auprc, (attack, defence, defended, clean_auprc)
    assert undefended < 0.5 * clean_auprc, (attack, undefended, clean_auprc)


def test_norm_bound_rejects_the_scaled_update_and_the_round_goes_on(
    federation, clean_auprc: float, caplog: pytest.LogCaptureFixture  # type: ignore[no-untyped-def]
) -> None:
    caplog.set_level(logging.WARNING)
    split, _ = federation
    bad_name = split.names()[3]
    auprc = run_plain(federation, "scaled", "mean", max_update_norm=50.0)
    assert auprc >= 0.95 * clean_auprc
    assert f"Update of institution '{bad_name}' rejected: L2 norm" in caplog.text
    assert "exceeds the bound max_update_norm=50" in caplog.text


@pytest.mark.parametrize(("kind", "reason"), [("nan", "NaN or infinite"), ("wrong-shape", "has shape")])
def test_malformed_updates_are_rejected_with_the_institution_named(
    federation, kind: str, reason: str, caplog: pytest.LogCaptureFixture  # type: ignore[no-untyped-def]
) -> None:
    caplog.set_level(logging.WARNING)
    split, dirs = federation
    cfg = FederationConfig(num_rounds=1, min_nodes=N - 1, secure_aggregation=False, store_url="sqlite://",
                           round_timeout=30)
    grid = InProcessGrid(build_client_app(), node_ids=NODES, node_configs=dirs, tamper=tamper(kind))
    with RunStore("sqlite://") as store:
        result = Coordinator(cfg, store=store, holdout=split.holdout).run(grid)
    (rnd,) = result.rounds
    assert split.names()[3] in rnd.dropped and len(rnd.participants) == N - 1
    assert f"Update of institution '{split.names()[3]}' rejected" in caplog.text and reason in caplog.text


def test_under_secure_aggregation_the_client_side_clip_bounds_the_attacker(federation, clean_auprc) -> None:  # type: ignore[no-untyped-def]
    split, dirs = federation

    def attacker(msg: Message, context: Context, call_next):  # type: ignore[no-untyped-def]
        reply = call_next(msg, context)
        if context.node_id == BAD and msg.metadata.message_type == m.TRAIN and not reply.has_error() \
                and m.UPDATE in reply.content:
            arrays = reply.content.array_records[m.UPDATE].to_numpy_ndarrays()
            reply.content[m.UPDATE] = ArrayRecord.from_numpy_ndarrays([a * 1e4 for a in arrays])
        return reply

    def run(clip_norm: float) -> float:
        cfg = FederationConfig(num_rounds=ROUNDS, min_nodes=N - 1, secure_aggregation=True, strategy="fedavg",
                               store_url="sqlite://", round_timeout=30, clip_norm=clip_norm)
        grid = InProcessGrid(build_client_app(mods=[secagg_mod, attacker]), node_ids=NODES, node_configs=dirs)
        with RunStore("sqlite://") as store:
            return float(Coordinator(cfg, store=store, holdout=split.holdout).run(grid).rounds[-1]
                         .global_metrics["auprc"])

    assert run(clip_norm=2.0) >= 0.95 * clean_auprc


# ------------------------------------------------------------------ units


def test_validator_names_every_problem() -> None:
    ref = [np.zeros((2, 3), np.float32), np.zeros(3, np.float32)]
    v = UpdateValidator(ref, max_norm=1.0)
    ok = [np.full((2, 3), 0.1, np.float32), np.zeros(3, np.float32)]
    assert v.check(ok, institution="a")[0] is ok[0]
    cases = [
        ([ref[0]], "expected 2 tensors, got 1"),
        ([ref[0], np.zeros(4, np.float32)], r"tensor 1 has shape \(4,\), expected \(3,\)"),
        ([ref[0], np.zeros(3, np.float64)], "tensor 1 has dtype float64, expected float32"),
        ([ref[0], np.array([0, np.inf, 0], np.float32)], "tensor 1 has NaN or infinite"),
        ([np.full((2, 3), 1.0, np.float32), ref[1]], "L2 norm 2.449 exceeds"),
        ("xx", "expected a list of 2 arrays"),
        ([ref[0], [0, 0, 0]], "tensor 1 is a list"),
    ]
    for arrays, message in cases:
        with pytest.raises(InvalidUpdateError, match=f"institution 'bank' rejected: {message}"):
            v.check(arrays, institution="bank")


def test_aggregate_norm_check_catches_an_unclipped_sum() -> None:
    assert check_aggregate_norm([np.ones(4)], weight_total=2.0, clip_norm=1.0) == 2.0
    with pytest.raises(FederationError, match="at least one institution did not clip"):
        check_aggregate_norm([np.ones(4) * 10], weight_total=2.0, clip_norm=1.0, round_number=3)


def test_robust_rules_ignore_one_outlier_and_keep_the_mean_interface() -> None:
    honest = [(f"b{i}", [np.array([1.0 + 0.01 * i, -1.0])], 10.0, {"loss": 1.0}) for i in range(6)]
    evil = ("evil", [np.array([1e6, 1e6])], 10.0, {"loss": 0.0})
    ref = [np.zeros(2)]
    for rule in ("median", "trimmed-mean", "krum", "multi-krum"):
        result = robust_aggregate([*honest, evil], rule=rule, reference=ref, trim_fraction=0.2)
        assert isinstance(result, AggregateResult)
        np.testing.assert_allclose(result.mean_update()[0], [1.03, -1.0], atol=0.05)
        assert len(result.participants) == 7
    mean = robust_aggregate([*honest, evil], rule="mean", reference=ref).mean_update()[0]
    assert mean[0] > 1e5
    with pytest.raises(FederationError, match=r"needs at least 5 contributions \(n >= 2f \+ 3\)"):
        robust_aggregate(honest[:3], rule="krum", reference=ref)


def test_config_refuses_robust_rules_under_secure_aggregation() -> None:
    with pytest.raises(ConfigError, match="'aggregation' parameter of FederationConfig must be 'mean' under secure"):
        FederationConfig(aggregation="median")
    with pytest.raises(ConfigError, match="'aggregation' parameter"):
        FederationConfig(aggregation="mode", secure_aggregation=False)
    with pytest.raises(ConfigError, match="'trim_fraction' parameter"):
        FederationConfig(aggregation="trimmed-mean", secure_aggregation=False, trim_fraction=0.5)
    cfg = FederationConfig.from_run_config({"aggregation": "krum", "secure-aggregation": "false",
                                            "byzantine-nodes": 2, "max-update-norm": 5})
    assert (cfg.aggregation, cfg.byzantine_nodes, cfg.max_update_norm) == ("krum", 2, 5.0)
