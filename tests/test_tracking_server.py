"""The shared tracking server's access rules: an MLflow server with basic-auth on PostgreSQL.

No training: these check who may read and write, and that credentials stay out of what is logged.
The server (default permission READ) starts once per session, so each test names its own
experiments and users.
"""

from __future__ import annotations

import uuid

import mlflow
import pytest
import requests
from mlflow.tracking import MlflowClient

from pipeline.tracking import ui_link

API = "/api/2.0/mlflow"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def log_in_as(mlflow_server, monkeypatch):
    """Switch this process's MLflow client to ``(username, password)``, as a worker's env would."""

    def log_in(username: str, password: str) -> MlflowClient:
        for name, value in mlflow_server.env(username, password).items():
            monkeypatch.setenv(name, value)
        mlflow.set_tracking_uri(mlflow_server.uri)
        return MlflowClient(mlflow_server.uri)

    yield log_in
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


@pytest.fixture
def reader(mlflow_server) -> tuple[str, str]:
    """A fresh user with nothing but the server's default permission, READ."""
    user = (unique("reader"), uuid.uuid4().hex)
    mlflow_server.create_user(*user)
    return user


def test_write_without_credentials_is_rejected(mlflow_server):
    response = requests.post(mlflow_server.uri + API + "/experiments/create", json={"name": unique("anonymous")}, timeout=30)
    assert response.status_code == 401


def test_wrong_password_is_rejected(mlflow_server, reader):
    response = requests.get(
        mlflow_server.uri + API + "/experiments/search",
        params={"max_results": 1},
        auth=(reader[0], "not-" + reader[1]),
        timeout=30,
    )
    assert response.status_code == 401


def test_read_only_user_reads_but_cannot_write(mlflow_server, log_in_as, reader):
    admin = log_in_as(*mlflow_server.admin)
    experiment_id = admin.create_experiment(unique("shared"))
    run_id = admin.create_run(experiment_id).info.run_id

    read = requests.get(
        mlflow_server.uri + API + "/experiments/get", params={"experiment_id": experiment_id}, auth=reader, timeout=30
    )
    assert read.status_code == 200 and read.json()["experiment"]["experiment_id"] == experiment_id

    create_run = requests.post(
        mlflow_server.uri + API + "/runs/create", json={"experiment_id": experiment_id}, auth=reader, timeout=30
    )
    log_metric = requests.post(
        mlflow_server.uri + API + "/runs/log-metric",
        auth=reader,
        timeout=30,
        json={"run_id": run_id, "key": "val_accuracy", "value": 0.5, "timestamp": 0, "step": 0},
    )
    assert create_run.status_code == 403
    assert log_metric.status_code == 403
    assert "val_accuracy" not in admin.get_run(run_id).data.metrics


def test_granted_user_logs_runs_through_the_mlflow_client(mlflow_server, log_in_as):
    admin = log_in_as(*mlflow_server.admin)
    experiment_id = admin.create_experiment(unique("tuning"))
    editor = (unique("editor"), uuid.uuid4().hex)
    mlflow_server.create_user(*editor)
    mlflow_server.grant(editor[0], experiment_id, "EDIT")

    log_in_as(*editor)
    with mlflow.start_run(experiment_id=experiment_id, run_name="parent") as parent:
        # A nested run does not inherit its parent's experiment; "0" (Default) is READ-only here.
        with mlflow.start_run(
            experiment_id=experiment_id, run_name="trial-0", nested=True, tags={"optuna.trial_number": "0"}
        ) as child:
            mlflow.log_params({"hidden_size": 64, "learning_rate": 0.001})
            for step, value in enumerate([0.5, 0.7, 0.9]):
                mlflow.log_metric("val_accuracy", value, step=step)

    run = admin.get_run(child.info.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert run.data.params == {"hidden_size": "64", "learning_rate": "0.001"}
    assert [m.value for m in admin.get_metric_history(run.info.run_id, "val_accuracy")] == [0.5, 0.7, 0.9]

    # What workers log with these credentials must never carry the password.
    for logged in (run, admin.get_run(parent.info.run_id)):
        stored = {**logged.data.params, **logged.data.tags}
        assert not [key for key, value in stored.items() if editor[1] in value or editor[1] in key]


def test_grant_is_limited_to_its_experiment(mlflow_server, log_in_as):
    admin = log_in_as(*mlflow_server.admin)
    granted, other = admin.create_experiment(unique("granted")), admin.create_experiment(unique("other"))
    editor = (unique("editor"), uuid.uuid4().hex)
    mlflow_server.create_user(*editor)
    mlflow_server.grant(editor[0], granted, "EDIT")

    client = log_in_as(*editor)
    client.create_run(granted)
    with pytest.raises(mlflow.exceptions.MlflowException, match="403"):
        client.create_run(other)


def test_the_ui_link_opens_the_servers_runs_table_or_says_how_to_start_a_ui():
    mlflow.set_tracking_uri("http://tracking.example:5000/")
    assert ui_link("7") == "http://tracking.example:5000/#/experiments/7/runs?workflowType=machine_learning"
    mlflow.set_tracking_uri("sqlite:///runs/mlflow.db")
    assert ui_link("7") == (
        "mlflow ui --backend-store-uri sqlite:///runs/mlflow.db, "
        "then open http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
    )
    mlflow.set_tracking_uri(None)
