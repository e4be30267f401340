"""Federated vs. local-only vs. centralized, on real and synthetic fraud-style data.

For each dataset (ADBench 5_campaign and 23_mammography from ../shared/data, and
the synthetic multi-institution generator), 5 institutions, Dirichlet(alpha=0.5)
label skew for the single-file datasets (the synthetic institutions are non-IID
by construction), several seeds: AUPRC and ROC-AUC (mean ± std) of

* local-only: each institution trains alone (mean over institutions),
* federated: consortium's ServerApp/ClientApp in Flower's simulation engine,
* centralized MLP: the same model and budget on pooled training rows,
* centralized HistGradientBoosting (class-weighted) as a tree-model reference,

all scored on the same global held-out split.  Writes
``benchmarks/results/federated_vs_central.{json,md}``.

    python benchmarks/federated_vs_central.py            # full: 3 seeds
    python benchmarks/federated_vs_central.py --quick    # 1 seed, smaller, < 60 s
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED_DATA, environment, parser, write_results  # noqa: E402

from consortium.data import FederatedSplit, federate, federate_institutions, generate_federation, load_npz  # noqa: E402
from consortium.federation.config import FederationConfig  # noqa: E402
from consortium.federation.experiment import ExperimentResult, run_experiment  # noqa: E402
from consortium.models import evaluate_scores  # noqa: E402

logger = logging.getLogger("benchmarks.federated_vs_central")


def hgb_centralized(split: FederatedSplit, *, seed: int) -> dict[str, float]:
    """Class-weighted HistGradientBoosting on pooled training rows (tree reference)."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    train = split.pooled_train()
    clf = HistGradientBoostingClassifier(class_weight="balanced", random_state=seed, max_iter=200,
                                         early_stopping=True, validation_fraction=0.15)
    clf.fit(train.X, train.y)
    m = evaluate_scores(split.holdout.y, clf.predict_proba(split.holdout.X)[:, 1])
    return {"auprc": m.auprc, "roc_auc": m.roc_auc}


def make_split(name: str, *, seed: int, quick: bool) -> FederatedSplit:
    if name == "synthetic":
        fed = generate_federation(5, transactions_per_institution=5_000 if quick else 20_000, seed=seed)
        return federate_institutions({k: v.dataset for k, v in fed.items()}, seed=seed)
    ds = load_npz(SHARED_DATA / f"{name}.npz", name=name)
    return federate(ds, 5, scheme="dirichlet", alpha=0.5, seed=seed)


def config_for(
    name: str, *, seed: int, quick: bool, store_url: str, mu: float, rounds: int | None = None
) -> FederationConfig:
    """Library defaults (FedProx, 2 local epochs, Adam lr 3e-3, batch 128), secure aggregation on."""
    return FederationConfig(
        num_rounds=rounds or (4 if quick else 30),
        strategy="fedprox",
        proximal_mu=mu,
        min_nodes=5,
        secure_aggregation=True,
        store_url=store_url,
        run_name=f"bench-{name}-{seed}-mu{mu}",
        seed=seed,
    )


def federated_val_auprc(result: ExperimentResult) -> float:
    """Federated validation AUPRC of the kept round (summed histograms; no holdout peeking)."""
    return float(result.run.selected.global_metrics.get("val-auprc", float("nan")))


def per_dataset_mu(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One FedProx mu per dataset: the best *mean* federated validation AUPRC over seeds.

    Less noisy than choosing per run when institutions' validation splits hold
    few positives; still never looks at the holdout. Reports the holdout AUPRC
    of that mu, averaged over seeds.
    """
    mus = [t["proximal_mu"] for t in runs[0]["mu_trials"]]
    val = {mu: float(np.mean([t["federated_val_auprc"] for r in runs for t in r["mu_trials"]
                              if t["proximal_mu"] == mu])) for mu in mus}
    best = max(mus, key=lambda mu: val[mu])
    holdout = [t["federated_holdout_auprc"] for r in runs for t in r["mu_trials"] if t["proximal_mu"] == best]
    fed = float(np.mean(holdout))
    cen = float(np.mean([r["centralized_auprc"] for r in runs]))
    loc = float(np.mean([r["local_only_auprc_mean"] for r in runs]))
    return {"proximal_mu": best, "mean_val_auprc_by_mu": {str(k): v for k, v in val.items()},
            "federated_auprc": fed, "federated_auprc_std": float(np.std(holdout)),
            "federated_over_centralized": fed / cen, "target_met": bool(fed >= 0.95 * cen and fed > loc)}


def add_per_dataset_mu(result: dict[str, Any]) -> None:
    """Add the per-dataset mu selection to every dataset and to the summary (in place)."""
    for name, d in result["datasets"].items():
        d["per_dataset_mu"] = per_dataset_mu(d["runs"])
        result["summary"][name]["federated_auprc_per_dataset_mu"] = d["per_dataset_mu"]["federated_auprc"]


def stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(np.nanmean(a)), "std": float(np.nanstd(a)), "n": int(len(a))}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="*", default=None)
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None, help="Federated rounds (default 30; --quick: 4).")
    p.add_argument("--mu-grid", type=float, nargs="+", default=None,
                   help="FedProx mu values; the one with the best federated validation AUPRC is kept "
                        "(default 0.01 0.1 1.0; --quick: 0.01 0.1).")
    p.add_argument("--reanalyse", default=None, metavar="JSON",
                   help="Recompute the per-dataset mu selection of a stored result and rewrite results/.")
    args = p.parse_args()
    if args.reanalyse:
        result = json.loads(Path(args.reanalyse).read_text())
        add_per_dataset_mu(result)
        write_results("federated_vs_central", result, markdown(result), json_path=args.json_path)
        print(markdown(result))
        return
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("flwr", "ray"):
        logging.getLogger(noisy).propagate = False
    datasets = args.datasets or (["synthetic"] if args.quick else ["5_campaign", "23_mammography", "synthetic"])
    n_seeds = args.seeds or (1 if args.quick else 3)
    args.mu_grid = args.mu_grid or ([0.01, 0.1] if args.quick else [0.01, 0.1, 1.0])
    t_start = time.perf_counter()
    per_dataset: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        store_url = f"sqlite:///{tmp}/bench.db"
        for name in datasets:
            runs = []
            for seed in range(n_seeds):
                split = make_split(name, seed=seed, quick=args.quick)
                t0 = time.perf_counter()
                # FedProx's mu is chosen per run on federated *validation* AUPRC (never the holdout);
                # the baselines train once (mu does not apply to them).
                candidates = []
                for i, mu in enumerate(args.mu_grid):
                    cfg = config_for(name, seed=seed, quick=args.quick, store_url=store_url, mu=mu,
                                     rounds=args.rounds)
                    res = run_experiment(split, cfg, work_dir=Path(tmp) / f"{name}-{seed}-{mu}", dataset_name=name,
                                         baselines=i == 0)
                    candidates.append((mu, res))
                baseline_res = candidates[0][1]
                best_mu, res = max(candidates, key=lambda c: federated_val_auprc(c[1]))
                s = {**baseline_res.summary(), **{k: v for k, v in res.summary().items() if k.startswith("federated")}}
                mu_trials = [{"proximal_mu": mu, "federated_val_auprc": federated_val_auprc(r),
                              "federated_holdout_auprc": r.summary()["federated_auprc"],
                              "selected_round": r.run.selected_round} for mu, r in candidates]
                hgb = hgb_centralized(split, seed=seed)
                runs.append({"seed": seed, **s, "proximal_mu": best_mu, "mu_trials": mu_trials,
                             "hgb_centralized_auprc": hgb["auprc"],
                             "hgb_centralized_roc_auc": hgb["roc_auc"],
                             "curve": res.curve(), "seconds": time.perf_counter() - t0,
                             "institution_rows": [i.train.n_rows for i in split.institutions],
                             "institution_positive_rates": [i.train.positive_rate for i in split.institutions]})
                print(f"{name} seed {seed}: federated {s['federated_auprc']:.4f} centralized "
                      f"{s['centralized_auprc']:.4f} local-only {s['local_only_auprc_mean']:.4f} "
                      f"HGB {hgb['auprc']:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
            keys = ["federated_auprc", "centralized_auprc", "local_only_auprc_mean", "hgb_centralized_auprc",
                    "federated_roc_auc", "centralized_roc_auc", "local_only_roc_auc_mean", "hgb_centralized_roc_auc"]
            agg = {k: stats([r[k] for r in runs]) for k in keys}
            fed, cen, loc = (agg["federated_auprc"]["mean"], agg["centralized_auprc"]["mean"],
                             agg["local_only_auprc_mean"]["mean"])
            per_dataset[name] = {"runs": runs, "aggregate": agg,
                                 "federated_over_centralized": fed / cen if cen else float("nan"),
                                 "target_met": bool(fed >= 0.95 * cen and fed > loc)}
            summary[name] = {"federated_auprc": fed, "centralized_auprc": cen, "local_only_auprc_mean": loc,
                             "hgb_centralized_auprc": agg["hgb_centralized_auprc"]["mean"]}
    cfg_example = config_for(datasets[0], seed=0, quick=args.quick, store_url="", mu=args.mu_grid[0],
                             rounds=args.rounds)
    result = {
        "benchmark": "federated_vs_central",
        "quick": args.quick,
        "seeds": n_seeds,
        "config": {k: v for k, v in cfg_example.to_run_config().items()
                   if k not in ("store-url", "run-name", "proximal-mu")},
        "proximal_mu_grid": args.mu_grid,
        "partition": "dirichlet alpha=0.5 (5_campaign, 23_mammography); synthetic institutions non-IID by construction",
        "environment": environment(),
        "seconds": time.perf_counter() - t_start,
        "summary": summary,
        "datasets": per_dataset,
    }
    add_per_dataset_mu(result)
    write_results("federated_vs_central", result, markdown(result), json_path=args.json_path)
    print(markdown(result))


def _mean_std(aggregate: dict[str, Any]) -> Any:
    return lambda k: f"{aggregate[k]['mean']:.4f} ± {aggregate[k]['std']:.4f}"


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Federated vs. local-only vs. centralized",
        "",
        f"5 institutions, {result['seeds']} seed(s), {result['partition']}. "
        f"Quick mode: {result['quick']}. Scores on a global held-out split no institution trained on. "
        "Federated = consortium ServerApp/ClientApp in Flower's simulation engine with secure aggregation, "
        f"FedProx with mu chosen from {result['proximal_mu_grid']} on federated validation AUPRC "
        "(summed score histograms; the holdout is never used for selection).",
        "",
        "| dataset | local-only AUPRC (mean of institutions) | federated AUPRC | centralized MLP AUPRC | "
        "centralized HGB AUPRC | federated / centralized | target met |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, d in result["datasets"].items():
        f = _mean_std(d["aggregate"])
        lines.append(f"| {name} | {f('local_only_auprc_mean')} | {f('federated_auprc')} | {f('centralized_auprc')} | "
                     f"{f('hgb_centralized_auprc')} | {d['federated_over_centralized']:.3f} | "
                     f"{'yes' if d['target_met'] else 'no'} |")
    lines += ["", "ROC-AUC:", "", "| dataset | local-only | federated | centralized MLP | centralized HGB |",
              "|---|---|---|---|---|"]
    for name, d in result["datasets"].items():
        f = _mean_std(d["aggregate"])
        lines.append(f"| {name} | {f('local_only_roc_auc_mean')} | {f('federated_roc_auc')} | "
                     f"{f('centralized_roc_auc')} | {f('hgb_centralized_roc_auc')} |")
    lines += ["", "FedProx mu kept per seed (by federated validation AUPRC):", ""]
    for name, d in result["datasets"].items():
        trials = "; ".join(
            f"seed {r['seed']}: mu={r['proximal_mu']} (" + ", ".join(
                f"mu {t['proximal_mu']}: val {t['federated_val_auprc']:.3f} / "
                f"holdout {t['federated_holdout_auprc']:.3f}"
                for t in r["mu_trials"]) + ")"
            for r in d["runs"])
        lines.append(f"- {name}: {trials}")
    if all("per_dataset_mu" in d for d in result["datasets"].values()):
        lines += ["", "One mu per dataset, chosen on the mean federated validation AUPRC over seeds "
                  "(same trials; holdout never used for selection):", "",
                  "| dataset | mu | mean validation AUPRC by mu | federated AUPRC | federated / centralized "
                  "| target met |",
                  "|---|---|---|---|---|---|"]
        for name, d in result["datasets"].items():
            q = d["per_dataset_mu"]
            vals = ", ".join(f"{k}: {v:.3f}" for k, v in q["mean_val_auprc_by_mu"].items())
            lines.append(f"| {name} | {q['proximal_mu']} | {vals} | {q['federated_auprc']:.4f} ± "
                         f"{q['federated_auprc_std']:.4f} | {q['federated_over_centralized']:.3f} | "
                         f"{'yes' if q['target_met'] else 'no'} |")
    lines += ["", "Target: federated AUPRC ≥ 0.95 × centralized MLP and above the mean local-only AUPRC.",
              f"Total time {result['seconds']:.0f} s on {result['environment']['cpus']} CPUs.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
