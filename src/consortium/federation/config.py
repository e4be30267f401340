"""The options of one federated run, in one validated, serialisable object.

A :class:`FederationConfig` travels two ways: as a Python object when the
simulation runner builds the apps in-process, and as Flower's flat
``run_config`` (``--run-config 'num-rounds=10 strategy="fedadam"'``) when a
coordinator runs the ServerApp in a SuperLink.  Both paths go through
:meth:`FederationConfig.from_run_config`, so a value is validated the same way
wherever it comes from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from consortium.errors import param_error

Strategy = Literal["fedavg", "fedprox", "fedavgm", "fedadam"]
ModelKind = Literal["mlp", "autoencoder", "gbdt"]

STRATEGIES: tuple[str, ...] = ("fedavg", "fedprox", "fedavgm", "fedadam")
MODEL_KINDS: tuple[str, ...] = ("mlp", "autoencoder", "gbdt")
LOSSES: tuple[str, ...] = ("weighted_bce", "focal", "bce")
DP_MODES: tuple[str, ...] = ("none", "dpsgd", "dpsgd-secagg", "dpfedavg", "dpfedavg-adaptive")
"""Privacy modes of a coordinator run (see :mod:`consortium.privacy.federated`)."""
RECORD_DP_MODES: tuple[str, ...] = ("dpsgd", "dpsgd-secagg")
"""Modes that protect one training row (DP-SGD, with private standardisation statistics)."""
INSTITUTION_DP_MODES: tuple[str, ...] = ("dpfedavg", "dpfedavg-adaptive")
"""Modes that protect a whole institution (DP-FedAvg) rather than one record."""


@dataclass(frozen=True)
class FederationConfig:
    """Everything the coordinator needs to run federated training.

    Attributes
    ----------
    num_rounds : int
        Federated rounds to run.
    strategy : {"fedavg", "fedprox", "fedavgm", "fedadam"}
        Server-side aggregation rule. ``fedprox`` adds the proximal term
        ``proximal_mu / 2 * ||w - w_global||^2`` to the local loss; ``fedavgm``
        adds server momentum.
    model : {"mlp", "autoencoder", "gbdt"}
        Supervised classifier, unsupervised reconstruction model, or federated
        gradient-boosted trees (hyperparameters as ``gbdt-*`` keys in ``extra``,
        see :class:`consortium.models.gbdt.GBDTParams`).
    hidden : tuple of int
        Hidden layer widths; empty (``--hidden ""``) makes the ``mlp`` a logistic
        regression, which DP training favours (its noise grows with the parameter count).
    local_epochs, batch_size, lr, weight_decay, loss, focal_gamma :
        Local training options (see :class:`consortium.models.TrainConfig`).
    local_optimizer : {"adam", "sgd"}
        Optimiser of local training (a fresh one every round).
    proximal_mu : float
        FedProx coefficient; used only with ``strategy="fedprox"``.
    server_lr : float
        FedAvg/FedProx server step: ``w += server_lr * mean_delta``.
    server_momentum : float
        FedAvgM momentum on the mean delta (Hsu et al., 2019).
    adam_lr, adam_beta1, adam_beta2, adam_tau :
        FedAdam options (Reddi et al., 2021).
    min_nodes : int
        Nodes that must be connected before the run starts and that must
        answer in each round.
    fraction_train : float
        Fraction of connected nodes sampled per round (at least ``min_nodes``).
    round_timeout : float
        Seconds to wait for replies in one round.
    secure_aggregation : bool
        Route every update through secure aggregation so the coordinator only
        learns sums.
    clip_norm : float
        L2 bound on one institution's model delta (larger deltas are scaled down).
    coordinate_bound : float
        Bound on each coordinate of a delta; sets the fixed-point precision of
        secure aggregation (smaller is finer).
    weight_cap : float
        Example counts above this weigh as this many (keeps weights inside the
        secure-aggregation encoding).
    max_fpr : float
        False-positive rate at which recall and the decision threshold are set.
    store_url : str
        SQLAlchemy URL of the run store.
    run_name : str
        Human-readable name of the run in the store.
    holdout_path : str
        Optional ``.npz`` with the global held-out test split, evaluated by the
        coordinator after every round (benchmarks and simulations only: in a
        real consortium the coordinator holds no data).
    data_dir : str
        Simulation only: directory with one sub-directory per institution.
    seed : int
        Seed for model initialisation and sampling.
    aggregation : {"mean", "median", "trimmed-mean", "krum", "multi-krum"}
        How clear-text updates are combined (see
        :mod:`consortium.federation.robust`); anything but ``"mean"`` needs
        ``secure_aggregation=False``, because robust rules see each update.
    trim_fraction : float
        ``trimmed-mean``: fraction cut at each end of every coordinate.
    byzantine_nodes : int
        ``krum``/``multi-krum``: assumed number of Byzantine institutions.
    max_update_norm : float
        Clear-text transport: updates whose L2 norm exceeds this are rejected
        (0 disables). Under secure aggregation ``clip_norm`` bounds updates
        client-side and the coordinator verifies the sum.
    resume : str
        Continue an interrupted run from its last completed round: a run id,
        or ``"latest"`` for the newest unfinished run named ``run_name``
        (``""``: start a new run).
    dp : {"none", "dpsgd", "dpsgd-secagg", "dpfedavg", "dpfedavg-adaptive"}
        Differential privacy, accounted and charged to the privacy ledger (see
        :mod:`consortium.privacy`): ``dpsgd`` = record-level DP-SGD in every
        institution, with private standardisation statistics; ``dpsgd-secagg`` =
        record-level DP-SGD of *one* global model whose noise the institutions
        add in ``1/k`` shares under secure aggregation (every round is one
        DP-SGD step over the union of the rows: needs secure aggregation,
        ``dp_local_steps == 1`` and ``fraction_train == 1``; see
        :mod:`consortium.privacy.dpsgd_secagg_run`); ``dpfedavg`` =
        institution-level DP-FedAvg (each update clipped to ``update_clip``; under
        secure aggregation every institution adds its share of Skellam noise
        before masking, else the coordinator adds Gaussian noise);
        ``dpfedavg-adaptive`` = the same with adaptive clipping (Andrew et al.
        2021), whose noisy clipped-count query is accounted too.
    target_epsilon : float
        With ``dp``: ε for all rounds (DP-SGD: statistics included); the noise
        multiplier is calibrated before training (0 = use ``dp_noise_multiplier``).
    delta : float
        δ of the guarantee (0 = 1/(10·n) of the protected units: pooled training
        rows per institution for ``dpsgd``, institutions for ``dpfedavg*``).
    dp_noise_multiplier, dp_clip, dp_sampling_rate, dp_local_steps, dp_lr :
        DP-SGD's σ (when no target ε), per-row clip C, Poisson rate q, noisy
        steps per round and SGD step size (``dpsgd-secagg``: the coordinator's
        step on the noisy gradient, one step per round). DP-FedAvg uses ``dp_noise_multiplier``
        as σ of the update sum in units of ``update_clip``.
    dp_negative_clip_power : float
        DP-SGD modes: negatives are clipped to ``C·(p/(1−p))**power`` with p the
        private positive rate (0 = one bound for both classes; the benchmark's
        logistic settings use 0).
    dp_stats_noise_multiplier, dp_stats_bound :
        ``dpsgd*``: σ of each of the four private statistics queries and the public
        per-feature bound the statistics clip to (see :mod:`consortium.privacy.stats`).
    update_clip : float
        ``dpfedavg*``: L2 bound C on one institution's model update (initial bound
        when adaptive).
    clip_quantile, clip_lr, count_noise_multiplier :
        ``dpfedavg-adaptive``: target quantile γ of update norms, geometric step η,
        and σ_b, the std of the noise on the count of unclipped updates.
    budget_epsilon : float
        Per-institution ε budget across all runs on the same data (0 = none): a
        round that would exceed it is not started.
    """

    num_rounds: int = 10
    strategy: Strategy = "fedprox"
    model: ModelKind = "mlp"
    hidden: tuple[int, ...] = (64, 32)
    local_epochs: int = 2
    batch_size: int = 128
    lr: float = 3e-3
    local_optimizer: str = "adam"
    weight_decay: float = 0.0
    loss: str = "weighted_bce"
    focal_gamma: float = 2.0
    proximal_mu: float = 0.01
    server_lr: float = 1.0
    server_momentum: float = 0.9
    adam_lr: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    adam_tau: float = 1e-3
    min_nodes: int = 2
    fraction_train: float = 1.0
    round_timeout: float = 600.0
    secure_aggregation: bool = True
    clip_norm: float = 100.0
    coordinate_bound: float = 1.0
    weight_cap: float = 100_000.0
    max_fpr: float = 0.01
    store_url: str = "sqlite:///consortium.db"
    run_name: str = "federated"
    holdout_path: str = ""
    data_dir: str = ""
    seed: int = 0
    aggregation: str = "mean"
    trim_fraction: float = 0.1
    byzantine_nodes: int = 1
    max_update_norm: float = 0.0
    resume: str = ""
    dp: str = "none"
    target_epsilon: float = 0.0
    delta: float = 0.0
    dp_noise_multiplier: float = 0.0
    dp_clip: float = 1.0
    dp_sampling_rate: float = 0.3
    dp_local_steps: int = 3
    dp_lr: float = 10.0
    budget_epsilon: float = 0.0
    dp_stats_noise_multiplier: float = 30.0
    dp_stats_bound: float = 1.0
    dp_negative_clip_power: float = 0.5
    update_clip: float = 0.5
    clip_quantile: float = 0.5
    clip_lr: float = 0.2
    count_noise_multiplier: float = 20.0
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        owner = "FederationConfig"
        if self.num_rounds < 1:
            raise param_error("num_rounds", owner, "an int >= 1", self.num_rounds)
        if self.strategy not in STRATEGIES:
            raise param_error("strategy", owner, f"one of {STRATEGIES}", self.strategy)
        if self.model not in MODEL_KINDS:
            raise param_error("model", owner, f"one of {MODEL_KINDS}", self.model)
        if any(h < 1 for h in self.hidden):
            raise param_error("hidden", owner, "a tuple of ints >= 1", self.hidden)
        if not self.hidden and self.model == "autoencoder":
            raise param_error("hidden", owner, "a non-empty tuple of ints >= 1 for the autoencoder", self.hidden)
        if self.local_epochs < 1:
            raise param_error("local_epochs", owner, "an int >= 1", self.local_epochs)
        if self.batch_size < 1:
            raise param_error("batch_size", owner, "an int >= 1", self.batch_size)
        for name in ("lr", "server_lr", "adam_lr", "adam_tau"):
            if not getattr(self, name) > 0:
                raise param_error(name, owner, "a float > 0", getattr(self, name))
        if self.local_optimizer not in ("adam", "sgd"):
            raise param_error("local_optimizer", owner, "one of ('adam', 'sgd')", self.local_optimizer)
        if self.loss not in LOSSES:
            raise param_error("loss", owner, f"one of {LOSSES}", self.loss)
        if self.proximal_mu < 0:
            raise param_error("proximal_mu", owner, "a float >= 0", self.proximal_mu)
        for name in ("adam_beta1", "adam_beta2", "server_momentum"):
            if not 0 <= getattr(self, name) < 1:
                raise param_error(name, owner, "a float in [0, 1)", getattr(self, name))
        if self.min_nodes < 1:
            raise param_error("min_nodes", owner, "an int >= 1", self.min_nodes)
        if not 0 < self.fraction_train <= 1:
            raise param_error("fraction_train", owner, "a float in (0, 1]", self.fraction_train)
        if not self.round_timeout > 0:
            raise param_error("round_timeout", owner, "a float > 0", self.round_timeout)
        for name in ("clip_norm", "coordinate_bound", "weight_cap"):
            if not getattr(self, name) > 0:
                raise param_error(name, owner, "a float > 0", getattr(self, name))
        if not 0 < self.max_fpr < 1:
            raise param_error("max_fpr", owner, "a float in (0, 1)", self.max_fpr)
        from consortium.federation.robust import check_rule  # noqa: PLC0415

        check_rule(self.aggregation, trim_fraction=self.trim_fraction,
                   byzantine_nodes=self.byzantine_nodes, owner=owner)
        if self.secure_aggregation and self.aggregation != "mean":
            raise param_error(
                "aggregation", owner,
                "'mean' under secure aggregation (robust rules need each update; use "
                "secure_aggregation=False, or rely on clip_norm)", self.aggregation,
            )
        if not self.max_update_norm >= 0:
            raise param_error("max_update_norm", owner, "a float >= 0 (0: no bound)", self.max_update_norm)
        self._check_privacy(owner)

    def _check_privacy(self, owner: str) -> None:
        """Bad privacy settings fail here, before any training (and say why)."""
        if self.dp not in DP_MODES:
            raise param_error("dp", owner, f"one of {DP_MODES}", self.dp)
        for name in ("target_epsilon", "delta", "dp_noise_multiplier", "budget_epsilon"):
            if not self.__getattribute__(name) >= 0:
                raise param_error(name, owner, "a float >= 0 (0 = unset)", getattr(self, name))
        if not self.delta < 1:
            raise param_error("delta", owner, "a float in (0, 1) or 0 for 1/(10 n)", self.delta)
        if self.dp == "none":
            return
        if self.target_epsilon == 0 and self.dp_noise_multiplier == 0:
            raise param_error(
                "dp_noise_multiplier", owner,
                "> 0 when no target_epsilon is given (σ = 0 adds no noise: no guarantee)", self.dp_noise_multiplier,
            )
        if self.dp in INSTITUTION_DP_MODES:
            self._check_institution_privacy(owner)
            return
        if not self.dp_clip > 0:
            raise param_error("dp_clip", owner, "a float > 0 (the per-row sensitivity bound)", self.dp_clip)
        if not 0 < self.dp_sampling_rate <= 1:
            raise param_error(
                "dp_sampling_rate", owner, "a float in (0, 1] (Poisson sampling rate)", self.dp_sampling_rate
            )
        if self.dp_local_steps < 1:
            raise param_error("dp_local_steps", owner, "an int >= 1", self.dp_local_steps)
        if self.dp == "dpsgd-secagg":
            self._check_distributed_dpsgd(owner)
        if not self.dp_lr > 0:
            raise param_error("dp_lr", owner, "a float > 0", self.dp_lr)
        if not self.dp_stats_noise_multiplier > 0:
            raise param_error("dp_stats_noise_multiplier", owner,
                              "a float > 0 (the statistics are released with this noise)",
                              self.dp_stats_noise_multiplier)
        if not 0 <= self.dp_negative_clip_power <= 1:
            raise param_error("dp_negative_clip_power", owner,
                              "a float in [0, 1] (0 = one clip bound for both classes, 1 = fully balanced)",
                              self.dp_negative_clip_power)
        if not self.dp_stats_bound > 0:
            raise param_error("dp_stats_bound", owner, "a float > 0 (public feature range of the statistics)",
                              self.dp_stats_bound)

    def _check_distributed_dpsgd(self, owner: str) -> None:
        """``dpsgd-secagg``: each round is one DP-SGD step whose noise exists only in the secure sum."""
        if not self.secure_aggregation:
            raise param_error(
                "secure_aggregation", owner,
                "True with dp='dpsgd-secagg' (each institution adds only 1/k of the noise variance: without "
                "secure aggregation the coordinator would see shares that are not private; use dp='dpsgd' "
                "to train without it)", self.secure_aggregation,
            )
        if self.dp_local_steps != 1:
            raise param_error(
                "dp_local_steps", owner,
                "1 with dp='dpsgd-secagg' (every DP-SGD step is one secure round: set num_rounds to the "
                "number of steps)", self.dp_local_steps,
            )
        if self.fraction_train != 1:
            raise param_error(
                "fraction_train", owner,
                "1.0 with dp='dpsgd-secagg' (every institution adds its noise share in every step)",
                self.fraction_train,
            )

    def _check_institution_privacy(self, owner: str) -> None:
        """DP-FedAvg: one bounded, unweighted update per institution, summed with noise."""
        if not self.update_clip > 0:
            raise param_error("update_clip", owner, "a float > 0 (one institution's sensitivity bound)",
                              self.update_clip)
        if self.aggregation != "mean":
            raise param_error("aggregation", owner, "'mean' with DP-FedAvg (the noise is calibrated to the "
                              "sensitivity of a sum of clipped updates)", self.aggregation)
        if self.dp == "dpfedavg-adaptive":
            if not 0 < self.clip_quantile < 1:
                raise param_error("clip_quantile", owner, "a float in (0, 1)", self.clip_quantile)
            if not self.clip_lr > 0:
                raise param_error("clip_lr", owner, "a float > 0", self.clip_lr)
            if not self.count_noise_multiplier > 0:
                raise param_error("count_noise_multiplier", owner,
                                  "a float > 0 (the clipped count is released with this noise)",
                                  self.count_noise_multiplier)

    @property
    def effective_proximal_mu(self) -> float:
        """The proximal coefficient clients apply (0 unless FedProx)."""
        return self.proximal_mu if self.strategy == "fedprox" else 0.0

    # -- Flower run_config <-> object -------------------------------------------------

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        """Flatten to Flower's ``run_config`` (hyphenated keys, scalar values)."""
        out: dict[str, bool | int | float | str] = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = ",".join(str(v) for v in value)
            out[f.name.replace("_", "-")] = value
        for k, v in self.extra.items():
            out[k] = v
        return out

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FederationConfig:
        """Build from Flower's ``run_config``; unknown keys go to ``extra``."""
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "extra"}
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in run_config.items():
            name = key.replace("-", "_")
            if name not in fields:
                extra[key] = value
                continue
            default = fields[name].default
            kwargs[name] = _coerce(name, value, default)
        return cls(**kwargs, extra=extra)


def parse_int_list(text: str) -> tuple[int, ...]:
    """``"64,32"`` -> ``(64, 32)``; ``""`` -> ``()`` (how tuples such as ``hidden`` travel in configs).

    Raises ``ValueError`` on a part that is not an int (callers name the field).
    """
    return tuple(int(part) for part in text.split(",") if part.strip())


def _coerce(name: str, value: Any, default: Any) -> Any:
    """Convert a run_config value to the type of the field's default."""
    owner = "FederationConfig (run config)"
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes"):
                    return True
                if value.lower() in ("false", "0", "no"):
                    return False
                raise ValueError(value)
            return bool(value)
        if isinstance(default, tuple):
            if isinstance(value, str):
                return parse_int_list(value)
            return tuple(int(v) for v in value)
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if isinstance(default, float):
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        expected = type(default).__name__
        if isinstance(default, tuple):
            expected = "comma-separated ints"
        raise param_error(name, owner, f"of type {expected}", value) from None
