"""Reference points for every federated result: local-only and centralized training.

Both baselines use the same model builder, local training loop, training budget
(``num_rounds * local_epochs`` epochs, with the best epoch chosen on validation
data as the federated run chooses its best round) and metrics as the federated run, and are
evaluated on the same global held-out split, so that "federated vs. local-only
vs. centralized" compares training regimes and nothing else.  The centralized
baseline pools every institution's training rows, which a real consortium
cannot do: it is the upper reference federated learning tries to approach.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from consortium.data import Dataset, FederatedSplit
from consortium.federation.config import FederationConfig
from consortium.models import (
    FeatureStats,
    FraudMetrics,
    TrainConfig,
    balanced_pos_weight,
    build_model,
    choose_threshold,
    evaluate_scores,
    get_parameters,
    predict_scores,
    set_parameters,
    train_local,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaselineResult:
    """Holdout metrics of one baseline model."""

    kind: str
    institution: str | None
    metrics: FraudMetrics


def train_and_evaluate(
    train: Dataset, val: Dataset, holdout: Dataset, config: FederationConfig, *, seed_offset: int = 0,
    patience: int = 5,
) -> FraudMetrics:
    """Train one model on ``train`` the way a federated run would and score ``holdout``.

    Training runs epoch by epoch up to the federated budget (``num_rounds *
    local_epochs`` epochs) and keeps the epoch with the best validation AUPRC
    (early stopping after ``patience`` epochs without improvement), which is the
    same validation-based model selection the federated run applies to its
    rounds. The threshold is chosen on the same validation rows.
    """
    stats = FeatureStats.from_data(train.X, train.y)
    std = stats.standardizer()
    pos_weight = balanced_pos_weight(stats.positive_rate) if config.loss == "weighted_bce" else None
    model = build_model(config.model, train.n_features, hidden=config.hidden, seed=config.seed)
    X_train, X_val = std.transform(train.X), std.transform(val.X)  # noqa: N806
    can_validate = val.n_rows > 0 and 0 < int(val.y.sum()) < val.n_rows
    best_auprc, best_params, since_best = -1.0, get_parameters(model), 0
    for epoch in range(config.num_rounds * config.local_epochs):
        tc = TrainConfig(
            epochs=1,
            batch_size=config.batch_size,
            lr=config.lr,
            optimizer=config.local_optimizer,  # type: ignore[arg-type]
            weight_decay=config.weight_decay,
            loss=config.loss,
            pos_weight=pos_weight,
            focal_gamma=config.focal_gamma,
            seed=config.seed * 100_000 + seed_offset * 1000 + epoch,
        )
        train_local(model, X_train, train.y, config=tc)
        if not can_validate:
            best_params = get_parameters(model)
            continue
        auprc = evaluate_scores(val.y, predict_scores(model, X_val)).auprc
        if auprc > best_auprc:
            best_auprc, best_params, since_best = auprc, get_parameters(model), 0
        else:
            since_best += 1
            if since_best >= patience:
                break
    set_parameters(model, best_params)
    threshold = None
    if can_validate:
        threshold = choose_threshold(val.y, predict_scores(model, X_val), max_fpr=config.max_fpr)
    scores = predict_scores(model, std.transform(holdout.X))
    return evaluate_scores(holdout.y, scores, threshold=threshold)


def local_only(split: FederatedSplit, config: FederationConfig) -> list[BaselineResult]:
    """Each institution alone: trained on its own rows, scored on the global holdout."""
    torch.set_num_threads(1)
    out = []
    for i, inst in enumerate(split.institutions):
        metrics = train_and_evaluate(inst.train, inst.val, split.holdout, config, seed_offset=i + 1)
        out.append(BaselineResult(kind="local_only", institution=inst.name, metrics=metrics))
        logger.info("local-only %s: AUPRC %.4f", inst.name, metrics.auprc)
    return out


def centralized(split: FederatedSplit, config: FederationConfig) -> BaselineResult:
    """All institutions' training rows pooled in one place (the upper reference)."""
    torch.set_num_threads(1)
    metrics = train_and_evaluate(split.pooled_train(), split.pooled_val(), split.holdout, config)
    logger.info("centralized: AUPRC %.4f", metrics.auprc)
    return BaselineResult(kind="centralized", institution=None, metrics=metrics)


def mean_metric(results: list[BaselineResult], name: str) -> float:
    """Mean of one metric over baseline results (NaN-aware)."""
    values = [getattr(r.metrics, name) for r in results]
    return float(np.nanmean(values)) if values else float("nan")

