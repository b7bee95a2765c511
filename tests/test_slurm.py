"""Tune workers as a Slurm job array, submitted as docs/scale-out.md ("On Slurm") says:
deploy/slurm/tune.sbatch on a one-node cluster with 3 fake GPUs (tests/slurm.py), each task an
`mlflow run -e tune` joining one PostgreSQL study and logging to the basic-auth MLflow server
(tests/servers.py), on tiny synthetic data in a prepare run on that server.

It is also the test of docs/scale-out.md's recipe itself: several `mlflow run -e tune` workers
against that server (artifacts proxied), their dataset inputs readable there with the user's
credentials, and `mlflow run -e evaluate -P model=models:/<name>@champion` afterwards."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import requests

from experiments import attributes
from experiments.trials import counted
from pipeline.data import save_prepared
from pipeline.tracking import PREPARED_ARTIFACT
from tests.conftest import REPO, mlflow_run, tiny_prepared
from tests.servers import fetch

N_TRIALS = 5
EPOCHS = 3
N_TRAIN = 16384  # an epoch of a second or more here: time to cancel a trial while it trains


def submit(slurm, cluster, data: Path) -> str:
    """sbatch the script from the project folder, as a user of the study would; the array job's id."""
    env = {
        **cluster["env"],
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # the virtual environment, activated
        "SLURM_CONF": slurm.env["SLURM_CONF"],
    }
    env.pop("MLFLOW_EXPERIMENT_NAME")  # given as --experiment-name, as the docs do
    params = {
        "storage": cluster["storage"],
        "study": "smoke",
        "study_name": cluster["name"],
        "n_trials": N_TRIALS,
        "epochs": EPOCHS,
        "pruner": "none",
        "data": data,
        "register_name": cluster["name"],
        "confirm_top": 0,  # the best trial's own model: the confirmation has tests of its own
    }
    command = ["sbatch", "--parsable", "--array=0-2", f"--chdir={cluster['tmp']}", f"--output={cluster['tmp']}/task-%a.out"]
    command += ["deploy/slurm/tune.sbatch", "--experiment-name", cluster["name"]]
    command += [arg for name, value in params.items() for arg in ("-P", f"{name}={value}")]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def prepare_run(cluster) -> str:
    """A prepare run on the server holding a tiny split as its ``prepared`` artifact (proxied: an
    ``mlflow-artifacts:`` URI), as `mlflow run -e prepare` would leave it; its id."""
    data = tiny_prepared(n_train=N_TRAIN)
    folder = cluster["tmp"] / "prepared-large"
    save_prepared(folder, {"train": data.train, "val": data.val, "test": data.test}, {"dataset": "mnist", "seed": 0})
    client = cluster["client"]
    run = client.create_run(cluster["experiment_id"], tags={"pipeline.stage": "prepare"})
    client.log_artifacts(run.info.run_id, str(folder), PREPARED_ARTIFACT)
    client.set_terminated(run.info.run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    return run.info.run_id


def check_dataset_sources(cluster, runs) -> None:
    """Each run's val and test inputs name their file on the server: readable with the worker's
    credentials (the exact bytes of the recorded digest), refused without."""
    user = (cluster["env"]["MLFLOW_TRACKING_USERNAME"], cluster["env"]["MLFLOW_TRACKING_PASSWORD"])
    checked = 0
    for run in runs:
        for dataset in (d.dataset for d in run.inputs.dataset_inputs if d.dataset.name in ("mnist-val", "mnist-test")):
            assert dataset.source_type == "http", dataset.source
            assert hashlib.sha256(fetch(dataset, user)).hexdigest()[:16] == dataset.digest
            assert requests.get(json.loads(dataset.source)["url"], timeout=30).status_code == 401
            checked += 1
    assert checked


def outputs(cluster) -> str:
    return "\n".join(f"--- {path.name}:\n{path.read_text()[-3000:]}" for path in sorted(cluster["tmp"].glob("task-*.out")))


def task_of(pid: int, job: str) -> str | None:
    """The array task (``<job>_<task>``) that process ``pid`` on this machine belongs to, if any."""
    try:
        environ = dict(line.split("=", 1) for line in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in line)
    except OSError:
        return None
    if environ.get("SLURM_ARRAY_JOB_ID") != job:
        return None
    return f"{job}_{environ['SLURM_ARRAY_TASK_ID']}"


def training_trial(cluster, job: str) -> tuple[int, str, optuna.trial.FrozenTrial] | None:
    """A worker of ``job`` training its trial's second epoch, stopped there (SIGSTOP) so that it is
    still training when Slurm's SIGTERM comes: its pid, its task (``<job>_<task>``) and the trial.

    The second of three: the loop stops at the end of a batch, and the third epoch's batches come after."""
    try:
        study = optuna.load_study(study_name=cluster["name"], storage=cluster["url"])
    except KeyError:  # not created yet
        return None
    for trial in study.get_trials(states=(optuna.trial.TrialState.RUNNING,)):
        pid = int(trial.user_attrs.get(attributes.WORKER.key, ":0").rsplit(":", 1)[1])
        task = task_of(pid, job) if pid else None
        if task and in_second_epoch(cluster, task, trial.number):
            os.kill(pid, signal.SIGSTOP)
            if in_second_epoch(cluster, task, trial.number):
                return pid, task, trial
            os.kill(pid, signal.SIGCONT)
    return None


def in_second_epoch(cluster, task: str, number: int) -> bool:
    output = (cluster["tmp"] / f"task-{task.split('_')[1]}.out").read_text()
    return f"trial {number} epoch 1/{EPOCHS}" in output and f"trial {number} epoch 2/" not in output


def sigterm_arrived(pid: int) -> bool:
    """SIGTERM is pending for stopped process ``pid``, or it runs again (Slurm sends SIGCONT first)."""
    status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)
    pending = int(status["ShdPnd"], 16) | int(status["SigPnd"], 16)
    return bool(pending & 1 << (signal.SIGTERM - 1)) or not status["State"].startswith("T")


def task_states(slurm, job: str) -> dict[str, tuple[str, str]]:
    """``<job>_<task>`` -> (JobState, ExitCode) of each task of the array, while slurmctld remembers it (MinJobAge)."""
    states = {}
    for line in slurm("scontrol", "show", "job", job, "--oneliner").splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        states[f"{fields['ArrayJobId']}_{fields['ArrayTaskId']}"] = (fields["JobState"], fields["ExitCode"])
    return states


@pytest.mark.slow(seconds=190)
def test_an_array_of_three_workers_runs_the_study_and_a_cancelled_task_has_its_trial_rerun(slurm, cluster):
    job = submit(slurm, cluster, prepare_run(cluster))
    deadline = time.monotonic() + 480  # a hang, not slowness: under the whole suite the array has taken 260 s
    while not (found := training_trial(cluster, job)):
        assert slurm.jobs() and time.monotonic() < deadline, outputs(cluster)
        time.sleep(0.1)
    pid, task, cancelled = found
    slurm("scancel", task)
    while not sigterm_arrived(pid):
        time.sleep(0.02)
    os.kill(pid, signal.SIGCONT)  # Slurm sends SIGCONT itself; this is in case it did not
    while slurm("squeue", "--noheader", f"--jobs={job}").strip():
        assert time.monotonic() < deadline, outputs(cluster)
        time.sleep(1)

    states = task_states(slurm, job)
    assert states.pop(task)[0] == "CANCELLED", outputs(cluster)
    cancelled_output = (cluster["tmp"] / f"task-{task.split('_')[1]}.out").read_text()
    assert f"trial {cancelled.number} interrupted: re-queued" in cancelled_output, cancelled_output
    assert states == {f"{job}_{i}": ("COMPLETED", "0:0") for i in range(3) if f"{job}_{i}" != task}, outputs(cluster)
    cvds = [re.search(r"CUDA_VISIBLE_DEVICES=(\S*)", path.read_text())[1] for path in cluster["tmp"].glob("task-*.out")]
    assert sorted(cvds) == ["0", "1", "2"], outputs(cluster)  # --gres=gpu:1: one GPU each, all running at once

    study = optuna.load_study(study_name=cluster["name"], storage=cluster["url"])
    assert len(counted(study.trials)) == N_TRIALS
    [failed] = [t for t in study.trials if t.state.name == "FAIL"]
    assert failed.number == cancelled.number, outputs(cluster)
    [retry] = [t for t in study.trials if attributes.RETRY_OF.read(t) == cancelled.number]
    assert retry.state.name == "COMPLETE" and retry.params == cancelled.params
    assert attributes.REQUEUE_REASON.read(retry).startswith("interrupted"), retry.user_attrs  # by SIGTERM, not lost
    client = cluster["client"]
    cancelled_run = client.get_run(attributes.RUN_ID.read(cancelled))
    assert cancelled_run.info.status == "KILLED" and cancelled_run.data.tags["optuna.trial_state"] == "REQUEUED"
    [parent] = client.search_runs([cluster["experiment_id"]], "tags.`pipeline.stage` = 'tune'")
    children = client.search_runs([cluster["experiment_id"]], "tags.`pipeline.stage` = 'trial'")
    assert sorted(int(run.data.tags["optuna.trial_number"]) for run in children) == [t.number for t in study.trials]
    assert {run.data.tags["mlflow.parentRunId"] for run in children} == {parent.info.run_id}
    assert parent.info.status == "FINISHED"
    assert len(client.search_model_versions(f"name = '{cluster['name']}'")) == 1

    env = {**cluster["env"], "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    evaluated = mlflow_run(
        "-e", "evaluate", "-P", f"model=models:/{cluster['name']}@champion", cwd=cluster["tmp"], env=env, timeout=300
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    evaluations = client.search_runs([cluster["experiment_id"]], "tags.`pipeline.stage` = 'evaluate'")
    assert len(evaluations) == 2  # the study's test of its registered model, and this one
    check_dataset_sources(cluster, [*children, *evaluations])
