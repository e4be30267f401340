"""The ``consortium`` command: complete help, clear errors, demo JSON contract."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from click.testing import CliRunner

import consortium
from consortium.cli import main

SUBCOMMANDS = [
    [], ["demo"], ["simulate"], ["data"], ["data", "generate"], ["data", "split"], ["certs"],
    ["coordinator"], ["node"], ["runs"], ["runs", "list"], ["runs", "show"],
]


@pytest.mark.parametrize("args", SUBCOMMANDS, ids=lambda a: " ".join(a) or "root")
def test_every_subcommand_has_help(args: list[str]) -> None:
    result = CliRunner().invoke(main, [*args, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    # Every option is documented: no bare option lines without text for commands with options.
    assert len(result.output.splitlines()) > 3


def test_simulate_with_missing_label_column_is_a_one_line_error(tmp_path: Path) -> None:
    csv = tmp_path / "tx.csv"
    csv.write_text("amount,hour,label\n1.0,2,0\n3.0,4,1\n")
    result = CliRunner().invoke(main, ["simulate", "--data", str(csv), "--label-column", "is_fraud"])
    assert result.exit_code == 2
    assert "is_fraud" in result.output and "Traceback" not in result.output


def test_simulate_with_corrupt_npz_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, X=np.zeros((10, 3)))  # no y
    result = CliRunner().invoke(main, ["simulate", "--data", str(bad)])
    assert result.exit_code == 2
    assert "bad.npz" in result.output and "'y'" in result.output


@pytest.mark.slow
def test_demo_json_has_summary_keys_and_everything_reached_the_dashboard(tmp_path: Path) -> None:
    """One demo run (the Ray start-up dominates): JSON contract, and the live dashboard got rounds, model, alerts.

    The demo's dashboard subscribed (MQTT 5) to the embedded broker the edge agent published
    to (MQTT 3.1.1); its ingest stored the alerts and agent status it received.  A second
    dashboard on the same store then answers the JSON API with what the first one recorded.
    """
    from consortium.dashboard.server import start_dashboard  # noqa: PLC0415

    out = tmp_path / "demo"
    # A real process, not CliRunner: stdout and stderr are the real streams, and the demo's threads
    # (Ray, uvicorn, MQTT) cannot outlive CliRunner's swapped streams in this test process.
    src = str(Path(consortium.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, "-m", "consortium.cli", "demo", "--json", "--out", str(out), "--institutions", "3",
         "--transactions", "3000", "--rounds", "2", "--no-secure-aggregation"],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(result.stdout)  # stdout is JSON only; progress and the dashboard URL go to stderr
    summary = payload["summary"]
    for key in ("federated_auprc", "centralized_auprc", "local_only_auprc_mean"):
        assert isinstance(summary[key], float), key
    assert len(payload["rounds"]) == 2
    assert (out / "auprc_per_round.png").stat().st_size > 1000
    edge, dashboard = payload["edge"], payload["dashboard"]
    assert edge["embedded_broker"] and edge["alerts"] > 0
    assert dashboard["alerts_stored"] == dashboard["alerts_sent"] == edge["alerts"]
    assert dashboard["url"].startswith("http://127.0.0.1:") and dashboard["url"] in result.stderr

    board = start_dashboard(f"sqlite:///{out / 'consortium.db'}", port=0, registry_dir=out / "registry")
    try:
        def get(path: str) -> Any:
            response = httpx.get(board.url + path, timeout=10)
            assert response.status_code == 200, (path, response.text)
            return response.json()

        runs = get("api/runs")
        assert [r["rounds_completed"] for r in runs] == [2]
        rounds = get(f"api/runs/{runs[0]['run_id']}/rounds")["rounds"]
        assert [r["round"] for r in rounds] == [1, 2]
        assert all(isinstance(r["global_metrics"]["auprc"], float) for r in rounds)
        models = get("api/models")
        assert edge["model_version"] in json.dumps(models)
        alerts = get("api/alerts?limit=1000")
        assert len(alerts) == edge["alerts"] == len({a["msg_id"] for a in alerts})
        assert {(a["institution"], a["agent"], a["model_version"]) for a in alerts} == {
            ("demo-bank", "demo-agent", edge["model_version"])}
        fleet = get("api/fleet")
        assert [(a["agent"], a["model_version"]) for a in fleet] == [("demo-agent", edge["model_version"])]
    finally:
        board.stop()
