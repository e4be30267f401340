"""``consortium privacy report RUN`` and ``consortium privacy audit RUN``."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from consortium.errors import ConsortiumError


def _fail(exc: ConsortiumError) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(2)


@click.group(name="privacy")
def privacy() -> None:
    """Privacy ledger and audit."""


@privacy.command("report")
@click.argument("run_id")
@click.option("--store", "store_url", default="sqlite:///consortium.db", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the charges as JSON.")
def report(run_id: str, store_url: str, as_json: bool) -> None:
    """Print the privacy ledger's charges of RUN (cumulative ε per institution and data)."""
    from consortium.privacy.ledger import PrivacyLedger  # noqa: PLC0415
    from consortium.registry import RunStore  # noqa: PLC0415

    try:
        with RunStore(store_url) as store:
            charges = PrivacyLedger(store).charges(run_id=run_id)
    except ConsortiumError as exc:
        _fail(exc)
        return
    if as_json:
        click.echo(json.dumps([{**c.__dict__, "created_at": c.created_at.isoformat()} for c in charges], indent=2))
        return
    if not charges:
        click.echo(f"run {run_id}: no privacy charges (trained without differential privacy, or unknown run)")
        return
    click.echo(f"run {run_id}: {len(charges)} charge(s); ε is cumulative per institution and data (PLD; RDP beside)")
    for c in charges:
        budget = "-" if c.budget_epsilon is None else f"{c.budget_epsilon:g}"
        click.echo(
            f"  {c.institution:<16} data {c.data_id[:12]:<12} round {c.round:>3} {c.mechanism:<9} "
            f"ε={c.epsilon:.4f} (RDP {c.epsilon_rdp:.4f}) δ={c.delta:.2g} budget {budget}"
        )


@privacy.command("audit")
@click.argument("run_id")
@click.option("--store", "store_url", default="sqlite:///consortium.db", show_default=True)
@click.option(
    "--members",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help=".npz (X, y) of rows the run trained on (one institution's training split).",
)
@click.option(
    "--nonmembers",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help=".npz (X, y) of rows it never saw (held-out split).",
)
@click.option(
    "--public",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help=".npz (X, y) of public/synthetic rows for LiRA's shadow models (default: half of --nonmembers).",
)
@click.option("--shadows", type=click.IntRange(min=2), default=4, show_default=True, help="LiRA shadow models.")
@click.option(
    "--shadow-epochs", type=click.IntRange(min=1), default=20, show_default=True, help="Epochs per shadow model."
)
@click.option("--json", "as_json", is_flag=True, help="Print the audit as JSON.")
def audit(
    run_id: str,
    store_url: str,
    members: str,
    nonmembers: str,
    public: str | None,
    shadows: int,
    shadow_epochs: int,
    as_json: bool,
) -> None:
    """Membership-inference audit of RUN's kept model (loss threshold + LiRA) beside the ledger's ε."""
    import numpy as np  # noqa: PLC0415

    from consortium.data import load_npz  # noqa: PLC0415
    from consortium.models import (  # noqa: PLC0415
        Standardizer,
        TrainConfig,
        build_model,
        predict_scores,
        set_parameters,
        train_local,
    )
    from consortium.privacy.audit_run import membership_audit  # noqa: PLC0415
    from consortium.privacy.ledger import PrivacyLedger  # noqa: PLC0415
    from consortium.registry import RunStore  # noqa: PLC0415

    try:
        with RunStore(store_url) as store:
            ck = store.load_checkpoint(run_id)
            charges = PrivacyLedger(store).charges(run_id=run_id)
        n = int(ck.extra["n_params"])
        arrays = ck.arrays
        kind, hidden, d = str(ck.extra["model"]), tuple(ck.extra["hidden"]), len(ck.extra["feature_names"])
        model = build_model(kind, d, hidden=hidden, seed=0)
        set_parameters(model, arrays[:n])
        std = Standardizer(mean=arrays[n], std=arrays[n + 1])
        mem, non = load_npz(members, name="members"), load_npz(nonmembers, name="nonmembers")
        if public is not None:
            pub = load_npz(public, name="public")
            pub_xy = (pub.X, pub.y)
            non_xy = (non.X, non.y)
        else:  # the attacker's population data: half of the non-members, the rest stay audited
            half = non.n_rows // 2
            pub_xy, non_xy = (non.X[:half], non.y[:half]), (non.X[half:], non.y[half:])
        for name, ds in (("members", mem.X), ("nonmembers", non.X), ("public", pub_xy[0])):
            if ds.shape[1] != d:
                raise ConsortiumError(f"The {name} file has {ds.shape[1]} features; run {run_id} expects {d}.")
        delta = float(np.mean([c.delta for c in charges])) if charges else 0.0

        def score(X: np.ndarray) -> np.ndarray:  # noqa: N803
            return predict_scores(model, std.transform(X))

        def train_shadow(X: np.ndarray, y: np.ndarray, seed: int):  # type: ignore[no-untyped-def]  # noqa: N803
            shadow = build_model(kind, d, hidden=hidden, seed=seed)
            train_local(shadow, std.transform(X), y, config=TrainConfig(epochs=shadow_epochs, seed=seed))
            return lambda Z: predict_scores(shadow, std.transform(Z))

        result = membership_audit(
            score, (mem.X, mem.y), non_xy, pub_xy, train_shadow=train_shadow, n_shadows=shadows, delta=delta
        )
    except ConsortiumError as exc:
        _fail(exc)
        return
    eps = max((c.epsilon for c in charges), default=float("inf"))
    if as_json:
        click.echo(json.dumps({"run_id": run_id, **result.as_dict(), "epsilon_accountant": eps}, indent=2))
        return
    k = result.n_members
    click.echo(f"run {run_id}: membership attacks on {k} members / {k} non-members ({result.n_shadows} shadows)")
    click.echo(f"  loss-threshold attack AUC {result.auc_loss:.3f}")
    click.echo(f"  LiRA (offline) attack AUC {result.auc_lira:.3f}")
    verdict = "consistent" if result.epsilon_lower <= eps else "EXCEEDS the accountant: check the mechanism"
    click.echo(
        f"  empirical ε lower bound {result.epsilon_lower:.3f} (95 % CP, {result.attack} attack; "
        f"point {result.epsilon_point:.3f}); accountant ε {eps:.4f} ({verdict})"
    )


def dp_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--dp``, ``--target-epsilon``, ``--delta``, ``--budget-epsilon`` and the mechanisms' options.

    They are passed on as ``dp_settings``, :class:`~consortium.federation.config.FederationConfig`
    keyword arguments, so every value is validated there before any training.  The DP-SGD
    options left unset keep the config's defaults, except ``--dp-local-steps`` under
    ``dpsgd-secagg``, which is 1 (one DP-SGD step per secure round; the only value it accepts).
    """
    from consortium.federation.config import DP_MODES, FederationConfig  # noqa: PLC0415

    defaults = FederationConfig()

    @click.option(
        "--dp",
        type=click.Choice(list(DP_MODES)),
        default="none",
        show_default=True,
        help="Differential privacy: none; dpsgd = record-level DP-SGD in every institution (private "
        "standardisation statistics); dpsgd-secagg = record-level DP-SGD of one global model, each round one step "
        "whose noise the institutions add in 1/k shares under secure aggregation; dpfedavg = institution-level "
        "DP-FedAvg (distributed Skellam noise under "
        "secure aggregation, else central Gaussian); dpfedavg-adaptive = the same with adaptive clipping.",
    )
    @click.option(
        "--target-epsilon",
        type=float,
        default=0.0,
        show_default=True,
        help="ε for the whole run; σ is calibrated before training and printed (0 = --dp-noise-multiplier).",
    )
    @click.option("--delta", type=float, default=0.0, show_default=True, help="δ (0 = 1/(10 n)).")
    @click.option(
        "--dp-noise-multiplier", type=float, default=0.0, show_default=True, help="σ when no --target-epsilon is given."
    )
    @click.option(
        "--budget-epsilon",
        type=float,
        default=0.0,
        show_default=True,
        help="Per-institution ε budget across runs on the same data (0 = none).",
    )
    @click.option("--dp-clip", type=float, default=None,
                  help=f"dpsgd*: per-row gradient L2 bound C [default: {defaults.dp_clip:g}].")
    @click.option("--dp-sampling-rate", type=float, default=None,
                  help=f"dpsgd*: Poisson sampling rate q of rows per step [default: {defaults.dp_sampling_rate:g}].")
    @click.option("--dp-local-steps", type=int, default=None,
                  help=f"dpsgd: noisy steps per round [default: {defaults.dp_local_steps}; dpsgd-secagg: 1, the "
                  "only value it accepts].")
    @click.option("--dp-lr", type=float, default=None,
                  help=f"dpsgd*: SGD step size on the noisy gradient [default: {defaults.dp_lr:g}].")
    @click.option("--update-clip", type=float, default=defaults.update_clip, show_default=True,
                  help="dpfedavg*: L2 bound C on one institution's update (initial bound when adaptive).")
    @click.option("--clip-quantile", type=float, default=defaults.clip_quantile, show_default=True,
                  help="dpfedavg-adaptive: target quantile of update norms.")
    @click.option("--clip-lr", type=float, default=defaults.clip_lr, show_default=True,
                  help="dpfedavg-adaptive: geometric step of the clip bound.")
    @click.option("--count-noise-multiplier", type=float, default=defaults.count_noise_multiplier,
                  show_default=True, help="dpfedavg-adaptive: noise std on the count of unclipped updates.")
    @click.option("--stats-noise-multiplier", type=float, default=defaults.dp_stats_noise_multiplier,
                  show_default=True, help="dpsgd: σ of each private standardisation statistic.")
    @click.option("--dp-negative-clip-power", type=float, default=defaults.dp_negative_clip_power,
                  show_default=True, help="dpsgd modes: negatives clipped to C·(p/(1-p))^power (0 = one bound).")
    @click.option("--stats-bound", type=float, default=defaults.dp_stats_bound, show_default=True,
                  help="dpsgd: public per-feature bound the private statistics clip to.")
    @wraps(fn)
    def wrapper(
        *args: Any,
        dp: str,
        target_epsilon: float,
        delta: float,
        dp_noise_multiplier: float,
        budget_epsilon: float,
        update_clip: float,
        clip_quantile: float,
        clip_lr: float,
        count_noise_multiplier: float,
        stats_noise_multiplier: float,
        stats_bound: float,
        dp_negative_clip_power: float,
        dp_clip: float | None,
        dp_sampling_rate: float | None,
        dp_local_steps: int | None,
        dp_lr: float | None,
        **kwargs: Any,
    ) -> Any:
        settings = {
            "dp": dp,
            "target_epsilon": target_epsilon,
            "delta": delta,
            "dp_noise_multiplier": dp_noise_multiplier,
            "budget_epsilon": budget_epsilon,
            "update_clip": update_clip,
            "clip_quantile": clip_quantile,
            "clip_lr": clip_lr,
            "count_noise_multiplier": count_noise_multiplier,
            "dp_stats_noise_multiplier": stats_noise_multiplier,
            "dp_stats_bound": stats_bound,
            "dp_negative_clip_power": dp_negative_clip_power,
        }
        if dp_local_steps is None and dp == "dpsgd-secagg":
            dp_local_steps = 1
        for name, value in (("dp_clip", dp_clip), ("dp_sampling_rate", dp_sampling_rate),
                            ("dp_local_steps", dp_local_steps), ("dp_lr", dp_lr)):
            if value is not None:
                settings[name] = value
        return fn(*args, dp_settings=settings, **kwargs)

    return wrapper
