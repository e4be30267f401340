"""``consortium simulate --model gbdt`` and ``consortium demo --model gbdt``: federated boosting end to end.

Federated boosting runs in Flower's simulation engine (secure aggregation by
default) next to two baselines on the same split, both with the federated code
path: centralized boosting on the pooled rows and local-only boosting per
institution. The demo also exports the ensemble as a signed ONNX bundle.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from consortium.data import FederatedSplit
from consortium.federation.config import FederationConfig
from consortium.federation.gbdt_coordinator import GBDTRunResult, TreeCallback, tree_summary
from consortium.federation.gbdt_simulation import simulate_gbdt
from consortium.models.gbdt import GBDTParams, fit_local, predict_proba
from consortium.models.metrics import evaluate_scores
from consortium.registry import RunStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GBDTExperiment:
    """A federated boosting run with its baselines, all scored on the split's holdout."""

    run: GBDTRunResult
    centralized: dict[str, float] = field(default_factory=dict)
    local_only: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        local = list(self.local_only.values())
        return {
            "model": "gbdt",
            "run_id": self.run.run_id,
            "institutions": list(self.run.institutions),
            "federated": {**self.run.holdout_metrics, "threshold": self.run.threshold,
                          **tree_summary(self.run.boost.ensemble.trees)},
            "centralized": self.centralized,
            "local_only": self.local_only,
            "local_only_auprc_mean": float(np.nanmean([m["auprc"] for m in local])) if local else None,
            "validation_curve": [{"trees": v.n_trees, "loss": v.loss, "auprc": v.auprc}
                                 for v in self.run.boost.validation],
            "privacy": self.run.extra.get("privacy") or None,
            "seconds": self.seconds,
        }


def run_gbdt_experiment(
    split: FederatedSplit,
    config: FederationConfig,
    *,
    params: GBDTParams,
    work_dir: Path,
    store: RunStore,
    baselines: bool = True,
    on_tree: TreeCallback | None = None,
    dp_epsilon: float | None = None,
) -> GBDTExperiment:
    """Federated boosting in simulation, then centralized and local-only boosting on the same split."""
    t0 = time.perf_counter()
    run = simulate_gbdt(split, config, params=params, work_dir=work_dir, store=store, on_tree=on_tree,
                        dp_epsilon=dp_epsilon)
    central: dict[str, float] = {}
    local: dict[str, dict[str, float]] = {}
    if baselines:
        tr, va = split.pooled_train(), split.pooled_val()
        m = evaluate_scores(split.holdout.y, predict_proba(fit_local(tr.X, tr.y, va.X, va.y, params=params),
                                                            split.holdout.X))
        central = {"auprc": m.auprc, "roc-auc": m.roc_auc, "recall-at-1pct-fpr": m.recall_at_1pct_fpr}
        for inst in split.institutions:
            r = fit_local(inst.train.X, inst.train.y, inst.val.X, inst.val.y, params=params)
            mi = evaluate_scores(split.holdout.y, predict_proba(r, split.holdout.X))
            local[inst.name] = {"auprc": mi.auprc, "roc-auc": mi.roc_auc, "recall-at-1pct-fpr": mi.recall_at_1pct_fpr}
        for kind, inst_name, met in [("centralized", None, central), *(("local_only", k, v) for k, v in local.items())]:
            store.record_baseline(run.run_id, kind=f"gbdt_{kind}", institution=inst_name, metrics=met)
    return GBDTExperiment(run=run, centralized=central, local_only=local, seconds=time.perf_counter() - t0)


def results_table(exp: GBDTExperiment) -> str:
    """A small text table of holdout metrics."""
    rows = [("federated GBDT", exp.run.holdout_metrics)]
    if exp.centralized:
        rows.append(("centralized GBDT", exp.centralized))
    if exp.local_only:
        keys = ("auprc", "roc-auc", "recall-at-1pct-fpr")
        rows.append(("local-only (mean)", {k: float(np.nanmean([m[k] for m in exp.local_only.values()]))
                                           for k in keys}))
    lines = [f"{'':20s} {'AUPRC':>8s} {'ROC-AUC':>8s} {'R@1%FPR':>8s}"]
    for name, met in rows:
        lines.append(f"{name:20s} {met.get('auprc', float('nan')):8.4f} {met.get('roc-auc', float('nan')):8.4f} "
                     f"{met.get('recall-at-1pct-fpr', float('nan')):8.4f}")
    s = tree_summary(exp.run.boost.ensemble.trees)
    lines.append(f"{s['trees']} trees kept (mean {s['mean_leaves']:.1f} leaves), threshold {exp.run.threshold:.4f}")
    return "\n".join(lines)


def run_gbdt_demo(
    *,
    out_dir: str | Path,
    institutions: int = 5,
    transactions: int = 20_000,
    trees: int = 200,
    secure_aggregation: bool = True,
    seed: int = 0,
    store_url: str | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> tuple[GBDTExperiment, Path, Path]:
    """The demo with federated boosting: synthetic banks, simulation, baselines, signed bundle, JSON."""
    from consortium.data import federate_institutions, generate_federation  # noqa: PLC0415
    from consortium.federation.experiment import dump_json  # noqa: PLC0415
    from consortium.models.gbdt_onnx import export_bundle  # noqa: PLC0415
    from consortium.registry.signing import generate_signing_key, load_private_key  # noqa: PLC0415

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stage = on_stage or (lambda s: logger.info(s))
    stage(f"Generating {institutions} institutions x {transactions:,} transactions (seed {seed})")
    fed = generate_federation(institutions, transactions_per_institution=transactions, seed=seed)
    split = federate_institutions({name: inst.dataset for name, inst in fed.items()}, seed=seed)
    url = store_url or f"sqlite:///{(out / 'consortium.db').resolve()}"
    config = FederationConfig(model="gbdt", min_nodes=institutions, secure_aggregation=secure_aggregation,
                              store_url=url, run_name="demo-gbdt", seed=seed)
    params = GBDTParams(n_trees=trees)
    stage(f"Federated boosting (up to {trees} trees) in Flower's simulation engine")
    with RunStore(url) as store:
        exp = run_gbdt_experiment(split, config, params=params, work_dir=out / "work", store=store)
    stage("Exporting the ensemble as a signed ONNX bundle")
    keys = out / "keys"
    keys.mkdir(exist_ok=True)
    key_path = keys / "bundle-signing.pem"
    if not key_path.exists():
        generate_signing_key(key_path)
    bundle = export_bundle(out / f"gbdt-{exp.run.run_id}.bundle", result=exp.run.boost,
                           feature_names=exp.run.feature_names, threshold=exp.run.threshold,
                           model_version=f"gbdt-{exp.run.run_id}", private_key=load_private_key(key_path),
                           run_id=exp.run.run_id, metrics=exp.run.holdout_metrics)
    json_path = dump_json({**exp.to_json(), "bundle": str(bundle)}, out / "demo-gbdt.json")
    return exp, bundle, json_path


def _echo(text: str) -> None:
    import click  # noqa: PLC0415

    click.echo(text)


def _tree_progress(total: int, enabled: bool) -> Any:
    """A rich progress bar over trees (or a no-op context)."""
    import contextlib  # noqa: PLC0415

    if not enabled:
        return contextlib.nullcontext(None)
    from rich.progress import Progress  # noqa: PLC0415

    return Progress(transient=True)


def gbdt_simulate_command(split: FederatedSplit, *, name: str, trees: int, dp_epsilon: float | None,
                          secure_aggregation: bool, baselines: bool, seed: int, store_url: str,
                          out_dir: str | None, as_json: bool) -> None:
    """Body of ``consortium simulate --model gbdt``."""
    import json  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    from consortium.federation.experiment import dump_json  # noqa: PLC0415

    config = FederationConfig(model="gbdt", min_nodes=len(split.institutions), secure_aggregation=secure_aggregation,
                              store_url=store_url, run_name=f"simulate-gbdt-{name}", seed=seed)
    params = GBDTParams(n_trees=trees)
    with tempfile.TemporaryDirectory() as tmp, _tree_progress(trees, not as_json) as progress:
        task = progress.add_task("trees", total=trees) if progress is not None else None

        def on_tree(n: int, _point: object) -> None:
            if progress is not None:
                progress.update(task, completed=n)

        work = Path(out_dir) if out_dir else Path(tmp)
        with RunStore(store_url) as store:
            exp = run_gbdt_experiment(split, config, params=params, work_dir=work, store=store, baselines=baselines,
                                      on_tree=on_tree, dp_epsilon=dp_epsilon)
        if out_dir:
            dump_json(exp.to_json(), work / "results.json")
    if as_json:
        from consortium.federation.experiment import _json_safe  # noqa: PLC0415

        _echo(json.dumps(_json_safe(exp.to_json()), indent=2))
        return
    _echo(results_table(exp))
    _echo(f"Run store: {store_url}  (run {exp.run.run_id})")


def gbdt_demo_command(*, out_dir: str, institutions: int, transactions: int, trees: int, secure_aggregation: bool,
                      seed: int, store_url: str | None, as_json: bool) -> None:
    """Body of ``consortium demo --model gbdt``."""
    import json  # noqa: PLC0415

    exp, bundle, json_path = run_gbdt_demo(out_dir=out_dir, institutions=institutions, transactions=transactions,
                                           trees=trees, secure_aggregation=secure_aggregation, seed=seed,
                                           store_url=store_url, on_stage=None if as_json else _echo)
    if as_json:
        _echo(json.dumps(json.loads(json_path.read_text()), indent=2))
        return
    _echo(results_table(exp))
    _echo(f"Full results:    {json_path}")
    _echo(f"Model bundle:    {bundle}  (public key: {Path(out_dir) / 'keys' / 'bundle-signing.pem.pub'})")
    _echo(f"Finished in {exp.seconds:.0f} s")
