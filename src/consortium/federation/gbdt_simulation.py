"""Federated boosting in Flower's simulation engine: the deployed ServerApp/ClientApp, on one machine.

The ClientApp is the institutions' usual one (it answers the GBDT message types
next to training and evaluation); only the ServerApp's main loop differs: it runs
:class:`~consortium.federation.gbdt_coordinator.GBDTCoordinator`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from consortium.data import FederatedSplit, save_split
from consortium.errors import FederationError
from consortium.federation.client_app import build_client_app
from consortium.federation.config import FederationConfig
from consortium.federation.gbdt_coordinator import GBDTCoordinator, GBDTRunResult, TreeCallback
from consortium.models.gbdt import GBDTParams
from consortium.registry import RunStore

logger = logging.getLogger(__name__)


def simulate_gbdt(
    split: FederatedSplit,
    config: FederationConfig,
    *,
    params: GBDTParams,
    work_dir: str | Path,
    store: RunStore | None = None,
    on_tree: TreeCallback | None = None,
    noise_std: float = 0.0,
    dp_epsilon: float | None = None,
    num_cpus: int | None = None,
) -> GBDTRunResult:
    """Train federated boosting over ``split`` in Flower's simulation engine.

    Parameters
    ----------
    split : FederatedSplit
        Institutions' data (written to ``work_dir/data``, one directory each) and the holdout.
    config : FederationConfig
        Nodes, timeouts, secure aggregation, store URL.
    params : GBDTParams
        Boosting hyperparameters.
    work_dir : path
        Where institution directories are written.
    store : RunStore, optional
        Open run store (default: opened from ``config.store_url``).
    on_tree : callable, optional
        Progress callback per finished tree.
    noise_std : float
        Per-institution Gaussian noise on histogram entries without accounting (tests).
    dp_epsilon : float, optional
        Calibrated, ledger-charged DP on the histograms (see :mod:`consortium.federation.gbdt_privacy`).
    num_cpus : int, optional
        CPUs for the simulation backend.
    """
    from flwr.simulation import run_simulation  # noqa: PLC0415  (heavy import)

    work = Path(work_dir)
    save_split(split, work / "data")
    data_dirs = [work / "data" / inst.name for inst in split.institutions]
    cfg = dataclasses.replace(config, min_nodes=min(config.min_nodes, len(data_dirs)))
    own_store = store is None
    run_store = store if store is not None else RunStore(cfg.store_url)
    results: list[GBDTRunResult] = []
    errors: list[BaseException] = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            coordinator = GBDTCoordinator(cfg, params=params, store=run_store, on_tree=on_tree,
                                          holdout=split.holdout, noise_std=noise_std, dp_epsilon=dp_epsilon)
            results.append(coordinator.run(grid))
        except BaseException as exc:  # handed back to the caller below
            logger.error("Federated boosting failed: %s", exc)
            errors.append(exc)

    client_app = build_client_app(data_dirs=data_dirs, disclose_eval_default=True)
    cpus = num_cpus or os.cpu_count() or 1
    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "include_dashboard": False, "log_to_driver": False},
    }
    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=len(data_dirs),
                       backend_config=backend_config)  # type: ignore[arg-type]
    finally:
        if own_store:
            run_store.close()
    if errors:
        raise errors[0]
    if not results:
        raise FederationError("The simulation ended without a result; see the Flower log above for the cause.")
    return results[0]
