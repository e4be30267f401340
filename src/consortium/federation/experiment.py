"""Federated training next to its baselines, on the same split: one comparable result.

Used by ``consortium simulate``, ``consortium demo`` and the benchmarks, so that
every table in the project is produced by the same code path.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from consortium.data import FederatedSplit
from consortium.federation.baselines import BaselineResult, centralized, local_only, mean_metric
from consortium.federation.config import FederationConfig
from consortium.federation.coordinator import RoundCallback, RunResult
from consortium.federation.simulation import simulate
from consortium.registry import RunStore

logger = logging.getLogger(__name__)

HEADLINE = ("auprc", "roc_auc", "recall_at_1pct_fpr")


@dataclass(frozen=True)
class ExperimentResult:
    """Federated run plus local-only and centralized baselines on one split."""

    run: RunResult
    local: tuple[BaselineResult, ...]
    central: BaselineResult | None
    dataset: str
    config: FederationConfig
    extra: dict[str, Any] = field(default_factory=dict)

    def federated_metrics(self) -> dict[str, float]:
        """Holdout metrics of the kept global model (the round with the best validation AUPRC)."""
        last = self.run.selected.global_metrics
        return {
            "auprc": last.get("auprc", math.nan),
            "roc_auc": last.get("roc-auc", math.nan),
            "recall_at_1pct_fpr": last.get("recall-at-1pct-fpr", math.nan),
        }

    def summary(self) -> dict[str, float]:
        """Headline numbers: federated vs. centralized vs. mean local-only AUPRC."""
        fed = self.federated_metrics()
        out = {
            "federated_auprc": fed["auprc"],
            "federated_roc_auc": fed["roc_auc"],
            "federated_recall_at_1pct_fpr": fed["recall_at_1pct_fpr"],
            "local_only_auprc_mean": mean_metric(list(self.local), "auprc"),
            "local_only_roc_auc_mean": mean_metric(list(self.local), "roc_auc"),
        }
        if self.central is not None:
            out["centralized_auprc"] = self.central.metrics.auprc
            out["centralized_roc_auc"] = self.central.metrics.roc_auc
            out["centralized_recall_at_1pct_fpr"] = self.central.metrics.recall_at_1pct_fpr
        return out

    def table_rows(self) -> list[dict[str, Any]]:
        """One row per model: local-only (each institution), federated, centralized."""
        rows: list[dict[str, Any]] = []
        for r in self.local:
            rows.append({"model": f"local-only {r.institution}", **{k: getattr(r.metrics, k) for k in HEADLINE}})
        rows.append({"model": "federated", **self.federated_metrics()})
        if self.central is not None:
            rows.append({"model": "centralized", **{k: getattr(self.central.metrics, k) for k in HEADLINE}})
        return rows

    def curve(self) -> list[dict[str, float]]:
        """Per-round holdout metrics of the global model."""
        return [
            {"round": r.round, "auprc": r.global_metrics.get("auprc", math.nan),
             "roc_auc": r.global_metrics.get("roc-auc", math.nan),
             "val_auprc": r.global_metrics.get("val-auprc", math.nan), "seconds": r.seconds}
            for r in self.run.rounds
        ]

    def to_json(self) -> dict[str, Any]:
        """Everything, JSON-ready (NaN becomes null)."""
        return _json_safe(
            {
                "dataset": self.dataset,
                "run_id": self.run.run_id,
                "selected_round": self.run.selected_round,
                "institutions": list(self.run.institutions),
                "config": {k: v for k, v in self.config.to_run_config().items() if k != "store-url"},
                "summary": self.summary(),
                # (ε, δ), mechanism and parameters of the released model (None: trained without DP).
                "privacy": self.run.extra.get("privacy"),
                "table": self.table_rows(),
                "rounds": self.curve(),
                "per_institution": [
                    {"round": r.round, "institution": k, **v}
                    for r in self.run.rounds
                    for k, v in r.institution_metrics.items()
                ],
                **self.extra,
            }
        )


def run_experiment(
    split: FederatedSplit,
    config: FederationConfig,
    *,
    work_dir: str | Path,
    dataset_name: str,
    store: RunStore | None = None,
    on_round: RoundCallback | None = None,
    baselines: bool = True,
) -> ExperimentResult:
    """Federated training in simulation, then local-only and centralized baselines."""
    run = simulate(split, config, work_dir=work_dir, store=store, on_round=on_round)
    local: list[BaselineResult] = []
    central = None
    if baselines:
        local = local_only(split, config)
        central = centralized(split, config)
        if store is not None:
            for b in [*local, central]:
                store.record_baseline(run.run_id, kind=b.kind, institution=b.institution, metrics=b.metrics.as_dict())
    return ExperimentResult(run=run, local=tuple(local), central=central, dataset=dataset_name, config=config)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if hasattr(obj, "item"):
        return _json_safe(obj.item())
    return obj


def dump_json(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` as indented JSON (NaN as null)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(_json_safe(obj), indent=2))
    return p
