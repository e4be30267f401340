"""Flower glue: the institutions' ``secagg_mod`` and the coordinator's ``run_secure_round``.

Every protocol message of a round travels with the message type of the round
(``train`` by default), so Flower routes all four stages to the same handler and
therefore through the mods wrapped around it. It carries a ``ConfigRecord``
named ``"secagg"`` with a ``stage`` field, plus an ``ArrayRecord``
``"secagg-arrays"`` for the masked vector.

* Stage 0 (``advertise_keys``) is the real training message: the mod strips the
  ``secagg`` record, calls the train handler, takes its reply (ArrayRecord
  ``update`` = model delta, MetricRecord ``metrics`` with ``num-examples`` and
  training metrics), clips, weights and encodes it, keeps it in
  ``context.state`` and answers with **only** its public keys and a
  commitment - no update, no example count, no metric.
* Stages 1-3 are answered by the mod alone from ``context.state``.
* Messages without a ``secagg`` record pass through unchanged. Put
  ``secagg_mod`` first in the ``mods`` list so that other mods never see
  protocol-only messages.

Any failure becomes a Flower error reply (code ``MOD_FAILED_PRECONDITION``)
whose reason names the stage and the fix; the node then simply counts as
dropped for this round.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from consortium.errors import ConsortiumError, param_error
from consortium.federation.aggregation import METRICS_RECORD, UPDATE_RECORD, WEIGHT_KEY, AggregateResult
from consortium.secagg.config import SecAggConfig
from consortium.secagg.contribution import ContributionSpec, build_contribution, to_aggregate
from consortium.secagg.errors import SecAggAbort, SecAggError
from consortium.secagg.messages import (
    REQUEST_TYPES,
    Record,
    SetupRequest,
    Stage,
    stage_of,
)
from consortium.secagg.protocol import ClientSession, ServerSession, plan_for
from consortium.secagg.quantize import NoiseFn

__all__ = [
    "SECAGG_ARRAYS",
    "SECAGG_RECORD",
    "SecAggAbort",
    "SecAggConfig",
    "content_to_record",
    "make_secagg_mod",
    "record_to_content",
    "run_secure_round",
    "secagg_mod",
]

logger = logging.getLogger(__name__)

SECAGG_RECORD = "secagg"
"""ConfigRecord with the protocol fields of a secure-aggregation message."""
SECAGG_ARRAYS = "secagg-arrays"
"""ArrayRecord with the array fields (the masked vector)."""
STATE_RECORD = "secagg-state"
STATE_ARRAYS = "secagg-state-arrays"
USED_ROUNDS_RECORD = "secagg-rounds"
MAX_REMEMBERED_ROUNDS = 1000
NODE_INSTITUTION = "institution"
POLL_INTERVAL_S = 0.05


# --------------------------------------------------------------------------- records


def record_to_content(record: Mapping[str, Any], *, prefix: str = SECAGG_RECORD) -> dict[str, Any]:
    """Split a protocol record into a ConfigRecord (scalars, lists) and an ArrayRecord (arrays)."""
    scalars = {k: v for k, v in record.items() if not isinstance(v, np.ndarray)}
    arrays = {k: Array(np.ascontiguousarray(v)) for k, v in record.items() if isinstance(v, np.ndarray)}
    out: dict[str, Any] = {prefix: ConfigRecord(scalars)}
    if arrays:
        out[f"{prefix}-arrays"] = ArrayRecord(arrays)
    return out


def content_to_record(content: RecordDict, *, prefix: str = SECAGG_RECORD) -> Record:
    """Inverse of :func:`record_to_content` (raises SecAggError on unreadable arrays)."""
    record: Record = dict(content.config_records[prefix])
    arrays_key = f"{prefix}-arrays"
    if arrays_key in content.array_records:
        for k, arr in content.array_records[arrays_key].items():
            try:
                record[k] = arr.numpy()
            except (TypeError, ValueError, OSError) as exc:
                raise SecAggError(f"Array field '{k}' is unreadable: {exc}", stage=str(record.get("stage"))) from exc
    return record


# --------------------------------------------------------------------------- client mod


def _error_reply(msg: Message, stage: str, exc: BaseException) -> Message:
    reason = (
        f"secagg_mod failed at stage '{stage}': {exc} "
        "(the node sits out this round; fix the cause and it rejoins in the next round)"
    )
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)


def _save_session(context: Context, session: ClientSession, stage: Stage) -> None:
    """Persist the session; the encoded input is written once and deleted once masked."""
    record = session.to_state()
    encoded = record.pop("encoded", None)
    context.state[STATE_RECORD] = ConfigRecord(record)
    if stage is Stage.ADVERTISE_KEYS and encoded is not None:
        context.state[STATE_ARRAYS] = ArrayRecord({"encoded": Array(encoded)})
    elif stage is Stage.MASKED_INPUT and STATE_ARRAYS in context.state:
        del context.state[STATE_ARRAYS]


def _load_session(context: Context, stage: Stage) -> ClientSession:
    if STATE_RECORD not in context.state.config_records:
        raise SecAggError(
            "This node holds no secure-aggregation session (it missed the round's first "
            "stage or restarted); it rejoins in the next round.",
            stage=stage.label,
        )
    record: Record = dict(context.state.config_records[STATE_RECORD])
    if stage is Stage.MASKED_INPUT and STATE_ARRAYS in context.state.array_records:
        record["encoded"] = context.state.array_records[STATE_ARRAYS]["encoded"].numpy()
    return ClientSession.from_state(record)


def _used_rounds(context: Context) -> list[str]:
    if USED_ROUNDS_RECORD in context.state.config_records:
        ids = context.state.config_records[USED_ROUNDS_RECORD].get("ids", [])
        return [str(r) for r in ids] if isinstance(ids, list) else []
    return []


def _train_outputs(reply: Message) -> tuple[list[np.ndarray], float, dict[str, float]]:
    content = reply.content
    if UPDATE_RECORD not in content.array_records or METRICS_RECORD not in content.metric_records:
        raise SecAggError(
            f"The train handler must reply with ArrayRecord '{UPDATE_RECORD}' (model delta) and "
            f"MetricRecord '{METRICS_RECORD}' (with '{WEIGHT_KEY}'); got records {sorted(content)}.",
            stage=Stage.ADVERTISE_KEYS.label,
        )
    metrics_record = content.metric_records[METRICS_RECORD]
    if WEIGHT_KEY not in metrics_record:
        raise SecAggError(f"MetricRecord '{METRICS_RECORD}' lacks '{WEIGHT_KEY}'.", stage=Stage.ADVERTISE_KEYS.label)
    delta = content.array_records[UPDATE_RECORD].to_numpy_ndarrays()
    metrics = {k: float(v) for k, v in metrics_record.items() if k != WEIGHT_KEY and isinstance(v, int | float)}
    return delta, float(metrics_record[WEIGHT_KEY]), metrics  # type: ignore[arg-type]


def make_secagg_mod(
    *,
    noise_fn: NoiseFn | None = None,
    rng_factory: Callable[[], np.random.Generator] | None = None,
) -> Mod:
    """Build the institution-side secure-aggregation mod.

    Parameters
    ----------
    noise_fn : NoiseFn, optional
        Privacy hook: integer noise added to the encoded contribution before
        masking (``noise_fn(segment, shape, scale, rng)``), e.g. a share of a
        distributed discrete Gaussian.
    rng_factory : callable, optional
        Source of the rounding/noise generator; default a fresh
        ``numpy.random.default_rng`` seeded with 128 bits from the OS CSPRNG.

    Returns
    -------
    Mod
        ``(msg, context, call_next) -> Message``.
    """
    make_rng = rng_factory or (lambda: np.random.default_rng(secrets.randbits(128)))

    def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if not msg.has_content() or SECAGG_RECORD not in msg.content.config_records:
            return call_next(msg, context)
        stage_label = "unknown"
        try:
            record = content_to_record(msg.content)
            stage = stage_of(record)
            stage_label = stage.label
            if stage is Stage.ADVERTISE_KEYS:
                reply_record = _advertise(msg, context, call_next, record, noise_fn, make_rng())
                if isinstance(reply_record, Message):
                    return reply_record  # the train handler's own error reply
            else:
                session = _load_session(context, stage)
                request = REQUEST_TYPES[stage].from_record(record)
                handlers: dict[Stage, Callable[[Any], Any]] = {
                    Stage.SHARE_KEYS: session.share_keys,
                    Stage.MASKED_INPUT: session.masked_input,
                    Stage.UNMASK: session.unmask,
                }
                reply_record = handlers[stage](request).to_record()
                _save_session(context, session, stage)
            return Message(RecordDict(record_to_content(reply_record)), reply_to=msg)
        except ConsortiumError as exc:
            logger.warning("secure aggregation, stage %s: %s", stage_label, exc)
            return _error_reply(msg, stage_label, exc)
        except Exception as exc:  # never crash the node; the round treats it as a dropout
            logger.exception("Unexpected failure in secagg_mod at stage %s", stage_label)
            return _error_reply(msg, stage_label, exc)

    return secagg_mod


def _advertise(
    msg: Message,
    context: Context,
    call_next: ClientAppCallable,
    record: Record,
    noise_fn: NoiseFn | None,
    rng: np.random.Generator,
) -> Record | Message:
    st = Stage.ADVERTISE_KEYS
    setup = SetupRequest.from_record(record)
    spec = ContributionSpec.from_record(record)
    if tuple(setup.segments) != spec.segments():
        raise SecAggError(
            "The segment layout does not match the contribution spec (update, weight, metrics).",
            stage=st.label,
        )
    used = _used_rounds(context)
    if setup.round_id in used:
        raise SecAggError(
            f"Round {setup.round_id!r} was already joined once; a node never contributes twice to "
            "the same round (that could expose its update by differencing two sums).",
            stage=st.label,
        )
    node_id = int(msg.metadata.dst_node_id)
    institution = str(context.node_config.get(NODE_INSTITUTION, str(node_id)))
    plan = plan_for(setup)  # fail before training if the parameters are unusable
    for key in [k for k in msg.content if k in (SECAGG_RECORD, SECAGG_ARRAYS)]:
        del msg.content[key]
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    delta, num_examples, metrics = _train_outputs(reply)
    contribution = build_contribution(delta, num_examples=num_examples, metrics=metrics, spec=spec)
    encoded = plan.encode(contribution.values, rng=rng, noise_fn=noise_fn)
    session = ClientSession.start(node_id=node_id, setup=setup, encoded=encoded.values, institution=institution)
    advert = session.advertise()
    _save_session(context, session, Stage.ADVERTISE_KEYS)
    context.state[USED_ROUNDS_RECORD] = ConfigRecord({"ids": [*used, setup.round_id][-MAX_REMEMBERED_ROUNDS:]})
    return advert.to_record()


secagg_mod: Mod = make_secagg_mod()
"""The default mod (no noise hook). Use ``ClientApp(mods=[secagg_mod, ...])``."""


# --------------------------------------------------------------------------- coordinator


def _exchange(
    grid: Grid, messages: Mapping[int, Message], timeout: float, stage: Stage
) -> tuple[dict[int, Record], dict[int, str]]:
    """Push one stage's messages, poll replies until all arrived or ``timeout`` passed."""
    ordered = list(messages.items())
    ids: list[str | None] = list(grid.push_messages([m for _, m in ordered]))
    ids += [None] * (len(ordered) - len(ids))  # a grid may return fewer ids on failure
    pending: dict[str, int] = {}
    failures: dict[int, str] = {}
    for (node, _), mid in zip(ordered, ids, strict=True):
        if mid:
            pending[str(mid)] = node
        else:
            failures[node] = "the message could not be pushed to the SuperLink"
    replies: dict[int, Record] = {}
    deadline = time.monotonic() + timeout
    while pending:
        for reply in grid.pull_messages(list(pending)):
            if reply.metadata.reply_to_message_id not in pending:
                continue  # a stale reply to an earlier stage or round
            node = pending.pop(reply.metadata.reply_to_message_id)
            if reply.has_error():
                failures[node] = str(reply.error.reason)
                continue
            try:
                replies[node] = content_to_record(reply.content)
            except (KeyError, SecAggError) as exc:
                failures[node] = f"reply without a readable '{SECAGG_RECORD}' record ({exc})"
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(min(POLL_INTERVAL_S, max(0.0, deadline - time.monotonic())))
    if pending:
        logger.info("Stage %s: %d node(s) did not answer within %.1f s.", stage.label, len(pending), timeout)
    return replies, failures


def run_secure_round(
    grid: Grid,
    *,
    node_ids: Sequence[int],
    node_names: Mapping[int, str],
    train_content: RecordDict,
    reference: Sequence[np.ndarray],
    config: SecAggConfig,
    timeout_per_stage: float | None = None,
    round_id: str | None = None,
    message_type: str = MessageType.TRAIN,
) -> AggregateResult:
    """Run one secure-aggregation training round over ``grid``.

    Sends ``train_content`` (global model, training config) plus the round's
    public parameters to every node, runs the four stages with a timeout each,
    and returns the sums only.

    Parameters
    ----------
    grid : flwr.serverapp.Grid
        The ServerApp's grid.
    node_ids : sequence of int
        Nodes to invite (at least 2).
    node_names : Mapping[int, str]
        Registered institution names for reporting; a node missing here is
        reported under the name it advertised at stage 0 (or its node id).
    train_content : RecordDict
        What the train handler needs (global arrays, config).
    reference : sequence of numpy.ndarray
        Global model tensors: shapes and dtypes of the result.
    config : SecAggConfig
        Protocol parameters.
    timeout_per_stage : float, optional
        Seconds to wait for replies per stage; default ``config.stage_timeout``.
    round_id : str, optional
        Unique round id; default a random one.
    message_type : str
        Flower message type of all four stages (default ``"train"``); the handler
        it routes to must reply with ArrayRecord ``update`` and MetricRecord
        ``metrics`` (e.g. ``"query.stats"`` for additive statistics).

    Returns
    -------
    AggregateResult
        ``update_sum`` (in the reference dtypes), ``weight_total``, ``metric_sums``,
        ``participants`` and ``dropped`` by institution name.

    Raises
    ------
    SecAggAbort
        If fewer than the threshold survive a stage (the model must stay unchanged).
    """
    timeout = config.stage_timeout if timeout_per_stage is None else float(timeout_per_stage)
    if not timeout > 0:
        raise param_error("timeout_per_stage", "run_secure_round", "a float > 0", timeout_per_stage)
    if not isinstance(config, SecAggConfig):
        raise param_error("config", "run_secure_round", "a SecAggConfig", type(config).__name__)
    rid = round_id or secrets.token_hex(12)
    spec = ContributionSpec.create(config, reference)
    session = ServerSession(
        round_id=rid,
        node_ids=list(node_ids),
        segments=spec.segments(),
        modulus_bits=config.modulus_bits,
        neighbours=config.neighbours,
        threshold=config.threshold,
    )
    spec_record = spec.to_record()
    ttl = timeout + 5.0
    while (stage := session.stage) is not None:
        messages = {}
        records: dict[int, dict[str, Any]] = {}  # identical requests share their records
        for node, request in session.requests().items():
            if id(request) not in records:
                record = request.to_record()
                if stage is Stage.ADVERTISE_KEYS:
                    record = {**record, **spec_record}
                records[id(request)] = record_to_content(record)
            content = RecordDict(dict(train_content.items())) if stage is Stage.ADVERTISE_KEYS else RecordDict()
            for key, rec in records[id(request)].items():
                content[key] = rec
            messages[node] = Message(content, dst_node_id=int(node), message_type=message_type, group_id=rid, ttl=ttl)
        replies, failures = _exchange(grid, messages, timeout, stage)
        session.receive(replies, failures=failures)
    result = session.outcome()
    names = {int(n): str(node_names.get(n, n)) for n in node_ids}
    for node, advertised in result.institutions.items():
        if node in node_names and node_names[node] != advertised and advertised != str(node):
            # (A node without an 'institution' in its node config advertises its id: not a conflict.)
            logger.warning(
                "Node %s advertised institution %r but is registered as %r; using the registered name.",
                node,
                advertised,
                node_names[node],
            )
        elif node not in node_names:
            names[node] = advertised
    return to_aggregate(result, spec=spec, reference=reference, names=names)
