"""The coordinator's Flower ServerApp.

In deployment the SuperLink runs the module-level :data:`app`, which reads its
options from Flower's ``run_config`` (``flwr run . --run-config 'num-rounds=3'``).
The simulation runner instead builds an app with :func:`build_server_app`, giving
it the config object, the store and a progress callback directly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from consortium.data import Dataset
from consortium.federation.config import FederationConfig
from consortium.federation.coordinator import Coordinator, RoundCallback, RunResult
from consortium.registry import RunStore

logger = logging.getLogger(__name__)


def build_server_app(
    config: FederationConfig | None = None,
    *,
    store_factory: Callable[[FederationConfig], RunStore] | None = None,
    holdout: Dataset | None = None,
    on_round: RoundCallback | None = None,
    on_result: Callable[[RunResult], None] | None = None,
    on_error: Callable[[BaseException], None] | None = None,
) -> ServerApp:
    """Build the coordinator's ServerApp.

    Parameters
    ----------
    config : FederationConfig, optional
        Run options; if None they are read from ``context.run_config``.
    store_factory : callable, optional
        Opens the run store (default: ``RunStore(config.store_url)``).
    holdout : Dataset, optional
        Global held-out split to evaluate each round.
    on_round, on_result, on_error : callable, optional
        Hooks for progress reporting and for handing results and errors back to
        an in-process caller (the simulation runner).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = config if config is not None else FederationConfig.from_run_config(context.run_config)
        store = store_factory(cfg) if store_factory is not None else RunStore(cfg.store_url)
        try:
            if cfg.model == "gbdt":  # federated boosting: its own coordinator, same nodes and store
                from consortium.federation.gbdt_coordinator import GBDTCoordinator  # noqa: PLC0415
                from consortium.models.gbdt import GBDTParams  # noqa: PLC0415

                params = GBDTParams.from_config(dict(cfg.extra))
                GBDTCoordinator(cfg, params=params, store=store, holdout=holdout).run(grid)
                return
            result = Coordinator(cfg, store=store, on_round=on_round, holdout=holdout).run(grid)
        except BaseException as exc:
            logger.error("Federated run failed: %s", exc)
            if on_error is not None:
                on_error(exc)
                return
            raise
        finally:
            if store_factory is None:
                store.close()
        if on_result is not None:
            on_result(result)

    return app


app = build_server_app()
"""ServerApp for deployment (``serverapp = "consortium.federation.server_app:app"``)."""
