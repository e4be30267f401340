"""Dashboard ingest: alerts/s from Mosquitto into the store and out to a live page, zero loss, p99 latency.

Four processes share the machine, as the issue asks (publisher, broker, dashboard
and client together on 2 cores):

publisher   paho, QoS 1, one :class:`~consortium.edge.messages.Alert` per MQTT message, paced
            at the target rate; ``ts`` is the publish time.
broker      the shared Mosquitto at 127.0.0.1:1883 (stock configuration).
dashboard   :func:`consortium.dashboard.server.start_dashboard` in this process: ingest
            (parse → batch INSERT ... ON CONFLICT DO NOTHING → ack) and the SSE stream.
client      a separate process reading ``/api/stream`` like the page does; latency is
            (time the alert arrives at the client) − (its publish time).

Every alert has a fresh ``msg_id``; loss is checked twice: distinct alerts in the
store and distinct alerts received by the client must both equal alerts published.
Baseline in the same run: the same publisher with a bare paho subscriber (no store,
no HTTP) gives the broker's own publish→subscriber latency at the same rate.

    python benchmarks/dashboard_ingest.py            # rates 1000, 2000, 3000 alerts/s, 20 s each
    python benchmarks/dashboard_ingest.py --quick    # 2000 alerts/s for 4 s
    python benchmarks/dashboard_ingest.py --store postgresql+psycopg://root@127.0.0.1:5432/test
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, environment, parser, write_results  # noqa: E402

BROKER_HOST, BROKER_PORT = "127.0.0.1", 1883
TARGET_RATE = 2000
TARGET_P99_MS = 250.0


# --------------------------------------------------------------------------- child roles


def role_publisher(institution: str, n: int, rate: float, out: str) -> None:
    """Publish ``n`` alerts at ``rate``/s (QoS 1) and report the achieved rate."""
    import paho.mqtt.client as mqtt  # noqa: PLC0415
    from paho.mqtt.enums import CallbackAPIVersion  # noqa: PLC0415

    from consortium.edge.messages import Alert, agent_topic, make_msg_id  # noqa: PLC0415

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{uuid.uuid4().hex[:8]}",
                         protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect(BROKER_HOST, BROKER_PORT)
    client.loop_start()
    topic = agent_topic(institution, "bench", "alerts")
    infos = []
    t0 = time.time()
    for i in range(n):
        delay = t0 + i / rate - time.time()
        if delay > 0:
            time.sleep(delay)
        alert = Alert(make_msg_id(institution, "bench", i), institution, "bench", f"tx-{i}", 0.99, 0.5, "bench-v1",
                      time.time())
        infos.append(client.publish(topic, alert.to_json(), qos=1))
    t1 = time.time()
    for info in infos:
        info.wait_for_publish(60)
    acked = sum(info.is_published() for info in infos)
    client.disconnect()
    client.loop_stop()
    Path(out).write_text(json.dumps({"published": n, "acked": acked, "seconds": t1 - t0, "rate": n / (t1 - t0)}))


def role_sse_client(url: str, institution: str, n: int, timeout: float, out: str) -> None:
    """Read the dashboard's event stream until ``n`` alerts of ``institution`` arrived (or timeout)."""
    import httpx  # noqa: PLC0415

    latencies: list[float] = []
    seen: set[str] = set()
    deadline = time.time() + timeout
    with httpx.Client(timeout=httpx.Timeout(timeout, connect=10)) as client, \
            client.stream("GET", url + "api/stream") as response:
        Path(out + ".ready").write_text("1")
        event = ""
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "alerts":
                now = time.time()
                for alert in json.loads(line[6:]):
                    if alert["institution"] == institution and alert["msg_id"] not in seen:
                        seen.add(alert["msg_id"])
                        latencies.append(now - alert["ts"])
            if len(seen) >= n or time.time() > deadline:
                break
    Path(out).write_text(json.dumps({"received": len(seen), "latencies": latencies}))


def role_mqtt_client(institution: str, n: int, timeout: float, out: str) -> None:
    """Baseline: a bare paho subscriber (QoS 1), publish→receive latency without store or HTTP."""
    import threading  # noqa: PLC0415

    import paho.mqtt.client as mqtt  # noqa: PLC0415
    from paho.mqtt.enums import CallbackAPIVersion  # noqa: PLC0415

    latencies: list[float] = []
    seen: set[str] = set()
    done, subscribed = threading.Event(), threading.Event()

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        alert = json.loads(msg.payload)
        if alert["msg_id"] not in seen:
            seen.add(alert["msg_id"])
            latencies.append(time.time() - alert["ts"])
        if len(seen) >= n:
            done.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-sub-{uuid.uuid4().hex[:8]}",
                         protocol=mqtt.MQTTv5)
    client.on_message = on_message
    client.on_connect = lambda c, *_: c.subscribe(f"consortium/{institution}/+/alerts", qos=1)
    client.on_subscribe = lambda *_: subscribed.set()
    client.connect(BROKER_HOST, BROKER_PORT)
    client.loop_start()
    subscribed.wait(10)
    Path(out + ".ready").write_text("1")
    done.wait(timeout)
    client.disconnect()
    client.loop_stop()
    Path(out).write_text(json.dumps({"received": len(seen), "latencies": latencies}))


# --------------------------------------------------------------------------- orchestration


def _spawn(*args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                                         os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, __file__, "--role", *args], env=env)


def _wait_file(path: Path, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if time.time() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.05)


def _latency_stats(latencies: list[float]) -> dict[str, float | None]:
    if not latencies:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    a = np.asarray(latencies) * 1000
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "max_ms": float(a.max())}


def run_rate(rate: float, seconds: float, *, store_url: str | None, work: Path) -> dict[str, Any]:
    """One dashboard phase and one baseline phase at ``rate`` alerts/s."""
    from consortium.dashboard.ingest import count_stored_alerts  # noqa: PLC0415
    from consortium.dashboard.server import start_dashboard  # noqa: PLC0415

    n = int(rate * seconds)
    timeout = seconds + 60
    institution = f"bench-{uuid.uuid4().hex[:8]}"
    url = store_url or f"sqlite:///{work / f'dash-{institution}.db'}"
    schema = None
    if url.startswith("postgresql"):
        schema = f"bench_{uuid.uuid4().hex[:12]}"
        _pg_schema(url, schema, create=True)
    handle = start_dashboard(url, broker_url=f"mqtt://{BROKER_HOST}:{BROKER_PORT}", port=0, store_schema=schema,
                             mqtt_client_id=f"bench-dash-{institution}")
    try:
        client_out = work / f"client-{institution}.json"
        client = _spawn("sse-client", handle.url, institution, str(n), str(timeout), str(client_out))
        _wait_file(Path(str(client_out) + ".ready"))
        time.sleep(0.5)
        pub_out = work / f"pub-{institution}.json"
        t0 = time.time()
        _spawn("publisher", institution, str(n), str(rate), str(pub_out)).wait()
        client.wait(timeout)
        t_end = time.time()
        assert handle.ingestor is not None
        handle.ingestor.wait_idle(30)
        stored = count_stored_alerts(handle.store, institution=institution)
        stats = handle.ingestor.stats()
    finally:
        handle.stop()
        if schema is not None:
            _pg_schema(url, schema, create=False)
    pub = json.loads(pub_out.read_text())
    got = json.loads(client_out.read_text())
    lat = got["latencies"]
    # Sustained rate: alerts that reached the page per second, from the first publish to the last arrival.
    last_arrival = t0 + pub["seconds"] + (max(lat) if lat else 0.0)
    dashboard = {
        "target_rate": rate,
        "alerts_published": n,
        "alerts_acked_by_broker": pub["acked"],
        "publish_rate": pub["rate"],
        "alerts_stored": stored,
        "alerts_received_by_client": got["received"],
        "lost": n - min(stored, got["received"]),
        "alerts_per_s": got["received"] / max(last_arrival - t0, 1e-9),
        "ingest_batches": stats.batches,
        "mean_batch": stats.received / max(stats.batches, 1),
        "wall_s": t_end - t0,
        **{f"push_latency_{k}": v for k, v in _latency_stats(lat).items()},
    }

    base_out = work / f"base-{institution}.json"
    sub = _spawn("mqtt-client", institution + "b", str(n), str(timeout), str(base_out))
    _wait_file(Path(str(base_out) + ".ready"))
    _spawn("publisher", institution + "b", str(n), str(rate), str(work / f"pubb-{institution}.json")).wait()
    sub.wait(timeout)
    base = json.loads(base_out.read_text())
    baseline = {"received": base["received"], **{f"mqtt_latency_{k}": v for k, v in
                                                 _latency_stats(base["latencies"]).items()}}
    return {"dashboard": dashboard, "baseline_bare_subscriber": baseline}


def _pg_schema(url: str, schema: str, *, create: bool) -> None:
    import psycopg  # noqa: PLC0415
    from sqlalchemy.engine import make_url  # noqa: PLC0415

    conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}" if create else f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rates = [r["dashboard"]["target_rate"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(rates, [r["dashboard"]["push_latency_p99_ms"] or np.nan for r in rows], "o-", label="dashboard p99")
    ax.plot(rates, [r["dashboard"]["push_latency_p50_ms"] or np.nan for r in rows], "o--", label="dashboard p50")
    ax.plot(rates, [r["baseline_bare_subscriber"]["mqtt_latency_p99_ms"] or np.nan for r in rows], "s:",
            label="bare MQTT subscriber p99")
    ax.axhline(TARGET_P99_MS, color="red", lw=0.8, ls="--", label="target p99")
    ax.set_xlabel("alerts/s published (QoS 1, one per message)")
    ax.set_ylabel("publish → page latency (ms)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("Dashboard ingest on 2 cores (publisher, broker, dashboard, client)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--store", default=None, help="Store URL (default: a fresh SQLite file per rate).")
    p.add_argument("--role", nargs="+", help=argparse_hidden())
    args = p.parse_args()
    if args.role:
        role, *rest = args.role
        {"publisher": lambda: role_publisher(rest[0], int(rest[1]), float(rest[2]), rest[3]),
         "sse-client": lambda: role_sse_client(rest[0], rest[1], int(rest[2]), float(rest[3]), rest[4]),
         "mqtt-client": lambda: role_mqtt_client(rest[0], int(rest[1]), float(rest[2]), rest[3])}[role]()
        return
    rates, seconds = ([TARGET_RATE], 4.0) if args.quick else ([1000, 2000, 3000], 20.0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rate in rates:
            row = run_rate(rate, seconds, store_url=args.store, work=Path(tmp))
            print(json.dumps(row, indent=1), flush=True)
            rows.append(row)
    at_target = next(r for r in rows if r["dashboard"]["target_rate"] == TARGET_RATE)["dashboard"]
    summary = {
        "alerts_published": at_target["alerts_published"],
        "alerts_stored": at_target["alerts_stored"],
        "alerts_received_by_client": at_target["alerts_received_by_client"],
        "alerts_per_s": at_target["alerts_per_s"],
        "push_latency_p50_ms": at_target["push_latency_p50_ms"],
        "push_latency_p99_ms": at_target["push_latency_p99_ms"],
        "lost": at_target["lost"],
        "target_met": bool(at_target["lost"] == 0 and at_target["alerts_per_s"] >= 0.97 * TARGET_RATE
                           and (at_target["push_latency_p99_ms"] or 1e9) < TARGET_P99_MS),
        "load_average_1m": os.getloadavg()[0],
    }
    result = {"summary": summary, "rates": rows, "quick": args.quick, "store": args.store or "sqlite",
              "environment": environment()}
    lines = ["# Dashboard ingest (Mosquitto → store → SSE client)", "",
             f"Target: ≥ {TARGET_RATE} alerts/s, zero loss, p99 < {TARGET_P99_MS:.0f} ms. "
             f"Store: {result['store']}. Load average at the end: {summary['load_average_1m']:.1f} (2 cores).", "",
             "| rate/s | published | stored | at client | lost | sustained/s | p50 ms | p99 ms | bare MQTT p99 ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d, b = r["dashboard"], r["baseline_bare_subscriber"]
        lines.append(f"| {d['target_rate']} | {d['alerts_published']} | {d['alerts_stored']} | "
                     f"{d['alerts_received_by_client']} | {d['lost']} | {d['alerts_per_s']:.0f} | "
                     f"{_f(d['push_latency_p50_ms'])} | {_f(d['push_latency_p99_ms'])} | "
                     f"{_f(b['mqtt_latency_p99_ms'])} |")
    lines += ["", f"Target met at {TARGET_RATE}/s: **{summary['target_met']}**", ""]
    if not args.quick:
        _plot(rows, RESULTS_DIR / "dashboard_ingest.png")
        lines.append("![latency](dashboard_ingest.png)")
    write_results("dashboard_ingest" + ("_quick" if args.quick else ""), result, "\n".join(lines) + "\n",
                  json_path=args.json_path)
    print(json.dumps(summary, indent=1))


def _f(x: float | None) -> str:
    return "–" if x is None else f"{x:.0f}"


def argparse_hidden() -> str:
    import argparse  # noqa: PLC0415

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
