"""Fixtures for tests of the shared infrastructure: a throwaway PostgreSQL cluster and an MLflow
server with basic-auth, both on loopback, started once per session under pytest's tmp folder, and
``cluster``: a study database, an experiment and a worker account on them, for one test.

Loaded as a plugin by tests/conftest.py (its ``pytest_plugins``). The start and
stop code is tests/infra.py's, which the load test and deploy/k8s/image_smoke.py use too.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
from mlflow.tracking import MlflowClient
from sqlalchemy.engine import make_url

from pipeline.data import save_prepared
from tests.conftest import REPO, tiny_prepared
from tests.infra import (
    InfraError,
    MlflowServer,
    Postgres,
    free_port,
    log_tail,
    postgres_bindir,
    postgres_cluster,
)
from tests.infra import (
    mlflow_server as start_mlflow_server,
)


@pytest.fixture(scope="session")
def postgres(tmp_path_factory) -> Iterator[Postgres]:
    """A running cluster: ``.create_database(name) -> URL`` (a fresh database and its owner role)."""
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
    mlflow_server.grant(name, experiment_id, "MANAGE")  # as docs/scale-out.md: removing a checkpoint is a delete
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


@contextmanager
def model_server(model_uri: str, env: dict[str, str], cwd: Path, timeout: float = 180) -> Iterator[str]:
    """``mlflow models serve -m <model_uri> --env-manager local`` typed in ``cwd``, as README's
    serving section starts it; yields its URL once ``/ping`` answers."""
    port, log = free_port(), cwd / f"models-serve-{secrets.token_hex(3)}.log"
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local", "--port", str(port)]
    with open(log, "w") as output:
        server = subprocess.Popen(command, cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + timeout
    try:
        while True:
            if server.poll() is not None:
                pytest.fail(f"mlflow models serve exited ({server.returncode}):\n{log_tail(log)}", pytrace=False)
            try:
                if requests.get(f"{url}/ping", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow models serve did not answer /ping in {timeout:.0f} s:\n{log_tail(log)}", pytrace=False)
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
