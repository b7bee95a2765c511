"""A team's shared `mlflow server`, started as teams start it, and the commands users type against it.

MLflow 3's plain `mlflow server` proxies artifacts: runs get ``mlflow-artifacts:/`` URIs, not the
``file:`` ones of a local store. Every stage records its data splits as dataset inputs whose source
must work with whatever URI the server hands out, so these tests run `mlflow run .` against the
server as a new team starts it (MLflow's defaults), check each dataset source by fetching it, and
restart the tracking server and PostgreSQL under a running study. Each other kind of artifact URI
(``--no-serve-artifacts`` gives the server's own paths, object stores their URLs) is a case of the
first test. The
documented recipe (basic-auth, tune workers through `mlflow run`, the champion evaluated from the
registry, their dataset sources) is tests/test_slurm.py's, whose array tasks are those workers.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from mlflow.tracking import MlflowClient
from sqlalchemy.engine import make_url

from experiments import attributes
from experiments.trials import counted
from pipeline.tracking import DATA_SOURCE_TAG, log_data_inputs, proxied_artifact_url, split_source, ui_link
from tests.conftest import REPO, mlflow_run, tiny_prepared, user_environment
from tests.infra import mlflow_server, postgres_cluster
from tests.servers import fetch

SMALL_PIPELINE = ("-P", "hidden_size=16", "-P", "num_layers=1", "-P", "epochs=1", "-P", "train_limit=1000", "-P", "val_size=500")


# --- every artifact URI scheme gets a source that works, or none and a reason ----------------------


@pytest.mark.parametrize(
    ("uri", "tracking_uri", "expected"),
    [
        ("/data/prepared/val.pt", "sqlite:///x.db", "/data/prepared/val.pt"),
        ("/srv/artifacts/1/prepared/val.pt", "http://tracking:5000", "/srv/artifacts/1/prepared/val.pt"),  # --no-serve-artifacts
        ("file:///data/prepared/val.pt", "sqlite:///x.db", "file:///data/prepared/val.pt"),
        ("https://files.example/prepared/val.pt", "sqlite:///x.db", "https://files.example/prepared/val.pt"),
        ("s3://bucket/1/abc/artifacts/prepared/val.pt", "http://tracking:5000", "s3://bucket/1/abc/artifacts/prepared/val.pt"),
        ("gs://bucket/prepared/val.pt", "http://tracking:5000", "gs://bucket/prepared/val.pt"),
        (
            "mlflow-artifacts:/1/abc/artifacts/prepared/val.pt",
            "https://tracking.example/",
            "https://tracking.example/api/2.0/mlflow-artifacts/artifacts/1/abc/artifacts/prepared/val.pt",
        ),
        (
            "mlflow-artifacts://other:5000/1/abc/artifacts/prepared/val.pt",
            "sqlite:///x.db",
            "http://other:5000/api/2.0/mlflow-artifacts/artifacts/1/abc/artifacts/prepared/val.pt",
        ),
        ("mlflow-artifacts:/1/abc/artifacts/prepared/val.pt", "sqlite:///x.db", None),
        ("weird://somewhere/prepared/val.pt", "sqlite:///x.db", None),
    ],
)
def test_each_artifact_uri_scheme_gets_a_readable_source_or_a_reason(uri, tracking_uri, expected, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    source, why_not = split_source(uri)
    assert source == expected
    assert bool(why_not) == (expected is None) and (expected or uri.split(":")[0] in why_not)


def test_a_runs_uri_is_read_through_the_run_it_names(tracking):
    with mlflow.start_run() as run:
        pass
    source, why_not = split_source(f"runs:/{run.info.run_id}/prepared/val.pt")
    assert (source, why_not) == (f"{run.info.artifact_uri}/prepared/val.pt", "")


@pytest.mark.parametrize(
    "folder", ["mlflow-artifacts:/0/abc/artifacts/prepared", "weird://host/prepared", "s3://bucket/prepared"]
)
def test_inputs_are_logged_whatever_the_source_and_a_missing_one_is_explained(tracking, folder):
    data = tiny_prepared()
    data.manifest["splits"] = {name: {"file": f"{name}.pt", "sha256": f"{i}" * 64} for i, name in enumerate(("val", "test"))}
    with mlflow.start_run() as run:
        log_data_inputs(data, folder, {"val": "validation", "test": "testing"})
    logged = mlflow.get_run(run.info.run_id)
    inputs = {d.dataset.name: d.dataset for d in logged.inputs.dataset_inputs}
    assert set(inputs) == {"mnist-val", "mnist-test"} and inputs["mnist-test"].digest == "1" * 16
    if folder.startswith("s3:"):
        assert json.loads(inputs["mnist-val"].source)["uri"] == "s3://bucket/prepared/val.pt"
        assert DATA_SOURCE_TAG not in logged.data.tags
    else:  # sqlite tracking serves no artifacts, and no MLflow source reads weird://
        assert "dataset source left out" in logged.data.tags[DATA_SOURCE_TAG]


# --- through the user's door ------------------------------------------------------------------------


def check_stage_inputs(client: MlflowClient, experiment_id: str, auth=None) -> str:
    """Each train and evaluate run shows its splits as dataset inputs, and each source that names a
    split's file holds exactly the bytes of the recorded digest. Returns the source type seen."""
    kinds = set()
    for stage, contexts in (("train", {"training", "validation"}), ("evaluate", {"testing"})):
        runs = client.search_runs([experiment_id], f"tags.`pipeline.stage` = '{stage}'")
        assert runs, f"no {stage} run"
        for run in runs:
            inputs = {
                tag.value: d.dataset for d in run.inputs.dataset_inputs for tag in d.tags if tag.key == "mlflow.data.context"
            }
            assert set(inputs) == contexts, (stage, run.inputs)
            for context in contexts - {"training"}:  # training's record is the prepare run's, sourced from the raw files
                assert hashlib.sha256(fetch(inputs[context], auth)).hexdigest()[:16] == inputs[context].digest
                kinds.add(inputs[context].source_type)
    [kind] = kinds
    return kind


@pytest.mark.slow(seconds=165)
def test_the_pipeline_logs_to_a_plain_mlflow_server(tmp_path, mnist_dir):
    # `mlflow server --backend-store-uri sqlite:///server.db --port P`, as a new team types it.
    with mlflow_server(tmp_path / "server", "sqlite:///server.db") as server:
        env = user_environment(server.uri)
        done = mlflow_run("-P", f"data_dir={mnist_dir}", *SMALL_PIPELINE, cwd=tmp_path, env=env)
        assert done.returncode == 0, done.stderr[-4000:]
        client = MlflowClient(server.uri)
        [prepare] = client.search_runs(["0"], "tags.`pipeline.stage` = 'prepare'")
        assert prepare.info.artifact_uri.startswith("mlflow-artifacts:")
        assert check_stage_inputs(client, "0") == "http"


def test_proxied_artifact_url_needs_a_server(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert (
        proxied_artifact_url("mlflow-artifacts:/0/r/artifacts/x")
        == "http://127.0.0.1:5000/api/2.0/mlflow-artifacts/artifacts/0/r/artifacts/x"
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    assert proxied_artifact_url("mlflow-artifacts:/0/r/artifacts/x") is None


# --- servers restart; studies go on -----------------------------------------------------------------


def running_trial(storage_url: str, name: str, after: int = -1) -> int | None:
    """The number of a trial (above ``after``) that trains right now, with its MLflow run open."""
    try:
        study = optuna.load_study(study_name=name, storage=storage_url)
    except KeyError:  # not created yet
        return None
    numbers = [t.number for t in study.trials if t.state.name == "RUNNING" and attributes.RUN_ID.key in t.user_attrs]
    return next((n for n in numbers if n > after), None)


def wait_for(predicate, workers, logs: list[Path], timeout: float = 300):
    """``predicate()``'s first answer other than None, while every worker still runs."""
    deadline = time.monotonic() + timeout
    while (value := predicate()) is None:
        if any(w.poll() is not None for w in workers) or time.monotonic() > deadline:
            output = "\n".join(f"--- {log.name} ---\n{log.read_text()[-3000:]}" for log in logs)
            pytest.fail(f"a worker exited, or {timeout:.0f} s passed:\n{output}")
        time.sleep(0.3)
    return value


@pytest.mark.slow(seconds=155)
def test_a_study_goes_on_while_the_tracking_server_and_postgresql_restart(tmp_path, monkeypatch):
    """Servers are upgraded and restarted while trials run: first the MLflow server (down 10 s), then
    PostgreSQL, which holds both the study and the server's runs (down until a worker has met it
    down). No trial is lost or counted twice and every worker exits 0."""
    import subprocess
    import sys

    with postgres_cluster(tmp_path / "postgres") as postgres:
        tracking_db, auth_db, study_db = (postgres.create_database(n) for n in ("tracking", "auth", "optuna"))
        with mlflow_server(tmp_path / "server", tracking_db, auth_db, workers=1, job_execution=False) as server:
            data = tiny_prepared(n_train=4096)
            from pipeline.data import save_prepared

            save_prepared(tmp_path / "prepared", {"train": data.train, "val": data.val, "test": data.test}, {"dataset": "mnist"})
            url = make_url(study_db)
            env = {**user_environment(server.uri), **server.env(*server.admin), "PGPASSWORD": url.password}
            name = f"restarts-{secrets.token_hex(3)}"
            command = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "tune", "--env-manager", "local"]
            settings = dict(
                study="smoke", study_name=name, n_trials=4, epochs=3, pruner="none", device="cpu", n_workers=1, confirm_top=0
            )
            settings.update(storage=f"postgresql://{url.username}@{url.host}:{url.port}/{url.database}", heartbeat_interval=2)
            settings.update(data=tmp_path / "prepared", register_name=name)
            command += [arg for key, value in settings.items() for arg in ("-P", f"{key}={value}")]
            log_files = [tmp_path / f"worker-{i}.log" for i in range(2)]
            logs = [path.open("w+") for path in log_files]
            workers = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=log) for log in logs]
            storage_url = url.render_as_string(hide_password=False)
            try:
                first = wait_for(lambda: running_trial(storage_url, name), workers, log_files)
                server.restart(down_seconds=10)  # longer than an epoch: its metrics wait for the server
                wait_for(lambda: running_trial(storage_url, name, after=first), workers, log_files)
                postgres.stop()  # until a worker's call meets it down
                wait_for(lambda: any("database unreachable" in log.read_text() for log in log_files) or None, workers, log_files)
                postgres.start()
                codes = [worker.wait(timeout=600) for worker in workers]
            finally:
                for worker in workers:
                    worker.kill()
            output = "\n".join(f"--- worker {i} ---\n{log.seek(0) or log.read()[-3000:]}" for i, log in enumerate(logs))
            assert codes == [0, 0], output

            study = optuna.load_study(study_name=name, storage=storage_url)
            assert len(counted(study.trials)) == 4, [(t.number, t.state.name) for t in study.trials]
            assert all(t.state.name == "COMPLETE" for t in counted(study.trials)), output
            retried = [attributes.RETRY_OF.read(t) for t in study.trials if attributes.RETRY_OF.read(t) is not None]
            assert len(retried) == len(set(retried)), "a trial was re-queued twice"
            for key, value in server.env(*server.admin).items():
                monkeypatch.setenv(key, value)
            client = MlflowClient(server.uri)
            [experiment] = [e for e in client.search_experiments() if e.name == "Default"]
            children = client.search_runs(
                [experiment.experiment_id], f"tags.`optuna.study_name` = '{name}' and tags.`pipeline.stage` = 'trial'"
            )
            finished = [r for r in children if r.info.status == "FINISHED"]
            assert sorted(int(r.data.tags["optuna.trial_number"]) for r in finished) == sorted(
                t.number for t in counted(study.trials)
            )
            assert not [r for r in children if r.info.status == "RUNNING"], output
            assert len(client.search_model_versions(f"name = '{name}'")) == 1


def test_the_ui_link_opens_the_servers_runs_table_or_says_how_to_start_a_ui():
    mlflow.set_tracking_uri("http://tracking.example:5000/")
    assert ui_link("7") == "http://tracking.example:5000/#/experiments/7/runs?workflowType=machine_learning"
    mlflow.set_tracking_uri("sqlite:///runs/mlflow.db")
    assert ui_link("7") == (
        "mlflow ui --backend-store-uri sqlite:///runs/mlflow.db, "
        "then open http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
    )
    mlflow.set_tracking_uri(None)
