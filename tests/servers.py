"""Fixtures for tests of the shared infrastructure: a throwaway PostgreSQL cluster and an MLflow
server with basic-auth, both on loopback, started once per session under pytest's tmp folder.

Loaded as a plugin by tests/conftest.py (``pytest_plugins = ["tests.servers"]``). The start and
stop code is experiments/infra.py's, which the load test uses too.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from experiments.infra import (
    InfraError,
    MlflowServer,
    Postgres,
    postgres_bindir,
    postgres_cluster,
)
from experiments.infra import (
    mlflow_server as start_mlflow_server,
)


@pytest.fixture(scope="session")
def postgres(tmp_path_factory) -> Iterator[Postgres]:
    """A running cluster: ``.create_database(name) -> URL`` (fresh database and owner role), ``.admin_url``."""
    try:
        postgres_bindir()
    except InfraError as missing:
        pytest.fail(str(missing), pytrace=False)  # CI must not pass by skipping these tests
    with postgres_cluster(tmp_path_factory.mktemp("postgres")) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def mlflow_server(postgres, tmp_path_factory) -> Iterator[MlflowServer]:
    """A running ``mlflow server --app-name basic-auth`` on PostgreSQL (default permission READ):
    ``.uri``, ``.admin`` (username, password), ``.create_user(username, password)``,
    ``.grant(username, experiment_id, permission)``, ``.env(username, password) -> dict``."""
    # One worker: startup dominates these tests' runtime and each worker imports MLflow anew.
    with start_mlflow_server(
        tmp_path_factory.mktemp("mlflow-server"),
        postgres.create_database("tracking"),
        postgres.create_database("auth"),
        workers=1,
    ) as server:
        yield server
