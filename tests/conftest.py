"""Shared pytest fixtures.

Run store
---------
``store_url`` is parametrised over the two supported backends: a SQLite file in
``tmp_path`` and the PostgreSQL server at ``CONSORTIUM_TEST_POSTGRES_URL``
(default ``postgresql+psycopg://root@127.0.0.1:5432/test``).  Each PostgreSQL
test gets a fresh schema of its own, dropped afterwards, because the server is
shared with other test runs.  An unreachable server makes PostgreSQL tests fail
(never skip): CI starts it, and a silently skipped backend would hide bugs.
Deselect them locally with ``-m "not postgres"``.
``run_store`` is a :class:`~consortium.registry.RunStore` opened on ``store_url``;
``postgres_url`` is the server's URL for PostgreSQL-only tests.

Deployed federation
-------------------
``deployed_federation(...)`` writes a synthetic three-institution federation,
its holdout and a local CA to ``tmp_path`` and returns a
:class:`DeployedFederation` whose ``run(config)`` starts the TLS coordinator and
one node process per institution, submits the run and stops everything: the
setup the deployed (real-process) tests share.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from sqlalchemy.engine import make_url

from consortium.registry import RunStore

if TYPE_CHECKING:
    from consortium.data import FederatedSplit
    from consortium.federation.certs import CertificatePaths
    from consortium.federation.config import FederationConfig
    from consortium.federation.deploy import RunOutcome

POSTGRES_TEST_URL = os.environ.get(
    "CONSORTIUM_TEST_POSTGRES_URL", "postgresql+psycopg://root@127.0.0.1:5432/test"
)


@dataclass(frozen=True)
class StoreUrl:
    """Where a test's run store lives: a database URL and, on PostgreSQL, its own schema."""

    backend: str
    url: str
    schema: str | None = None

    def open(self, **options: Any) -> RunStore:
        """Open a (further) :class:`RunStore` on this location."""
        return RunStore(self.url, schema=self.schema, **options)


def _libpq_conninfo(url: str) -> str:
    """The SQLAlchemy URL as a plain libpq URL that psycopg accepts."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _postgres_connection(url: str) -> psycopg.Connection:
    try:
        return psycopg.connect(_libpq_conninfo(url), autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"The PostgreSQL test server at {make_url(url).render_as_string(hide_password=True)} "
            f"is unreachable ({' '.join(str(exc).split())}). Start it (the CI script does) "
            f"or deselect these tests with -m 'not postgres'.",
            pytrace=False,
        )


@pytest.fixture
def postgres_url() -> str:
    """URL of the shared PostgreSQL test server, after checking it answers (fails if not)."""
    with _postgres_connection(POSTGRES_TEST_URL):
        pass
    return POSTGRES_TEST_URL


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ]
)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreUrl]:
    """A fresh, empty run store location on each backend."""
    if request.param == "sqlite":
        yield StoreUrl(backend="sqlite", url=f"sqlite:///{tmp_path / 'runs.db'}")
        return
    url = request.getfixturevalue("postgres_url")
    schema = f"consortium_test_{uuid.uuid4().hex}"
    with _postgres_connection(url) as connection:
        connection.execute(f"CREATE SCHEMA {schema}")
    try:
        yield StoreUrl(backend="postgres", url=url, schema=schema)
    finally:
        with _postgres_connection(url) as connection:
            connection.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@pytest.fixture
def run_store(store_url: StoreUrl) -> Iterator[RunStore]:
    """An open, empty :class:`RunStore` on each backend, closed after the test."""
    store = store_url.open(retries=1, retry_wait=0.05)
    try:
        yield store
    finally:
        store.close()


# ------------------------------------------------------------ deployed federation


@dataclass(frozen=True)
class DeployedFederation:
    """Data, certificates and run store of a deployed test federation (all under ``tmp_path``).

    Build the :class:`~consortium.federation.config.FederationConfig` with
    ``store_url`` and ``holdout_path`` from here, then call :meth:`run`.
    """

    split: FederatedSplit
    data_root: Path
    holdout_path: Path
    certs: CertificatePaths
    store_url: str
    work_dir: Path

    def run(self, config: FederationConfig, *, timeout: float = 600) -> RunOutcome:
        """Start the TLS coordinator and one node per institution, run ``config``, stop them all.

        Nodes are stopped even when the run fails, and the coordinator by its
        context manager, so a failing test leaves no processes behind.
        """
        from consortium.federation.deploy import (  # noqa: PLC0415
            FlowerProcess,
            start_coordinator,
            start_node,
            submit_run,
        )

        nodes: list[FlowerProcess] = []
        with start_coordinator(certs=self.certs, work_dir=self.work_dir / "coordinator") as coordinator:
            coordinator.wait_ready(timeout=60)
            try:
                for name in self.split.names():
                    nodes.append(start_node(fleet_address=coordinator.addresses.fleet, ca_cert=self.certs.ca_cert,
                                            data_path=self.data_root / name, institution=name,
                                            work_dir=self.work_dir / f"node-{name}"))
                for node in nodes:
                    node.wait_ready(timeout=60)  # type: ignore[attr-defined]
                return submit_run(coordinator, run_config=config.to_run_config(), timeout=timeout)
            finally:
                for node in nodes:
                    node.stop()


@pytest.fixture
def deployed_federation(tmp_path: Path) -> Callable[..., DeployedFederation]:
    """Factory of :class:`DeployedFederation`.

    Call it as ``(n_institutions=3, *, transactions_per_institution, seed, n_days)``.
    """

    def make(n_institutions: int = 3, *, transactions_per_institution: int, seed: int,
             n_days: int) -> DeployedFederation:
        from consortium.data import federate_institutions, generate_federation, save_npz, save_split  # noqa: PLC0415
        from consortium.federation.certs import make_local_ca  # noqa: PLC0415

        fed = generate_federation(n_institutions, transactions_per_institution=transactions_per_institution,
                                  seed=seed, n_days=n_days)
        split = federate_institutions({k: v.dataset for k, v in fed.items()}, seed=seed)
        return DeployedFederation(
            split=split,
            data_root=Path(save_split(split, tmp_path / "data")),
            holdout_path=Path(save_npz(split.holdout, tmp_path / "holdout.npz")),
            certs=make_local_ca(tmp_path / "certs"),
            store_url=f"sqlite:///{tmp_path / 'runs.db'}",
            work_dir=tmp_path,
        )

    return make


THREE_BANK_NODES = (101, 202, 303)
"""Node ids of :func:`three_banks` (tests that drop a node out refer to them)."""


@pytest.fixture(scope="module")
def three_banks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Three small synthetic banks saved as node data dirs: ``{"dirs": {node id: node config}, "split": ...}``.

    Shared by the coordinator privacy tests, which drive the real ClientApp over an
    in-process grid with node ids :data:`THREE_BANK_NODES`.
    """
    from consortium.data import federate_institutions, generate_federation, save_split  # noqa: PLC0415

    fed = generate_federation(3, transactions_per_institution=1_000, seed=11, n_days=20)
    split = federate_institutions({k: v.dataset for k, v in fed.items()}, seed=11)
    root = Path(save_split(split, tmp_path_factory.mktemp("inst")))
    dirs = {
        node: {"data-path": str(root / n), "institution": n}
        for node, n in zip(THREE_BANK_NODES, split.names(), strict=True)
    }
    return {"dirs": dirs, "split": split}
