"""Faults injected into real stage processes: SIGTERM, kill -9, a crash while logging, four writers.

Each test starts ``python -m pipeline.<stage>`` as a subprocess against its own MLflow store,
interrupts it the way a preempted machine or an impatient user would, and checks what the
store and the checkpoint folder hold afterwards and what the rerun makes of them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pipeline import prepare, train
from pipeline.data import DataError, save_prepared
from pipeline.main import CONTENT_KEY_TAG, code_version, content_key
from pipeline.signals import Terminated
from pipeline.tracking import (
    ERROR_TAG,
    HOST_TAG,
    PID_TAG,
    RESUME_KEY_TAG,
    find_interrupted,
    finished_run,
    load_prepared_run,
    stage_run,
)
from tests.conftest import REPO, tiny_prepared

EPOCHS = 5
TRAIN_FLAGS = [
    "--hidden-size",
    "16",
    "--num-layers",
    "2",
    "--dropout",
    "0.2",
    "--batch-size",
    "64",
    "--learning-rate",
    "0.01",
    "--epochs",
    str(EPOCHS),
    "--device",
    "cpu",
]
CURVES = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")


@pytest.fixture
def prepared_folder(tmp_path) -> Path:
    data = tiny_prepared(n_train=512)
    folder = tmp_path / "prepared"
    save_prepared(folder, {"train": data.train, "val": data.val, "test": data.test}, {"dataset": "mnist", "seed": 0})
    return folder


class Stage:
    """``python -m pipeline.<stage>`` in tmp_path against the test's tracking store, its stderr in a file."""

    def __init__(self, tmp_path: Path, tracking: str, *argv: str):
        self.argv = [sys.executable, "-m", *argv]
        self.cwd = tmp_path
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"MLFLOW_TRACKING_URI": tracking}
        self.log = tmp_path / f"stage-{time.monotonic_ns()}.log"

    def start(self) -> subprocess.Popen:
        self.process = subprocess.Popen(
            self.argv, cwd=self.cwd, env=self.env, stdout=subprocess.DEVNULL, stderr=self.log.open("w")
        )
        return self.process

    def run(self) -> int:
        self.start()
        return self.wait()

    def wait(self, timeout: float = 300) -> int:
        return self.process.wait(timeout)

    def stderr(self) -> str:
        return self.log.read_text()

    def wait_for(self, pattern: str, timeout: float = 300) -> Path:
        """The first file matching ``pattern`` under cwd, while the process still runs."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if found := sorted(self.cwd.glob(pattern)):
                return found[0]
            if self.process.poll() is not None:
                pytest.fail(f"the stage exited ({self.process.returncode}) before {pattern} appeared:\n{self.stderr()}")
            time.sleep(0.02)
        pytest.fail(f"{pattern} did not appear in {timeout} s:\n{self.stderr()}")


def curves(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    return {name: sorted((m.step, m.value) for m in client.get_metric_history(run_id, name)) for name in CURVES}


@pytest.mark.parametrize("stop, said", [(KeyboardInterrupt(), "SIGINT"), (Terminated(), "SIGTERM")])
def test_a_stage_stopped_outside_training_says_by_which_signal(tracking, capsys, stop, said):
    with pytest.raises(SystemExit) as exit, stage_run("evaluate"):
        raise stop  # as Ctrl-C or a scheduler's SIGTERM while a stage loads data or logs its results
    [run] = MlflowClient().search_runs(["0"])
    assert exit.value.code == 128 + signal.Signals[said] and run.info.status == "KILLED"
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: {said}; run {run.info.run_id} ended KILLED: rerun the same command to start it again"
    )


@pytest.mark.slow(seconds=90)
def test_sigterm_then_kill_9_the_rerun_resumes_the_same_run_to_the_uninterrupted_metrics(tmp_path, tracking, prepared_folder):
    client = MlflowClient()
    command = ["pipeline.train", "--data", str(prepared_folder), *TRAIN_FLAGS]
    reference = Stage(tmp_path, tracking, *command, "--checkpoint-dir", "reference")
    assert reference.run() == 0, reference.stderr()
    (reference_id,) = [run.info.run_id for run in client.search_runs(["0"])]

    # SIGTERM after epoch 1: the batch in progress finishes, a checkpoint of it is written, the run ends KILLED.
    stage = Stage(tmp_path, tracking, *command, "--checkpoint-dir", "checkpoints")
    stage.start()
    run_id = stage.wait_for("checkpoints/*/epoch-0001.pt").parent.name
    stage.process.send_signal(signal.SIGTERM)
    assert stage.wait() == 128 + signal.SIGTERM, stage.stderr()
    assert client.get_run(run_id).info.status == "KILLED"
    assert list((tmp_path / "checkpoints" / run_id).glob("epoch-*-partial.pt")), "no checkpoint of the batch in progress"
    assert f"run {run_id} ended KILLED: rerun the same command to resume it" in stage.stderr()

    # The same command resumes that run; kill -9 it after epoch 3: the run is left RUNNING, its process gone.
    stage.start()
    stage.wait_for(f"checkpoints/{run_id}/epoch-0003.pt")
    stage.process.kill()
    stage.wait()
    assert f"resuming the interrupted train run {run_id} (KILLED)" in stage.stderr()
    assert client.get_run(run_id).info.status == "RUNNING"

    # And again: it finishes the same run, with the metrics of the run nobody interrupted.
    assert stage.run() == 0, stage.stderr()
    assert f"resuming the interrupted train run {run_id} (RUNNING)" in stage.stderr()
    runs = {run.info.run_id: run for run in client.search_runs(["0"], "tags.`pipeline.stage` = 'train'")}
    assert set(runs) == {reference_id, run_id}, "the reruns opened new runs instead of resuming"
    assert runs[run_id].info.status == "FINISHED"
    assert list((tmp_path / "checkpoints").iterdir()) == [], "the finished run left its checkpoints"
    resumed, uninterrupted = curves(client, run_id), curves(client, reference_id)
    assert [step for step, _ in resumed["val_accuracy"]] == list(range(1, EPOCHS + 1)), "an epoch is missing or logged twice"
    assert resumed == uninterrupted
    for name in ("best_val_accuracy", "best_epoch"):
        assert runs[run_id].data.metrics[name] == runs[reference_id].data.metrics[name]


def test_the_train_stage_removes_its_checkpoints_once_logged_unless_asked_to_keep(tmp_path, tracking, prepared_folder):
    command = ["--data", str(prepared_folder), *TRAIN_FLAGS[:-4], "--epochs", "2", "--device", "cpu"]
    train.main(command)
    assert list((tmp_path / "checkpoints").iterdir()) == []  # the root stays: it is the user's folder
    train.main([*command, "--seed", "7", "--keep-checkpoints"])
    (kept,) = MlflowClient().search_runs(["0"], "params.seed = '7'")
    assert sorted(p.name for p in (tmp_path / "checkpoints" / kept.info.run_id).iterdir()) == ["epoch-0001.pt", "epoch-0002.pt"]


def test_neither_a_run_that_failed_by_itself_nor_a_finished_one_is_resumed(tmp_path, tracking, prepared_folder):
    command = ["--data", str(prepared_folder), *TRAIN_FLAGS[:-4], "--epochs", "1", "--device", "cpu"]
    train.main(command)
    (finished,) = MlflowClient().search_runs(["0"])
    with mlflow.start_run(run_name="train") as failed:  # the same command, failed by a divergence or a bug
        mlflow.set_tags(
            {
                "pipeline.stage": "train",
                RESUME_KEY_TAG: finished.data.tags[RESUME_KEY_TAG],
                ERROR_TAG: "TrainingDiverged: train_loss is nan in epoch 1",
            }
        )
        mlflow.end_run("FAILED")
    train.main(command)
    runs = MlflowClient().search_runs(["0"])
    assert sorted(run.info.status for run in runs) == ["FAILED", "FINISHED", "FINISHED"]
    assert failed.info.run_id not in {run.info.run_id for run in runs if run.info.status == "FINISHED"}


CRASH_WHILE_LOGGING = """
import os, signal, sys, mlflow
from pathlib import Path
from pipeline import data, prepare
from tests.conftest import write_synthetic_mnist

data.DATASETS["mnist"] = write_synthetic_mnist(Path(sys.argv[2]).parent)  # trust the same tiny files as the test

def log_half_then_die(local_dir, artifact_path=None, **kwargs):
    for name in ("manifest.json", "val.pt"):  # the manifest and one split reach the store; then the machine dies
        mlflow.log_artifact(os.path.join(local_dir, name), artifact_path)
    os.kill(os.getpid(), signal.SIGKILL)

mlflow.log_artifacts = log_half_then_die
prepare.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_kill_9_while_prepare_logs_leaves_output_that_is_refused_and_not_reused(tmp_path, tracking, synthetic_mnist):
    flags = ["--data-dir", str(synthetic_mnist), "--val-size", "100"]
    crashed = Stage(tmp_path, tracking, "-c", CRASH_WHILE_LOGGING, *flags)
    crashed.argv.remove("-m")
    crashed.env["PYTHONPATH"] = str(REPO)
    assert crashed.run() == -signal.SIGKILL, crashed.stderr()
    (run,) = MlflowClient().search_runs(["0"], "tags.`pipeline.stage` = 'prepare'")
    assert run.info.status == "RUNNING"
    # Its manifest is there, so mere existence would pass; the checksums do not.
    with pytest.raises(DataError, match=r"train.pt: missing or does not match its manifest checksum"):
        load_prepared_run(run.info.run_id)
    # Even carrying the content key main would look for, a run that did not finish is never reused.
    key = content_key("prepare", {"data_dir": str(synthetic_mnist), "val_size": "100"}, code_version())
    MlflowClient().set_tag(run.info.run_id, CONTENT_KEY_TAG, key)
    assert finished_run("0", {CONTENT_KEY_TAG: key}) is None

    prepare.main(flags)  # the next run rebuilds from the raw files
    (finished,) = MlflowClient().search_runs(["0"], "tags.`pipeline.stage` = 'prepare' and attributes.status = 'FINISHED'")
    assert len(load_prepared_run(finished.info.run_id).train.labels) == 300
    MlflowClient().set_tag(finished.info.run_id, CONTENT_KEY_TAG, key)
    assert finished_run("0", {CONTENT_KEY_TAG: key}).info.run_id == finished.info.run_id  # the finished one is


LOGGER = """
import sys, mlflow
worker, steps = int(sys.argv[1]), int(sys.argv[2])
with mlflow.start_run(run_name=f"writer-{worker}"):
    mlflow.log_params({"worker": worker, "steps": steps})
    for step in range(steps):
        mlflow.log_metric("value", worker * 1000 + step, step=step)
        mlflow.log_metrics({"a": step, "b": -step}, step=step)
        if step % 20 == 0:
            mlflow.set_tag(f"at_{step}", "yes")
"""


@pytest.mark.slow
def test_four_processes_logging_to_one_local_store_lose_nothing(tmp_path, tracking):
    steps = 60
    MlflowClient().get_experiment("0")  # create the store's tables before the writers race to (set_experiment would
    # select Default for the rest of this pytest process, and MLFLOW_EXPERIMENT_NAME in later tests would be ignored)
    writers = [Stage(tmp_path, tracking, "-c", LOGGER, str(worker), str(steps)) for worker in range(4)]
    for writer in writers:
        writer.argv.remove("-m")
        writer.start()
    for writer in writers:
        assert writer.wait() == 0, writer.stderr()
        assert "locked" not in writer.stderr().lower()
    client = MlflowClient()
    runs = client.search_runs(["0"])
    assert sorted(run.data.params["worker"] for run in runs) == ["0", "1", "2", "3"]
    for run in runs:
        worker = int(run.data.params["worker"])
        assert run.info.status == "FINISHED"
        assert [m.value for m in sorted(client.get_metric_history(run.info.run_id, "value"), key=lambda m: m.step)] == [
            worker * 1000 + step for step in range(steps)
        ]
        assert len(client.get_metric_history(run.info.run_id, "b")) == steps
        assert len([tag for tag in run.data.tags if tag.startswith("at_")]) == steps // 20


def test_the_same_commands_twice_give_the_same_data_and_metrics_and_log_what_makes_them(tracking, synthetic_mnist):
    client = MlflowClient()
    for _ in range(2):
        prepare.main(["--data-dir", str(synthetic_mnist), "--val-size", "100", "--seed", "7"])
    prepares = client.search_runs(["0"], "tags.`pipeline.stage` = 'prepare'")
    manifests = [load_prepared_run(run.info.run_id).manifest for run in prepares]
    assert manifests[0]["splits"] == manifests[1]["splits"]  # the same sha256 for every split file

    for _ in range(2):
        train.main(["--data", prepares[0].info.run_id, *TRAIN_FLAGS[:-4], "--epochs", "2", "--device", "cpu", "--seed", "5"])
    trains = client.search_runs(["0"], "tags.`pipeline.stage` = 'train'")
    assert len(trains) == 2
    assert curves(client, trains[0].info.run_id) == curves(client, trains[1].info.run_id)
    params = trains[0].data.params
    assert params["seed"] == "5" and params["data_sha256"] == manifests[0]["splits"]["train"]["sha256"]
    assert {"torch_version", "mlflow_version", "optuna_version", "python_version"} <= set(params)
    assert prepares[0].data.params["seed"] == "7"


def test_a_diverging_train_stage_ends_failed_with_its_reason_and_is_not_resumed(tmp_path, tracking, capsys):
    data = tiny_prepared()
    blank = type(data.train)(data.train.images * 0, data.train.labels)  # pixel_std 0: the inputs become nan
    folder = tmp_path / "blank"
    save_prepared(folder, {"train": blank, "val": data.val, "test": data.test}, {"dataset": "mnist", "seed": 0})
    with pytest.raises(SystemExit) as exit_:
        train.main(["--data", str(folder), *TRAIN_FLAGS])
    assert exit_.value.code == 1
    captured = capsys.readouterr()
    assert "train_loss is nan in epoch 1; lower learning_rate" in captured.err
    (run,) = MlflowClient().search_runs(["0"])
    assert run.info.status == "FAILED" and run.data.tags[ERROR_TAG].startswith("TrainingDiverged: train_loss is nan")
    with pytest.raises(SystemExit):
        train.main(["--data", str(folder), *TRAIN_FLAGS])
    assert len(MlflowClient().search_runs(["0"])) == 2  # the rerun started afresh instead of resuming a FAILED run


def test_a_run_whose_process_still_lives_is_never_taken_over(tracking):
    client = MlflowClient()

    def interrupted_run(pid: int) -> str:
        tags = {RESUME_KEY_TAG: f"key-{pid}", HOST_TAG: socket.gethostname(), PID_TAG: str(pid)}
        return client.create_run("0", tags=tags).info.run_id  # left RUNNING, as by kill -9 or a live process

    alive = interrupted_run(os.getpid())  # this very process: alive
    assert find_interrupted(f"key-{os.getpid()}") is None
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = interrupted_run(gone.pid)
    assert find_interrupted(f"key-{gone.pid}").info.run_id == dead
    assert client.get_run(alive).info.status == "RUNNING"  # untouched
