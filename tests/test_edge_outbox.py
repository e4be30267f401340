"""The durable outbox: FIFO order, acknowledgement, sequence numbers across restarts, survival of SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from consortium.edge.outbox import Outbox
from consortium.errors import ConfigError


def test_fifo_ack_and_len(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as box:
        seqs = [box.put("t/a", f"m{i}".encode()) for i in range(5)]
        assert seqs == [1, 2, 3, 4, 5] and len(box) == 5
        assert [i.payload for i in box.pending(3)] == [b"m0", b"m1", b"m2"]
        box.ack(2)
        box.ack(99)  # unknown: no-op
        assert [i.seq for i in box.pending()] == [1, 3, 4, 5] and len(box) == 4
        assert [i.seq for i in box.pending(after=3)] == [4, 5]
        box.ack_many([1, 3, 4, 5])
        assert len(box) == 0 and box.pending() == []


def test_put_many_builds_payload_from_its_seq_and_is_atomic(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as box:
        seqs = box.put_many([("t", lambda s: f"id-{s}".encode(), False), ("t", lambda s: f"id-{s}".encode(), True)])
        assert [i.payload for i in box.pending()] == [f"id-{s}".encode() for s in seqs]
        assert box.pending()[1].retain

        def boom(_seq: int) -> bytes:
            raise RuntimeError("cannot encode")

        with pytest.raises(RuntimeError):
            box.put_many([("t", lambda s: b"x", False), ("t", boom, False)])
        assert len(box) == 2 and box.last_seq == 2


def test_sequence_numbers_keep_growing_after_restart_even_when_empty(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path) as box:
        for _ in range(3):
            box.put("t", b"x")
        box.ack_many([1, 2, 3])
    with Outbox(path) as box:
        assert len(box) == 0 and box.put("t", b"y") == 4  # message ids are never reused


def test_bad_synchronous_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'synchronous' parameter of Outbox"):
        Outbox(tmp_path / "o.db", synchronous="OFF")


_WRITER = """
import sys
from consortium.edge.outbox import Outbox
box = Outbox(sys.argv[1])
for i in range(100000):
    seq = box.put("t", b"payload-%d" % i)
    print(seq, flush=True)
"""


def test_committed_messages_survive_sigkill(tmp_path: Path) -> None:
    """Every seq the writer reported as committed is in the file after kill -9."""
    path = tmp_path / "o.db"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ})
    assert proc.stdout is not None
    reported = [int(proc.stdout.readline()) for _ in range(200)]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with Outbox(path) as box:
        seqs = [i.seq for i in box.pending(limit=1_000_000)]
    assert seqs[: len(reported)] == reported  # all reported, in order, none lost
    assert seqs == list(range(1, len(seqs) + 1))  # and nothing half-written
