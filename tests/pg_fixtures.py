"""Session fixtures for tests that need a real PostgreSQL server.

Load them in a test module with ``pytest_plugins = ["pg_fixtures"]`` (tests/ is on sys.path
through tests/conftest.py), so every module shares one cluster per session.

A missing PostgreSQL 15 install fails these tests (it does not skip them): CI installs it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pg_cluster import Attempt, PgCluster, PgClusterError, fill_question_attempts, missing_binaries

N_ATTEMPTS = 2500  # > 2 pages of 1000 for the Supabase source


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    problem = missing_binaries()
    if problem:
        pytest.fail(problem, pytrace=False)
    try:
        cluster = PgCluster()
    except PgClusterError as exc:
        pytest.fail(f"could not start the test PostgreSQL cluster: {exc}", pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def attempts(pg_cluster: PgCluster) -> list[Attempt]:
    """``question_attempts`` with N_ATTEMPTS rows (uuid question ids); do not modify it."""
    return fill_question_attempts(pg_cluster, N_ATTEMPTS)


@pytest.fixture()
def pg_dsn(pg_cluster: PgCluster, monkeypatch: pytest.MonkeyPatch) -> str:
    """RECFLOW_PG_DSN set to the cluster's password-authenticated read-only role."""
    monkeypatch.setenv("RECFLOW_PG_DSN", pg_cluster.dsn)
    return pg_cluster.dsn
