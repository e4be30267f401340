"""The ClientApp every institution runs: it trains and evaluates on local data only.

What leaves the institution, per message type:

* ``query.info``  - institution name, feature names, whether it discloses its
  evaluation metrics. No data.
* ``query.stats`` - additive feature statistics (count, positives, sums, sums of
  squares) for federated standardisation.
* ``train``       - the model delta ``local - global`` and the example count;
  under secure aggregation these only ever leave masked (see
  :mod:`consortium.secagg`).
* ``evaluate``    - per-class histograms of validation scores (for the federated
  threshold) and, only if the institution's ``disclose-eval`` node setting allows
  it, metrics on its own test split.

The institution's data location comes from the node configuration
(``flower-supernode --node-config "data-path='/srv/bank_a' institution='bank_a'"``)
or, in simulation, from the list of directories the runner gives
:func:`build_client_app`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from consortium.data import InstitutionSplit, load_institution
from consortium.errors import ConfigError
from consortium.federation import messages as m
from consortium.federation.exact_sum import encode_limbs
from consortium.federation.thresholds import score_histograms, to_unit_interval
from consortium.secagg.flower import secagg_mod
from consortium.models import (
    FeatureStats,
    Standardizer,
    TrainConfig,
    build_model,
    evaluate_scores,
    get_parameters,
    predict_scores,
    set_parameters,
    train_local,
)

logger = logging.getLogger(__name__)


def _truthy(value: object) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


def resolve_data_path(context: Context, data_dirs: Sequence[Path] | None) -> Path:
    """Where this node's institution data lives (node config, or simulation partition)."""
    if m.NODE_DATA_PATH in context.node_config:
        return Path(str(context.node_config[m.NODE_DATA_PATH]))
    if data_dirs is not None and "partition-id" in context.node_config:
        pid = int(context.node_config["partition-id"])
        if not 0 <= pid < len(data_dirs):
            raise ConfigError(
                f"Simulation partition {pid} has no data directory: only {len(data_dirs)} given."
            )
        return Path(data_dirs[pid])
    raise ConfigError(
        f"This node has no '{m.NODE_DATA_PATH}' in its node config; start it with "
        f"--node-config \"{m.NODE_DATA_PATH}='/path/to/institution' {m.NODE_INSTITUTION}='name'\"."
    )


def _load(context: Context, data_dirs: Sequence[Path] | None) -> InstitutionSplit:
    split = load_institution(resolve_data_path(context, data_dirs))
    return split


def _institution_name(context: Context, split: InstitutionSplit) -> str:
    return str(context.node_config.get(m.NODE_INSTITUTION, split.name))


def _standardizer(content: RecordDict) -> Standardizer:
    arrays = content.array_records[m.STANDARDIZER]
    return Standardizer(mean=arrays["mean"].numpy(), std=arrays["std"].numpy())


def _model_from(content: RecordDict, n_features: int) -> tuple[torch.nn.Module, list[np.ndarray]]:
    cfg = content.config_records[m.CONFIG]
    hidden = tuple(int(h) for h in str(cfg["hidden"]).split(",") if h)
    model = build_model(str(cfg["model"]), n_features, hidden=hidden, seed=int(cfg.get("seed", 0)))
    params = content.array_records[m.GLOBAL_ARRAYS].to_numpy_ndarrays()
    set_parameters(model, params)
    return model, params


def build_client_app(
    *,
    data_dirs: Sequence[Path] | None = None,
    mods: Sequence[Mod] | None = None,
    disclose_eval_default: bool = False,
) -> ClientApp:
    """Build the institution's ClientApp.

    Parameters
    ----------
    data_dirs : sequence of Path, optional
        Simulation only: directory of institution ``i`` for partition id ``i``.
    mods : sequence of Mod, optional
        Flower mods wrapped around every handler. Default: secure aggregation's
        mod, which passes through every message that is not part of a secure round.
    disclose_eval_default : bool
        Whether the institution shares metrics on its own test split when its
        node config does not say (``disclose-eval``). Off by default: disclosure
        is each institution's decision.
    """
    if mods is None:
        mods = [secagg_mod]
    app = ClientApp(mods=list(mods))

    def disclose(context: Context) -> bool:
        return _truthy(context.node_config.get(m.NODE_DISCLOSE_EVAL, disclose_eval_default))

    @app.query("info")
    def info(msg: Message, context: Context) -> Message:
        split = _load(context, data_dirs)
        record = ConfigRecord(
            {
                "institution": _institution_name(context, split),
                "n-features": int(split.train.n_features),
                "feature-names": list(split.train.feature_names),
                "disclose-eval": disclose(context),
            }
        )
        return Message(RecordDict({m.INFO_RECORD: record}), reply_to=msg)

    @app.query("stats")
    def stats(msg: Message, context: Context) -> Message:
        split = _load(context, data_dirs)
        fs = FeatureStats.from_data(split.train.X, split.train.y)
        flat = np.concatenate([[fs.count, fs.positives], np.asarray(fs.sum), np.asarray(fs.sumsq)])
        arrays = ArrayRecord({"stats": _array(encode_limbs(flat))})
        metrics = MetricRecord({m.WEIGHT: 1})
        return Message(RecordDict({m.UPDATE: arrays, m.METRICS: metrics}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        split = _load(context, data_dirs)
        cfg = msg.content.config_records[m.CONFIG]
        model, global_params = _model_from(msg.content, split.train.n_features)
        X = _standardizer(msg.content).transform(split.train.X)
        tc = TrainConfig(
            epochs=int(cfg["local-epochs"]),
            batch_size=int(cfg["batch-size"]),
            lr=float(cfg["lr"]),
            optimizer=str(cfg.get("optimizer", "adam")),  # type: ignore[arg-type]
            weight_decay=float(cfg.get("weight-decay", 0.0)),
            loss=str(cfg["loss"]),
            pos_weight=float(cfg["pos-weight"]) if float(cfg.get("pos-weight", 0.0)) > 0 else None,
            focal_gamma=float(cfg.get("focal-gamma", 2.0)),
            proximal_mu=float(cfg.get("proximal-mu", 0.0)),
            seed=int(cfg.get("seed", 0)) * 1000 + int(cfg.get("server-round", 0)),
        )
        result = train_local(
            model,
            X,
            split.train.y,
            config=tc,
            global_params=global_params if tc.proximal_mu > 0 else None,
        )
        local = get_parameters(model)
        delta = [(lp - gp).astype(gp.dtype) for lp, gp in zip(local, global_params, strict=True)]
        content = RecordDict(
            {
                m.UPDATE: ArrayRecord.from_numpy_ndarrays(delta),
                m.METRICS: MetricRecord(
                    {m.WEIGHT: int(result.num_examples), "train-loss": float(result.mean_loss)}
                ),
            }
        )
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        split = _load(context, data_dirs)
        cfg = msg.content.config_records[m.CONFIG]
        kind = str(cfg["model"])
        model, _ = _model_from(msg.content, split.train.n_features)
        std = _standardizer(msg.content)
        bins = int(cfg.get("histogram-bins", m.HISTOGRAM_BINS))
        val_scores = predict_scores(model, std.transform(split.val.X))
        neg, pos = score_histograms(to_unit_interval(val_scores, kind=kind), split.val.y, bins=bins)
        content = RecordDict(
            {m.VAL_HISTOGRAM: ArrayRecord({"neg": _array(neg), "pos": _array(pos)})}
        )
        metrics: dict[str, float | int] = {m.WEIGHT: int(split.test.n_rows)}
        if disclose(context):
            test_scores = predict_scores(model, std.transform(split.test.X))
            fm = evaluate_scores(split.test.y, test_scores)
            metrics.update(
                {
                    "auprc": _finite(fm.auprc),
                    "roc-auc": _finite(fm.roc_auc),
                    "recall-at-1pct-fpr": _finite(fm.recall_at_1pct_fpr),
                    "disclosed": 1,
                }
            )
        else:
            metrics["disclosed"] = 0
        content[m.METRICS] = MetricRecord(metrics)
        return Message(content, reply_to=msg)

    return app


def _array(a: np.ndarray):  # type: ignore[no-untyped-def]
    from flwr.app import Array

    return Array(np.ascontiguousarray(a))


def _finite(x: float) -> float:
    """MetricRecord values must be numbers; NaN (single-class test split) is sent as -1."""
    return float(x) if np.isfinite(x) else -1.0


app = build_client_app()
"""ClientApp for deployment (``clientapp = "consortium.federation.client_app:app"``)."""
