"""A coordinator process to kill: the real Coordinator over an in-process Grid.

Fault tests and ``benchmarks/faults.py`` start this module as a subprocess
(``python -m consortium.federation.fault_harness``), SIGKILL it or cut its
database mid-run, start it again with ``--resume latest`` and check the run
store. The institutions' ClientApps run inside the same process behind
:class:`~consortium.secagg.inprocess.InProcessGrid` (every message through
Flower's wire format), so a run takes seconds instead of the minutes a
SuperLink with polling SuperNodes needs; the coordinator logic, the store and
the process boundary are the real ones.

It prints ``ROUND <n>`` (flushed) after each recorded round, so a parent knows
when to strike, and ``DONE <run_id>`` at the end.

Every recorded round also writes one row to ``fault_harness_charges`` through
:attr:`Coordinator.round_hooks`, i.e. in the same transaction as the round, the
way the privacy ledger charges an ε spend: a test then checks that charges and
rounds match one to one after crashes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, Session, mapped_column

from consortium.registry.store_schema import RUN_ID_LENGTH, Base


class FaultChargeRow(Base):
    """One charge per recorded round (stands in for a privacy-ledger entry)."""

    __tablename__ = "fault_harness_charges"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(sa.String(RUN_ID_LENGTH), index=True)
    round: Mapped[int] = mapped_column(sa.Integer)


def charge_round(session: Session, run_id: str, round_number: int) -> None:
    """Round hook: add the round's charge inside the round's transaction."""
    session.add(FaultChargeRow(run_id=run_id, round=round_number))


def charges(store: object, run_id: str) -> list[int]:
    """Rounds charged for ``run_id``, in insertion order."""
    from consortium.registry import RunStore  # noqa: PLC0415

    assert isinstance(store, RunStore)

    def work(session: Session) -> list[int]:
        rows = session.scalars(sa.select(FaultChargeRow.round).where(FaultChargeRow.run_id == run_id)
                               .order_by(FaultChargeRow.id))
        return [int(r) for r in rows]

    return store.run_transaction(work, action="read fault-harness charges")


def main(argv: list[str] | None = None) -> int:
    """Entry point: run (or resume) one federated run; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, help="Directory with one sub-directory per institution.")
    parser.add_argument("--store", required=True, help="Run store URL.")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--resume", default="")
    parser.add_argument("--run-name", default="fault-harness")
    parser.add_argument("--pause", type=float, default=0.0, help="Seconds to sleep after each round.")
    parser.add_argument("--secure", action="store_true", help="Secure aggregation (default: plain).")
    parser.add_argument("--store-retries", type=int, default=3)
    parser.add_argument("--round-timeout", type=float, default=60.0)
    args = parser.parse_args(argv)

    from consortium.federation.client_app import build_client_app  # noqa: PLC0415
    from consortium.federation.config import FederationConfig  # noqa: PLC0415
    from consortium.federation.coordinator import Coordinator, RoundReport  # noqa: PLC0415
    from consortium.registry import RunStore  # noqa: PLC0415
    from consortium.secagg.inprocess import InProcessGrid  # noqa: PLC0415

    institutions = sorted(p for p in Path(args.data).iterdir() if p.is_dir())
    nodes = [5000 + i for i in range(len(institutions))]
    configs: dict[int, dict[str, object]] = {
        n: {"data-path": str(p), "institution": p.name} for n, p in zip(nodes, institutions, strict=True)
    }
    cfg = FederationConfig(num_rounds=args.rounds, min_nodes=len(nodes), secure_aggregation=args.secure,
                           store_url=args.store, run_name=args.run_name, resume=args.resume,
                           round_timeout=args.round_timeout, strategy="fedadam")

    def on_round(report: RoundReport) -> None:
        print(f"ROUND {report.round}", flush=True)
        if args.pause:
            time.sleep(args.pause)

    store = RunStore(args.store, retries=args.store_retries, retry_wait=0.25)
    store.create_missing_tables()
    grid = InProcessGrid(build_client_app(), node_ids=nodes, node_configs=configs)
    coordinator = Coordinator(cfg, store=store, on_round=on_round)
    coordinator.round_hooks.append(charge_round)
    result = coordinator.run(grid)
    print(f"DONE {result.run_id}", flush=True)
    store.close()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
