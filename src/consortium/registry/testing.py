"""Test helpers: a finished run recorded exactly as the coordinator records one, without training.

Lets registry, edge and dashboard tests publish real bundles in milliseconds
instead of running a federated simulation.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import numpy as np

from consortium.models import FeatureStats, build_model, get_parameters
from consortium.registry.store import RoundRecord, RunStore

__all__ = ["FEATURES", "record_run"]

FEATURES: tuple[str, ...] = ("amount", "hour", "merchant_risk", "velocity")


def record_run(
    store: RunStore,
    *,
    kind: str = "mlp",
    rounds: int = 3,
    selected: int = 2,
    features: Sequence[str] = FEATURES,
    seed: int = 0,
) -> tuple[str, np.ndarray]:
    """Record a completed run with ``rounds`` checkpoints in the coordinator's layout.

    Round ``r`` has validation AUPRC ``0.1 r``, holdout AUPRC ``0.2 r``, a NaN ROC-AUC
    and threshold ``0.25 + r / 100``; the run's final message selects round
    ``selected``.  Returns the run id and the raw rows the standardiser was fitted on.
    """
    rng = np.random.default_rng(seed)
    d = len(features)
    scale = np.geomspace(1.0, 100.0, d)
    X = (rng.standard_normal((500, d)) * scale + scale).astype(np.float32)
    std = FeatureStats.from_data(X).standardizer()
    hidden = [8, 4] if kind == "mlp" else [3, 2]
    run_id = store.create_run(name="simulate-synthetic", config={"model": kind}, institutions=["a", "b"])
    for rnd in range(1, rounds + 1):
        params = get_parameters(build_model(kind, d, hidden=hidden, seed=seed * 1000 + rnd))
        now = datetime.now(UTC)
        store.record_round(
            run_id,
            RoundRecord(
                round=rnd, started_at=now, finished_at=now, participants=("a", "b"),
                global_metrics={"val-auprc": 0.1 * rnd, "auprc": 0.2 * rnd, "roc-auc": float("nan"),
                                "threshold": 0.3, "seconds": 1.0},
            ),
            checkpoint=[*params, std.mean, std.std],
            checkpoint_extra={"n_params": len(params), "threshold": 0.25 + rnd / 100, "model": kind,
                              "hidden": hidden, "feature_names": list(features), "optimizer": "fedavg"},
        )
    store.finish_run(run_id, status="completed", message=f"selected round {selected} (best validation AUPRC)")
    return run_id, X
