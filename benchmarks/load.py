"""Load: many edge agents through Mosquitto into the store; many nodes through secure rounds.

Part 1 (alerts): ``--agents`` simulated edge agents (the real ``MqttPublisher``
with its durable outbox, spread over worker processes) publish alerts to a
private Mosquitto on loopback for ``--seconds``; the dashboard's
``AlertIngestor`` stores them in a private PostgreSQL. Counts prove delivery
end to end (agent -> broker -> store, distinct msg_ids); latency is from the
agent's ``ts`` to the ingestor's commit.

Part 2 (nodes): ``--nodes`` SuperNode processes (TLS, node authentication)
against one coordinator for ``--rounds`` rounds of secure aggregation; 10 % of
the nodes are SIGKILLed mid-round (and restarted); reports round times,
completed rounds and the coordinator's peak memory.

    python benchmarks/load.py            # 200 agents x 60 s, 10 nodes x 5 rounds
    python benchmarks/load.py --quick    # 20 agents x 8 s; part 2 only with --nodes N (a deployed
                                         # round takes ~1-2 min on this shared 2-core machine)
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, parser, write_results  # noqa: E402
from _reliability import update_reliability  # noqa: E402

logger = logging.getLogger("benchmarks.load")


# ----------------------------------------------------------------------------- part 1: alerts


def _agent_worker(broker: str, agents: list[tuple[str, str]], rate: float, seconds: float, outbox_dir: str,
                  result: Any) -> None:
    """One process running several agents; each publishes ``rate`` alerts/s for ``seconds``."""
    from consortium.edge.messages import Alert  # noqa: PLC0415
    from consortium.edge.publisher import MqttPublisher  # noqa: PLC0415

    pubs = [MqttPublisher(broker, institution=inst, agent=agent, outbox_path=Path(outbox_dir) / f"{inst}-{agent}.db",
                          synchronous="NORMAL").start() for inst, agent in agents]
    sent = 0
    start = time.time()
    interval = 1.0 / rate
    next_at = [start + (i / len(pubs)) * interval for i in range(len(pubs))]
    while True:
        now = time.time()
        if now - start >= seconds:
            break
        for i, pub in enumerate(pubs):
            if now >= next_at[i]:
                inst, agent = agents[i]
                pub.publish(Alert(msg_id="", institution=inst, agent=agent, transaction_id=f"t{sent}",
                                  score=0.99, threshold=0.5, model_version="v1", ts=time.time()))
                sent += 1
                next_at[i] += interval
        time.sleep(0.002)
    delivered = all(pub.wait_delivered(timeout=120) for pub in pubs)
    for pub in pubs:
        pub.stop(drain_timeout=10)
    result.put((sent, delivered))


def run_alert_load(tmp: Path, *, agents: int, rate: float, seconds: float, workers: int) -> dict[str, Any]:
    """Part 1: agents -> private Mosquitto -> AlertIngestor -> private PostgreSQL."""
    from consortium.dashboard.ingest import AlertIngestor, count_stored_alerts  # noqa: PLC0415
    from consortium.federation.private_services import PrivateMosquitto, PrivatePostgres  # noqa: PLC0415
    from consortium.registry import RunStore  # noqa: PLC0415

    latencies: list[float] = []

    def on_batch(rows: list[dict[str, Any]]) -> None:
        now = time.time()
        latencies.extend(now - float(r["ts"]) for r in rows if "ts" in r)

    names = [(f"bank_{i % 10}", f"agent-{i:03d}") for i in range(agents)]
    with PrivateMosquitto() as broker, PrivatePostgres() as pg, RunStore(pg.url) as store:
        ingestor = AlertIngestor(store, broker.url, on_batch=on_batch).start(wait=15)
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        outboxes = tmp / "outboxes"
        outboxes.mkdir()
        chunks = [names[i::workers] for i in range(workers)]
        procs = [ctx.Process(target=_agent_worker, args=(broker.url, chunk, rate, seconds, str(outboxes), queue))
                 for chunk in chunks if chunk]
        t0 = time.perf_counter()
        for p in procs:
            p.start()
        results = [queue.get(timeout=seconds + 600) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        sent = sum(r[0] for r in results)
        deadline = time.monotonic() + 120
        stored = 0
        while time.monotonic() < deadline:
            ingestor.wait_idle(timeout=5)
            stored = count_stored_alerts(store)
            if stored >= sent:
                break
            time.sleep(0.5)
        elapsed = time.perf_counter() - t0
        stats = ingestor.stats
        ingestor.stop()
    lat = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    return {
        "agents": agents, "rate_per_agent": rate, "seconds": seconds, "workers": workers,
        "alerts_sent": sent, "alerts_stored": stored, "alerts_lost": sent - stored,
        "all_delivered_to_broker": all(r[1] for r in results),
        "alerts_per_s": round(stored / seconds, 1), "wall_seconds": round(elapsed, 1),
        "alert_latency_p50_ms": round(float(np.percentile(lat, 50)), 1),
        "alert_latency_p99_ms": round(float(np.percentile(lat, 99)), 1),
        "ingest_stats": {k: getattr(stats, k) for k in dir(stats) if not k.startswith("_")
                         and isinstance(getattr(stats, k), int | float)},
    }


# ----------------------------------------------------------------------------- part 2: nodes


def _rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def run_node_fleet(tmp: Path, *, n_nodes: int, rounds: int, kill_fraction: float = 0.1,
                   restart_killed: bool = True) -> dict[str, Any]:
    """Part 2: ``n_nodes`` SuperNodes (TLS + node auth), secure aggregation, kill some mid-round."""
    from consortium.data import federate_institutions, generate_federation, save_split  # noqa: PLC0415
    from consortium.federation.certs import make_local_ca  # noqa: PLC0415
    from consortium.federation.config import FederationConfig  # noqa: PLC0415
    from consortium.federation.deploy import NodeProcess, start_coordinator, start_node, submit_run  # noqa: PLC0415
    from consortium.federation.enroll import generate_node_key, register_nodes  # noqa: PLC0415
    from consortium.registry import RunStore  # noqa: PLC0415

    n_kill = max(1, round(kill_fraction * n_nodes))
    fed = generate_federation(n_nodes, transactions_per_institution=1_200, seed=4, n_days=30)
    split = federate_institutions({k: v.dataset for k, v in fed.items()}, seed=4)
    root = Path(save_split(split, tmp / "data"))
    names = split.names()
    certs = make_local_ca(tmp / "certs")
    keys = {name: generate_node_key(tmp / "keys", name) for name in names}
    store_url = f"sqlite:///{tmp / 'runs.db'}"
    cfg = FederationConfig(num_rounds=rounds, min_nodes=n_nodes - n_kill, secure_aggregation=True,
                           store_url=store_url, run_name="load", round_timeout=120, local_epochs=1)
    nodes: dict[str, NodeProcess] = {}
    killed: list[str] = []
    peak = {"rss": 0.0}
    outcome: dict[str, Any] = {}
    t_start = time.perf_counter()
    with start_coordinator(certs=certs, work_dir=tmp / "coord", node_auth=True) as coordinator:
        coordinator.wait_ready(timeout=120)
        register_nodes(coordinator, {n: k.public_key for n, k in keys.items()})
        try:
            for name in names:
                nodes[name] = start_node(fleet_address=coordinator.addresses.fleet, ca_cert=certs.ca_cert,
                                         data_path=root / name, institution=name, work_dir=tmp / f"n-{name}",
                                         auth_key=keys[name].private_key)
            for node in nodes.values():
                node.wait_ready(timeout=300)
            started = len(nodes)

            def submit() -> None:
                outcome["run"] = submit_run(coordinator, run_config=cfg.to_run_config(), timeout=3600)

            runner = threading.Thread(target=submit, daemon=True)
            runner.start()
            stop = threading.Event()

            def sample_memory() -> None:
                while not stop.is_set():
                    peak["rss"] = max(peak["rss"], _rss_mb(list(coordinator.process_ids())))
                    time.sleep(0.5)

            sampler = threading.Thread(target=sample_memory, daemon=True)
            sampler.start()

            def recorded() -> int:
                try:
                    with RunStore(store_url) as store:
                        runs = store.list_runs()
                        return store.last_completed_round(runs[0].run_id) if runs else 0
                except Exception:  # noqa: BLE001 - the ServerApp may not have created the store yet
                    return 0

            kill_after = 1 if rounds > 1 else 0
            while recorded() < kill_after and runner.is_alive():
                time.sleep(0.5)
            time.sleep(4.0)  # the next round's secure aggregation is under way
            for name in names[-n_kill:]:
                for pid in nodes[name].process_ids():
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                killed.append(name)
            kill_round = kill_after + 1
            if restart_killed:
                while recorded() < kill_round and runner.is_alive():
                    time.sleep(0.5)
                for name in killed:
                    nodes[name].stop(timeout=5)
                    nodes[name] = start_node(fleet_address=coordinator.addresses.fleet, ca_cert=certs.ca_cert,
                                             data_path=root / name, institution=name,
                                             work_dir=tmp / f"n-{name}-restart", auth_key=keys[name].private_key)
                    nodes[name].wait_ready(timeout=300)
            runner.join(timeout=3600)
            stop.set()
            sampler.join(timeout=5)
        finally:
            for node in nodes.values():
                node.stop(timeout=10)
    with RunStore(store_url) as store:
        (run,) = store.list_runs()
        rounds_rec = store.rounds(run.run_id)
    run_outcome = outcome.get("run")
    last = rounds_rec[-1] if rounds_rec else None
    rejoined = bool(restart_killed and last is not None and last.round > kill_round
                    and set(killed) <= set(last.participants))
    return {
        "nodes_started": started, "nodes_killed": len(killed), "killed": killed, "kill_round": kill_round,
        "rounds_requested": rounds, "rounds_completed": len(rounds_rec), "run_status": run.status,
        "flower_status": run_outcome.status if run_outcome is not None else "no outcome",
        "participants_per_round": [len(r.participants) for r in rounds_rec],
        "dropped_per_round": [list(r.dropped) for r in rounds_rec],
        "round_seconds": [round(r.duration_s, 1) for r in rounds_rec],
        "killed_rejoined": rejoined,
        "coordinator_peak_rss_mb": round(peak["rss"], 1),
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--agents", type=int, default=None)
    p.add_argument("--rate", type=float, default=None, help="Alerts per second per agent.")
    p.add_argument("--seconds", type=float, default=None)
    p.add_argument("--nodes", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--skip-nodes", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    agents = args.agents or (20 if args.quick else 200)
    rate = args.rate or (2.0 if args.quick else 1.5)
    seconds = args.seconds or (8.0 if args.quick else 60.0)
    n_nodes = args.nodes or (0 if args.quick else 10)
    rounds = args.rounds or (2 if args.quick else 5)
    with tempfile.TemporaryDirectory(prefix="consortium-load-") as tmp_dir:
        tmp = Path(tmp_dir)
        (tmp / "alerts").mkdir()
        alerts = run_alert_load(tmp / "alerts", agents=agents, rate=rate, seconds=seconds, workers=4)
        print(f"alerts: {alerts['alerts_sent']} sent, {alerts['alerts_stored']} stored, lost {alerts['alerts_lost']},"
              f" {alerts['alerts_per_s']}/s, p99 {alerts['alert_latency_p99_ms']} ms", flush=True)
        fleet: dict[str, Any] = {}
        if not args.skip_nodes and n_nodes > 0:
            (tmp / "nodes").mkdir()
            fleet = run_node_fleet(tmp / "nodes", n_nodes=n_nodes, rounds=rounds, kill_fraction=0.1)
            print(f"nodes: {fleet['nodes_started']} started, {fleet['nodes_killed']} killed in round "
                  f"{fleet['kill_round']}, {fleet['rounds_completed']}/{rounds} rounds, round s "
                  f"{fleet['round_seconds']}, coordinator peak {fleet['coordinator_peak_rss_mb']} MB", flush=True)
    summary = {k: alerts[k] for k in ("alerts_sent", "alerts_stored", "alerts_lost", "alerts_per_s",
                                      "alert_latency_p99_ms")}
    if fleet:
        summary.update({
            "node_rounds_completed": fleet["rounds_completed"], "nodes_started": fleet["nodes_started"],
            "nodes_killed": fleet["nodes_killed"],
            "node_round_seconds_mean": round(float(np.mean(fleet["round_seconds"])), 1) if fleet["round_seconds"]
            else None,
            "coordinator_peak_rss_mb": fleet["coordinator_peak_rss_mb"],
        })
    result = {"summary": summary, "alerts": alerts, "nodes": fleet, "quick": args.quick, "environment": environment()}
    md = ["# Load", "", "## Alerts: agents -> Mosquitto -> AlertIngestor -> PostgreSQL", "",
          f"{alerts['agents']} agents x {alerts['rate_per_agent']}/s for {alerts['seconds']} s: "
          f"sent {alerts['alerts_sent']}, stored {alerts['alerts_stored']}, **lost {alerts['alerts_lost']}**; "
          f"{alerts['alerts_per_s']} alerts/s; latency p50 {alerts['alert_latency_p50_ms']} ms, "
          f"p99 {alerts['alert_latency_p99_ms']} ms.", ""]
    if fleet:
        md += ["## Nodes: SuperNodes (TLS, node auth), secure aggregation, 10 % SIGKILLed mid-round", "",
               f"{fleet['nodes_started']} nodes, {fleet['nodes_killed']} killed in round {fleet['kill_round']} "
               f"and restarted (rejoined: {fleet['killed_rejoined']}); {fleet['rounds_completed']} of "
               f"{fleet['rounds_requested']} rounds completed ({fleet['run_status']}); participants per round "
               f"{fleet['participants_per_round']}; round seconds {fleet['round_seconds']}; coordinator "
               f"(SuperLink + ServerApp) peak RSS {fleet['coordinator_peak_rss_mb']} MB.", ""]
    write_results("load" if not args.quick else "load_quick", result, "\n".join(md), json_path=args.json_path)
    if not args.quick:
        update_reliability("load", result, summary=summary)


if __name__ == "__main__":
    main()
