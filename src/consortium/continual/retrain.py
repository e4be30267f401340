"""Drift-triggered federated retraining from the current global model, without forgetting.

When the trigger (:mod:`consortium.continual.trigger`) confirms drift at enough
institutions, a new *round set* starts from the deployed global model — not from
scratch — so what the consortium knew is the starting point.  Two measures keep
it from forgetting earlier fraud while it learns the new pattern:

* **rehearsal**: each institution adds its local :class:`RehearsalBuffer` of
  earlier fraud (and some legitimate rows) to its recent rows;
* **a proximal term toward the previous model**: ``mu / 2 * ||w - w_prev||^2``
  in every local step (the FedProx term of :func:`consortium.models.train_local`,
  anchored at the deployed model rather than at each round's global model).

:func:`federated_retrain` runs the rounds in-process with the same local
training function as the Flower client (FedAvg of the example-weighted deltas),
which is what the benchmark uses; a deployed coordinator starts the same round
set through :class:`~consortium.federation.coordinator.Coordinator` with
``initial_parameters`` and ``initial_standardizer``.  The threshold is chosen the
coordinator's way: from the sum of the institutions' validation-score histograms.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from consortium.continual.rehearsal import RehearsalBuffer
from consortium.errors import ConfigError, param_error
from consortium.federation.thresholds import (
    auprc_from_histograms,
    from_unit_interval,
    score_histograms,
    threshold_from_histograms,
    to_unit_interval,
)
from consortium.models import (
    Standardizer,
    TrainConfig,
    balanced_pos_weight,
    build_model,
    get_parameters,
    predict_scores,
    set_parameters,
    train_local,
)

logger = logging.getLogger(__name__)

HISTOGRAM_BINS = 1000


@dataclass(frozen=True)
class GlobalModel:
    """A deployed global model: weights, the standardisation it expects, and its threshold."""

    params: list[np.ndarray]
    standardizer: Standardizer
    threshold: float
    kind: str = "mlp"
    hidden: tuple[int, ...] = (64, 32)
    version: str = "1"

    def build(self) -> torch.nn.Module:
        """A model holding these weights."""
        model = build_model(self.kind, self.standardizer.n_features, hidden=self.hidden)
        set_parameters(model, self.params)
        return model

    def scores(self, X: np.ndarray) -> np.ndarray:
        """Scores of raw feature rows."""
        return predict_scores(self.build(), self.standardizer.transform(X))


@dataclass(frozen=True)
class LocalData:
    """One institution's rows for a round set: recent training rows and validation rows (raw features)."""

    X: np.ndarray
    y: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    rehearsal: RehearsalBuffer | None = None


@dataclass(frozen=True)
class RetrainConfig:
    """Options of one retraining round set.

    Attributes
    ----------
    rounds : int
        Federated rounds.
    local_epochs, batch_size, lr :
        Local training options.
    proximal_mu : float
        Weight of the proximal term toward the *previous* model (0 disables it).
    rehearsal : bool
        Mix each institution's rehearsal buffer into its local rows.
    max_fpr : float
        False-positive rate at which the new threshold is set.
    seed : int
        Seed of local training.
    """

    rounds: int = 5
    local_epochs: int = 1
    batch_size: int = 256
    lr: float = 1e-3
    proximal_mu: float = 0.1
    rehearsal: bool = True
    max_fpr: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        owner = "RetrainConfig"
        for name in ("rounds", "local_epochs", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise param_error(name, owner, "an int >= 1", v)
        if not isinstance(self.lr, int | float) or not self.lr > 0:
            raise param_error("lr", owner, "a float > 0", self.lr)
        if not isinstance(self.proximal_mu, int | float) or self.proximal_mu < 0:
            raise param_error("proximal_mu", owner, "a float >= 0", self.proximal_mu)
        if not 0 < self.max_fpr < 1:
            raise param_error("max_fpr", owner, "a float in (0, 1)", self.max_fpr)

    def without_anti_forgetting(self) -> RetrainConfig:
        """The same round set with neither rehearsal nor the proximal term (the ablation)."""
        return replace(self, proximal_mu=0.0, rehearsal=False)


@dataclass(frozen=True)
class RetrainResult:
    """The new global model and how it was reached."""

    model: GlobalModel
    rounds: int
    val_auprc: list[float] = field(default_factory=list)
    examples: dict[str, int] = field(default_factory=dict)


def _training_rows(data: LocalData, use_rehearsal: bool) -> tuple[np.ndarray, np.ndarray]:
    X, y = np.asarray(data.X, dtype=np.float32), np.asarray(data.y, dtype=np.int64)
    if use_rehearsal and data.rehearsal is not None and len(data.rehearsal):
        Xr, yr = data.rehearsal.sample()
        X, y = np.vstack([X, Xr]), np.r_[y, yr]
    return X, y


def federated_retrain(
    institutions: Mapping[str, LocalData],
    *,
    start: GlobalModel,
    config: RetrainConfig,
    version: str,
    on_round: Callable[[int, float], None] | None = None,
) -> RetrainResult:
    """Run a FedAvg round set from ``start`` over the institutions' local rows.

    Every round each institution trains a copy of the global model on its rows
    (plus its rehearsal buffer), the example-weighted mean delta moves the
    global model, and the summed validation histograms give the validation
    AUPRC; the best round is kept and its threshold set at ``config.max_fpr``.
    The standardisation of ``start`` is kept (the weights were learned on it).

    Raises
    ------
    ConfigError
        No institution, or none with any fraud row to learn from.
    """
    if not institutions:
        raise param_error("institutions", "federated_retrain", "a non-empty mapping", dict(institutions))
    torch.set_num_threads(1)
    rows = {name: _training_rows(d, config.rehearsal) for name, d in institutions.items()}
    positives = sum(int(y.sum()) for _, y in rows.values())
    total = sum(y.size for _, y in rows.values())
    if positives == 0:
        raise ConfigError("federated_retrain: no institution holds a fraud row; there is nothing to learn from.")
    pos_weight = balanced_pos_weight(positives / total)
    std = start.standardizer
    prev = [p.copy() for p in start.params]
    params = [p.copy() for p in start.params]
    best: tuple[float, int, list[np.ndarray], float] = (-1.0, 0, params, start.threshold)
    history = []
    for rnd in range(1, config.rounds + 1):
        deltas, weights = [], []
        for i, (name, (X, y)) in enumerate(rows.items()):
            model = replace(start, params=params).build()
            tc = TrainConfig(epochs=config.local_epochs, batch_size=config.batch_size, lr=config.lr,
                             pos_weight=pos_weight, proximal_mu=config.proximal_mu,
                             seed=config.seed * 100_000 + rnd * 100 + i)
            res = train_local(model, std.transform(X), y, config=tc,
                              global_params=prev if config.proximal_mu > 0 else None)
            deltas.append([lp - gp for lp, gp in zip(get_parameters(model), params, strict=True)])
            weights.append(res.num_examples)
            logger.debug("round %d %s: %d rows, loss %.4f", rnd, name, res.num_examples, res.mean_loss)
        w = np.asarray(weights, dtype=np.float64) / float(sum(weights))
        params = [p + sum(wi * d[k] for wi, d in zip(w, deltas, strict=True)).astype(p.dtype)
                  for k, p in enumerate(params)]
        neg = np.zeros(HISTOGRAM_BINS)
        pos = np.zeros(HISTOGRAM_BINS)
        model = replace(start, params=params).build()
        for d in institutions.values():
            if d.y_val.size == 0:
                continue
            s = predict_scores(model, std.transform(np.asarray(d.X_val, dtype=np.float32)))
            n_, p_ = score_histograms(to_unit_interval(s, kind=start.kind), np.asarray(d.y_val), bins=HISTOGRAM_BINS)
            neg += n_
            pos += p_
        val_auprc = auprc_from_histograms(neg, pos)
        history.append(val_auprc)
        choice = threshold_from_histograms(neg, pos, max_fpr=config.max_fpr) if pos.sum() and neg.sum() else None
        threshold = from_unit_interval(choice.unit_threshold, kind=start.kind) if choice else start.threshold
        if not val_auprc <= best[0]:
            best = (val_auprc if math.isfinite(val_auprc) else -1.0, rnd, params, threshold)
        if on_round is not None:
            on_round(rnd, val_auprc)
        logger.info("retraining round %d/%d: validation AUPRC %.4f", rnd, config.rounds, val_auprc)
    _, rnd_kept, kept, threshold = best
    new = GlobalModel(params=kept, standardizer=std, threshold=threshold, kind=start.kind, hidden=start.hidden,
                      version=version)
    return RetrainResult(model=new, rounds=rnd_kept, val_auprc=history,
                         examples={n: int(y.size) for n, (_, y) in rows.items()})


def initial_training(
    institutions: Mapping[str, LocalData],
    *,
    standardizer: Standardizer,
    config: RetrainConfig,
    kind: str = "mlp",
    hidden: Sequence[int] = (64, 32),
    seed: int = 0,
    version: str = "1",
) -> RetrainResult:
    """The first federated model (from a fresh initialisation), by the same round loop."""
    model = build_model(kind, standardizer.n_features, hidden=tuple(hidden), seed=seed)
    start = GlobalModel(params=get_parameters(model), standardizer=standardizer, threshold=0.5, kind=kind,
                        hidden=tuple(hidden), version="0")
    return federated_retrain(institutions, start=start, config=replace(config, proximal_mu=0.0, rehearsal=False),
                             version=version)
