"""What an institution computes on its own rows when asked to train or evaluate.

Kept apart from :mod:`consortium.federation.client_app` so that only training
and evaluation messages import PyTorch: Flower starts a ClientApp process per
message in deployment, and the secure-aggregation stages between them need no
model code.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from consortium.data import InstitutionSplit
from consortium.errors import ConfigError
from consortium.federation import messages as m
from consortium.federation.config import INSTITUTION_DP_MODES, parse_int_list
from consortium.federation.thresholds import score_histograms, to_unit_interval
from consortium.federation.validation import update_norm
from consortium.models import (
    Standardizer,
    TrainConfig,
    TrainResult,
    balanced_pos_weight,
    build_model,
    evaluate_scores,
    get_parameters,
    predict_scores,
    set_parameters,
    train_local,
)


def standardizer_from(content: RecordDict) -> Standardizer:
    """The federated standardisation the coordinator sent."""
    arrays = content.array_records[m.STANDARDIZER]
    return Standardizer(mean=arrays["mean"].numpy(), std=arrays["std"].numpy())


def model_from(content: RecordDict, n_features: int) -> tuple[torch.nn.Module, list[np.ndarray]]:
    """Build the model the config names and load the global parameters into it."""
    cfg = content.config_records[m.CONFIG]
    # An empty list is a real choice (logistic regression), not "use the default".
    hidden = parse_int_list(str(cfg["hidden"]))
    model = build_model(str(cfg["model"]), n_features, hidden=hidden, seed=int(_scalar(cfg, "seed", 0)))
    params = content.array_records[m.GLOBAL_ARRAYS].to_numpy_ndarrays()
    set_parameters(model, params)
    return model, params


def _scalar(cfg: ConfigRecord, key: str, default: float | int | str | None = None) -> Any:
    """One scalar of the coordinator's config; a missing key without default is a clear error."""
    if key in cfg:
        value = cfg[key]
    elif default is not None:
        return default
    else:
        raise ConfigError(f"The coordinator's config has no '{key}'; coordinator and node versions differ.")
    if isinstance(value, list | bytes):
        raise ConfigError(f"The coordinator's config field '{key}' must be a scalar. Got {value!r} instead.")
    return value


def train_reply(split: InstitutionSplit, content: RecordDict) -> RecordDict:
    """Train locally from the global model; reply with the delta and the example count."""
    torch.set_num_threads(1)
    cfg = content.config_records[m.CONFIG]
    model, global_params = model_from(content, split.train.n_features)
    X = standardizer_from(content).transform(split.train.X)
    pos_weight = float(_scalar(cfg, "pos-weight", 0.0))
    tc = TrainConfig(
        epochs=int(_scalar(cfg, "local-epochs")),
        batch_size=int(_scalar(cfg, "batch-size")),
        lr=float(_scalar(cfg, "lr")),
        optimizer=str(_scalar(cfg, "optimizer", "adam")),  # type: ignore[arg-type]
        weight_decay=float(_scalar(cfg, "weight-decay", 0.0)),
        loss=str(_scalar(cfg, "loss")),
        pos_weight=pos_weight if pos_weight > 0 else None,
        focal_gamma=float(_scalar(cfg, "focal-gamma", 2.0)),
        proximal_mu=float(_scalar(cfg, "proximal-mu", 0.0)),
        seed=int(_scalar(cfg, "seed", 0)) * 1000 + int(_scalar(cfg, "server-round", 0)),
    )
    mode = str(_scalar(cfg, "dp", "none"))
    if mode == "dpsgd-secagg":
        return _dpsgd_secagg_reply(model, X, split.train.y, cfg)
    if mode == "dpsgd":
        result = _dp_sgd(model, X, split.train.y, cfg)
    else:
        if mode in INSTITUTION_DP_MODES and tc.loss == "weighted_bce":
            # No pooled class weight in DP-FedAvg (it would need its own release): weight locally;
            # everything local is inside this institution's clipped, noised update.
            tc = dataclasses.replace(tc, pos_weight=balanced_pos_weight(float(np.mean(split.train.y))))
        result = train_local(
            model, X, split.train.y, config=tc, global_params=global_params if tc.proximal_mu > 0 else None
        )
    delta = [(lp - gp).astype(gp.dtype) for lp, gp in zip(get_parameters(model), global_params, strict=True)]
    if mode in INSTITUTION_DP_MODES:
        return _dp_fedavg_reply(delta, cfg)
    return RecordDict(
        {
            m.UPDATE: ArrayRecord.from_numpy_ndarrays(delta),
            m.METRICS: MetricRecord({m.WEIGHT: int(result.num_examples), "train-loss": float(result.mean_loss)}),
        }
    )


def _dp_sgd(model: torch.nn.Module, X: np.ndarray, y: np.ndarray, cfg: ConfigRecord) -> TrainResult:  # noqa: N803
    """Record-level DP-SGD with the coordinator's accounted parameters (see consortium.privacy.dpsgd).

    Sampling and noise are seeded from this institution's OS entropy, never from the
    run's public seed: a coordinator that could regenerate the noise could subtract it.
    """
    import secrets  # noqa: PLC0415

    from consortium.privacy.dpsgd import dp_sgd_train  # noqa: PLC0415
    from consortium.privacy.mechanisms import DpSgdMechanism  # noqa: PLC0415

    mech = DpSgdMechanism(
        noise_multiplier=float(_scalar(cfg, "dp-noise-multiplier")),
        clip_norm=float(_scalar(cfg, "dp-clip")),
        sampling_rate=float(_scalar(cfg, "dp-sampling-rate")),
        steps_per_round=int(_scalar(cfg, "dp-local-steps")),
    )
    out = dp_sgd_train(
        model, X, y, mechanism=mech, lr=float(_scalar(cfg, "dp-lr")),
        negative_ratio=float(_scalar(cfg, "dp-negative-ratio", 1.0)), seed=secrets.randbits(63),
        optimizer="sgd",
    )
    # The unnoised training loss is not DP: it is not reported (0 stands in).
    return TrainResult(num_examples=int(X.shape[0]), steps=out.steps, mean_loss=0.0)


def _dpsgd_secagg_reply(model: torch.nn.Module, X: np.ndarray, y: np.ndarray, cfg: ConfigRecord) -> RecordDict:  # noqa: N803
    """``dpsgd-secagg``: one DP-SGD step's noisy share at the global model, weight 1, no metric.

    Sampling and noise come from this institution's own OS entropy: the coordinator
    must not be able to reproduce (and subtract) them.  The share only ever leaves
    inside the secure sum (the coordinator refuses this mode without it).
    """
    import secrets  # noqa: PLC0415

    from consortium.privacy.distributed_dpsgd import secagg_share  # noqa: PLC0415
    from consortium.privacy.mechanisms import DistributedDpSgdMechanism  # noqa: PLC0415

    if int(_scalar(cfg, "dp-local-steps", 1)) != 1:
        raise ConfigError("dpsgd-secagg takes exactly one DP-SGD step per secure round; the round asks for more.")
    mech = DistributedDpSgdMechanism(
        noise_multiplier=float(_scalar(cfg, "dp-noise-multiplier")),
        clip_norm=float(_scalar(cfg, "dp-clip")),
        sampling_rate=float(_scalar(cfg, "dp-sampling-rate")),
        steps_per_round=1,
        participants=int(_scalar(cfg, "dp-participants")),
    )
    model.eval()  # per-row gradients must depend on their row only
    share = secagg_share(
        model,
        torch.as_tensor(np.ascontiguousarray(X, dtype=np.float32)),
        torch.as_tensor(np.asarray(y, dtype=np.float32)),
        mechanism=mech,
        negative_ratio=float(_scalar(cfg, "dp-negative-ratio", 1.0)),
        expected_batch=float(_scalar(cfg, "dp-expected-batch")),
        data_bound=float(_scalar(cfg, "dp-data-bound")),
        generator=torch.Generator().manual_seed(secrets.randbits(63)),
        rng=np.random.default_rng(secrets.randbits(128)),
    )
    return RecordDict({m.UPDATE: ArrayRecord.from_numpy_ndarrays(share), m.METRICS: MetricRecord({m.WEIGHT: 1})})


def _dp_fedavg_reply(delta: list[np.ndarray], cfg: ConfigRecord) -> RecordDict:
    """DP-FedAvg: the update clipped to the round's C, weight 1, and (adaptive) the centred unclipped bit.

    The clip leaves a relative 1e-6 of room so that the float32 cast cannot push the
    norm past C (the coordinator refuses larger clear-text updates). No training
    loss is reported: it would travel un-noised.
    """
    clip = float(_scalar(cfg, "dp-update-clip"))
    norm = update_norm(delta)
    factor = min(1.0, clip * (1.0 - 1e-6) / max(norm, 1e-12))
    clipped = [(d.astype(np.float64) * factor).astype(d.dtype) for d in delta]
    metrics: dict[str, int | float | list[int] | list[float]] = {m.WEIGHT: 1}
    if int(_scalar(cfg, "dp-adaptive", 0)):
        metrics["unclipped"] = (1.0 if norm <= clip else 0.0) - 0.5
    return RecordDict({m.UPDATE: ArrayRecord.from_numpy_ndarrays(clipped), m.METRICS: MetricRecord(metrics)})


def evaluate_reply(split: InstitutionSplit, content: RecordDict, *, disclose: bool) -> RecordDict:
    """Validation-score histograms (always) and own test metrics (only if ``disclose``)."""
    torch.set_num_threads(1)
    cfg = content.config_records[m.CONFIG]
    kind = str(cfg["model"])
    model, _ = model_from(content, split.train.n_features)
    std = standardizer_from(content)
    bins = int(_scalar(cfg, "histogram-bins", m.HISTOGRAM_BINS))
    val_scores = predict_scores(model, std.transform(split.val.X))
    neg, pos = score_histograms(to_unit_interval(val_scores, kind=kind), split.val.y, bins=bins)
    reply = RecordDict({m.VAL_HISTOGRAM: ArrayRecord({"neg": Array(neg), "pos": Array(pos)})})
    metrics: dict[str, int | float | list[int] | list[float]] = {
        m.WEIGHT: int(split.test.n_rows),
        "disclosed": int(disclose),
    }
    if disclose:
        fm = evaluate_scores(split.test.y, predict_scores(model, std.transform(split.test.X)))
        metrics.update(
            {
                "auprc": _finite(fm.auprc),
                "roc-auc": _finite(fm.roc_auc),
                "recall-at-1pct-fpr": _finite(fm.recall_at_1pct_fpr),
            }
        )
    reply[m.METRICS] = MetricRecord(metrics)
    return reply


def _finite(x: float) -> float:
    """MetricRecord values must be numbers; NaN (single-class test split) is sent as -1."""
    return float(x) if np.isfinite(x) else -1.0
