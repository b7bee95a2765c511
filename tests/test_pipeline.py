"""The main entry point: stage reuse rules, and `mlflow run .` end to end on real MNIST."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline import main as main_module
from pipeline.config import TrainConfig
from pipeline.main import CONTENT_KEY_TAG, code_version, content_key
from pipeline.tracking import finished_run, format_param
from tests.conftest import REPO
from tests.test_tables import table_rows


def test_content_key_changes_with_parameters_inputs_and_pipeline_code_only(tmp_path, monkeypatch):
    project = tmp_path / "project"
    shutil.copytree(REPO / "pipeline", project / "pipeline")
    for name in ("MLproject", "requirements.txt", "README.md"):
        shutil.copy(REPO / name, project / name)
    (project / "experiments").mkdir()
    (project / "experiments" / "tune.py").write_text("# tuning code\n")
    monkeypatch.setattr(main_module, "PROJECT_DIR", project)

    def key(parameters=None, stage="train"):
        return content_key(stage, parameters or {"data": "prepare-run-a", "epochs": "2"}, code_version())

    base = key()
    assert base == key({"epochs": "2", "data": "prepare-run-a"})  # order does not matter
    assert base != key({"data": "prepare-run-a", "epochs": "3"})  # a parameter
    assert base != key({"data": "prepare-run-b", "epochs": "2"})  # an input run
    assert base != key(stage="evaluate")
    for elsewhere in ("README.md", "experiments/tune.py"):  # not what a stage runs
        (project / elsewhere).write_text((project / elsewhere).read_text() + "\n# edited\n")
        assert key() == base, elsewhere
    for code in ("pipeline/training.py", "MLproject", "requirements.txt"):  # what a stage runs
        (project / code).write_text((project / code).read_text() + "\n# edited\n")
        assert key() != base, code
        base = key()


def test_only_finished_runs_are_reused(tracking):
    client = MlflowClient()
    for status in ("FAILED", "KILLED", "RUNNING"):
        run = client.create_run("0", tags={CONTENT_KEY_TAG: "k"})
        if status != "RUNNING":
            client.set_terminated(run.info.run_id, status)
    assert finished_run("0", {CONTENT_KEY_TAG: "k"}) is None
    finished = client.create_run("0", tags={CONTENT_KEY_TAG: "k"})
    client.set_terminated(finished.info.run_id, "FINISHED")
    other = client.create_run("0", tags={CONTENT_KEY_TAG: "other"})
    client.set_terminated(other.info.run_id, "FINISHED")
    assert finished_run("0", {CONTENT_KEY_TAG: "k"}).info.run_id == finished.info.run_id


def mlflow_run(args: list[str], cwd: Path, tracking_uri: str) -> subprocess.CompletedProcess:
    venv_bin = str(Path(sys.executable).parent)  # so the stages' `python` is this interpreter
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PATH": venv_bin + os.pathsep + os.environ["PATH"]}
    env.pop("MLFLOW_RUN_ID", None)
    return subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(REPO), "--env-manager", "local", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.slow(seconds=105)
def test_mlflow_run_end_to_end_then_reuse(tmp_path, store_uri, mnist_dir):
    uri = store_uri
    (tmp_path / "mnist").symlink_to(mnist_dir)
    typed_in = tmp_path / "work"  # the user's folder, not the project's, where mlflow run starts the stages
    typed_in.mkdir()
    # Relative paths are read from the folder the command was typed in.
    given = {"data_dir": "../mnist", "train_limit": 4000, "val_size": 1000, "epochs": 2, "hidden_size": 32}
    given |= {"num_layers": 1, "learning_rate": 0.005, "checkpoint_dir": "checkpoints"}
    params = [arg for name, value in given.items() for arg in ("-P", f"{name}={value}")]
    first = mlflow_run(params, typed_in, uri)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "test_accuracy" in first.stdout and "workflowType=machine_learning" in first.stdout

    client = MlflowClient(uri)
    runs = {run.data.tags["pipeline.stage"]: run for run in client.search_runs(["0"])}
    assert set(runs) == {"main", "prepare", "train", "evaluate"}
    parent = runs["main"]
    for stage in ("prepare", "train", "evaluate"):
        assert runs[stage].info.status == "FINISHED"
        assert runs[stage].data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert parent.data.tags[f"pipeline.{stage}_run"] == runs[stage].info.run_id
    train_id = runs["train"].info.run_id
    # Every train parameter reached the train stage as given (-P) or defaulted, through two mlflow runs.
    given = TrainConfig(hidden_size=32, num_layers=1, learning_rate=0.005, epochs=2)
    for name, value in dataclasses.asdict(given).items():
        assert runs["train"].data.params[name] == format_param(value), name
    assert runs["prepare"].data.params["train_limit"] == "4000" and runs["prepare"].data.params["val_size"] == "1000"
    [raw_files] = runs["prepare"].inputs.dataset_inputs
    assert json.loads(raw_files.dataset.source)["uri"] == str(mnist_dir.resolve())  # <typed_in>/../mnist
    assert [m.step for m in client.get_metric_history(train_id, "val_accuracy")] == [1, 2]
    assert {f.path for f in client.list_artifacts(train_id)} >= {"learning_curves.png"}
    # Checkpoints went to the user's folder, and were removed once the run finished
    assert (typed_in / "checkpoints").is_dir() and not (typed_in / "checkpoints" / train_id).exists()
    assert not (REPO / "checkpoints").exists() or not (REPO / "checkpoints" / train_id).exists()
    assert runs["evaluate"].data.metrics["test_accuracy"] > 0.5  # chance is 0.1
    assert parent.data.metrics["test_accuracy"] == runs["evaluate"].data.metrics["test_accuracy"]

    again = mlflow_run(params, typed_in, uri)
    assert again.returncode == 0, again.stderr[-3000:]
    for stage in ("prepare", "train", "evaluate"):
        assert f"{stage}: reusing finished run {runs[stage].info.run_id}" in again.stderr
    stages = [run.data.tags["pipeline.stage"] for run in client.search_runs(["0"])]
    assert sorted(stages) == ["evaluate", "main", "main", "prepare", "train"]
    [second] = [
        run for run in client.search_runs(["0"], "tags.`pipeline.stage` = 'main'") if run.info.run_id != parent.info.run_id
    ]
    note = second.data.tags["mlflow.note.content"]  # the reusing pipeline run links the runs it reused
    linked = {row["stage"]: (row["run"], row[""]) for row in table_rows(note[note.index("| stage") :])}
    assert linked == {
        stage: (f"[{runs[stage].info.run_id}](#/experiments/0/runs/{runs[stage].info.run_id})", "reused")
        for stage in ("prepare", "train", "evaluate")
    }


@pytest.mark.slow
def test_a_failing_stage_ends_main_with_its_one_line_error_and_no_traceback(tmp_path, store_uri):
    uri = store_uri
    offline_and_empty = tmp_path / "no-data"
    offline_and_empty.mkdir()
    failed = mlflow_run(["-P", f"data_dir={offline_and_empty}"], tmp_path, uri)
    assert failed.returncode == 1
    assert "Traceback" not in failed.stderr and "ExecutionException" not in failed.stderr
    assert "error: train-images-idx3-ubyte, train-labels-idx1-ubyte" in failed.stderr  # the stage's own line
    [main_run] = MlflowClient(uri).search_runs(["0"], "tags.`pipeline.stage` = 'main'")
    assert main_run.info.status == "FAILED" and "the prepare stage failed" in main_run.data.tags["pipeline.error"]
    assert "error: the prepare stage failed (run " in failed.stderr


def train_stage_pid(checkpoint_root: Path) -> int:
    """The pid of the `python -m pipeline.train` process writing under ``checkpoint_root``."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"pipeline.train" in args and str(checkpoint_root).encode() in args:
            return int(cmdline.parent.name)
    raise AssertionError("no train stage process found")


@pytest.mark.slow(seconds=120)
def test_main_resumes_an_interrupted_train_run_and_deletes_the_launchers_empty_run(tmp_path, store_uri, mnist_dir):
    uri = store_uri
    (tmp_path / "mnist").symlink_to(mnist_dir)
    params = ["-P", "data_dir=mnist", "-P", "train_limit=4000", "-P", "val_size=1000", "-P", "epochs=4",
              "-P", "hidden_size=32", "-P", "num_layers=1", "-P", "checkpoint_dir=checkpoints"]  # fmt: skip
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": venv_bin + os.pathsep + os.environ["PATH"]}
    env.pop("MLFLOW_RUN_ID", None)
    first = subprocess.Popen([sys.executable, "-m", "mlflow", "run", str(REPO), "--env-manager", "local", *params],
                             cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while not list((tmp_path / "checkpoints").glob("*/epoch-0001.pt")):
        assert time.monotonic() < deadline and first.poll() is None, "the train stage never checkpointed epoch 1"
        time.sleep(0.1)
    [checkpoint] = list((tmp_path / "checkpoints").glob("*/epoch-0001.pt"))
    interrupted = checkpoint.parent.name
    os.kill(train_stage_pid(tmp_path / "checkpoints"), signal.SIGTERM)  # a scheduler preempts the train stage
    assert first.wait(timeout=300) != 0
    client = MlflowClient(uri)
    assert client.get_run(interrupted).info.status == "KILLED"

    again = mlflow_run(params, tmp_path, uri)  # the same command
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming the interrupted train run {interrupted} (KILLED)" in again.stderr
    trains = client.search_runs(["0"], "tags.`pipeline.stage` = 'train'")
    assert [run.info.run_id for run in trains] == [interrupted]  # the launcher's empty train run was deleted
    assert trains[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(interrupted, "val_accuracy")] == [1, 2, 3, 4]
    [pipeline] = [r for r in client.search_runs(["0"], "tags.`pipeline.stage` = 'main'") if r.info.status == "FINISHED"]
    assert pipeline.data.tags["pipeline.train_run"] == interrupted


def test_main_starts_its_stages_with_this_interpreter_even_without_an_activated_venv(monkeypatch):
    seen = []

    def recording_pipeline(*args, **kwargs):  # where MLflow would find `python` for the stages
        seen.append(os.environ["PATH"].split(os.pathsep)[0])
        raise main_module.StageFailed("the prepare stage failed; its error is above")

    monkeypatch.setattr(main_module, "run_pipeline", recording_pipeline)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # a shell where the virtual environment was never activated
    with pytest.raises(SystemExit):
        main_module.main([])
    assert seen == [str(Path(sys.executable).parent)]
