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
def audit(run_id: str, store_url: str, members: str, nonmembers: str) -> None:
    """Membership-inference audit of RUN's kept model beside the ledger's ε."""
    import numpy as np  # noqa: PLC0415

    from consortium.data import load_npz  # noqa: PLC0415
    from consortium.models import Standardizer, build_model, predict_scores, set_parameters  # noqa: PLC0415
    from consortium.privacy.audit import bce_losses, epsilon_lower_bound, loss_threshold_auc  # noqa: PLC0415
    from consortium.privacy.ledger import PrivacyLedger  # noqa: PLC0415
    from consortium.registry import RunStore  # noqa: PLC0415

    try:
        with RunStore(store_url) as store:
            ck = store.load_checkpoint(run_id)
            charges = PrivacyLedger(store).charges(run_id=run_id)
        n = int(ck.extra["n_params"])
        arrays = ck.arrays
        model = build_model(
            str(ck.extra["model"]), len(ck.extra["feature_names"]), hidden=tuple(ck.extra["hidden"]), seed=0
        )
        set_parameters(model, arrays[:n])
        std = Standardizer(mean=arrays[n], std=arrays[n + 1])
        mem, non = load_npz(members, name="members"), load_npz(nonmembers, name="nonmembers")
    except ConsortiumError as exc:
        _fail(exc)
        return
    k = min(mem.n_rows, non.n_rows)
    lm = bce_losses(predict_scores(model, std.transform(mem.X[:k])), mem.y[:k])
    ln = bce_losses(predict_scores(model, std.transform(non.X[:k])), non.y[:k])
    auc = loss_threshold_auc(lm, ln)
    lb = epsilon_lower_bound(-lm, -ln, delta=float(np.mean([c.delta for c in charges])) if charges else 0.0)
    eps = max((c.epsilon for c in charges), default=float("inf"))
    click.echo(f"run {run_id}: loss-threshold attack AUC {auc:.3f} on {k} members / {k} non-members")
    click.echo(
        f"  empirical ε lower bound {lb['epsilon_lower']:.3f} (95 % CP; point {lb['epsilon_point']:.3f}); "
        f"accountant ε {eps:.4f}"
    )


def dp_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--dp``, ``--target-epsilon``, ``--delta``, ``--budget-epsilon``, passed on as ``dp_settings``.

    ``dp_settings`` holds :class:`~consortium.federation.config.FederationConfig` keyword arguments.
    """

    @click.option(
        "--dp",
        type=click.Choice(["none", "dpsgd"]),
        default="none",
        show_default=True,
        help="Differential privacy: none, or record-level DP-SGD in every institution.",
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
    @wraps(fn)
    def wrapper(
        *args: Any,
        dp: str,
        target_epsilon: float,
        delta: float,
        dp_noise_multiplier: float,
        budget_epsilon: float,
        **kwargs: Any,
    ) -> Any:
        settings = {
            "dp": dp,
            "target_epsilon": target_epsilon,
            "delta": delta,
            "dp_noise_multiplier": dp_noise_multiplier,
            "budget_epsilon": budget_epsilon,
        }
        return fn(*args, dp_settings=settings, **kwargs)

    return wrapper
