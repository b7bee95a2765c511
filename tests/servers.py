"""Fixtures for tests of the shared infrastructure: a throwaway PostgreSQL cluster and an MLflow
server with basic-auth, both on loopback, started once per session under pytest's tmp folder, and
``cluster``: a study database, an experiment and a worker account on them, for one test.

Loaded as a plugin by tests/conftest.py (its ``pytest_plugins``). The start and
stop code is experiments/infra.py's, which the load test uses too.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from mlflow.tracking import MlflowClient
from sqlalchemy.engine import make_url

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
from pipeline.data import save_prepared
from tests.conftest import REPO, tiny_prepared


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
        job_execution=False,  # as docs/scale-out.md starts it
    ) as server:
        yield server


@pytest.fixture
def cluster(postgres, mlflow_server, tmp_path, monkeypatch):
    """A fresh study database, an experiment on the server, and a worker account that may write to it."""
    name = f"study_{secrets.token_hex(4)}"
    url = make_url(postgres.create_database(name))
    password = secrets.token_hex(12)
    mlflow_server.create_user(name, password)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", mlflow_server.admin[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", mlflow_server.admin[1])
    client = MlflowClient(mlflow_server.uri)
    experiment_id = client.create_experiment(name)
    mlflow_server.grant(name, experiment_id, "EDIT")
    data = tiny_prepared(n_train=512)
    folder = tmp_path / "prepared"
    save_prepared(folder, {"train": data.train, "val": data.val, "test": data.test}, {"dataset": "mnist", "seed": 0})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PG"))}
    env.update(mlflow_server.env(name, password), MLFLOW_EXPERIMENT_NAME=name, PGPASSWORD=url.password, PYTHONPATH=str(REPO))
    storage = f"{url.drivername}://{url.username}@{url.host}:{url.port}/{url.database}"  # its password: PGPASSWORD
    return {
        "name": name,
        "client": client,
        "experiment_id": experiment_id,
        "env": env,
        "folder": folder,
        "storage": storage,
        "url": url.render_as_string(hide_password=False),
        "secrets": (password, url.password),
        "tmp": tmp_path,
    }


def fetch(dataset, auth: tuple[str, str] | None) -> bytes:
    """The bytes a dataset input's source points at, fetched as its reader would."""
    source = json.loads(dataset.source)
    if dataset.source_type == "http":
        response = requests.get(source["url"], auth=auth, timeout=60)
        response.raise_for_status()
        return response.content
    assert dataset.source_type == "local", dataset.source
    return Path(source["uri"]).read_bytes()
