"""Run consortium's fault scenarios and count how many are survived.

Every scenario injects one fault or bad input into real code (real processes
and signals where the fault is a process's death) and checks the expected
behaviour; docs/reliability.md lists them with the tests that show each one.

    python benchmarks/faults.py            # all scenarios (several minutes)
    python benchmarks/faults.py --quick    # a subset, under 60 s

Writes ``benchmarks/results/faults.{json,md}`` and the ``faults_tried`` /
``faults_survived`` keys of ``benchmarks/results/reliability.{json,md}``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, parser, write_results  # noqa: E402
from _reliability import update_reliability  # noqa: E402

from consortium.data import Dataset, FederatedSplit, federate, save_split  # noqa: E402
from consortium.errors import ConfigError, FederationError  # noqa: E402

logger = logging.getLogger("benchmarks.faults")
HERE = Path(__file__).resolve().parent
N_BYZ = 10
BAD_NODE = 1003


# ----------------------------------------------------------------------------- data


def toy_split(n_institutions: int, *, rows: int = 10_000, seed: int = 7) -> FederatedSplit:
    """A learnable 10 %-positive problem split IID (a stable AUPRC to compare against)."""
    rng = np.random.default_rng(seed)
    d = 12
    y = (rng.random(rows) < 0.1).astype(np.int64)
    X = rng.normal(size=(rows, d)) + np.outer(y, np.linspace(1.2, 0.2, d))
    X[:, :3] += 0.8 * y[:, None] * rng.normal(size=(rows, 1))
    return federate(Dataset(X, y, tuple(f"f{i}" for i in range(d)), name="toy"), n_institutions, scheme="iid",
                    seed=5)


class InProcessFederation:
    """The real ClientApp of ``n`` institutions behind the in-process Grid."""

    def __init__(self, n: int, root: Path) -> None:
        self.split = toy_split(n)
        data = Path(save_split(self.split, root / f"toy{n}"))
        self.root = data
        self.nodes = [1000 + i for i in range(n)]
        self.configs = {node: {"data-path": str(data / name), "institution": name}
                        for node, name in zip(self.nodes, self.split.names(), strict=True)}

    def run(self, *, rounds: int = 4, tamper: Any = None, mods: Any = None, **options: Any) -> Any:
        from consortium.federation.client_app import build_client_app  # noqa: PLC0415
        from consortium.federation.config import FederationConfig  # noqa: PLC0415
        from consortium.federation.coordinator import Coordinator  # noqa: PLC0415
        from consortium.registry import RunStore  # noqa: PLC0415
        from consortium.secagg.inprocess import InProcessGrid  # noqa: PLC0415

        base: dict[str, Any] = {"num_rounds": rounds, "min_nodes": len(self.nodes) - 1, "secure_aggregation": False,
                                "strategy": "fedavg", "store_url": "sqlite://", "round_timeout": 30}
        cfg = FederationConfig(**{**base, **options})
        app = build_client_app(mods=mods) if mods is not None else build_client_app()
        grid = InProcessGrid(app, node_ids=self.nodes, node_configs=self.configs, tamper=tamper)
        with RunStore("sqlite://") as store:
            return Coordinator(cfg, store=store, holdout=self.split.holdout).run(grid)


def corrupt(kind: str) -> Callable[[int, str, Any], Any]:
    """A tamper hook: node BAD_NODE's training reply becomes ``kind``."""
    from flwr.app import ArrayRecord  # noqa: PLC0415

    from consortium.federation import messages as m  # noqa: PLC0415

    rng = np.random.default_rng(0)

    def rewrite(node: int, label: str, reply: Any) -> Any:
        if node != BAD_NODE or label != m.TRAIN or reply.has_error():
            return reply
        arrays = reply.content.array_records[m.UPDATE].to_numpy_ndarrays()
        new = {
            "scaled": lambda: [a * 1e4 for a in arrays],
            "sign-flipped": lambda: [a * -10 for a in arrays],
            "random": lambda: [rng.normal(0, 5.0, a.shape).astype(a.dtype) for a in arrays],
            "nan": lambda: [np.full_like(a, np.nan) for a in arrays],
            "wrong-shape": lambda: [a[..., :1] for a in arrays],
            "wrong-dtype": lambda: [a.astype(np.float64) for a in arrays],
        }[kind]()
        reply.content[m.UPDATE] = ArrayRecord.from_numpy_ndarrays(new)
        return reply

    return rewrite


# ----------------------------------------------------------------------------- scenarios

Scenario = Callable[[Path], dict[str, Any]]


def key_permissions(tmp: Path) -> dict[str, Any]:
    """A group/world-readable node key or coordinator TLS key is refused before anything starts."""
    from consortium.federation.certs import make_local_ca  # noqa: PLC0415
    from consortium.federation.deploy import start_coordinator, start_node  # noqa: PLC0415
    from consortium.federation.enroll import generate_node_key  # noqa: PLC0415

    key = generate_node_key(tmp / "keys", "bank_a")
    os.chmod(key.private_key, 0o644)
    certs = make_local_ca(tmp / "certs")
    refused = []
    try:
        start_node(fleet_address="127.0.0.1:9", ca_cert=certs.ca_cert, data_path=tmp, institution="bank_a",
                   work_dir=tmp / "n", auth_key=key.private_key)
    except ConfigError as exc:
        refused.append("chmod 600" in str(exc))
    os.chmod(certs.server_key, 0o640)
    try:
        start_coordinator(certs=certs, work_dir=tmp / "c")
    except ConfigError as exc:
        refused.append("chmod 600" in str(exc))
    return {"survived": refused == [True, True], "details": "node key 0644 and TLS key 0640 refused"}


def malformed_update(kind: str) -> Scenario:
    def scenario(tmp: Path) -> dict[str, Any]:
        fed = _federation(tmp, N_BYZ)
        result = fed.run(rounds=1, tamper=corrupt(kind))
        (rnd,) = result.rounds
        bad = fed.split.names()[BAD_NODE - 1000]
        ok = bad in rnd.dropped and len(rnd.participants) == N_BYZ - 1
        return {"survived": ok, "details": f"{bad} left out; round 1 completed with {len(rnd.participants)}"}

    scenario.__doc__ = f"One institution sends a {kind} update: rejected with its name, the round goes on."
    return scenario


_FEDERATIONS: dict[int, InProcessFederation] = {}
_CLEAN: dict[int, float] = {}


def _federation(tmp: Path, n: int) -> InProcessFederation:
    if n not in _FEDERATIONS:
        _FEDERATIONS[n] = InProcessFederation(n, tmp)
    return _FEDERATIONS[n]


def _auprc(result: Any) -> float:
    return float(result.rounds[-1].global_metrics["auprc"])


def byzantine(attack: str, defence: str) -> Scenario:
    def scenario(tmp: Path) -> dict[str, Any]:
        fed = _federation(tmp, N_BYZ)
        if N_BYZ not in _CLEAN:
            _CLEAN[N_BYZ] = _auprc(fed.run())
        clean = _CLEAN[N_BYZ]
        undefended = _auprc(fed.run(tamper=corrupt(attack)))
        options: dict[str, Any] = {"max_update_norm": 50.0} if defence == "norm-bound" else {"aggregation": defence}
        defended = _auprc(fed.run(tamper=corrupt(attack), **options))
        return {
            "survived": defended >= 0.95 * clean,
            "clean_auprc": clean, "undefended_auprc": undefended, "defended_auprc": defended,
            "defended_vs_clean": defended / clean, "undefended_vs_clean": undefended / clean,
            "details": f"AUPRC clean {clean:.3f}, {attack} with mean {undefended:.3f}, with {defence} {defended:.3f}",
        }

    scenario.__doc__ = f"1 of {N_BYZ} institutions sends {attack} updates; defence: {defence} (AUPRC within 5 %)."
    return scenario


def secagg_clip(tmp: Path) -> dict[str, Any]:
    """Under secure aggregation a x1e4-scaled update is clipped client-side before masking."""
    from flwr.app import ArrayRecord  # noqa: PLC0415

    from consortium.federation import messages as m  # noqa: PLC0415
    from consortium.secagg.flower import secagg_mod  # noqa: PLC0415

    fed = _federation(tmp, N_BYZ)
    if N_BYZ not in _CLEAN:
        _CLEAN[N_BYZ] = _auprc(fed.run())

    def attacker(msg: Any, context: Any, call_next: Any) -> Any:
        reply = call_next(msg, context)
        if context.node_id == BAD_NODE and msg.metadata.message_type == m.TRAIN and not reply.has_error() \
                and m.UPDATE in reply.content:
            arrays = reply.content.array_records[m.UPDATE].to_numpy_ndarrays()
            reply.content[m.UPDATE] = ArrayRecord.from_numpy_ndarrays([a * 1e4 for a in arrays])
        return reply

    auprc = _auprc(fed.run(secure_aggregation=True, clip_norm=2.0, mods=[secagg_mod, attacker]))
    return {"survived": auprc >= 0.95 * _CLEAN[N_BYZ], "defended_auprc": auprc, "clean_auprc": _CLEAN[N_BYZ],
            "details": f"AUPRC {auprc:.3f} vs clean {_CLEAN[N_BYZ]:.3f}"}


def _harness(data: Path, store: str, *extra: str) -> tuple[subprocess.Popen[str], list[str]]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-m", "consortium.federation.fault_harness", "--data", str(data),
                             "--store", store, "--rounds", "5", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.strip())

    threading.Thread(target=read, daemon=True).start()
    return proc, lines


def _wait_line(proc: subprocess.Popen[str], lines: list[str], line: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while line not in lines:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise FederationError(f"harness never printed {line!r}: {lines}")
        time.sleep(0.02)


def _complete(store_url: str, run_id: str) -> tuple[bool, str]:
    from consortium.federation.fault_harness import charges  # noqa: PLC0415
    from consortium.registry import RunStore  # noqa: PLC0415

    with RunStore(store_url) as store:
        rounds = [r.round for r in store.rounds(run_id)]
        ckpts = [store.load_checkpoint(run_id, round=r).round for r in rounds]
        charged = charges(store, run_id)
        status = store.get_run(run_id).status
    ok = rounds == ckpts == charged == [1, 2, 3, 4, 5] and status == "completed"
    return ok, f"rounds {rounds}, checkpoints {ckpts}, charges {charged}, status {status}"


def coordinator_sigkill(tmp: Path) -> dict[str, Any]:
    """Coordinator SIGKILLed mid-round, restarted with --resume latest: no round repeated or lost."""
    data = _federation(tmp, 3).root
    url = f"sqlite:///{tmp / 'kill.db'}"
    proc, lines = _harness(data, url, "--pause", "0.5")
    _wait_line(proc, lines, "ROUND 2")
    time.sleep(0.7)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc2, lines2 = _harness(data, url, "--resume", "latest")
    proc2.wait(timeout=300)
    time.sleep(0.2)
    if proc2.returncode != 0 or not lines2 or not lines2[-1].startswith("DONE"):
        return {"survived": False, "details": f"resume failed: {lines2}"}
    ok, details = _complete(url, lines2[-1].split()[1])
    return {"survived": ok, "details": f"killed after {lines}; resumed {lines2[:-1]}; {details}"}


def store_outage(tmp: Path) -> dict[str, Any]:
    """The coordinator's PostgreSQL (private instance) crashes for 5 s mid-run; the run completes."""
    from consortium.federation.private_services import PrivatePostgres  # noqa: PLC0415

    data = _federation(tmp, 3).root
    with PrivatePostgres() as pg:
        proc, lines = _harness(data, pg.url, "--pause", "0.3", "--store-retries", "2")
        _wait_line(proc, lines, "ROUND 1")
        pg.stop(mode="immediate")
        time.sleep(5)
        pg.start()
        proc.wait(timeout=300)
        time.sleep(0.2)
        assert proc.stderr is not None
        stderr = proc.stderr.read()
        if proc.returncode != 0 or not lines[-1].startswith("DONE"):
            return {"survived": False, "details": stderr[-500:]}
        ok, details = _complete(pg.url, lines[-1].split()[1])
        retried = "Run store unavailable" in stderr
    return {"survived": ok and retried, "details": f"retried={retried}; {details}"}


def unenrolled_and_revoked(tmp: Path) -> dict[str, Any]:
    """Real SuperLink with node auth: an unenrolled node is refused, a revoked node dropped, both logged."""
    from consortium.federation.certs import make_local_ca  # noqa: PLC0415
    from consortium.federation.deploy import start_coordinator, start_node  # noqa: PLC0415
    from consortium.federation.enroll import RefusalWatcher, generate_node_key, register_nodes, revoke_node  # noqa: PLC0415

    certs = make_local_ca(tmp / "certs")
    good, stranger = generate_node_key(tmp / "k", "bank_a"), generate_node_key(tmp / "k", "bank_b")
    checks: dict[str, bool] = {}
    with start_coordinator(certs=certs, work_dir=tmp / "coord", node_auth=True) as coordinator:
        coordinator.wait_ready(timeout=60)
        ids = register_nodes(coordinator, {"bank_a": good.public_key})
        common: dict[str, Any] = {"fleet_address": coordinator.addresses.fleet, "ca_cert": certs.ca_cert,
                                  "data_path": tmp}
        with RefusalWatcher(coordinator, interval=0.2) as watcher, \
                start_node(institution="bank_a", work_dir=tmp / "a", auth_key=good.private_key, **common) as a, \
                start_node(institution="bank_b", work_dir=tmp / "b", auth_key=stranger.private_key, **common) as b:
            checks["enrolled joins"] = a.wait_ready(timeout=60) == ids["bank_a"]
            try:
                b.wait_ready(timeout=60)
                checks["unenrolled refused (node side)"] = False
            except FederationError as exc:
                checks["unenrolled refused (node side)"] = stranger.fingerprint in str(exc)
            revoke_node(coordinator, ids["bank_a"])
            deadline = time.monotonic() + 30
            while a.is_running() and time.monotonic() < deadline:
                time.sleep(0.2)
            checks["revoked node leaves"] = not a.is_running()
            time.sleep(1.5)
        checks["unenrolled logged (coordinator)"] = any(stranger.fingerprint in r for r in watcher.refusals)
        checks["revoked logged (coordinator)"] = any("revoked while connected" in r for r in watcher.refusals)
    return {"survived": all(checks.values()), "details": checks}


def fuzz(target: str, seconds: int) -> Scenario:
    def scenario(tmp: Path) -> dict[str, Any]:
        done = subprocess.run([sys.executable, str(HERE / "fuzz_atheris.py"), target,
                               f"-max_total_time={seconds}", "-seed=1", "-print_final_stats=1"],
                              capture_output=True, text=True, timeout=seconds + 120,
                              env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)), check=False)
        runs = re.search(r"Done (\d+) runs", done.stderr)
        return {"survived": done.returncode == 0, "runs": int(runs.group(1)) if runs else 0,
                "details": f"{runs.group(1) if runs else '?'} inputs in {seconds} s, exit {done.returncode}"
                           + ("" if done.returncode == 0 else f": {done.stderr[-800:]}")}

    scenario.__doc__ = f"atheris coverage-guided fuzzing of the {target} parser for {seconds} s: no crash."
    return scenario


def node_kill_deployed(tmp: Path) -> dict[str, Any]:
    """Deployed (TLS, node auth, secure aggregation): 1 of 4 SuperNodes SIGKILLed mid-round; it rejoins."""
    sys.path.insert(0, str(HERE))
    from load import run_node_fleet  # noqa: PLC0415

    # Killed in round 2 and restarted; round 3 is sampled before it has reconnected, round 4 has it back.
    result = run_node_fleet(tmp, n_nodes=4, rounds=4, kill_fraction=0.25, restart_killed=True)
    ok = result["rounds_completed"] == 4 and result["killed_rejoined"]
    return {"survived": ok, "details": {k: v for k, v in result.items() if k != "round_seconds"}}


def scenarios(quick: bool) -> list[tuple[str, Scenario]]:
    """The scenario list; ``quick`` keeps the fast subset."""
    quick_list: list[tuple[str, Scenario]] = [
        ("key file readable by others", key_permissions),
        ("NaN update", malformed_update("nan")),
        ("byzantine scaled x1e4 vs median", byzantine("scaled", "median")),
        ("fuzz MQTT payloads", fuzz("mqtt", 3)),
        ("fuzz coordinator replies", fuzz("reply", 3)),
    ]
    if quick:
        return quick_list
    return quick_list + [
        ("wrong-shape update", malformed_update("wrong-shape")),
        ("wrong-dtype update", malformed_update("wrong-dtype")),
        ("byzantine scaled vs norm bound", byzantine("scaled", "norm-bound")),
        ("byzantine scaled vs multi-krum", byzantine("scaled", "multi-krum")),
        ("byzantine sign-flipped vs trimmed mean", byzantine("sign-flipped", "trimmed-mean")),
        ("byzantine sign-flipped vs median", byzantine("sign-flipped", "median")),
        ("byzantine sign-flipped vs multi-krum", byzantine("sign-flipped", "multi-krum")),
        ("byzantine random vs median", byzantine("random", "median")),
        ("byzantine random vs trimmed mean", byzantine("random", "trimmed-mean")),
        ("byzantine random vs krum", byzantine("random", "krum")),
        ("byzantine scaled under secure aggregation (client-side clip)", secagg_clip),
        ("fuzz npz loader", fuzz("npz", 15)),
        ("fuzz CSV loader", fuzz("csv", 15)),
        ("fuzz MQTT payloads (long)", fuzz("mqtt", 15)),
        ("fuzz coordinator replies (long)", fuzz("reply", 15)),
        ("fuzz signed bundles", fuzz("bundle", 15)),
        ("coordinator SIGKILL mid-round + resume", coordinator_sigkill),
        ("run store (PostgreSQL) down 5 s mid-run", store_outage),
        ("unenrolled node joins / enrolled node revoked", unenrolled_and_revoked),
        ("SuperNode SIGKILL mid-round, restarted", node_kill_deployed),
    ]


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--only", default=None,
                   help="Re-run the scenarios whose name contains this text; merge into results/faults.json.")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="consortium-faults-") as tmp_dir:
        chosen = [(n, s) for n, s in scenarios(args.quick) if args.only is None or args.only in n]
        for i, (name, scenario) in enumerate(chosen):
            tmp = Path(tmp_dir) / f"s{i}"
            tmp.mkdir()
            t0 = time.perf_counter()
            try:
                outcome = scenario(tmp)
            except Exception as exc:  # noqa: BLE001 - a scenario that raises is a fault not survived
                outcome = {"survived": False, "details": f"{type(exc).__name__}: {exc}",
                           "traceback": traceback.format_exc()[-2000:]}
            outcome = {"fault": name, "expected": (scenario.__doc__ or "").strip(), **outcome,
                       "seconds": round(time.perf_counter() - t0, 2)}
            rows.append(outcome)
            print(f"{'OK  ' if outcome['survived'] else 'FAIL'} {name} ({outcome['seconds']} s): "
                  f"{outcome.get('details', '')}", flush=True)
    if args.only is not None:  # keep the other scenarios' latest results
        previous = json.loads((HERE / "results" / "faults.json").read_text())["scenarios"]
        fresh = {r["fault"]: r for r in rows}
        rows = [fresh.pop(r["fault"], r) for r in previous] + list(fresh.values())
    summary = {"faults_tried": len(rows), "faults_survived": sum(bool(r["survived"]) for r in rows),
               "seconds": round(sum(r["seconds"] for r in rows), 1), "quick": args.quick}
    result = {"summary": summary, "scenarios": rows, "environment": environment()}
    md = [f"# Fault scenarios ({'quick' if args.quick else 'full'} run)", "",
          f"{summary['faults_survived']} of {summary['faults_tried']} faults survived "
          f"in {summary['seconds']} s.", "", "| fault | survived | s | details |", "|---|---|---:|---|"]
    for r in rows:
        details = str(r.get("details", "")).replace("|", "/")[:300]
        md.append(f"| {r['fault']} | {'yes' if r['survived'] else '**no**'} | {r['seconds']} | {details} |")
    write_results("faults" if not args.quick else "faults_quick", result, "\n".join(md) + "\n",
                  json_path=args.json_path)
    if not args.quick:
        update_reliability("faults", result, summary={k: summary[k] for k in ("faults_tried", "faults_survived")})
    print(f"{summary['faults_survived']}/{summary['faults_tried']} faults survived in {summary['seconds']} s")


if __name__ == "__main__":
    main()
