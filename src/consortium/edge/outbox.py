"""A durable first-in-first-out queue of outgoing MQTT messages in one SQLite file.

The agent writes every message here before it tries the broker, and deletes it
only when the broker has acknowledged it (QoS 1 PUBACK).  A message therefore
survives a broker outage *and* an agent crash: after a restart the agent finds
it still pending and sends it again, in order.  Sequence numbers come from the
table's ``AUTOINCREMENT`` key, so they keep growing across restarts and make
message ids (``institution/agent/seq``) unique for the life of the file.

Durability: WAL journal with ``synchronous=FULL`` — a commit returns only after
the WAL is fsynced, so a committed message survives a power cut, not only a
process kill.  Commits are batched by the caller (:meth:`Outbox.put_many`) to
keep the fsync cost per message small; ``docs/edge.md`` has the measured costs.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from consortium.errors import param_error

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    retain INTEGER NOT NULL DEFAULT 0
)
"""


@dataclass(frozen=True)
class OutboxItem:
    """One queued message."""

    seq: int
    topic: str
    payload: bytes
    retain: bool = False


PayloadBuilder = Callable[[int], bytes]
"""Builds a payload once its sequence number is known (so the payload can carry its own msg_id)."""


class Outbox:
    """Durable SQLite FIFO of (topic, payload) pairs; safe to share between threads.

    Parameters
    ----------
    path : str or Path
        The SQLite file (created with its parent directory if absent).
    synchronous : {"FULL", "NORMAL"}
        SQLite's ``synchronous`` pragma.  ``FULL`` (default) fsyncs on every commit:
        committed messages survive power loss.  ``NORMAL`` in WAL mode survives a
        process kill but may lose the last commits on power loss.
    """

    def __init__(self, path: str | Path, *, synchronous: str = "FULL") -> None:
        if synchronous not in ("FULL", "NORMAL"):
            raise param_error("synchronous", "Outbox", "'FULL' or 'NORMAL'", synchronous)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.execute(_SCHEMA)
        row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
        self._last_seq = int(row[0]) if row else 0
        self._count = int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    # ------------------------------------------------------------------ writing

    def put(self, topic: str, payload: bytes, *, retain: bool = False) -> int:
        """Append one message and commit; return its sequence number."""
        return self.put_many([(topic, lambda _seq: payload, retain)])[0]

    def put_many(self, items: Sequence[tuple[str, PayloadBuilder, bool]]) -> list[int]:
        """Append several messages in ONE transaction (one fsync); return their sequence numbers.

        Each item is ``(topic, build, retain)`` where ``build(seq)`` returns the payload bytes:
        the payload can embed its own sequence number (message id).  If a builder raises,
        nothing of the batch is written and the exception propagates.
        """
        if not items:
            return []
        with self._lock:
            seqs = list(range(self._last_seq + 1, self._last_seq + 1 + len(items)))
            rows = [
                (seq, topic, build(seq), int(retain))
                for seq, (topic, build, retain) in zip(seqs, items, strict=True)
            ]
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT INTO outbox (seq, topic, payload, retain) VALUES (?, ?, ?, ?)", rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._last_seq = seqs[-1]
            self._count += len(rows)
        return seqs

    # ------------------------------------------------------------------ reading / acknowledging

    def pending(self, limit: int = 1000, *, after: int = 0) -> list[OutboxItem]:
        """The oldest ``limit`` queued messages with ``seq > after``, in order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, topic, payload, retain FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
                (int(after), int(limit)),
            ).fetchall()
        return [OutboxItem(int(s), str(t), bytes(p), bool(r)) for s, t, p, r in rows]

    def ack(self, seq: int) -> None:
        """Delete one delivered message (unknown ``seq``: no-op)."""
        self.ack_many([seq])

    def ack_many(self, seqs: Iterable[int]) -> None:
        """Delete several delivered messages in one transaction."""
        keys = [(int(s),) for s in seqs]
        if not keys:
            return
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cur = self._db.executemany("DELETE FROM outbox WHERE seq = ?", keys)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._count -= max(cur.rowcount, 0)

    def __len__(self) -> int:
        """Number of queued (not yet acknowledged) messages."""
        return self._count

    @property
    def last_seq(self) -> int:
        """The highest sequence number ever assigned by this file."""
        return self._last_seq

    def close(self) -> None:
        """Close the database (further calls fail)."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
