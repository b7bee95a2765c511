"""Tuning through the user's door: `mlflow run . -e tune` and `-e evaluate -P model=models:/...@champion`,
as README.md and docs/tuning.md tell users to run them, on 1000 real MNIST images and the tiny `smoke` study."""

from __future__ import annotations

import functools
import gzip
import os
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
import requests
import torch
from mlflow.tracking import MlflowClient

from experiments import attributes
from experiments.trials import counted
from pipeline.tracking import CPU_THREADS_TAG
from tests.conftest import REPO, user_environment
from tests.servers import model_server

pytestmark = pytest.mark.slow  # each starts several `mlflow run` processes: a minute or more


@pytest.fixture
def user(tmp_path, store_uri, mnist_dir):
    """A user's shell: their own folder and tracking store, the project somewhere else."""
    uri = store_uri  # tmp_path/mlflow.db
    env = user_environment(uri)  # this virtual environment activated, none of the tester's MLFLOW_* variables
    journal = str(tmp_path / "studies.journal")  # given as a relative path: the user's folder, not the project's

    def command(*params: str, entry_point: str = "tune", study_name: str = "s", **tune_params) -> list[str]:
        if entry_point == "tune":
            settings = {
                "study": "smoke",
                "study_name": study_name,
                "storage": "studies.journal",
                "epochs": 1,
                "device": "cpu",
                "data_dir": mnist_dir,
                "train_limit": 1000,
                "val_size": 500,
                "confirm_top": 0,  # the best trial's own model, but where a test asks for the confirmation
                **tune_params,
            }
            params = (*params, *[f"{k}={v}" for k, v in settings.items()])
        args = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", entry_point, "--env-manager", "local"]
        return args + [arg for param in params for arg in ("-P", param)]

    def run(*params: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(command(*params, **kwargs), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)

    def start(*params: str, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(
            command(*params, **kwargs),
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    user = User()
    user.run, user.start, user.journal = run, start, journal
    user.env, user.folder, user.mnist_dir = env, tmp_path, mnist_dir
    return user


class User:
    @functools.cached_property
    def client(self) -> MlflowClient:
        """A client of the store the user's commands log to: MLFLOW_TRACKING_URI, else MLflow's default
        in their folder. Made when first asked for, so a test may first change the environment."""
        return MlflowClient(self.env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.folder / 'mlflow.db'}")


def study(user, name: str = "s") -> optuna.Study:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(user.journal)))


def visible_runs(user, stage: str | None = None):
    """The active runs of the Default experiment, of one stage or all."""
    runs = user.client.search_runs(["0"])
    return [run for run in runs if stage is None or run.data.tags.get("pipeline.stage") == stage]


def top_level(user):
    """What the runs table lists before any parent is expanded."""
    return [run for run in visible_runs(user) if "mlflow.parentRunId" not in run.data.tags]


def trained_by(record, trial_runs) -> str:
    """The numbers of the trial runs that a worker record's command trained, as its
    ``optuna.trial_numbers`` lists them. The commands that join here run one worker (n_workers=1, or
    auto on a CPU) in their own process, the one the record is named after: ``worker <host:pid>``."""
    assert record.info.run_name.startswith("worker "), record.info.run_name
    worker = record.info.run_name.removeprefix("worker ")
    numbers = [int(run.data.tags["optuna.trial_number"]) for run in trial_runs if run.data.tags["optuna.worker"] == worker]
    return " ".join(map(str, sorted(numbers)))


@pytest.mark.slow(seconds=300)
def test_extend_rerun_refuse_and_evaluate_the_champion(user):
    confirmed = {"confirm_top": 2, "confirm_seeds": 2}  # the champion confirmed over seeds, as by default (3 x 3)
    first = user.run("n_trials=2", n_workers=2, **confirmed)  # both workers train the confirmation's runs
    assert first.returncode == 0, first.stderr[-3000:]
    # Each trial's line says how far it trained, how long it took and how many are done.
    done = r"\] trial [01] COMPLETE, 1 epoch \([0-9ms]+\): val_accuracy 0\.\d{4} \| best .+ \| 2 of 2 done\n"
    assert re.search(done, first.stderr)
    said = re.findall(r"; (\d) of 4 trained\)\n", first.stderr)  # each said as it ends
    assert len(said) == 4 and max(said) == "4", said
    [parent] = visible_runs(user, "tune")
    confirm_runs = visible_runs(user, "confirm")
    assert len(confirm_runs) == 4 and all(run.info.status == "FINISHED" for run in confirm_runs)
    assert len({run.data.tags["optuna.worker"] for run in confirm_runs}) == 2
    # Each trained with its share of the cores, as the trials did (tagged, as every CPU run is).
    share = str(max(1, (os.cpu_count() or 1) // 2))
    assert {run.data.tags[CPU_THREADS_TAG] for run in confirm_runs + visible_runs(user, "trial")} == {share}

    extended = user.run("n_trials=4", **confirmed)  # the same command with a larger budget
    assert extended.returncode == 0, extended.stderr[-3000:]
    trials = visible_runs(user, "trial")
    assert sorted(run.data.tags["optuna.trial_number"] for run in trials) == ["0", "1", "2", "3"]
    assert {run.data.tags["mlflow.parentRunId"] for run in trials} == {parent.info.run_id}  # none in the launcher's run
    assert [run.info.run_id for run in top_level(user)] == [parent.info.run_id]  # no empty launcher run in the table
    [worker] = visible_runs(user, "worker")  # the second command's own run: a record of its worker, under the parent
    assert worker.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert worker.data.tags["optuna.trial_numbers"] == trained_by(worker, trials) == "2 3"
    assert worker.data.metrics["trials_run"] == 2
    assert len(counted(study(user).trials)) == 4
    evaluations = visible_runs(user, "evaluate")
    evaluated = [run.data.tags["pipeline.model"] for run in evaluations]
    registered = {f"models:/lstm-mnist/{v.version}" for v in user.client.search_model_versions("name = 'lstm-mnist'")}
    seed_models = {run.data.tags["confirm.model_uri"] for run in visible_runs(user, "confirm")}
    assert len(evaluated) == len(set(evaluated))  # each model tested once: every registered version, and seed models
    assert registered <= set(evaluated) <= registered | seed_models and len(evaluated) > len(registered)
    assert not [r for r in visible_runs(user) if r.info.run_name == "best-retrain"]

    again = user.run("n_trials=4", **confirmed)  # nothing left: one line, exit 0, nothing new in the table
    assert again.returncode == 0, again.stderr[-3000:]
    assert "study s is complete: 4 trials; best trial" in again.stderr
    assert [run.info.run_id for run in top_level(user)] == [parent.info.run_id]
    assert len(visible_runs(user, "trial")) == 4 and len(visible_runs(user, "evaluate")) == len(evaluations)

    changed = user.run("n_trials=6", epochs=2, **confirmed)
    assert changed.returncode != 0
    assert "tune: error: study 's' was created with epochs=1 (this command: 2)" in changed.stderr
    assert "another -P study_name" in changed.stderr
    assert len(counted(study(user).trials)) == 4
    [refused] = [run for run in top_level(user) if run.info.run_id != parent.info.run_id]
    assert refused.info.status == "FAILED" and "created with epochs=1" in refused.data.tags["pipeline.error"]

    champion = user.run("model=models:/lstm-mnist@champion", "device=cpu", entry_point="evaluate")
    assert champion.returncode == 0, champion.stderr[-3000:]
    assert "test_accuracy" in champion.stderr
    version = user.client.get_model_version_by_alias("lstm-mnist", "champion")
    newest = max(visible_runs(user, "evaluate"), key=lambda run: run.info.start_time)
    assert newest.data.metrics["test_accuracy"] == pytest.approx(float(version.tags["test_accuracy"]), abs=1e-6)
    served_champion_answers_as_it_was_evaluated(user, newest.info.run_id)

    # The next study starts from this one's best configurations, and weighs latency against accuracy.
    warm = user.run(
        "n_trials=3", "warm_start=s", "warm_start_k=2", "cost=latency_ms", study_name="s-fast", register_name="lstm-fast"
    )
    assert warm.returncode == 0, warm.stderr[-3000:]
    [fast] = [run for run in visible_runs(user, "tune") if run.data.tags["optuna.study_name"] == "s-fast"]
    assert fast.data.params["warm_start"] == "s"
    carried = [study(user).trials[int(number)] for number in fast.data.params["warm_start_trials"].split()]
    new = study(user, "s-fast").trials
    assert len(carried) == 2 and [t.params for t in new[1:3]] == [t.params for t in carried]  # after trial 0, best first
    others = [
        t.value for t in study(user).trials if t.state.name == "COMPLETE" and t.number not in {0, *(c.number for c in carried)}
    ]
    assert carried[0].value >= carried[1].value >= max(others, default=0)  # trial 0 is run anyway, so not carried
    assert all(t.values[1] > 0 for t in new)  # milliseconds for one image, measured in each trial
    compact = user.client.get_model_version_by_alias("lstm-fast", "compact")
    assert float(compact.tags["latency_ms"]) == pytest.approx(new[int(compact.tags["optuna.trial_number"])].values[1], abs=5e-4)


def served_champion_answers_as_it_was_evaluated(user, evaluate_run_id: str) -> None:
    """docs/serving.md's server on the champion: 1,000 official test images as raw 0-255 pixels over
    HTTP get the classes the evaluate run gave them, so the same accuracy; a bad request gets a 400."""
    raw = user.mnist_dir / "MNIST" / "raw"
    images, labels = read_idx(raw / "t10k-images-idx3-ubyte.gz"), read_idx(raw / "t10k-labels-idx1-ubyte.gz")
    table = mlflow.artifacts.download_artifacts(
        run_id=evaluate_run_id, artifact_path="predictions.csv", tracking_uri=user.env["MLFLOW_TRACKING_URI"]
    )
    evaluated = pd.read_csv(table)[:1000]
    with model_server("models:/lstm-mnist@champion", user.env, user.folder) as url:
        answered = requests.post(f"{url}/invocations", json={"inputs": images[:1000].tolist()}, timeout=300)
        assert answered.status_code == 200, answered.text[-2000:]
        served = pd.DataFrame(answered.json()["predictions"])
        assert served["class"].tolist() == evaluated["class"].tolist()
        assert (served["class"] == labels[:1000]).mean() == (evaluated["class"] == evaluated["true_class"]).mean()
        # and they are the pixels read as pixels: the LSTM itself (the pytorch face) given them scaled to [0, 1]
        mlflow.set_tracking_uri(user.env["MLFLOW_TRACKING_URI"])
        try:
            lstm = mlflow.pytorch.load_model("models:/lstm-mnist@champion")
        finally:
            mlflow.set_tracking_uri(None)
        with torch.no_grad():
            logits = lstm(torch.from_numpy(images[:1000]).float().div(255))  # (1000, 28, 28) read by rows
        assert served["class"].tolist() == logits.argmax(1).tolist()
        refused = requests.post(f"{url}/invocations", json={"inputs": (images[:2] / 255 * 2).tolist()}, timeout=60)
        assert refused.status_code == 400 and "float pixels must be within [0, 1]" in refused.json()["message"]


def read_idx(path: Path) -> np.ndarray:
    """An IDX file as a user reads it: magic and dimensions, big-endian, then uint8 data."""
    raw = gzip.decompress(path.read_bytes())
    dims = struct.unpack(f">{raw[3]}I", raw[4 : 4 + 4 * raw[3]])
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * raw[3]).reshape(dims)


@pytest.mark.slow(seconds=145)
def test_two_mlflow_run_workers_started_at_once_share_one_study_to_its_end(user):
    """As two tasks of an array, started at the same moment in a new folder with MLflow's default store
    (no MLFLOW_TRACKING_URI: sqlite:///mlflow.db there): both create the store, one prepares while the
    other waits for it, both search, then both train the confirmation's runs, at once; one summarises."""
    (user.folder / "mlflow.db").unlink()
    del user.env["MLFLOW_TRACKING_URI"]
    shared = {"n_trials": 5, "pruner": "none", "n_workers": 1, "epochs": 2, "confirm_top": 2, "confirm_seeds": 2}
    workers = [user.start(**shared), user.start(**shared)]
    outputs = []
    for worker in workers:
        outputs.append(worker.communicate(timeout=600)[0])
        assert worker.returncode == 0, outputs[-1][-3000:]
    [prepare] = visible_runs(user, "prepare")
    assert prepare.info.status == "FINISHED"
    assert sum("[main] prepare: starting" in output for output in outputs) == 1
    assert sum(f"[main] prepare: reusing finished run {prepare.info.run_id}" in output for output in outputs) == 1
    trials = study(user).trials
    assert len(trials) == 5 and all(t.state.name == "COMPLETE" for t in trials), [t.state.name for t in trials]
    [parent] = visible_runs(user, "tune")
    children = visible_runs(user, "trial")
    assert sorted(int(run.data.tags["optuna.trial_number"]) for run in children) == [t.number for t in trials]
    assert {run.data.tags["mlflow.parentRunId"] for run in children} == {parent.info.run_id}
    assert [run.info.run_id for run in top_level(user)] == [parent.info.run_id]
    # The command that joined records the trials its worker trained, as their runs say, none of the other's.
    [worker] = visible_runs(user, "worker")
    ran = trained_by(worker, children)
    assert worker.data.tags["optuna.trial_numbers"] == ran and worker.data.metrics["trials_run"] == len(ran.split())
    # Each command's worker trained some of the confirmation's 4 runs, and two of them at the same time.
    confirmed = visible_runs(user, "confirm")
    assert len(confirmed) == 4 and all(run.info.status == "FINISHED" for run in confirmed)
    by_worker = {}
    for run in confirmed:
        by_worker.setdefault(run.data.tags["optuna.worker"], []).append(run)
    assert len(by_worker) == 2, sorted(by_worker)
    first, second = by_worker.values()
    assert any(a.info.start_time < b.info.end_time and b.info.start_time < a.info.end_time for a in first for b in second)
    assert sum("[confirm] trial" in line and "trained)" in line for out in outputs for line in out.splitlines()) == 4
    assert sum("registered lstm-mnist version" in out for out in outputs) == 1  # one summary
    assert len(user.client.search_model_versions("name = 'lstm-mnist'")) == 1


@pytest.mark.slow(seconds=105)
def test_a_trial_killed_after_epoch_2_of_6_resumes_there_on_the_rerun(user):
    """kill -9 (a lost machine): the rerun's copy of the trial downloads its checkpoint from the run and
    trains the epochs left, at most the one cut short again; and ends where an uninterrupted one ends."""
    slow = {"n_trials": 1, "epochs": 6, "train_limit": 5000, "pruner": "none"}
    worker = user.start(**slow)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # until the trial has logged its second epoch
        time.sleep(0.1)
        try:
            [trial] = study(user).get_trials(states=(optuna.trial.TrialState.RUNNING,)) or [None]
        except KeyError:  # not created yet
            continue
        if trial and len(user.client.get_metric_history(trial.user_attrs.get("mlflow_run_id", "-"), "val_accuracy")) >= 2:
            break
    else:
        pytest.fail("no trial trained two epochs")
    os.killpg(worker.pid, signal.SIGKILL)
    first = worker.communicate(timeout=60)[0]
    rerun = user.run(**slow)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    epoch_line = re.compile(r"trial \d+ epoch (\d)/6")
    trained = [int(n) for n in epoch_line.findall(first)] + [int(n) for n in epoch_line.findall(rerun.stderr)]
    assert sorted(set(trained)) == [1, 2, 3, 4, 5, 6] and len(trained) <= 7, trained
    assert "resuming after epoch" in rerun.stderr
    trials = study(user).trials
    [copy] = [t for t in trials if attributes.RETRY_OF.read(t) == 0]
    assert copy.state.name == "COMPLETE" and len(counted(trials)) == 1
    resumed = user.client.get_run(copy.user_attrs["mlflow_run_id"])
    assert resumed.data.tags["optuna.resumed_from_run"] == trials[0].user_attrs["mlflow_run_id"]
    history = user.client.get_metric_history(resumed.info.run_id, "val_accuracy")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]  # the whole curve, the restored epochs too
    assert not user.client.list_artifacts(resumed.info.run_id, "checkpoint")  # removed once its result was told
    uninterrupted = user.run(**slow, study_name="whole")
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    assert copy.value == study(user, "whole").trials[0].value


@pytest.mark.slow(seconds=60)
def test_ctrl_c_requeues_the_trial_in_progress_and_the_rerun_runs_it(user):
    slow = {"epochs": 8, "train_limit": 5000, "pruner": "none"}
    worker = user.start("n_trials=2", **slow)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # until a trial is training: its child run has logged an epoch
        time.sleep(0.2)
        try:
            running = study(user).get_trials(states=(optuna.trial.TrialState.RUNNING,))
        except KeyError:  # not created yet
            continue
        if (
            running
            and "mlflow_run_id" in running[0].user_attrs
            and user.client.get_metric_history(running[0].user_attrs["mlflow_run_id"], "val_accuracy")
        ):
            break
    else:
        pytest.fail("no trial started training")
    os.killpg(worker.pid, signal.SIGINT)  # Ctrl-C in the terminal reaches the whole foreground group
    output = worker.communicate(timeout=120)[0]
    assert worker.returncode != 0
    assert "re-queued" in output

    trials = study(user).trials
    interrupted = running[0].number
    assert trials[interrupted].state.name == "FAIL" and len(counted(trials)) == interrupted  # it does not count
    [copy] = [t for t in trials if attributes.RETRY_OF.read(t) == interrupted]
    assert copy.state.name == "WAITING"
    killed = user.client.get_run(running[0].user_attrs["mlflow_run_id"])
    assert killed.info.status == "KILLED" and killed.data.tags["optuna.trial_state"] == "REQUEUED"

    rerun = user.run("n_trials=2", **slow)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    trials = study(user).trials
    assert len(counted(trials)) == 2 and trials[copy.number].state.name == "COMPLETE"
    assert trials[copy.number].params == trials[interrupted].params  # the same configuration, run again
    [parent] = visible_runs(user, "tune")
    assert parent.info.status == "FINISHED"
