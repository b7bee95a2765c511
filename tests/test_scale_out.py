"""Tuning workers as on several machines: one PostgreSQL study, one MLflow server with basic-auth.

Each worker is its own ``python -m experiments.tune`` process with credentials only in its
environment (the tracking server's from MLFLOW_TRACKING_USERNAME/PASSWORD, the database's from
PGPASSWORD), on tiny synthetic data.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import mlflow
import optuna
import pytest

from experiments import attributes
from experiments.trials import counted


def start_workers(cluster, count: int, n_trials: int, *extra: str, first: int = 0) -> list[tuple[subprocess.Popen, object]]:
    command = [
        sys.executable,
        "-m",
        "experiments.tune",
        "--study",
        "smoke",
        "--study-name",
        cluster["name"],
        "--storage",
        cluster["storage"],
        "--n-trials",
        str(n_trials),
        "--epochs",
        "1",
        "--pruner",
        "none",
        "--device",
        "cpu",
        "--data",
        str(cluster["folder"]),
        "--register-name",
        cluster["name"],
        "--confirm-top",
        "0",  # the best trial's own model: confirming over seeds is tested in test_confirm.py and test_tune_mlflow_run.py
        *extra,
    ]
    workers = []
    for i in range(first, first + count):
        log = (cluster["tmp"] / f"worker-{i}.log").open("w+")
        workers.append((subprocess.Popen(command, cwd=cluster["tmp"], env=cluster["env"], stdout=log, stderr=log), log))
    return workers


def output(log) -> str:
    log.seek(0)
    return log.read()


def study_runs(cluster, stage: str):
    return cluster["client"].search_runs([cluster["experiment_id"]], f"tags.`pipeline.stage` = '{stage}'")


def check_one_parent_one_child_per_trial_one_registration(cluster, study: optuna.Study) -> None:
    [parent] = study_runs(cluster, "tune")
    children = study_runs(cluster, "trial")
    assert sorted(int(run.data.tags["optuna.trial_number"]) for run in children) == [t.number for t in study.trials]
    assert {run.data.tags["mlflow.parentRunId"] for run in children} == {parent.info.run_id}
    assert not [run for run in children if run.info.status == "RUNNING"]
    versions = cluster["client"].search_model_versions(f"name = '{cluster['name']}'")
    assert len(versions) == 1, "the best model was registered more than once"
    for run in [parent, *children]:  # no password anywhere the UI shows
        logged = " ".join([*run.data.params.values(), *run.data.tags.values()])
        assert not any(secret in logged for secret in cluster["secrets"])


@pytest.mark.slow(seconds=140)
def test_three_workers_started_at_once_run_exactly_n_trials(cluster):
    workers = start_workers(cluster, 3, n_trials=6)
    for process, log in workers:
        assert process.wait(timeout=600) == 0, output(log)[-3000:]
    study = optuna.load_study(study_name=cluster["name"], storage=cluster["url"])
    assert [t.number for t in study.trials] == list(range(6))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    summarised = [re.search(r"registered \S+ version \d+", output(log)) for _, log in workers]
    assert sum(found is not None for found in summarised) == 1  # one worker summarised and registered
    check_one_parent_one_child_per_trial_one_registration(cluster, study)


def frozen_inside_a_trial(cluster, worker: subprocess.Popen) -> bool:
    """Stop ``worker`` (SIGSTOP) and say whether the study still shows a trial of its running.

    A stopped process cannot finish its trial, so a True answer stays true until it is killed.
    """
    worker.send_signal(signal.SIGSTOP)
    try:
        study = optuna.load_study(study_name=cluster["name"], storage=cluster["url"])
    except KeyError:  # not created yet
        study = None
    running = study is not None and any(
        t.user_attrs.get(attributes.WORKER.key, "").endswith(f":{worker.pid}") and attributes.RUN_ID.key in t.user_attrs
        for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    )
    if not running:
        worker.send_signal(signal.SIGCONT)
    return running


@pytest.mark.slow(seconds=90)
def test_a_worker_killed_mid_trial_has_its_trial_retried_and_the_study_completes(cluster):
    # The victim starts alone, so no other worker can take every trial before it starts one.
    [(victim, victim_log)] = start_workers(cluster, 1, 4, "--heartbeat-interval", "1")
    deadline = time.monotonic() + 300
    while not frozen_inside_a_trial(cluster, victim):
        assert victim.poll() is None and time.monotonic() < deadline, output(victim_log)[-3000:]
        time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    [(survivor, survivor_log)] = start_workers(cluster, 1, 4, "--heartbeat-interval", "1", first=1)
    storage = cluster["url"]

    assert survivor.wait(timeout=600) == 0, output(survivor_log)[-3000:]
    study = optuna.load_study(study_name=cluster["name"], storage=storage)
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") == 4 and states.count("FAIL") == 1, states
    [killed] = [t for t in study.trials if t.state.name == "FAIL"]
    [retry] = [t for t in study.trials if attributes.RETRY_OF.read(t) == killed.number]
    assert retry.state.name == "COMPLETE" and retry.params == killed.params
    assert len(counted(study.trials)) == 4  # the killed trial is not counted
    killed_run = cluster["client"].get_run(attributes.RUN_ID.read(killed))
    assert killed_run.info.status == "FAILED" and "stopped sending heartbeats" in killed_run.data.tags["optuna.fail_reason"]
    check_one_parent_one_child_per_trial_one_registration(cluster, study)
    mlflow.set_tracking_uri(None)
