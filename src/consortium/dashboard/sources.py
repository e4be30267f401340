"""Data the dashboard shows but does not own: the privacy ledger and the model registry.

Both are read through their owners' public APIs (``consortium.privacy.ledger``,
``consortium.registry.registry`` / ``consortium.registry.http``).  A deployment
without one of them still gets a working dashboard: the panel says the source is
not installed instead of failing.

:func:`store_fingerprint` lets the server notice that the coordinator recorded a
round, a baseline, a privacy charge or a registry version, and tell the pages to
refetch, so those panels update live too.
"""

from __future__ import annotations

import importlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter

from consortium.registry.store import RunStore
from consortium.registry.store_schema import Base

logger = logging.getLogger(__name__)

WATCHED_TABLES = ("runs", "rounds", "baselines", "institution_metrics", "privacy_ledger", "registry_models")
"""Tables whose changes make the pages refetch the federation, privacy and model panels."""


def _optional(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


@dataclass
class OptionalSources:
    """The privacy ledger and the model registry, when installed and configured.

    Parameters
    ----------
    registry_dir : Path, optional
        Blob directory of the model registry (``consortium dashboard --registry DIR``);
        without it the models panel is empty.
    """

    registry_dir: Path | None = None
    store: RunStore | None = None

    @property
    def has_privacy(self) -> bool:
        """Whether the privacy ledger module is installed."""
        return _optional("consortium.privacy.ledger") is not None

    def privacy_charges(
        self, store: RunStore, *, run_id: str | None = None, institution: str | None = None
    ) -> list[dict[str, Any]]:
        """Ledger charges as JSON-ready dicts (ε, δ, budget, mechanism), oldest first."""
        ledger_mod = _optional("consortium.privacy.ledger")
        if ledger_mod is None:
            return []
        store.create_missing_tables()
        ledger = ledger_mod.PrivacyLedger(store)
        charges = ledger.charges(institution=institution, run_id=run_id)
        return [
            {
                "run_id": c.run_id, "institution": c.institution, "data_id": c.data_id, "round": int(c.round),
                "mechanism": c.mechanism, "epsilon": _finite(c.epsilon), "epsilon_rdp": _finite(c.epsilon_rdp),
                "delta": _finite(c.delta), "budget_epsilon": _finite(c.budget_epsilon),
                "created_at": c.created_at.isoformat() if hasattr(c.created_at, "isoformat") else str(c.created_at),
            }
            for c in charges
        ]

    def registry_router(self) -> APIRouter | None:
        """The registry's own ``/api/models`` router, or None when it is not installed or configured."""
        http = _optional("consortium.registry.http")
        reg = _optional("consortium.registry.registry")
        if http is None or reg is None or self.registry_dir is None or self.store is None:
            return None
        registry = reg.ModelRegistry(self.store, self.registry_dir)
        router: APIRouter = http.create_registry_router(registry)
        return router


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and math.isfinite(x) else None


def store_fingerprint(store: RunStore) -> tuple[int, ...]:
    """Row counts (and running runs) of the watched tables: changes when anything new was recorded."""
    tables = [Base.metadata.tables[name] for name in WATCHED_TABLES if name in Base.metadata.tables]

    def work(session: Any) -> tuple[int, ...]:
        counts = [int(session.scalar(sa.select(sa.func.count()).select_from(t)) or 0) for t in tables]
        running = session.scalar(sa.text("SELECT count(*) FROM runs WHERE status = 'running'"))
        return (*counts, int(running or 0))

    result: tuple[int, ...] = store.run_transaction(work, action="check the store for changes")
    return result
