"""The running server: `consortium dashboard` as a process, and the live stream's replay and per-institution scope."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from consortium.dashboard.schema import AlertRow
from consortium.dashboard.server import start_dashboard
from consortium.registry import RunStore

TOKEN = "server-test-token-0123456789"


def _alerts(store: RunStore, institutions: list[str]) -> None:
    def add(session: object) -> None:
        for i, inst in enumerate(institutions):
            session.add(AlertRow(msg_id=f"{inst}/a/{i}", institution=inst, agent="a",  # type: ignore[attr-defined]
                                 transaction_id=f"tx-{i}", score=0.9, threshold=0.5, model_version="v1", ts=1.0,
                                 received_at=1.0))

    store.run_transaction(add, action="seed")


def _read_events(response: httpx.Response, want: int) -> list[tuple[str, str | None, list[dict[str, object]]]]:
    events: list[tuple[str, str | None, list[dict[str, object]]]] = []
    kind, last_id = "", None
    for line in response.iter_lines():
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("id: "):
            last_id = line[4:]
        elif line.startswith("data: "):
            events.append((kind, last_id, json.loads(line[6:])))
            kind, last_id = "", None
            if len(events) >= want:
                break
    return events


def test_stream_replays_after_last_event_id_and_scopes_institutions(tmp_path: Path) -> None:
    users = tmp_path / "users.json"
    entry = {"name": "a", "institution": "bank-a", "token": "bank-a-token-0123456789"}
    users.write_text(json.dumps({"users": [entry]}))
    with start_dashboard(f"sqlite:///{tmp_path / 'runs.db'}", port=0, auth_token=TOKEN, users_file=users) as board:
        _alerts(board.store, ["bank-a", "bank-b", "bank-a", "bank-a"])  # ids 1..4
        with httpx.Client(base_url=board.url, timeout=10) as client:
            assert client.get("/api/stream").status_code == 401
            headers = {"Authorization": f"Bearer {TOKEN}", "Last-Event-ID": "1"}
            with client.stream("GET", "/api/stream", headers=headers) as response:
                kind, last_id, items = _read_events(response, 1)[0]
            assert (kind, last_id) == ("alerts", "4") and [a["id"] for a in items] == [2, 3, 4]

            # Live: an institution's stream gets only its own institution's items.
            headers = {"Authorization": "Bearer bank-a-token-0123456789"}
            received: list[tuple[str, str | None, list[dict[str, object]]]] = []
            with client.stream("GET", "/api/stream", headers=headers) as response:
                def publish() -> None:
                    while board.hub.subscriber_count < 1:
                        threading.Event().wait(0.02)
                    board.hub.publish("alerts", [{"id": 10, "institution": "bank-b"}], last_id=10)
                    board.hub.publish("fleet", [{"institution": "bank-b", "agent": "x"},
                                                {"institution": "bank-a", "agent": "y"}])
                    board.hub.publish("alerts", [{"id": 11, "institution": "bank-a"}], last_id=11)

                threading.Thread(target=publish, daemon=True).start()
                received = _read_events(response, 2)
            assert received == [("fleet", None, [{"institution": "bank-a", "agent": "y"}]),
                                ("alerts", "11", [{"id": 11, "institution": "bank-a"}])]


def test_dashboard_command_serves_until_sigterm(tmp_path: Path) -> None:
    env = {**os.environ, "CONSORTIUM_DASHBOARD_TOKEN": TOKEN}
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        [sys.executable, "-m", "consortium.cli", "dashboard", "--store", f"sqlite:///{tmp_path / 'runs.db'}",
         "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("Dashboard: http://127.0.0.1:"), line
        url = line.split()[1]
        assert TOKEN not in line
        assert httpx.get(url + "api/me", timeout=10).status_code == 401
        me = httpx.get(url + "api/me", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        assert me.json() == {"user": "operator", "institution": None, "auth": True}
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert TOKEN not in out + err
    finally:
        if proc.poll() is None:
            proc.kill()


def test_bad_options_are_one_line_errors(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "consortium.cli", "dashboard", "--store", f"sqlite:///{tmp_path / 'runs.db'}",
         "--broker", "http://nope:1883", "--port", "0"],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                                          os.environ.get("PYTHONPATH", "")])},
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: The 'broker_url' parameter") and "Traceback" not in result.stderr


@pytest.mark.parametrize("port", [-1, 70000])
def test_port_is_checked(tmp_path: Path, port: int) -> None:
    from consortium.errors import ConfigError  # noqa: PLC0415

    with pytest.raises(ConfigError, match="'port'"):
        start_dashboard(f"sqlite:///{tmp_path / 'runs.db'}", port=port)


def test_demo_dashboard_uses_the_demo_store_and_a_free_port_when_taken(tmp_path: Path) -> None:
    import socket  # noqa: PLC0415

    from consortium.dashboard.server import free_port, start_demo_dashboard  # noqa: PLC0415

    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        board = start_demo_dashboard(tmp_path / "demo", port=port)
        assert board is not None
        try:
            assert board.url.startswith("http://127.0.0.1:") and f":{port}/" not in board.url
            assert str((tmp_path / "demo" / "consortium.db").resolve()) in board.store.url_masked
            assert httpx.get(board.url + "api/runs", timeout=10).json() == []
        finally:
            board.stop()
