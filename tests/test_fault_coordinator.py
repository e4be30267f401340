"""Coordinator crashes and store outages, with real processes and signals.

The coordinator runs as a subprocess (``consortium.federation.fault_harness``:
the real Coordinator and run store, institutions behind an in-process Grid).
It is SIGKILLed mid-run and restarted with ``resume="latest"``, or its own
PostgreSQL server (``initdb``/``pg_ctl`` on a free port, never the shared one)
is stopped for some seconds mid-run. Afterwards every round is recorded exactly
once with its checkpoint, and the per-round charge written in the round's
transaction (as the privacy ledger does) matches the rounds one to one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from consortium.data import federate_institutions, generate_federation, save_split
from consortium.federation.fault_harness import charges
from consortium.federation.private_services import PrivatePostgres
from consortium.registry import RunStore

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
ROUNDS = 5


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    fed = generate_federation(3, transactions_per_institution=1_000, seed=2, n_days=30)
    split = federate_institutions({k: v.dataset for k, v in fed.items()}, seed=2)
    return Path(save_split(split, tmp_path_factory.mktemp("inst")))


class Harness:
    """One coordinator subprocess; ``wait_for("ROUND 2")`` blocks until it printed that line."""

    def __init__(self, data_root: Path, store: str, *extra: str) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "consortium.federation.fault_harness", "--data", str(data_root),
             "--store", store, "--rounds", str(ROUNDS), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        self.lines: list[str] = []
        self.stderr = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.strip())

    def wait_for(self, line: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while line not in self.lines:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"never printed {line!r}: {self.lines} {self.finish()}")
            time.sleep(0.02)

    def finish(self, timeout: float = 180) -> str:
        self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        assert self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()
        return self.stderr


def _check_complete(store: RunStore, run_id: str) -> None:
    run = store.get_run(run_id)
    assert run.status == "completed"
    assert [r.round for r in store.rounds(run_id)] == list(range(1, ROUNDS + 1))
    for rnd in range(1, ROUNDS + 1):  # no round without its checkpoint
        assert store.load_checkpoint(run_id, round=rnd).round == rnd
    assert charges(store, run_id) == list(range(1, ROUNDS + 1))  # no charge lost or doubled


def test_coordinator_sigkilled_mid_round_resumes_from_the_last_checkpoint(data_root: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    first = Harness(data_root, url, "--pause", "0.5")
    first.wait_for("ROUND 2")
    time.sleep(0.7)  # round 3 is under way
    first.proc.send_signal(signal.SIGKILL)
    first.finish()
    assert first.proc.returncode == -signal.SIGKILL
    with RunStore(url) as store:
        (run,) = store.list_runs()
        assert run.status == "running"  # killed: nobody marked it
        done_before = [r.round for r in store.rounds(run.run_id)]
        before = {r.round: r.finished_at for r in store.rounds(run.run_id)}
        assert done_before == list(range(1, len(done_before) + 1)) and 2 <= len(done_before) < ROUNDS
        last_ckpt = store.load_checkpoint(run.run_id).arrays

    second = Harness(data_root, url, "--resume", "latest")
    second.finish()
    assert second.proc.returncode == 0, second.stderr[-3000:]
    assert second.lines[-1] == f"DONE {run.run_id}"
    assert second.lines[:-1] == [f"ROUND {r}" for r in range(len(done_before) + 1, ROUNDS + 1)]
    assert f"Resuming run {run.run_id} after round {len(done_before)}" in second.stderr
    with RunStore(url) as store:
        assert len(store.list_runs()) == 1
        _check_complete(store, run.run_id)
        # Rounds completed before the crash were not run again.
        assert {r.round: r.finished_at for r in store.rounds(run.run_id) if r.round in before} == before
        resumed_from = store.load_checkpoint(run.run_id, round=len(done_before)).arrays
    assert all((a == b).all() for a, b in zip(last_ckpt, resumed_from, strict=True))


def test_store_down_for_seconds_then_back_the_run_completes_without_partial_rounds(data_root: Path) -> None:
    with PrivatePostgres() as pg:
        harness = Harness(data_root, pg.url, "--pause", "0.3", "--store-retries", "2")
        harness.wait_for("ROUND 1")
        pg.stop(mode="immediate")  # like a crash of the database server
        time.sleep(5)
        pg.start()
        harness.finish()
        assert harness.proc.returncode == 0, harness.stderr[-3000:]
        assert "Run store unavailable while recording round" in harness.stderr
        run_id = harness.lines[-1].split()[1]
        with RunStore(pg.url) as store:
            _check_complete(store, run_id)
