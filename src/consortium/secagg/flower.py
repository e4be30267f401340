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

import functools
import io
import logging
import math
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.constant import ErrorCode, SType
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
    "NoiseFor",
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
#
# Flower's ``Array(ndarray)`` serialises through ``np.save`` into a BytesIO and
# ``Array.numpy()`` parses with ``np.load``; for a 100k-parameter vector that is
# ~0.25 ms and ~0.05 ms of overhead per call. The two helpers below produce and
# read exactly the same ``.npy`` bytes directly (the header is cached per dtype
# and shape), and fall back to Flower's own path for anything unusual.
# ``RecordDict.config_records`` / ``array_records`` rebuild and re-validate a
# view of the whole RecordDict on every access, so records are looked up by key.


@functools.lru_cache(maxsize=64)
def _npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` header ``np.save`` writes for a C-ordered array (format 1.0, else 2.0)."""
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    buf = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(buf, header)
    except ValueError:  # header too long for format 1.0: np.save uses 2.0 as well
        buf = io.BytesIO()
        np.lib.format.write_array_header_2_0(buf, header)
    return buf.getvalue()


_FAST_KINDS = frozenset("biufc")
"""dtype kinds (bool, integers, floats, complex) whose ``.npy`` form is header + raw bytes."""


def _plain_descr(dtype: np.dtype[Any]) -> str | None:
    if dtype.kind not in _FAST_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        return None
    descr = np.lib.format.dtype_to_descr(dtype)
    return descr if isinstance(descr, str) else None


def array_of(arr: np.ndarray) -> Array:
    """``flwr.app.Array(arr)`` (the same ``.npy`` bytes) with one copy instead of ``np.save``."""
    arr = np.asarray(arr)
    descr = _plain_descr(arr.dtype)
    if descr is None or not arr.flags.c_contiguous:
        return Array(np.ascontiguousarray(arr))
    shape = tuple(int(n) for n in arr.shape)
    header = _npy_header(descr, shape)
    data = b"".join((header, arr.reshape(-1).view(np.uint8).data)) if arr.size else header
    return Array(dtype=str(arr.dtype), shape=shape, stype=SType.NUMPY, data=data)


def numpy_of(array: Array) -> np.ndarray:
    """``array.numpy()``, as a read-only view of the record's bytes when they are a plain ``.npy``.

    The fast path only accepts data that starts with exactly the header
    ``np.save`` writes for the declared dtype and shape and has exactly the
    matching length; everything else goes through Flower's ``np.load``.
    """
    data = array.data
    try:
        dtype = np.dtype(array.dtype)
        shape = tuple(int(n) for n in array.shape)
    except (TypeError, ValueError):
        return array.numpy()
    descr = _plain_descr(dtype)
    if array.stype != SType.NUMPY or descr is None or not isinstance(data, bytes) or any(n < 0 for n in shape):
        return array.numpy()
    header = _npy_header(descr, shape)
    count = math.prod(shape)
    if len(data) != len(header) + count * dtype.itemsize or not data.startswith(header):
        return array.numpy()  # np.load validates (or rejects) anything else
    return np.frombuffer(data, dtype=dtype, count=count, offset=len(header)).reshape(shape)


def record_to_content(record: Mapping[str, Any], *, prefix: str = SECAGG_RECORD) -> dict[str, Any]:
    """Split a protocol record into a ConfigRecord (scalars, lists) and an ArrayRecord (arrays)."""
    scalars = {k: v for k, v in record.items() if not isinstance(v, np.ndarray)}
    arrays = {k: array_of(v) for k, v in record.items() if isinstance(v, np.ndarray)}
    out: dict[str, Any] = {prefix: ConfigRecord(scalars)}
    if arrays:
        out[f"{prefix}-arrays"] = ArrayRecord(arrays)
    return out


def content_to_record(content: RecordDict, *, prefix: str = SECAGG_RECORD) -> Record:
    """Inverse of :func:`record_to_content` (raises SecAggError on unreadable arrays)."""
    config = content.get(prefix)
    if not isinstance(config, ConfigRecord):
        raise KeyError(prefix)
    record: Record = dict(config)
    arrays = content.get(f"{prefix}-arrays")
    if isinstance(arrays, ArrayRecord):
        for k, arr in arrays.items():
            try:
                record[k] = numpy_of(arr)
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


def _save_session(
    context: Context, session: ClientSession, stage: Stage, *, loaded: Mapping[str, Any] | None = None
) -> None:
    """Persist the session; the encoded input is written once and deleted once masked.

    The record is written whole at the first stage. Later stages pass the
    record they ``loaded`` and replace only the values that changed (usually
    just the ``"session"`` blob): a ConfigRecord validates every value it is given.
    """
    record = session.to_state()
    encoded = record.pop("encoded", None)
    stored = context.state.get(STATE_RECORD)
    if stage is Stage.ADVERTISE_KEYS or loaded is None or not isinstance(stored, ConfigRecord):
        context.state[STATE_RECORD] = ConfigRecord(record)
    else:
        for key, value in record.items():
            if loaded.get(key) != value:
                stored[key] = value
    if stage is Stage.ADVERTISE_KEYS and encoded is not None:
        context.state[STATE_ARRAYS] = ArrayRecord({"encoded": array_of(encoded)})
    elif stage is Stage.MASKED_INPUT and STATE_ARRAYS in context.state:
        del context.state[STATE_ARRAYS]


def _load_session(context: Context, stage: Stage) -> tuple[ClientSession, Record]:
    """The stored session and the record it was read from (for :func:`_save_session`)."""
    stored = context.state.get(STATE_RECORD)
    if not isinstance(stored, ConfigRecord):
        raise SecAggError(
            "This node holds no secure-aggregation session (it missed the round's first "
            "stage or restarted); it rejoins in the next round.",
            stage=stage.label,
        )
    record: Record = dict(stored)
    arrays = context.state.get(STATE_ARRAYS) if stage is Stage.MASKED_INPUT else None
    if isinstance(arrays, ArrayRecord) and "encoded" in arrays:
        record["encoded"] = numpy_of(arrays["encoded"])  # read-only view: masking writes a new vector
    return ClientSession.from_state(record), record


def _used_rounds(context: Context) -> list[str]:
    stored = context.state.get(USED_ROUNDS_RECORD)
    if isinstance(stored, ConfigRecord):
        ids = stored.get("ids", [])
        return [str(r) for r in ids] if isinstance(ids, list) else []
    return []


def _train_outputs(reply: Message) -> tuple[list[np.ndarray], float, dict[str, float]]:
    content = reply.content
    update = content.get(UPDATE_RECORD)
    metrics_record = content.get(METRICS_RECORD)
    if not isinstance(update, ArrayRecord) or not isinstance(metrics_record, MetricRecord):
        raise SecAggError(
            f"The train handler must reply with ArrayRecord '{UPDATE_RECORD}' (model delta) and "
            f"MetricRecord '{METRICS_RECORD}' (with '{WEIGHT_KEY}'); got records {sorted(content)}.",
            stage=Stage.ADVERTISE_KEYS.label,
        )
    if WEIGHT_KEY not in metrics_record:
        raise SecAggError(f"MetricRecord '{METRICS_RECORD}' lacks '{WEIGHT_KEY}'.", stage=Stage.ADVERTISE_KEYS.label)
    delta = [numpy_of(a) for a in update.values()]
    metrics = {k: float(v) for k, v in metrics_record.items() if k != WEIGHT_KEY and isinstance(v, int | float)}
    return delta, float(metrics_record[WEIGHT_KEY]), metrics  # type: ignore[arg-type]


NoiseFor = Callable[[Message], "NoiseFn | None"]
"""``noise_for(train_message) -> NoiseFn | None``: the noise hook a round's own message asks for."""


def make_secagg_mod(
    *,
    noise_fn: NoiseFn | None = None,
    noise_for: NoiseFor | None = None,
    rng_factory: Callable[[], np.random.Generator] | None = None,
) -> Mod:
    """Build the institution-side secure-aggregation mod.

    Parameters
    ----------
    noise_fn : NoiseFn, optional
        Privacy hook: integer noise added to the encoded contribution before
        masking (``noise_fn(segment, shape, scale, rng)``), e.g. a share of a
        distributed discrete Gaussian.
    noise_for : NoiseFor, optional
        Resolves the hook per round from the stage-0 (training) message, so that
        noise parameters travel with the round's config instead of being fixed
        when the ClientApp is built; it is called before training (a bad request
        fails early) and its ``None`` falls back to ``noise_fn``.
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
        if not msg.has_content() or not isinstance(msg.content.get(SECAGG_RECORD), ConfigRecord):
            return call_next(msg, context)
        stage_label = "unknown"
        try:
            record = content_to_record(msg.content)
            stage = stage_of(record)
            stage_label = stage.label
            if stage is Stage.ADVERTISE_KEYS:
                round_noise = (noise_for(msg) if noise_for is not None else None) or noise_fn
                reply_record = _advertise(msg, context, call_next, record, round_noise, make_rng())
                if isinstance(reply_record, Message):
                    return reply_record  # the train handler's own error reply
            else:
                session, loaded = _load_session(context, stage)
                request = REQUEST_TYPES[stage].from_record(record)
                handlers: dict[Stage, Callable[[Any], Any]] = {
                    Stage.SHARE_KEYS: session.share_keys,
                    Stage.MASKED_INPUT: session.masked_input,
                    Stage.UNMASK: session.unmask,
                }
                reply_record = handlers[stage](request).to_record()
                _save_session(context, session, stage, loaded=loaded)
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
    encoded = plan.encode(contribution.values, rng=rng, noise_fn=noise_fn, overwrite=True)
    if noise_fn is not None:
        logger.info("Round %s: privacy noise added to the encoded contribution before masking (%d coordinate(s) "
                    "clipped to the encodable range).", setup.round_id, encoded.noise_clipped)
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
