"""End to end in headless Chromium: run store + dashboard + the real edge agent on the shared Mosquitto.

Chromium is Debian's /usr/bin/chromium (``make test`` / ``.ci/run`` install it with
apt-get); Playwright only drives it, it never downloads a browser.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from consortium.dashboard.server import DashboardHandle, start_dashboard
from consortium.edge.agent import EdgeAgent
from consortium.edge.model import ActiveModel
from consortium.edge.publisher import MqttPublisher
from consortium.edge.testing import feature_names, mlp_onnx, mlp_weights, signed_bundle
from consortium.registry import RoundRecord, RunStore
from consortium.registry.bundle import read_bundle
from consortium.registry.signing import generate_signing_key, load_private_key, load_public_key

pytestmark = pytest.mark.slow

BROKER = "mqtt://127.0.0.1:1883"
CHROMIUM = Path("/usr/bin/chromium")
TOKEN = "browser-test-token-0123456789"
ROUNDS = 4
D = 6


def _seed_run(url: str) -> None:
    with RunStore(url) as store:
        run_id = store.create_run(name="browser-test", config={}, institutions=["bank-x", "bank-y"])
        t = datetime.now(UTC)
        for r in range(1, ROUNDS + 1):
            store.record_round(run_id, RoundRecord(
                round=r, started_at=t, finished_at=t + timedelta(seconds=1), participants=("bank-x", "bank-y"),
                global_metrics={"auprc": 0.4 + r / 20, "roc-auc": 0.9, "recall-at-1pct-fpr": 0.3 + r / 40},
            ))
        store.record_baseline(run_id, kind="centralized", institution=None, metrics={"auprc": 0.7})
        store.record_baseline(run_id, kind="local_only", institution="bank-x", metrics={"auprc": 0.45})


@pytest.fixture
def dashboard(tmp_path: Path) -> Iterator[DashboardHandle]:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    _seed_run(url)
    handle = start_dashboard(url, broker_url=BROKER, port=0, auth_token=TOKEN)
    yield handle
    handle.stop()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[EdgeAgent]:
    key = generate_signing_key(tmp_path / "coord.key")
    sk, pk = load_private_key(key), load_public_key(Path(f"{key}.pub"))
    data = signed_bundle(mlp_onnx(mlp_weights(D, (8,), seed=1)), version="v-browser-1", private_key=sk,
                         names=feature_names(D), threshold=1e-6)  # every transaction alerts
    institution = f"bank-{uuid.uuid4().hex[:8]}"
    publisher = MqttPublisher(BROKER, institution=institution, agent="agent-1",
                              outbox_path=tmp_path / "outbox.db").start()
    edge = EdgeAgent(ActiveModel.from_bundle(read_bundle(data, public_key=pk)), institution=institution,
                     agent="agent-1", publisher=publisher, telemetry_interval=60, public_key=pk).start()
    yield edge
    edge.stop()
    publisher.stop()


def _row(i: int) -> dict[str, Any]:
    x = np.random.default_rng(i).normal(size=D)
    return {"transaction_id": f"tx-browser-{i}", **{n: float(v) for n, v in zip(feature_names(D), x, strict=True)}}


def test_live_page_in_chromium(dashboard: DashboardHandle, agent: EdgeAgent, tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.fail("Debian's chromium is missing at /usr/bin/chromium: apt-get install -y chromium "
                    "(make test and .ci/run do this)", pytrace=False)
    from playwright.sync_api import sync_playwright  # noqa: PLC0415

    agent.score_row(_row(0))
    agent.emit_telemetry()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(dashboard.url)
            assert page.locator("input[name=token]").count() == 1  # authentication is on: login first
            page.fill("input[name=token]", TOKEN)
            page.click("button[type=submit]")
            page.wait_for_selector("body[data-ready='1']", timeout=15_000)

            # Fleet: the agent with its model version (online status + telemetry went through MQTT).
            fleet_row = page.locator(f"#fleet-table tr[data-agent='{agent.institution}/agent-1']")
            fleet_row.wait_for(timeout=10_000)
            page.wait_for_function(
                "sel => { const r = document.querySelector(sel); return r && r.textContent.includes('online'); }",
                arg=f"#fleet-table tr[data-agent='{agent.institution}/agent-1']", timeout=10_000)
            assert "v-browser-1" in fleet_row.inner_text()

            # AUPRC plot: one point per recorded round, baselines as reference lines.
            points = page.locator("#plot-auprc g[data-series='global'] circle")
            assert points.count() == ROUNDS
            assert [float(points.nth(i).get_attribute("data-x") or 0) for i in range(ROUNDS)] == [1, 2, 3, 4]
            assert page.locator("#plot-auprc g[data-ref='centralized']").count() == 1

            # A transaction scored at the edge appears as an alert row within 2 s.
            page.wait_for_selector("#alert-table tr[data-transaction='tx-browser-0']", timeout=5_000)
            t0 = time.monotonic()
            agent.score_row(_row(1))
            page.wait_for_selector("#alert-table tr[data-transaction='tx-browser-1']", timeout=2_000)
            elapsed = time.monotonic() - t0
            assert elapsed < 2.0
            row_text = page.locator("#alert-table tr[data-transaction='tx-browser-1']").inner_text()
            assert agent.institution in row_text and "v-browser-1" in row_text

            # Filter by institution: only that institution's rows remain.
            page.select_option("#alert-institution", agent.institution)
            page.wait_for_timeout(300)
            institutions = page.locator("#alert-table tbody tr td:nth-child(2)").all_inner_texts()
            assert institutions and set(institutions) == {agent.institution}

            page.screenshot(path=str(tmp_path / "dashboard.png"))
            assert (tmp_path / "dashboard.png").stat().st_size > 10_000
            assert TOKEN not in page.content()
            assert not errors, errors
        finally:
            browser.close()
