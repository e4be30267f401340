"""Privacy audit: membership-inference AUC (loss threshold, offline LiRA) and canary ε lower bounds vs ε.

In-process federated training (the configurations of ``privacy_utility.py``: 5 IID
institutions, its headline record-level mechanism ``dpsgd-secagg``, δ = 1e-5)
without DP and at ε ∈ {1, 8}.
Membership audit of institution 1's training rows against 30 % of its rows held
back from training; LiRA's shadows are the same federated recipe trained on the
holdout (public data, never audited). Canary audit: 200 canaries inserted into
institution 1 (200 more held out). Every empirical ε is a 95 % lower bound and
must stay below the accountant's ε.
Writes benchmarks/results/privacy_audit.{json,md,png}.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from _common import RESULTS_DIR, environment, parser, write_results
from privacy_utility import DELTA, HEADLINE, NONPRIVATE, SECAGG, STATS_BOUND, make_parts

from consortium.privacy.audit_canary import canary_audit
from consortium.privacy.audit_run import membership_audit
from consortium.privacy.inprocess import InProcessConfig, train_private_federated
from consortium.privacy.stats import PrivateStatsSpec

logger = logging.getLogger("benchmarks.privacy_audit")


def _config(eps: float | None, seed: int, dataset: str) -> InProcessConfig:
    """The non-private reference, or the utility benchmark's headline record-level mechanism at ``eps``."""
    if eps is None:
        return InProcessConfig(mode="none", seed=seed, **NONPRIVATE)  # type: ignore[arg-type]
    return InProcessConfig(
        mode=HEADLINE,  # type: ignore[arg-type]
        target_epsilon=eps,
        delta=DELTA,
        seed=seed,
        stats=PrivateStatsSpec(bound=STATS_BOUND.get(dataset, 1.0)),
        **SECAGG,  # type: ignore[arg-type]
    )


def audit_one(parts: list, holdout: Any, cfg: InProcessConfig, *, n_shadows: int, n_canaries: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    # Non-members come from institution 1's own rows (held back from its training), so that the attack
    # sees membership and not a shift between institutions (the synthetic federation is non-IID).
    # Rows are shuffled first: the synthetic rows are in time order, and a time cut would measure drift.
    X0, y0 = parts[0]  # noqa: N806
    order = np.random.default_rng(cfg.seed).permutation(len(y0))
    cut = int(0.7 * len(y0))
    keep, held = order[:cut], order[cut:]
    train_parts = [(X0[keep], y0[keep]), *parts[1:]]
    res = train_private_federated(train_parts, cfg)
    nonmembers = (X0[held], y0[held])
    public = (holdout.X, holdout.y)

    def shadow(X: np.ndarray, y: np.ndarray, seed: int):  # type: ignore[no-untyped-def]  # noqa: N803
        idx = np.array_split(np.random.default_rng(seed).permutation(len(y)), len(parts))
        r = train_private_federated([(X[i], y[i]) for i in idx], replace(cfg, seed=cfg.seed + 1000 + seed))
        return r.scores

    mia = membership_audit(
        res.scores, train_parts[0], nonmembers, public, train_shadow=shadow, n_shadows=n_shadows, delta=cfg.delta
    )
    can = canary_audit(parts, cfg, n_canaries=n_canaries, seed=cfg.seed)
    return {
        "epsilon_accountant": res.epsilon,
        "auc_loss": mia.auc_loss,
        "auc_lira": mia.auc_lira,
        "mia_epsilon_lower": mia.epsilon_lower,
        "mia_attack": mia.attack,
        "n_audited": mia.n_members,
        "canary_auc": can.auc,
        "canary_tpr": can.tpr,
        "canary_fpr": can.fpr,
        "canary_epsilon_point": can.epsilon_point,
        "canary_epsilon_lower": can.epsilon_lower,
        "consistent": bool(max(mia.epsilon_lower, can.epsilon_lower) <= res.epsilon),
        "seconds": time.perf_counter() - t0,
    }


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--datasets", default="23_mammography,synthetic")
    p.add_argument("--seeds", type=int, default=2)
    args = p.parse_args()
    datasets = ["synthetic"] if args.quick else args.datasets.split(",")
    seeds = 1 if args.quick else args.seeds
    n_shadows, n_canaries = (2, 64) if args.quick else (4, 200)
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for seed in range(seeds):
        for name in datasets:
            parts, holdout = make_parts(name, 5, seed, args.quick)
            for eps in (None, 8.0, 1.0):
                r = audit_one(parts, holdout, _config(eps, seed, name), n_shadows=n_shadows, n_canaries=n_canaries)
                rows.append({"dataset": name, "seed": seed, "epsilon": eps, **r})
                logger.info(
                    "%s seed %d ε=%s: loss AUC %.3f, LiRA AUC %.3f, canary AUC %.3f, ε_lower %.3f/%.3f (%.0fs)",
                    name, seed, eps, r["auc_loss"], r["auc_lira"], r["canary_auc"], r["mia_epsilon_lower"],
                    r["canary_epsilon_lower"], r["seconds"],
                )  # fmt: skip
    result = summarise(rows, datasets, quick=args.quick, seeds=seeds)
    result["seconds"] = time.perf_counter() - t_start
    plot(result["table"], datasets)
    write_results("privacy_audit", result, markdown(result), json_path=args.json_path)


def summarise(rows: list[dict[str, Any]], datasets: list[str], *, quick: bool, seeds: int) -> dict[str, Any]:
    keys = ("auc_loss", "auc_lira", "mia_epsilon_lower", "canary_auc", "canary_epsilon_lower", "epsilon_accountant")
    table = []
    for ds in datasets:
        for eps in (None, 8.0, 1.0):
            sel = [r for r in rows if r["dataset"] == ds and r["epsilon"] == eps]
            if sel:
                table.append(
                    {
                        "dataset": ds,
                        "epsilon": eps,
                        **{k: float(np.mean([r[k] for r in sel])) for k in keys},
                        "all_consistent": all(r["consistent"] for r in sel),
                        "n_seeds": len(sel),
                    }
                )
    main_ds = datasets[0]

    def get(eps: float | None, key: str) -> float:
        return next(t[key] for t in table if t["dataset"] == main_ds and t["epsilon"] == eps)

    summary = {
        "dataset": main_ds,
        "mia_auc_nodp": get(None, "auc_loss"),
        "mia_auc_eps1": get(1.0, "auc_loss"),
        "lira_auc_nodp": get(None, "auc_lira"),
        "lira_auc_eps1": get(1.0, "auc_lira"),
        "canary_epsilon_lower_nodp": get(None, "canary_epsilon_lower"),
        "canary_epsilon_lower_eps1": get(1.0, "canary_epsilon_lower"),
        "all_consistent": all(r["consistent"] for r in rows),
    }
    return {
        "benchmark": "privacy_audit",
        "quick": quick,
        "seeds": seeds,
        "delta": DELTA,
        "environment": environment(),
        "summary": summary,
        "table": table,
        "runs": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    s = result["summary"]
    lines = [
        "# Privacy audit",
        "",
        f"δ = {result['delta']}, {result['seeds']} seed(s), quick = {result['quick']}, 5 IID institutions. "
        "Membership attacks on institution 1's training rows vs. held-out rows; canaries in institution 1. "
        "Empirical ε = one-sided 95 % Clopper-Pearson lower bound (threshold chosen on a separate half).",
        "",
        f"Summary ({s['dataset']}): loss-threshold AUC {s['mia_auc_nodp']:.3f} without DP, "
        f"{s['mia_auc_eps1']:.3f} at ε=1; LiRA AUC {s['lira_auc_nodp']:.3f} / {s['lira_auc_eps1']:.3f}; "
        f"canary ε lower bound {s['canary_epsilon_lower_nodp']:.3f} / {s['canary_epsilon_lower_eps1']:.3f}; "
        f"all bounds below the accountant's ε: {s['all_consistent']}.",
        "",
        "| dataset | accountant ε | loss AUC | LiRA AUC | MIA ε lower | canary AUC | canary ε lower | consistent |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for t in result["table"]:
        lines.append(
            f"| {t['dataset']} | {t['epsilon_accountant']:.3g} | {t['auc_loss']:.3f} | {t['auc_lira']:.3f} | "
            f"{t['mia_epsilon_lower']:.3f} | {t['canary_auc']:.3f} | {t['canary_epsilon_lower']:.3f} | "
            f"{t['all_consistent']} |"
        )
    lines += ["", "![audit](privacy_audit.png)"]
    return "\n".join(lines)


def plot(table: list[dict[str, Any]], datasets: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 4), squeeze=False)
    labels = ["no DP", "ε=8", "ε=1"]
    for ax, ds in zip(axes[0], datasets, strict=True):
        rows = [t for t in table if t["dataset"] == ds]
        x = np.arange(len(rows))
        for j, (key, name) in enumerate(
            (("auc_loss", "loss AUC"), ("auc_lira", "LiRA AUC"), ("canary_auc", "canary AUC"))
        ):
            ax.bar(x + (j - 1) * 0.25, [t[key] for t in rows], width=0.25, label=name)
        ax.axhline(0.5, color="k", lw=1, ls="--")
        ax.set_xticks(x, labels[: len(rows)])
        ax.set_ylim(0.4, 1.0)
        ax.set_ylabel("attack ROC-AUC (0.5 = guessing)")
        ax.set_title(ds)
        ax.legend(fontsize=7)
    fig.tight_layout()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS_DIR / "privacy_audit.png", dpi=110)


if __name__ == "__main__":
    main()
