"""Processes started at the same moment all start: on a tracking store that does not exist yet (MLflow
creates its tables once, pipeline/tracking_store.py), and runs that log the same new dataset at once
both record it. Two `mlflow run . -e tune` commands started at once in a new folder, one prepare run
between them: tests/test_tune_mlflow_run.py."""

from __future__ import annotations

import subprocess
import sys

import mlflow
import pytest
import sqlalchemy
import torch
from mlflow.tracking import MlflowClient

from pipeline.data import Split
from pipeline.tracking import log_split_input


def test_mlflow_builds_a_sqlite_store_holding_a_lock_beside_the_database(store_uri, tmp_path):
    assert MlflowClient(store_uri).search_experiments()[0].name == "Default"
    assert (tmp_path / "mlflow.db.lock").exists()  # the plugin pyproject.toml declares built it (else: bash setup.sh)


@pytest.mark.slow  # three processes importing MLflow
def test_processes_opening_a_new_store_at_once_all_open_it(tmp_path):
    uri, go = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "go"
    opens = (
        "import os, time; from mlflow.tracking import MlflowClient; print('ready', flush=True)\n"
        f"while not os.path.exists({str(go)!r}): time.sleep(0.001)\n"
        f"MlflowClient({uri!r}).search_runs(['0'])"
    )
    processes = [
        subprocess.Popen([sys.executable, "-c", opens], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    assert [process.stdout.readline() for process in processes] == ["ready\n"] * 3  # MLflow imported: they start together
    go.touch()
    for process in processes:
        errors = process.communicate(timeout=300)[1]
        assert process.returncode == 0, errors[-3000:]  # not "Online migration expected to match one row", "duplicate column"


def test_runs_logging_the_same_new_dataset_at_once_both_record_it(tracking):
    """Another run inserts the dataset between this run's lookup and its insert, as a run in another
    process does when both start at once: the unique constraint meets this insert, and the retry finds it."""
    split = Split(torch.zeros(4, 28, 28, dtype=torch.uint8), torch.arange(4))
    sha256 = "ab" * 32
    other = MlflowClient().create_run("0").info.run_id
    met = []

    def another_run_inserts_it_first(connection, cursor, statement, *_):
        if statement.startswith("INSERT INTO datasets") and not met:
            met.append(statement)
            with mlflow.start_run(run_id=other, nested=True):
                log_split_input(split, "mnist-val", sha256, None, "validation")

    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", another_run_inserts_it_first)
    try:
        with mlflow.start_run() as run:
            log_split_input(split, "mnist-val", sha256, None, "validation")
    finally:
        sqlalchemy.event.remove(sqlalchemy.engine.Engine, "before_cursor_execute", another_run_inserts_it_first)
    assert met  # the two inserts did meet
    for run_id in (run.info.run_id, other):
        [logged] = MlflowClient().get_run(run_id).inputs.dataset_inputs
        assert (logged.dataset.name, logged.dataset.digest) == ("mnist-val", sha256[:16])
