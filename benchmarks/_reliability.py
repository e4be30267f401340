"""``benchmarks/results/reliability.{json,md}``: the fault and load numbers side by side.

``faults.py`` and ``load.py`` each update their own section and summary keys, so
either can be re-run alone without losing the other's latest numbers.
"""

from __future__ import annotations

import json
from typing import Any

from _common import RESULTS_DIR, environment, json_safe

SUMMARY_KEYS = ("faults_tried", "faults_survived", "alerts_sent", "alerts_stored", "alerts_lost", "alerts_per_s",
                "alert_latency_p99_ms", "node_rounds_completed", "nodes_started", "nodes_killed",
                "node_round_seconds_mean", "coordinator_peak_rss_mb")


def update_reliability(section: str, result: dict[str, Any], *, summary: dict[str, Any]) -> None:
    """Put ``result`` under ``section`` and ``summary`` into the shared summary; rewrite both files."""
    path = RESULTS_DIR / "reliability.json"
    data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    data.setdefault("summary", {}).update(summary)
    data[section] = result
    data["environment"] = environment()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(data), indent=2))
    lines = ["# Reliability: faults survived and load", "",
             "Written by `benchmarks/faults.py` and `benchmarks/load.py` (latest full runs); details in",
             "`faults.md` and `load.md` beside this file, scenarios in `docs/reliability.md`.", "",
             "| key | value |", "|---|---:|"]
    for key in SUMMARY_KEYS:
        if key in data["summary"]:
            lines.append(f"| {key} | {data['summary'][key]} |")
    (RESULTS_DIR / "reliability.md").write_text("\n".join(lines) + "\n")
