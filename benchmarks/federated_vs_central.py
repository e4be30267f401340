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
from consortium.federation.experiment import run_experiment  # noqa: E402
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
        fed = generate_federation(5, transactions_per_institution=8_000 if quick else 40_000, seed=seed)
        return federate_institutions({k: v.dataset for k, v in fed.items()}, seed=seed)
    ds = load_npz(SHARED_DATA / f"{name}.npz", name=name)
    return federate(ds, 5, scheme="dirichlet", alpha=0.5, seed=seed)


def config_for(name: str, *, seed: int, quick: bool, store_url: str) -> FederationConfig:
    return FederationConfig(
        num_rounds=5 if quick else 20,
        local_epochs=2,
        batch_size=128,
        lr=1e-3,
        min_nodes=5,
        secure_aggregation=True,
        store_url=store_url,
        run_name=f"bench-{name}-{seed}",
        seed=seed,
    )


def stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(np.nanmean(a)), "std": float(np.nanstd(a)), "n": int(len(a))}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="*", default=None)
    p.add_argument("--seeds", type=int, default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    datasets = args.datasets or (["synthetic"] if args.quick else ["5_campaign", "23_mammography", "synthetic"])
    n_seeds = args.seeds or (1 if args.quick else 3)
    t_start = time.perf_counter()
    per_dataset: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        store_url = f"sqlite:///{tmp}/bench.db"
        for name in datasets:
            runs = []
            for seed in range(n_seeds):
                split = make_split(name, seed=seed, quick=args.quick)
                cfg = config_for(name, seed=seed, quick=args.quick, store_url=store_url)
                t0 = time.perf_counter()
                res = run_experiment(split, cfg, work_dir=Path(tmp) / f"{name}-{seed}", dataset_name=name)
                s = res.summary()
                hgb = hgb_centralized(split, seed=seed)
                runs.append({"seed": seed, **s, "hgb_centralized_auprc": hgb["auprc"],
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
    cfg_example = config_for(datasets[0], seed=0, quick=args.quick, store_url="")
    result = {
        "benchmark": "federated_vs_central",
        "quick": args.quick,
        "seeds": n_seeds,
        "config": {k: v for k, v in cfg_example.to_run_config().items() if k not in ("store-url", "run-name")},
        "partition": "dirichlet alpha=0.5 (5_campaign, 23_mammography); synthetic institutions non-IID by construction",
        "environment": environment(),
        "seconds": time.perf_counter() - t_start,
        "summary": summary,
        "datasets": per_dataset,
    }
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
        "Federated = consortium ServerApp/ClientApp in Flower's simulation engine with secure aggregation.",
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
    lines += ["", "Target: federated AUPRC ≥ 0.95 × centralized MLP and above the mean local-only AUPRC.",
              f"Total time {result['seconds']:.0f} s on {result['environment']['cpus']} CPUs.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
