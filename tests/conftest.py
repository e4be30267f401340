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
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy.engine import make_url

from consortium.registry import RunStore

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
