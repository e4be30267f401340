"""The ClientApp every institution runs: it trains and evaluates on local data only.

What leaves the institution, per message type:

* ``query.info``  - institution name, feature names, whether it discloses its
  evaluation metrics. No data.
* ``query.stats`` - additive feature statistics (count, positives, sums, sums of
  squares) for federated standardisation; in ``dpsgd`` runs clipped to a public
  bound and with Gaussian noise added here, before the secure sum
  (:mod:`consortium.privacy.stats`).
* ``train``       - the model delta ``local - global`` and the example count;
  under secure aggregation these only ever leave masked (see
  :mod:`consortium.secagg`). In DP-FedAvg runs the delta is clipped and, under
  secure aggregation, this node adds its share of Skellam noise before masking
  (parameters from the round's config: :mod:`consortium.privacy.distributed`).
  In ``dpsgd-secagg`` runs it is instead one DP-SGD step's clipped gradient sum
  over a Poisson sample of the rows, divided by the public ``q·N``, with this
  node's Gaussian share of the noise (weight 1, no loss), and only ever masked
  (:mod:`consortium.privacy.dpsgd_secagg_run`).
* ``query.gbdtbins`` / ``query.gbdtlevel`` - federated boosting: fine-grid cell
  counts and per-node gradient/hessian/count histograms, summed like ``train``
  (see :mod:`consortium.federation.gbdt_protocol`).
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
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from consortium.data import InstitutionSplit, load_institution
from consortium.errors import ConfigError
from consortium.federation import messages as m
from consortium.federation.exact_sum import encode_limbs
from consortium.secagg.flower import make_secagg_mod


def _round_noise(msg: Message):  # type: ignore[no-untyped-def]
    """The distributed-DP noise hook a training round asks for (None: no noise)."""
    from consortium.privacy.distributed import noise_for_message  # noqa: PLC0415

    return noise_for_message(msg)


institution_secagg_mod = make_secagg_mod(noise_for=_round_noise)
"""Secure aggregation's mod with the privacy layer's noise hook, resolved per round from the round's config."""

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
        mod (:data:`institution_secagg_mod`), which passes through every message
        that is not part of a secure round.
    disclose_eval_default : bool
        Whether the institution shares metrics on its own test split when its
        node config does not say (``disclose-eval``). Off by default: disclosure
        is each institution's decision.
    """
    if mods is None:
        mods = [institution_secagg_mod]
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
                # Key of this data in the privacy ledger (a hash: reveals nothing about the rows).
                "data-fingerprint": _fingerprint(split),
            }
        )
        return Message(RecordDict({m.INFO_RECORD: record}), reply_to=msg)

    @app.query("stats")
    def stats(msg: Message, context: Context) -> Message:
        split = _load(context, data_dirs)
        # The additive statistics of consortium.models.FeatureStats (count, positives, sums, sums
        # of squares), computed here with numpy alone so that this handler does not import torch.
        X = split.train.X.astype(np.float64)
        config = msg.content.get(m.CONFIG) if msg.has_content() else None
        if isinstance(config, ConfigRecord) and "dp-stats-noise-multiplier" in config:
            flat = _private_stats(X, split.train.y, config)
        else:
            flat = np.concatenate([[X.shape[0], float(split.train.y.sum())], X.sum(axis=0), (X * X).sum(axis=0)])
        arrays = ArrayRecord({"stats": _array(encode_limbs(flat))})
        metrics = MetricRecord({m.WEIGHT: 1})
        return Message(RecordDict({m.UPDATE: arrays, m.METRICS: metrics}), reply_to=msg)

    @app.query("gbdtbins")
    def gbdt_bins(msg: Message, context: Context) -> Message:
        from consortium.federation.gbdt_client import bins_reply  # noqa: PLC0415

        return Message(bins_reply(_load(context, data_dirs), msg.content), reply_to=msg)

    @app.query("gbdtlevel")
    def gbdt_level(msg: Message, context: Context) -> Message:
        from consortium.federation.gbdt_client import data_tag, level_reply  # noqa: PLC0415

        tag = data_tag(resolve_data_path(context, data_dirs))
        reply = level_reply(lambda: _load(context, data_dirs), msg.content, context, tag=tag)
        return Message(reply, reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        from consortium.federation.local_work import train_reply  # noqa: PLC0415  (torch: only when training)

        return Message(train_reply(_load(context, data_dirs), msg.content), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        from consortium.federation.local_work import evaluate_reply  # noqa: PLC0415

        return Message(evaluate_reply(_load(context, data_dirs), msg.content, disclose=disclose(context)), reply_to=msg)

    return app


def _private_stats(X: np.ndarray, y: np.ndarray, config: ConfigRecord) -> np.ndarray:  # noqa: N803
    """The statistics with this institution's Gaussian noise (they leave the node already private)."""
    import secrets  # noqa: PLC0415

    from consortium.privacy.stats import PrivateStatsSpec, noisy_stats  # noqa: PLC0415

    try:
        spec = PrivateStatsSpec(noise_multiplier=float(config["dp-stats-noise-multiplier"]),  # type: ignore[arg-type]
                                bound=float(config["dp-stats-bound"]))  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"The private statistics request is incomplete or invalid: {exc!r}.") from None
    return noisy_stats(X, y, spec=spec, rng=np.random.default_rng(secrets.randbits(128)))


def _fingerprint(split: InstitutionSplit) -> str:
    """SHA-256 of the training rows and labels, so repeated runs on the same data share one budget."""
    import hashlib  # noqa: PLC0415

    h = hashlib.sha256()
    h.update(np.ascontiguousarray(split.train.X).tobytes())
    h.update(np.ascontiguousarray(split.train.y).tobytes())
    return h.hexdigest()[:32]


def _array(a: np.ndarray):  # type: ignore[no-untyped-def]
    from flwr.app import Array

    return Array(np.ascontiguousarray(a))


app = build_client_app()
"""ClientApp for deployment (``clientapp = "consortium.federation.client_app:app"``)."""
