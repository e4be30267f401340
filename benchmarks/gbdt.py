"""Federated gradient-boosted trees vs. centralized HistGradientBoosting / XGBoost, local-only and the MLP.

For ADBench 5_campaign and 23_mammography (../shared/data) split over 5
institutions (IID and Dirichlet alpha = 0.5 label skew) and the synthetic
multi-institution generator, several seeds, all scored on the same global
holdout:

* federated boosting over the real ClientApp (in-process Grid, protobuf on every
  message): plain sums, secure aggregation (SecAgg+), and secure aggregation with
  DP histograms at epsilon 1 and 4 (Dirichlet splits; smaller trees, see DP_PARAMS);
* centralized HistGradientBoosting and XGBoost with the same hyperparameters on
  the pooled training rows, early-stopped on the pooled validation rows;
* local-only boosting (each institution alone, mean over institutions);
* the federated MLP (FedProx + SecAgg) from benchmarks/results/federated_vs_central.json,
  which uses the same Dirichlet splits and seeds.

Training time is the benchmark process's CPU time over the run (every party runs
in it, one after the other, on the in-process grid), so ``secagg_time_over_plain``
is the ratio of total work and does not depend on the machine's load; wall time
is recorded beside it;
bytes are per institution, up plus down.

    python benchmarks/gbdt.py            # full: 3 seeds
    python benchmarks/gbdt.py --quick    # synthetic, 1 seed, small (< 60 s)
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
from _common import RESULTS_DIR, SHARED_DATA, environment, parser, write_results  # noqa: E402

from consortium.data import (  # noqa: E402
    FederatedSplit,
    federate,
    federate_institutions,
    generate_federation,
    load_npz,
    save_split,  # noqa: E402
)
from consortium.federation.client_app import build_client_app  # noqa: E402
from consortium.federation.config import FederationConfig  # noqa: E402
from consortium.federation.gbdt_coordinator import GBDTCoordinator  # noqa: E402
from consortium.models.gbdt import GBDTParams, fit_local, predict_proba  # noqa: E402
from consortium.models.metrics import evaluate_scores  # noqa: E402
from consortium.registry import RunStore  # noqa: E402
from consortium.secagg.inprocess import InProcessGrid  # noqa: E402

logger = logging.getLogger("benchmarks.gbdt")

PARAMS = GBDTParams()
"""Library defaults: 200 trees max, lr 0.1, depth 6, 31 leaves, l2 1, 20 rows per leaf, 128 bins, early stop 20."""
DP_PARAMS = GBDTParams(n_trees=20, learning_rate=0.3, max_depth=3, max_leaves=8, max_bins=32)
"""Fewer releases for DP: 20 trees x 3 levels + 2 = 62 Gaussian releases."""
EPSILONS = (1.0, 4.0)
SUMMARY_KEYS = ("fed_gbdt_auprc", "central_hgb_auprc", "fed_gbdt_over_central", "fed_mlp_auprc",
                "secagg_time_over_plain")
DP_DELTA = 1e-5


def make_split(name: str, *, scheme: str, seed: int, quick: bool) -> FederatedSplit:
    if name == "synthetic":
        fed = generate_federation(5, transactions_per_institution=3_000 if quick else 5_000, seed=seed)
        return federate_institutions({k: v.dataset for k, v in fed.items()}, seed=seed)
    ds = load_npz(SHARED_DATA / f"{name}.npz", name=name)
    return federate(ds, 5, scheme=scheme, alpha=0.5, seed=seed)  # type: ignore[arg-type]


def federated(split: FederatedSplit, tmp: Path, *, secure: bool, params: GBDTParams,
              dp_epsilon: float | None = None) -> dict[str, Any]:
    root = Path(save_split(split, tmp / "data"))
    nodes = [1000 + i for i in range(len(split.institutions))]
    dirs = {n: {"data-path": str(root / name), "institution": name}
            for n, name in zip(nodes, split.names(), strict=True)}
    cfg = FederationConfig(min_nodes=len(nodes), secure_aggregation=secure, store_url=f"sqlite:///{tmp}/runs.db",
                           round_timeout=300)
    grid = InProcessGrid(build_client_app(), node_ids=nodes, node_configs=dirs)
    with RunStore(cfg.store_url) as store:
        t0, c0 = time.perf_counter(), time.process_time()
        res = GBDTCoordinator(cfg, params=params, store=store, holdout=split.holdout, dp_epsilon=dp_epsilon,
                              dp_delta=DP_DELTA).run(grid)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    per_node = [grid.stats.bytes_up_by_node[n] + grid.stats.bytes_down_by_node[n] for n in nodes]
    out = {"auprc": res.holdout_metrics["auprc"], "roc_auc": res.holdout_metrics["roc-auc"], "seconds": seconds,
           "cpu_seconds": cpu,
           "trees": res.boost.best_n_trees, "requests": res.requests, "bytes_per_institution": float(np.mean(per_node))}
    if dp_epsilon is not None:
        out["epsilon_spent"] = res.extra["privacy"]["epsilon_spent"]
        out["noise_multiplier"] = res.extra["privacy"]["noise_multiplier"]
    return out


def hgb(split: FederatedSplit, params: GBDTParams, seed: int) -> dict[str, float]:
    from sklearn.ensemble import HistGradientBoostingClassifier  # noqa: PLC0415

    tr, va = split.pooled_train(), split.pooled_val()
    clf = HistGradientBoostingClassifier(
        learning_rate=params.learning_rate, max_iter=params.n_trees, max_depth=params.max_depth,
        max_leaf_nodes=params.max_leaves, l2_regularization=params.l2, min_samples_leaf=params.min_samples_leaf,
        max_bins=min(params.max_bins, 255), early_stopping=True, n_iter_no_change=params.early_stopping,
        scoring="loss", class_weight="balanced" if params.class_weight == "balanced" else None, random_state=seed)
    t0 = time.perf_counter()
    clf.fit(tr.X, tr.y, X_val=va.X, y_val=va.y)
    m = evaluate_scores(split.holdout.y, clf.predict_proba(split.holdout.X)[:, 1])
    return {"auprc": m.auprc, "roc_auc": m.roc_auc, "seconds": time.perf_counter() - t0, "trees": int(clf.n_iter_)}


def xgb(split: FederatedSplit, params: GBDTParams, seed: int) -> dict[str, float]:
    import xgboost  # noqa: PLC0415

    tr, va = split.pooled_train(), split.pooled_val()
    spw = float((tr.y == 0).sum() / max((tr.y == 1).sum(), 1)) if params.class_weight == "balanced" else 1.0
    clf = xgboost.XGBClassifier(
        n_estimators=params.n_trees, learning_rate=params.learning_rate, max_depth=params.max_depth,
        max_leaves=params.max_leaves, reg_lambda=params.l2, min_child_weight=params.min_child_weight,
        max_bin=params.max_bins, tree_method="hist", early_stopping_rounds=params.early_stopping,
        eval_metric="logloss", scale_pos_weight=spw, n_jobs=1, random_state=seed)
    t0 = time.perf_counter()
    clf.fit(tr.X, tr.y, eval_set=[(va.X, va.y)], verbose=False)
    m = evaluate_scores(split.holdout.y, clf.predict_proba(split.holdout.X)[:, 1])
    return {"auprc": m.auprc, "roc_auc": m.roc_auc, "seconds": time.perf_counter() - t0,
            "trees": int(clf.best_iteration) + 1}


def local_only(split: FederatedSplit, params: GBDTParams) -> dict[str, float]:
    auprc, roc = [], []
    for inst in split.institutions:
        r = fit_local(inst.train.X, inst.train.y, inst.val.X, inst.val.y, params=params)
        m = evaluate_scores(split.holdout.y, predict_proba(r, split.holdout.X))
        auprc.append(m.auprc)
        roc.append(m.roc_auc)
    return {"auprc": float(np.nanmean(auprc)), "roc_auc": float(np.nanmean(roc))}


def mlp_reference() -> dict[str, float]:
    """Federated MLP AUPRC per dataset (same Dirichlet splits and seeds) from the committed benchmark."""
    path = RESULTS_DIR / "federated_vs_central.json"
    if not path.exists():
        return {}
    summary = json.loads(path.read_text())["summary"]
    return {name: float(v["federated_auprc"]) for name, v in summary.items()}


def mean(values: list[float]) -> float:
    a = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(a)) if a.size else float("nan")


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="*", default=None)
    p.add_argument("--schemes", nargs="*", default=None, help="Partitions of the .npz datasets (iid dirichlet).")
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--no-dp", action="store_true", help="Skip the DP runs.")
    p.add_argument("--runs-out", default=None, metavar="JSONL",
                   help="Append every finished run here as one JSON line (several processes can share the work).")
    p.add_argument("--combine", nargs="+", default=None, metavar="JSONL",
                   help="Build the result from run lines written with --runs-out (no training).")
    args = p.parse_args()
    params = GBDTParams(n_trees=30) if args.quick else PARAMS
    dp_params = GBDTParams(n_trees=5, learning_rate=0.3, max_depth=3, max_leaves=8, max_bins=32) if args.quick \
        else DP_PARAMS
    t_start = time.perf_counter()
    if args.combine:
        runs = [json.loads(line) for f in args.combine for line in Path(f).read_text().splitlines() if line.strip()]
        finish(runs, args=args, params=params, dp_params=dp_params, seconds=sum(r["seconds"] for r in runs))
        return
    logging.basicConfig(level=logging.WARNING)
    datasets = args.datasets or (["synthetic"] if args.quick else ["5_campaign", "23_mammography", "synthetic"])
    n_seeds = args.seeds or (1 if args.quick else 3)
    runs = []
    with tempfile.TemporaryDirectory() as tmp_root:
        tmp = Path(tmp_root)
        for name in datasets:
            schemes = ["non-iid"] if name == "synthetic" else (args.schemes or ["dirichlet", "iid"])
            for scheme in schemes:
                for seed in range(args.first_seed, args.first_seed + n_seeds):
                    t0 = time.perf_counter()
                    split = make_split(name, scheme=scheme, seed=seed, quick=args.quick)
                    run: dict[str, Any] = {"dataset": name, "scheme": scheme, "seed": seed}
                    tag = f"{name}-{scheme}-{seed}"
                    run["plain"] = federated(split, tmp / f"{tag}-plain", secure=False, params=params)
                    run["secagg"] = federated(split, tmp / f"{tag}-secagg", secure=True, params=params)
                    # CPU seconds of this process: every party runs in it (in-process grid), and unlike wall time
                    # it does not depend on what else the machine is doing.
                    run["secagg_time_over_plain"] = run["secagg"]["cpu_seconds"] / run["plain"]["cpu_seconds"]
                    if not args.no_dp and scheme != "iid":
                        for eps in EPSILONS:
                            run[f"dp_eps{eps:g}"] = federated(split, tmp / f"{tag}-dp{eps:g}", secure=True,
                                                              params=dp_params, dp_epsilon=eps)
                        run["secagg_small_trees"] = federated(split, tmp / f"{tag}-small", secure=True,
                                                              params=dp_params)
                    run["central_hgb"] = hgb(split, params, seed)
                    run["central_xgb"] = xgb(split, params, seed)
                    run["local_only"] = local_only(split, params)
                    run["seconds"] = time.perf_counter() - t0
                    runs.append(run)
                    if args.runs_out:
                        with open(args.runs_out, "a") as fh:
                            fh.write(json.dumps(run, default=float) + "\n")
                    print(f"{tag}: fed plain {run['plain']['auprc']:.4f} secagg {run['secagg']['auprc']:.4f} "
                          f"HGB {run['central_hgb']['auprc']:.4f} XGB {run['central_xgb']['auprc']:.4f} "
                          f"local {run['local_only']['auprc']:.4f} secagg/plain time "
                          f"{run['secagg_time_over_plain']:.2f} ({run['seconds']:.0f} s)", flush=True)
    if not args.runs_out or args.quick:
        finish(runs, args=args, params=params, dp_params=dp_params, seconds=time.perf_counter() - t_start)


def finish(runs: list[dict[str, Any]], *, args: Any, params: GBDTParams, dp_params: GBDTParams,
           seconds: float) -> None:
    """Aggregate runs per dataset and partition, check the targets, write results/gbdt.{json,md}."""
    mlp = mlp_reference()
    for r in runs:  # runs recorded before CPU time was measured keep their wall-time ratio, marked as such
        r["time_basis"] = "cpu" if "cpu_seconds" in r["plain"] else "wall"
    per_dataset: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    for name in dict.fromkeys(r["dataset"] for r in runs):
        mine = [r for r in runs if r["dataset"] == name]
        schemes = list(dict.fromkeys(r["scheme"] for r in mine))
        per_dataset[name] = {"runs": mine, "by_scheme": {s: aggregate([r for r in mine if r["scheme"] == s])
                                                         for s in schemes}}
        main_scheme = "non-iid" if name == "synthetic" else "dirichlet"
        agg = per_dataset[name]["by_scheme"].get(main_scheme) or per_dataset[name]["by_scheme"][schemes[0]]
        fed, cen = agg["secagg_auprc"], agg["central_hgb_auprc"]
        summary[name] = {
            "fed_gbdt_auprc": fed, "central_hgb_auprc": cen, "central_xgb_auprc": agg["central_xgb_auprc"],
            "fed_gbdt_over_central": fed / cen, "fed_mlp_auprc": mlp.get(name, float("nan")),
            "local_only_auprc": agg["local_only_auprc"],
            "secagg_time_over_plain": mean([r["secagg_time_over_plain"] for r in mine]),
            "seeds": len({r["seed"] for r in mine}),
            "time_basis": sorted({r["time_basis"] for r in mine}),
            "target_met": bool(fed >= 0.97 * cen and fed > mlp.get(name, float("nan"))
                               and mean([r["secagg_time_over_plain"] for r in mine]) <= 2.0),
        }
    headline = summary.get("5_campaign") or next(iter(summary.values()))
    result = {
        "benchmark": "gbdt", "quick": bool(args.quick), "seeds": max(s["seeds"] for s in summary.values()),
        "params": params.__dict__, "dp_params": dp_params.__dict__, "dp_delta": DP_DELTA,
        "environment": environment(), "seconds": seconds,
        "summary": {k: headline[k] for k in SUMMARY_KEYS} | {"datasets": summary},
        "datasets": per_dataset,
    }
    write_results("gbdt_quick" if args.quick else "gbdt", result, markdown(result), json_path=args.json_path)
    print(markdown(result))


def aggregate(runs: list[dict[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key in ("plain", "secagg", "central_hgb", "central_xgb", "local_only", "secagg_small_trees",
                *(f"dp_eps{e:g}" for e in EPSILONS)):
        vals = [r[key] for r in runs if key in r]
        if not vals:
            continue
        for metric in ("auprc", "roc_auc", "seconds", "cpu_seconds", "bytes_per_institution", "trees",
                       "epsilon_spent"):
            xs = [v[metric] for v in vals if metric in v]
            if xs:
                out[f"{key}_{metric}"] = mean(xs)
                if metric == "auprc":
                    out[f"{key}_auprc_std"] = float(np.nanstd(xs))
    out["secagg_time_over_plain"] = mean([r["secagg_time_over_plain"] for r in runs])
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = ["# Federated gradient-boosted trees", "",
             f"{result['seeds']} seed(s), 5 institutions, quick={result['quick']}; holdout AUPRC (mean).", "",
             "| dataset | split | fed plain | fed SecAgg | DP eps=1 | DP eps=4 | SecAgg small trees | central HGB | "
             "central XGB | local-only | fed MLP | SecAgg/plain time | bytes/inst (SecAgg) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, d in result["datasets"].items():
        mlp = result["summary"]["datasets"][name]["fed_mlp_auprc"]
        for scheme, a in d["by_scheme"].items():
            def f(k: str, a: dict[str, float] = a) -> str:
                return f"{a[k]:.4f}" if k in a and a[k] == a[k] else "-"
            lines.append(
                f"| {name} | {scheme} | {f('plain_auprc')} | {f('secagg_auprc')} ± {f('secagg_auprc_std')} | "
                f"{f('dp_eps1_auprc')} | {f('dp_eps4_auprc')} | {f('secagg_small_trees_auprc')} | "
                f"{f('central_hgb_auprc')} | {f('central_xgb_auprc')} | {f('local_only_auprc')} | "
                f"{mlp if scheme in ('dirichlet', 'non-iid') and mlp == mlp else '-'} | "
                f"{a['secagg_time_over_plain']:.2f} | {a.get('secagg_bytes_per_institution', 0) / 1e6:.1f} MB |")
    lines += ["", "## Targets", ""]
    for name, s in result["summary"]["datasets"].items():
        lines.append(f"- {name}: fed/central HGB = {s['fed_gbdt_over_central']:.3f} (target >= 0.97), fed GBDT "
                     f"{s['fed_gbdt_auprc']:.4f} vs fed MLP {s['fed_mlp_auprc']:.4f}, SecAgg/plain time "
                     f"{s['secagg_time_over_plain']:.2f} (target <= 2): {'met' if s['target_met'] else 'NOT met'}")
    lines += ["", f"Total {result['seconds']:.0f} s. DP runs use {result['dp_params']} (delta {result['dp_delta']})."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
