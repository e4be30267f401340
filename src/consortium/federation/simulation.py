"""Run a federation of N institutions on one machine with Flower's simulation engine.

The same ServerApp and ClientApp as in deployment are used; only the transport
differs (Flower's Ray-based simulation runtime instead of gRPC).  Each
simulated institution reads its own directory written by
:func:`consortium.data.save_split`, exactly as a deployed node would.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from consortium.data import FederatedSplit, save_split
from consortium.errors import FederationError
from consortium.federation.client_app import build_client_app, institution_secagg_mod
from consortium.federation.config import FederationConfig
from consortium.federation.coordinator import RoundCallback, RunResult
from consortium.federation.server_app import build_server_app
from consortium.registry import RunStore

logger = logging.getLogger(__name__)


def simulate(
    split: FederatedSplit,
    config: FederationConfig,
    *,
    work_dir: str | Path,
    store: RunStore | None = None,
    on_round: RoundCallback | None = None,
    client_mods: Sequence[object] | None = None,
    num_cpus: int | None = None,
    disclose_eval: bool = True,
) -> RunResult:
    """Train federated over ``split`` in Flower's simulation engine.

    Parameters
    ----------
    split : FederatedSplit
        Institutions' local data and the global held-out split.
    config : FederationConfig
        Run options (rounds, strategy, store URL, ...).
    work_dir : path
        Where each institution's data directory is written.
    store : RunStore, optional
        Open run store to record into (default: opened from ``config.store_url``).
    on_round : callable, optional
        Progress callback, called once per completed round.
    client_mods : sequence, optional
        Extra Flower mods for the ClientApp, after secure aggregation's mod.
    disclose_eval : bool
        Whether the simulated institutions share metrics on their own test
        splits (they are all yours in a simulation; default True).
    num_cpus : int, optional
        CPUs given to the simulation backend (default: all).

    Returns
    -------
    RunResult
        Final model, threshold and per-round reports.
    """
    from flwr.simulation import run_simulation  # noqa: PLC0415  (heavy import)

    work = Path(work_dir)
    save_split(split, work / "data")
    data_dirs = [work / "data" / inst.name for inst in split.institutions]
    cfg = config if config.min_nodes <= len(data_dirs) else _with_min_nodes(config, len(data_dirs))
    own_store = store is None
    run_store = store if store is not None else RunStore(cfg.store_url)
    results: list[RunResult] = []
    errors: list[BaseException] = []
    server_app = build_server_app(
        cfg,
        store_factory=lambda _cfg: run_store,
        holdout=split.holdout,
        on_round=on_round,
        on_result=results.append,
        on_error=errors.append,
    )
    mods = None if client_mods is None else [institution_secagg_mod, *client_mods]
    client_app = build_client_app(
        data_dirs=data_dirs, mods=mods, disclose_eval_default=disclose_eval  # type: ignore[arg-type]
    )
    cpus = num_cpus or os.cpu_count() or 1
    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "include_dashboard": False, "log_to_driver": False},
    }
    flwr_logger = logging.getLogger("flwr")
    deprecation_filter = _DropRunSimulationDeprecation()
    flwr_logger.addFilter(deprecation_filter)
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=len(data_dirs),
            backend_config=backend_config,  # type: ignore[arg-type]
        )
    finally:
        flwr_logger.removeFilter(deprecation_filter)
        if own_store:
            run_store.close()
    if errors:
        raise errors[0]
    if not results:
        raise FederationError(
            "The simulation ended without a result; see the Flower log above for the cause."
        )
    return results[0]


class _DropRunSimulationDeprecation(logging.Filter):
    """Hide Flower 1.42's notice that ``run_simulation`` is deprecated.

    consortium builds the apps in-process (closures over data paths, store and
    progress callbacks), which ``flwr run`` cannot do; docs/architecture.md
    records the migration path.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "run_simulation" not in record.getMessage()


def _with_min_nodes(config: FederationConfig, n: int) -> FederationConfig:
    import dataclasses  # noqa: PLC0415

    return dataclasses.replace(config, min_nodes=n)
