"""The end-to-end demo: five synthetic banks train one fraud model together.

``consortium demo`` generates five institutions with different customers,
volumes, fraud rates and fraud scenarios, trains federated for ten rounds in
Flower's simulation engine (secure aggregation on), trains the local-only and
centralized baselines on the same split, prints the comparison table and writes
a PNG of AUPRC per round plus a JSON result, and exports the global model as a
signed ONNX bundle in a model registry (``out/registry``, key in ``out/keys``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from consortium.data import federate_institutions, generate_federation
from consortium.federation.config import FederationConfig
from consortium.federation.coordinator import RoundCallback
from consortium.federation.experiment import ExperimentResult, dump_json, run_experiment
from consortium.federation.plots import plot_auprc_per_round
from consortium.registry import RunStore
from consortium.registry.publish import publish_demo_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoOutput:
    """Files and results a demo run produced."""

    result: ExperimentResult
    plot: Path
    json_path: Path
    store_url: str
    seconds: float
    bundle: Path | None = None
    """The run's model as a signed bundle (registered in ``out_dir/registry``, key in ``out_dir/keys``)."""
    edge: dict[str, Any] | None = None
    """What the edge agent did with the bundle on the holdout stream (see :mod:`consortium.edge.demo`)."""


def run_demo(
    *,
    out_dir: str | Path,
    institutions: int = 5,
    transactions: int = 20_000,
    rounds: int = 10,
    model: str = "mlp",
    strategy: str = "fedprox",
    secure_aggregation: bool = True,
    seed: int = 0,
    store_url: str | None = None,
    on_round: RoundCallback | None = None,
    on_stage: Callable[[str], None] | None = None,
    broker_url: str | None = None,
    embedded_broker: bool = False,
    edge: bool = True,
) -> DemoOutput:
    """Generate data, train federated and baselines, write plot and JSON.

    ``embedded_broker`` says that ``broker_url`` is an in-process broker the caller
    started (``consortium demo`` shares one with its dashboard); it is only reported.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stage = on_stage or (lambda s: logger.info(s))
    stage(f"Generating {institutions} institutions x {transactions:,} transactions (seed {seed})")
    fed = generate_federation(institutions, transactions_per_institution=transactions, seed=seed)
    split = federate_institutions({name: inst.dataset for name, inst in fed.items()}, seed=seed)
    url = store_url or f"sqlite:///{(out / 'consortium.db').resolve()}"
    config = FederationConfig(
        num_rounds=rounds,
        strategy=strategy,  # type: ignore[arg-type]
        model=model,  # type: ignore[arg-type]
        min_nodes=institutions,
        secure_aggregation=secure_aggregation,
        store_url=url,
        run_name="demo",
        seed=seed,
    )
    stage(f"Training federated for {rounds} rounds in Flower's simulation engine")
    with RunStore(url) as store:
        result = run_experiment(
            split, config, work_dir=out / "work", dataset_name="synthetic", store=store, on_round=on_round
        )
        stage("Exporting the global model as a signed ONNX bundle")
        bundle = publish_demo_model(store, out_dir=out, run_id=result.run.run_id).entry.path
    edge_result = None
    if edge:
        from consortium.edge.demo import run_edge_demo  # noqa: PLC0415
        from consortium.registry.signing import load_public_key  # noqa: PLC0415

        embedded = embedded_broker or broker_url is None
        stage("Scoring the holdout stream with an edge agent over MQTT"
              + (" (embedded broker)" if embedded else f" ({broker_url})"))
        edge_result = run_edge_demo(
            bundle, public_key=load_public_key(out / "keys" / "bundle-signing.pem.pub"), X=split.holdout.X,
            y=split.holdout.y, feature_names=list(split.holdout.feature_names), broker_url=broker_url,
            outbox_dir=out / "edge", embedded=embedded,
        ).to_json()
    s = result.summary()
    plot = plot_auprc_per_round(
        [int(c["round"]) for c in result.curve()],
        [c["auprc"] for c in result.curve()],
        path=out / "auprc_per_round.png",
        centralized=s.get("centralized_auprc"),
        local_only_mean=s.get("local_only_auprc_mean"),
        title=f"Federated fraud model, {institutions} institutions (synthetic)",
    )
    seconds = time.perf_counter() - t0
    json_path = dump_json(
        {**result.to_json(), "plot": str(plot), "bundle": str(bundle), "edge": edge_result, "seconds": seconds},
        out / "demo.json",
    )
    return DemoOutput(result=result, plot=plot, json_path=json_path, store_url=url, seconds=seconds, bundle=bundle,
                      edge=edge_result)
