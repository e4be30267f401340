"""Private federated training in one process (benchmarks, audits, tests).

The same mechanisms, accountant and ledger as a deployed run, without Flower
or Ray: institutions' local work runs in a loop, so a grid of ε values fits on
two cores.  Three modes:

``none``
    Non-private FedAvg (exact statistics, weighted BCE, Adam): the reference.
``dpsgd``
    Record-level: private statistics (:mod:`consortium.privacy.stats`) and
    DP-SGD in every institution with class-aware clipping; σ is calibrated so that
    statistics + all rounds compose to at most the target ε for every institution.
``dpsgd-secagg``
    Record-level with the noise split across institutions under secure
    aggregation (:mod:`consortium.privacy.distributed_dpsgd`): one global model,
    each step one secure round of the institutions' noisy clipped gradient sums.
    Same private statistics; σ calibrated like ``dpsgd``, and the result also states
    ε against a coordinator colluding with one institution.
``dpfedavg``
    Institution-level: local non-private training, each update clipped to C,
    Gaussian noise σ·C on the sum (central noise; under secure aggregation the
    same total noise is split across institutions by ``SkellamMechanism``), no
    data-dependent standardisation (it would need its own institution-level
    release).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch

from consortium.models import (
    FeatureStats,
    Standardizer,
    TrainConfig,
    balanced_pos_weight,
    build_model,
    get_parameters,
    predict_scores,
    set_parameters,
    train_local,
)
from consortium.privacy.accounting import calibrate_noise_multiplier, compose, estimate
from consortium.privacy.distributed_dpsgd import apply_noisy_sum, institution_share
from consortium.privacy.dpsgd import dp_sgd_train, negative_clip_ratio, per_row_gradients
from consortium.privacy.mechanisms import DistributedDpSgdMechanism, DpFedAvgMechanism, DpSgdMechanism, Mechanism
from consortium.privacy.stats import PrivateStatsSpec, combine_noisy, noisy_stats

logger = logging.getLogger(__name__)

Mode = Literal["none", "dpsgd", "dpsgd-secagg", "dpfedavg"]


@dataclass(frozen=True)
class InProcessConfig:
    """Options of :func:`train_private_federated` (see the module docstring)."""

    mode: Mode = "dpsgd"
    target_epsilon: float | None = 1.0
    delta: float = 1e-5
    rounds: int = 10
    hidden: tuple[int, ...] = (32,)
    seed: int = 0
    # record level
    sampling_rate: float = 0.1
    local_steps: int = 10
    clip_norm: float = 1.0
    lr: float = 0.5
    dp_optimizer: str = "sgd"
    negative_clip_power: float = 0.5
    stats: PrivateStatsSpec = field(default_factory=PrivateStatsSpec)
    noise_multiplier: float | None = None
    # non-private / institution level
    local_epochs: int = 1
    batch_size: int = 128
    update_clip: float = 0.5
    server_lr: float = 1.0
    average_last: int = 0
    """Release the mean of the last k global models (Polyak averaging; post-processing, no privacy cost)."""


@dataclass(frozen=True)
class InProcessResult:
    """Trained global model, its scaling, and its privacy statement."""

    params: list[np.ndarray]
    standardizer: Standardizer
    mechanism: Mechanism | None
    epsilon: float
    epsilon_rdp: float
    delta: float
    accounting: dict[str, Any]
    config: InProcessConfig

    def model(self, n_features: int) -> torch.nn.Module:
        m = build_model("mlp", n_features, hidden=self.config.hidden, seed=self.config.seed)
        set_parameters(m, self.params)
        return m

    def scores(self, X: np.ndarray) -> np.ndarray:  # noqa: N803
        return predict_scores(self.model(X.shape[1]), self.standardizer.transform(X))

    def privacy(self) -> dict[str, Any]:
        """(ε, δ), mechanism and parameters, as saved with every model and results table."""
        return {
            "epsilon": self.epsilon,
            "epsilon_rdp": self.epsilon_rdp,
            "delta": self.delta,
            "mechanism": None if self.mechanism is None else self.mechanism.name,
            "params": {} if self.mechanism is None else self.mechanism.params(),
            "accounting": self.accounting,
        }


def _mean_delta(deltas: Sequence[Sequence[np.ndarray]]) -> list[np.ndarray]:
    return [np.mean([d[i] for d in deltas], axis=0) for i in range(len(deltas[0]))]


def train_private_federated(parts: Sequence[tuple[np.ndarray, np.ndarray]], config: InProcessConfig) -> InProcessResult:
    """FedAvg over ``parts`` (one ``(X, y)`` per institution) with the configured privacy."""
    torch.set_num_threads(1)
    cfg = config
    rng = np.random.default_rng(cfg.seed)
    d = parts[0][0].shape[1]
    model = build_model("mlp", d, hidden=cfg.hidden, seed=cfg.seed)
    params = get_parameters(model)
    mech: Mechanism | None = None
    accounting: dict[str, Any] = {}
    eps = eps_rdp = 0.0
    if cfg.mode == "none":
        stats = FeatureStats.from_data(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        std = stats.standardizer()
        pos_weight = balanced_pos_weight(stats.positive_rate)
        eps = eps_rdp = math.inf
    elif cfg.mode in ("dpsgd", "dpsgd-secagg"):
        stats = combine_noisy([noisy_stats(X, y, spec=cfg.stats, rng=rng) for X, y in parts])
        std = stats.standardizer()
        ratio = negative_clip_ratio(stats.positive_rate, power=cfg.negative_clip_power)
        record_params = {
            "noise_multiplier": cfg.noise_multiplier or 1.0,
            "clip_norm": cfg.clip_norm,
            "sampling_rate": cfg.sampling_rate,
            "steps_per_round": cfg.local_steps,
        }
        base: DpSgdMechanism = (
            DpSgdMechanism(**record_params)  # type: ignore[arg-type]
            if cfg.mode == "dpsgd"
            else DistributedDpSgdMechanism(**record_params, participants=len(parts))  # type: ignore[arg-type]
        )
        stats_event = cfg.stats.event()
        if cfg.target_epsilon is not None:
            sigma = calibrate_noise_multiplier(
                lambda s: compose([stats_event, replace(base, noise_multiplier=s).event(cfg.rounds)]),
                target_epsilon=cfg.target_epsilon,
                delta=cfg.delta,
                owner="train_private_federated",
            )
            base = replace(base, noise_multiplier=sigma)
        mech = base
        est = estimate(compose([stats_event, base.event(cfg.rounds)]), cfg.delta)
        eps, eps_rdp = est.epsilon, est.epsilon_rdp
        accounting = {
            "noise_multiplier": base.noise_multiplier,
            "sampling_rate": base.sampling_rate,
            "steps": base.steps_per_round * cfg.rounds,
            "delta": cfg.delta,
            "epsilon_reported": eps,
            "stats_noise_multiplier": cfg.stats.noise_multiplier,
            "stats_queries": 4,
            "negative_clip_ratio": ratio,
        }
        if isinstance(base, DistributedDpSgdMechanism):
            accounting["participants"] = base.participants
            if base.participants > 1:
                accounting["epsilon_if_one_colludes"] = estimate(
                    compose([stats_event, base.collusion_event(cfg.rounds, colluders=1)]), cfg.delta
                ).epsilon
    else:
        std = Standardizer(mean=np.zeros(d), std=np.ones(d))
        base_f = DpFedAvgMechanism(noise_multiplier=cfg.noise_multiplier or 1.0, clip_norm=cfg.update_clip)
        if cfg.target_epsilon is not None:
            base_f = DpFedAvgMechanism.calibrated(
                target_epsilon=cfg.target_epsilon, delta=cfg.delta, rounds=cfg.rounds, clip_norm=cfg.update_clip
            )
        mech = base_f
        est = estimate(base_f.event(cfg.rounds), cfg.delta)
        eps, eps_rdp = est.epsilon, est.epsilon_rdp
        accounting = {
            "noise_multiplier": base_f.noise_multiplier,
            "sampling_rate": 1.0,
            "steps": cfg.rounds,
            "delta": cfg.delta,
            "epsilon_reported": eps,
            "unit": "institution",
        }
    xs = [std.transform(X) for X, _ in parts]

    def released(final: list[np.ndarray]) -> InProcessResult:
        return InProcessResult(
            params=final,
            standardizer=std,
            mechanism=mech,
            epsilon=eps,
            epsilon_rdp=eps_rdp,
            delta=cfg.delta,
            accounting=accounting,
            config=cfg,
        )

    if isinstance(mech, DistributedDpSgdMechanism):
        return released(_train_distributed(model, xs, [y for _, y in parts], mech, cfg, ratio, stats.count))
    history: list[list[np.ndarray]] = []
    for rnd in range(1, cfg.rounds + 1):
        deltas: list[list[np.ndarray]] = []
        for i, (X, (_, y)) in enumerate(zip(xs, parts, strict=True)):
            local = build_model("mlp", d, hidden=cfg.hidden, seed=cfg.seed)
            set_parameters(local, params)
            seed = cfg.seed * 100_000 + rnd * 100 + i
            if cfg.mode == "dpsgd":
                assert isinstance(mech, DpSgdMechanism)
                dp_sgd_train(
                    local, X, y, mechanism=mech, lr=cfg.lr, negative_ratio=ratio, seed=seed, optimizer=cfg.dp_optimizer
                )
            else:
                tc = TrainConfig(
                    epochs=cfg.local_epochs,
                    batch_size=cfg.batch_size,
                    lr=3e-3,
                    seed=seed,
                    pos_weight=pos_weight if cfg.mode == "none" else None,
                )
                train_local(local, X, y, config=tc)
            deltas.append([lp - gp for lp, gp in zip(get_parameters(local), params, strict=True)])
        if cfg.mode == "dpfedavg":
            assert isinstance(mech, DpFedAvgMechanism)
            flat = [np.concatenate([t.ravel() for t in dl]) for dl in deltas]
            clipped = [f * min(1.0, mech.clip_norm / max(float(np.linalg.norm(f)), 1e-12)) for f in flat]
            noisy = mech.add_noise(np.sum(clipped, axis=0), rng) / len(parts)
            mean, off = [], 0
            for t in params:
                mean.append(noisy[off : off + t.size].reshape(t.shape).astype(t.dtype))
                off += t.size
        else:
            mean = _mean_delta(deltas)
        params = [(p + cfg.server_lr * m).astype(p.dtype) for p, m in zip(params, mean, strict=True)]
        if cfg.average_last > 0 and rnd > cfg.rounds - cfg.average_last:
            history.append(params)
    if history:
        params = [np.mean([h[i] for h in history], axis=0).astype(params[i].dtype) for i in range(len(params))]
    return released(params)


def _train_distributed(
    model: torch.nn.Module,
    xs: Sequence[np.ndarray],
    ys: Sequence[np.ndarray],
    mech: DistributedDpSgdMechanism,
    cfg: InProcessConfig,
    negative_ratio: float,
    total_rows: float,
) -> list[np.ndarray]:
    """One global model; every step each institution's noisy share, summed (SecAgg), one optimiser step."""
    data = [
        (torch.as_tensor(np.ascontiguousarray(X, dtype=np.float32)), torch.as_tensor(np.asarray(y, dtype=np.float32)))
        for X, y in zip(xs, ys, strict=True)
    ]
    gens = [torch.Generator().manual_seed(cfg.seed * 100_000 + 7_919 * (i + 1)) for i in range(len(data))]
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt: torch.optim.Optimizer = (
        torch.optim.Adam(trainable, lr=cfg.lr) if cfg.dp_optimizer == "adam" else torch.optim.SGD(trainable, lr=cfg.lr)
    )
    fn = per_row_gradients(model)
    expected_batch = max(mech.sampling_rate * total_rows, 1.0)
    history: list[list[np.ndarray]] = []
    model.eval()
    for rnd in range(1, cfg.rounds + 1):
        for _ in range(mech.steps_per_round):
            shares = [
                institution_share(
                    model, X, y, mechanism=mech, negative_ratio=negative_ratio, generator=g, per_row_grad=fn
                )
                for (X, y), g in zip(data, gens, strict=True)
            ]
            summed = [torch.stack(parts).sum(0) for parts in zip(*shares, strict=True)]
            apply_noisy_sum(opt, trainable, summed, expected_batch=expected_batch)
        if cfg.average_last > 0 and rnd > cfg.rounds - cfg.average_last:
            history.append(get_parameters(model))
    params = get_parameters(model)
    if history:
        params = [np.mean([h[i] for h in history], axis=0).astype(params[i].dtype) for i in range(len(params))]
    return params
