"""An in-process Flower ``Grid`` for tests and benchmarks: real messages, real ClientApp.

Every message body is serialised to Flower's protobuf wire format and parsed
back in both directions, so serialisation cost and bytes on the wire are real;
only the network and the SuperLink are missing. Clients run one after the other
in this process, which makes the measured time the *total CPU work* of all
parties; per-client compute time is recorded per stage for the critical path.

A ``policy(node_id, label)`` decides, per delivered message, whether the node
answers (``"deliver"``), has vanished (``"drop"``: no reply, like a timeout), or
processes the message but its reply arrives too late (``"late"``: kept in
:attr:`InProcessGrid.late_replies`, never returned by ``pull_messages``). A
``tamper(node_id, label, reply)`` hook can rewrite a reply before it is sent,
to play a misbehaving institution.
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # pylint: disable=E0611
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

Decision = Literal["deliver", "drop", "late"]
Policy = Callable[[int, str], Decision]
Tamper = Callable[[int, str, Message], Message]
LabelFn = Callable[[Message], str]


def wire_roundtrip(content: RecordDict) -> tuple[RecordDict, int]:
    """Serialise ``content`` to protobuf bytes and parse it back; return it and the byte count."""
    raw = recorddict_to_proto(content).SerializeToString()
    return recorddict_from_proto(ProtoRecordDict.FromString(raw)), len(raw)


def default_label(msg: Message) -> str:
    """Stage label of a consortium or Flower SecAgg+ message, else the message type."""
    if msg.has_content():
        for key in ("secagg", "secaggplus_configs"):
            record = msg.content.get(key)  # not `content.config_records`: it rebuilds a view per access
            if isinstance(record, ConfigRecord):
                stage = record.get("stage")
                if isinstance(stage, str):
                    return stage
    return msg.metadata.message_type


@dataclass
class GridStats:
    """Bytes and client compute time per stage label.

    ``client_seconds`` and ``wire_seconds`` are CPU seconds of this thread
    (``time.thread_time``), so they do not grow when other processes compete
    for the CPU; ``client_wall_seconds`` are wall-clock seconds.
    """

    bytes_down: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    bytes_up: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    client_seconds: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    client_wall_seconds: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    wire_seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    bytes_up_by_node: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    bytes_down_by_node: dict[int, int] = field(default_factory=lambda: defaultdict(int))


class InProcessGrid(Grid):
    """A Grid that delivers every message to a local ``ClientApp`` through protobuf.

    Parameters
    ----------
    client_app : flwr.clientapp.ClientApp
        The app every node runs.
    node_ids : sequence of int
        Node ids (Flower uses random unsigned 64-bit ids).
    node_configs : Mapping[int, dict], optional
        Per-node ``node_config`` (e.g. ``{"institution": "bank_a"}``).
    policy : Policy, optional
        Drop/late decision per (node, label); default always deliver.
    tamper : Tamper, optional
        Rewrites a node's reply before it is serialised.
    label_fn : LabelFn, optional
        Label of a message for statistics and policies; default :func:`default_label`.
    capture : bool
        Keep every serialised reply (node, label, protobuf bytes) in :attr:`captured_up`.

    Notes
    -----
    Creating a ``Message`` needs Flower's process-wide ``TaskIdentity``; when it is
    not set (outside a ServerApp runtime) this grid sets it to a ServerApp
    identity for ``run_id``.
    """

    def __init__(
        self,
        client_app: ClientApp,
        *,
        node_ids: Sequence[int],
        node_configs: Mapping[int, dict[str, object]] | None = None,
        run_id: int = 1,
        policy: Policy | None = None,
        tamper: Tamper | None = None,
        label_fn: LabelFn | None = None,
        capture: bool = False,
    ) -> None:
        try:
            TaskIdentity.run_id  # noqa: B018 - raises when unset
        except RuntimeError:
            TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, SUPERLINK_NODE_ID, 1
        self._run = Run.create_empty(run_id=run_id)
        self.app = client_app
        self.node_ids = [int(n) for n in node_ids]
        configs = node_configs or {}
        self.contexts = {
            n: Context(
                run_id=run_id,
                node_id=n,
                node_config=dict(configs.get(n, {})),  # type: ignore[arg-type]
                state=RecordDict(),
                run_config={},
            )
            for n in self.node_ids
        }
        self.policy = policy
        self.tamper = tamper
        self.label_fn = label_fn or default_label
        self.capture = capture
        self.stats = GridStats()
        self.captured_up: list[tuple[int, str, bytes]] = []
        self.late_replies: list[tuple[int, str, Message]] = []
        self.client_errors: list[str] = []
        self._replies: dict[str, Message] = {}

    # ------------------------------------------------------------------ Grid API
    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(  # noqa: D102
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            mid = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = mid
            ids.append(mid)
            reply = self._deliver(msg)
            if reply is not None:
                self._replies[mid] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(mid) for mid in list(message_ids) if mid in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        ids = list(self.push_messages(messages))
        return list(self.pull_messages(ids))

    # ------------------------------------------------------------------ delivery
    def _deliver(self, msg: Message) -> Message | None:
        node = int(msg.metadata.dst_node_id)
        if node not in self.contexts:
            return None
        label = self.label_fn(msg)
        decision = self.policy(node, label) if self.policy else "deliver"
        if decision == "drop":
            return None
        t0 = time.thread_time()
        content, nbytes = wire_roundtrip(msg.content)
        self.stats.bytes_down[label] += nbytes
        self.stats.bytes_down_by_node[node] += nbytes
        delivered = Message(content, node, msg.metadata.message_type, group_id=msg.metadata.group_id)
        delivered.metadata.__dict__["_message_id"] = msg.metadata.message_id
        t1, w1 = time.thread_time(), time.perf_counter()
        try:
            out = self.app(delivered, self.contexts[node])
        except Exception as exc:  # a crashing ClientApp is a dropout here
            self.client_errors.append(f"{node}/{label}: {type(exc).__name__}: {exc}")
            return None
        t2 = time.thread_time()
        self.stats.client_seconds[label].append(t2 - t1)
        self.stats.client_wall_seconds[label].append(time.perf_counter() - w1)
        if self.tamper is not None:
            out = self.tamper(node, label, out)
        if out.has_error():
            self.client_errors.append(f"{node}/{label}: {out.error.reason}")
            reply = out
        else:
            raw = recorddict_to_proto(out.content).SerializeToString()
            back, nbytes = recorddict_from_proto(ProtoRecordDict.FromString(raw)), len(raw)
            if self.capture:
                self.captured_up.append((node, label, raw))
            self.stats.bytes_up[label] += nbytes
            self.stats.bytes_up_by_node[node] += nbytes
            reply = Message(back, reply_to=delivered)
        self.stats.wire_seconds[label] += (t1 - t0) + (time.thread_time() - t2)
        if decision == "late":
            self.late_replies.append((node, label, reply))
            return None
        return reply
