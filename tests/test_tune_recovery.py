"""Studies that meet trouble, in process: failed, interrupted and pruned trials, workers lost or
sharing a study, memory released, a summary that fails, storage URLs checked, workers over GPUs."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
import weakref

import mlflow
import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient

from experiments import attributes, coordination, storage, summary
from experiments import objective as objective_module
from experiments import tune as tune_module
from experiments import worker as worker_module
from experiments.gpus import gpu_assignment, run_workers
from experiments.job import WorkerJob
from experiments.runs import RESUMED_FROM_TAG
from experiments.trials import counted
from experiments.tune import tune
from pipeline import training as training_module
from pipeline.config import ParameterError, PrepareConfig, TuneConfig
from pipeline.signals import Terminated
from pipeline.training import TrainingDiverged
from tests.spawned import end_as_numbered, record_environment
from tests.tuning import load, runs_of, smoke


@pytest.mark.slow
def test_pruned_trials_end_killed(tmp_path, prepared_run):
    config = smoke(tmp_path, epochs=2, n_trials=2)
    # No accuracy reaches 1.01, so this pruner must stop every trial at its first report.
    assert tune(config, PrepareConfig(), prepared_run, pruner=optuna.pruners.ThresholdPruner(lower=1.01)) is None
    assert [t.state.name for t in load(config).trials] == ["PRUNED", "PRUNED"]
    for run in runs_of("trial"):
        assert run.info.status == "KILLED" and run.data.tags["optuna.trial_state"] == "PRUNED"
        assert len(MlflowClient().get_metric_history(run.info.run_id, "val_accuracy")) == 1  # stopped after epoch 1
    assert not MlflowClient().search_registered_models()  # nothing complete, nothing registered


def second_trial_raises(monkeypatch, error: BaseException) -> None:
    """The second trial's training raises ``error``; the others train as usual."""
    real, calls = objective_module.train_and_log, []

    def train_and_log(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(objective_module, "train_and_log", train_and_log)


@pytest.mark.slow
def test_a_failed_trial_counts_and_the_study_goes_on(tmp_path, prepared_run, monkeypatch):
    second_trial_raises(monkeypatch, TrainingDiverged("train_loss is nan in epoch 1"))
    tune(smoke(tmp_path), PrepareConfig(), prepared_run)
    assert [t.state.name for t in load(smoke(tmp_path)).trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    [failed] = [run for run in runs_of("trial") if run.info.status == "FAILED"]
    assert failed.data.tags["optuna.trial_state"] == "FAIL"
    assert "TrainingDiverged: train_loss is nan" in failed.data.tags["optuna.fail_reason"]


@pytest.mark.slow
@pytest.mark.parametrize("sigterm_in_requeue", [False, True], ids=["ctrl-c", "ctrl-c-then-sigterm-in-the-requeue"])
def test_an_interrupted_trial_is_requeued_not_counted_and_runs_on_the_rerun(
    tmp_path, prepared_run, monkeypatch, sigterm_in_requeue
):
    second_trial_raises(monkeypatch, KeyboardInterrupt())
    monkeypatch.setattr(Terminated, "received", False)  # put back after the test, whatever it sets
    if sigterm_in_requeue:  # `mlflow run` follows a Ctrl-C with a SIGTERM to its stage: here it lands mid-re-queue
        real_requeue = worker_module.requeue

        def requeue(*args, **kwargs):
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)  # the handler runs as on delivery
            real_requeue(*args, **kwargs)

        monkeypatch.setattr(worker_module, "requeue", requeue)
    config = smoke(tmp_path, n_trials=2)
    with pytest.raises(KeyboardInterrupt):
        tune(config, PrepareConfig(), prepared_run)
    Terminated.received = False  # the SIGTERM is handled: the rerun starts anew
    trials = load(config).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "WAITING"]
    assert attributes.RETRY_OF.read(trials[2]) == 1 and len(counted(trials)) == 1
    [interrupted] = [run for run in runs_of("trial") if run.data.tags["optuna.trial_number"] == "1"]
    assert interrupted.info.status == "KILLED" and interrupted.data.tags["optuna.trial_state"] == "REQUEUED"

    tune(config, PrepareConfig(), prepared_run)  # the rerun runs the re-queued copy, and no more
    trials = load(config).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert trials[2].params == trials[1].params and len(counted(trials)) == 2
    [parent] = runs_of("tune")
    assert parent.info.status == "FINISHED"


@pytest.mark.slow(seconds=20)
@pytest.mark.parametrize("cut", ["the tell, lost", "the tell, after it landed", "first read after the tell", "saying the result"])
def test_a_database_cut_at_a_tell_is_waited_out(tmp_path, prepared_run, monkeypatch, capsys, cut):
    """The database fails as trial 0's result is told (the tell is lost, or it lands and its answer
    is lost), at the worker's first read of the study after the tell, or as it reads the study to say
    the result. The worker goes on; a lost tell re-queues trial 0, whose copy resumes from its
    checkpoint and alone counts; and no trial keeps a checkpoint once its result is told."""
    cuts = []

    def cut_once():
        if not cuts:
            cuts.append(1)
            raise optuna.exceptions.StorageInternalError("the database is shutting down")

    if cut == "saying the result":
        real_say = worker_module.say_done
        monkeypatch.setattr(worker_module, "say_done", lambda *args, **kwargs: cut_once() or real_say(*args, **kwargs))
    else:
        real_tell = worker_module.tell

        def tell(study, trial, **outcome):
            if cut == "the tell, lost":
                cut_once()
            real_tell(study, trial, **outcome)
            if cut == "the tell, after it landed":
                cut_once()
            elif not cuts:  # the study's next read fails
                real_get = study.get_trials
                study.get_trials = lambda *args, **kwargs: cut_once() or real_get(*args, **kwargs)

        monkeypatch.setattr(worker_module, "tell", tell)
    config = smoke(tmp_path, n_trials=2)
    tune(config, PrepareConfig(), prepared_run)
    trials, runs = load(config).trials, {run.data.tags["optuna.trial_number"]: run for run in runs_of("trial")}
    assert cuts and [t.state.name for t in counted(trials)] == ["COMPLETE", "COMPLETE"]
    assert not [run.info.run_id for run in runs.values() if MlflowClient().list_artifacts(run.info.run_id, "checkpoint")]
    if cut == "the tell, lost":
        [copy] = [t for t in trials if attributes.RETRY_OF.read(t) == 0]
        assert (runs["0"].info.status, runs["0"].data.tags["optuna.trial_state"]) == ("KILLED", "REQUEUED")
        assert runs[str(copy.number)].data.tags[RESUMED_FROM_TAG] == runs["0"].info.run_id
    else:
        assert len(trials) == 2
    if cut == "the tell, after it landed":
        assert "trial 0 COMPLETE: its result was told before the cut" in capsys.readouterr().err


@pytest.mark.slow(seconds=20)
@pytest.mark.parametrize("ending", ["trained", "diverged", "database failed"])
def test_a_trial_given_up_while_it_trained_is_left_to_its_copy(tmp_path, prepared_run, monkeypatch, capsys, ending):
    """Another worker gives trial 0 up while its worker trains it (its lease lapsed: a database cut, a
    stalled process) and re-queues it. Its worker, done, finds it ended: it leaves the trial to the copy,
    ends its run REQUEUED and goes on, whether training ended well, diverged, or met its database down;
    the copy resumes from the original's checkpoint, and counts."""
    real, real_tell, given_up = worker_module.objective, worker_module.tell, []

    def objective(trial, **kwargs):
        value = real(trial, **kwargs)
        if not given_up:
            given_up.append(trial.number)
            frozen = trial.study.get_trials(deepcopy=False)[trial.number]
            coordination.requeue(trial.study, frozen, "its worker stopped sending heartbeats", lost_worker=True)
            if ending == "diverged":
                raise TrainingDiverged("train_loss is nan in epoch 1")
        return value

    def tell(study, trial, **outcome):
        if trial.number in given_up:  # the database fails at the tell of a trial given up
            raise optuna.exceptions.StorageInternalError("the database is shutting down")
        real_tell(study, trial, **outcome)

    monkeypatch.setattr(worker_module, "objective", objective)
    if ending == "database failed":
        monkeypatch.setattr(worker_module, "tell", tell)
    config = smoke(tmp_path, n_trials=2)
    tune(config, PrepareConfig(), prepared_run)
    trials = load(config).trials
    [copy] = [t for t in trials if attributes.RETRY_OF.read(t) == 0]
    assert trials[0].state.name == "FAIL" and copy.state.name == "COMPLETE"
    assert [t.state.name for t in counted(trials)] == ["COMPLETE", "COMPLETE"]
    said = "trial 0: the study's database failed; re-queued" if ending == "database failed" else "trial 0 was given up"
    assert said in capsys.readouterr().err
    [original] = [run for run in runs_of("trial") if run.data.tags["optuna.trial_number"] == "0"]
    assert (original.info.status, original.data.tags["optuna.trial_state"]) == ("KILLED", "REQUEUED")
    [resumed] = [run for run in runs_of("trial") if run.data.tags["optuna.trial_number"] == str(copy.number)]
    assert resumed.data.tags[RESUMED_FROM_TAG] == original.info.run_id


@pytest.mark.slow
def test_extending_a_study_summarises_once_and_a_finished_one_says_so(tmp_path, prepared_run, capsys):
    tune(smoke(tmp_path, n_trials=2), PrepareConfig(), prepared_run)
    tune(smoke(tmp_path, n_trials=4), PrepareConfig(), prepared_run)  # n_trials counts the whole study
    assert [t.number for t in load(smoke(tmp_path)).trials] == [0, 1, 2, 3]
    [parent] = runs_of("tune")
    assert parent.info.status == "FINISHED"
    assert sorted(run.data.tags["optuna.trial_number"] for run in runs_of("trial")) == ["0", "1", "2", "3"]
    versions = MlflowClient().search_model_versions("name = 'tiny-lstm'")
    assert len(runs_of("evaluate")) == len(versions) <= 2  # one test per registered version, none for an unchanged best
    history = MlflowClient().get_metric_history(parent.info.run_id, "n_complete_trials")
    assert [m.step for m in history] == [2, 4]  # summarised once per extension

    capsys.readouterr()
    tune(smoke(tmp_path, n_trials=4), PrepareConfig(), prepared_run)  # nothing left to do
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("study tiny is complete: 4 trials; best trial") and "registered as tiny-lstm" in line
    assert "champion: version" in line
    assert len(runs_of("trial")) == 4 and len(runs_of("evaluate")) == len(versions)


@pytest.mark.slow
def test_a_rerun_with_other_settings_is_refused(tmp_path, prepared_run):
    tune(smoke(tmp_path, n_trials=1), PrepareConfig(), prepared_run)
    with pytest.raises(ParameterError, match=r"created with epochs=1 \(this command: 2\); sampler=tpe \(this command: random\)"):
        tune(smoke(tmp_path, n_trials=2, epochs=2, sampler="random"), PrepareConfig(), prepared_run)
    with pytest.raises(ParameterError, match="study=smoke"):
        tune(smoke(tmp_path, n_trials=2, study="lstm-cpu"), PrepareConfig(), prepared_run)
    assert len(load(smoke(tmp_path)).trials) == 1


@pytest.mark.slow
# Two ways to lose a worker: before it recorded itself, and after, with its lease gone. The pid is never
# read (liveness is the lease alone), so a live one stands for every pid: a check by pid would keep it.
@pytest.mark.parametrize("orphan", ["no worker recorded", "a live pid without its lease"])
def test_a_running_trial_that_lost_its_worker_is_requeued_when_the_study_resumes(tmp_path, prepared_run, orphan):
    config = smoke(tmp_path, n_trials=2)
    tune(config, PrepareConfig(), prepared_run)
    study = load(config)
    lost = study.ask(study.trials[0].distributions)  # left RUNNING by a worker that is gone
    child = MlflowClient().create_run("0", tags={"pipeline.stage": "trial", "optuna.trial_number": str(lost.number)})
    attributes.RUN_ID.write(lost, child.info.run_id)
    if orphan == "a live pid without its lease":  # a pid reused by another process: alive, but not a worker
        lost.set_user_attr("worker", f"{os.uname().nodename}:{os.getpid()}")

    tune(smoke(tmp_path, n_trials=3), PrepareConfig(), prepared_run)
    trials = load(config).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE"]
    assert attributes.RETRY_OF.read(trials[3]) == lost.number and trials[3].params == trials[2].params
    lost_run = MlflowClient().get_run(child.info.run_id)
    assert lost_run.info.status == "FAILED" and "stopped while running it" in lost_run.data.tags["optuna.fail_reason"]
    assert not [run for run in runs_of("trial") if run.info.status == "RUNNING"]


def hold_lease(config: TuneConfig, number: int) -> subprocess.Popen:
    """Another worker's lease on trial ``number``: a process holding its flock until killed."""
    lease = coordination.lease_path(config, config.study_name, number)
    code = "import fcntl, sys, time; f = open(sys.argv[1], 'w'); fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True)"
    holder = subprocess.Popen([sys.executable, "-c", code + "; time.sleep(600)", str(lease)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


@pytest.mark.slow
def test_a_worker_with_nothing_to_ask_waits_for_a_live_trial_with_a_bound_then_a_lost_one_is_rerun(
    tmp_path, prepared_run, monkeypatch, capsys
):
    config = smoke(tmp_path, n_trials=2)
    tune(smoke(tmp_path, n_trials=1), PrepareConfig(), prepared_run)
    study = load(config)
    running = study.ask(study.trials[0].distributions)  # a live worker's trial, on another host say
    running.set_user_attr("worker", "another-host:1")
    holder = hold_lease(config, running.number)
    try:
        monkeypatch.setattr(worker_module, "wait_bound", lambda study: 2.0)
        began = time.monotonic()
        tune(config, PrepareConfig(), prepared_run)  # nothing to ask: waits 2 s for the live trial, then leaves
        assert time.monotonic() - began < 60
        assert load(config).trials[running.number].state.name == "RUNNING"  # a live lease is never taken over
        captured = capsys.readouterr()
        assert "still run the study's last work" in captured.err
    finally:
        holder.kill()
        holder.wait()
    tune(config, PrepareConfig(), prepared_run)  # its worker is gone now: re-queued, run here, summarised
    trials = load(config).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"] and len(counted(trials)) == 2


@pytest.mark.slow
def test_a_worker_the_budget_holds_waits_past_the_bound_for_the_running_trials_then_decides_again(
    tmp_path, prepared_run, monkeypatch, capsys
):
    # After one small trial the budget leaves no room, while trial 0, whose timing would make room,
    # still runs: the worker waits for the running trials rather than leave at its bound.
    tune(smoke(tmp_path, n_trials=1), PrepareConfig(), prepared_run)
    config = smoke(tmp_path, n_trials=3, budget=3600)
    study = load(config)
    running = study.ask(study.trials[0].distributions)  # another worker's trial, still training
    running.set_user_attr("worker", "another-host:1")
    holder = hold_lease(config, running.number)
    monkeypatch.setattr(worker_module, "wait_bound", lambda study: 1.0)
    monkeypatch.setattr(worker_module, "another_trial_fits", lambda *args: False)
    returned, still_waiting = threading.Event(), []

    def end_the_running_trial() -> None:
        time.sleep(6)  # six times the bound
        still_waiting.append(not returned.is_set())
        load(config).tell(running.number, 0.5)
        holder.kill()

    ender = threading.Thread(target=end_the_running_trial)
    try:
        ender.start()
        tune(config, PrepareConfig(), prepared_run)
        returned.set()
    finally:
        ender.join()
        holder.kill()
        holder.wait()
    assert still_waiting == [True]
    assert [t.state.name for t in load(config).trials] == ["COMPLETE", "COMPLETE"]  # and no trial after it
    err = capsys.readouterr().err
    assert "-P budget leaves no room for another trial; waiting for the running ones, then deciding again" in err
    assert "still run the study's last work" not in err


@pytest.mark.slow(seconds=85)
def test_two_worker_processes_share_one_study_and_confirm_two_seeds_at_once(tmp_path, prepared_run):
    config = smoke(tmp_path, n_trials=4, n_workers="2", confirm_top=1, confirm_seeds=2)
    registered = tune(config, PrepareConfig(), prepared_run)
    assert sorted(t.number for t in load(config).trials) == [0, 1, 2, 3]
    draws = [tuple(sorted(t.params.items())) for t in load(config).trials]
    assert len(set(draws)) == 4, draws  # no worker replays another's draws (the same seed in each worker would)
    trials = runs_of("trial")
    assert sorted(run.data.tags["optuna.trial_number"] for run in trials) == ["0", "1", "2", "3"]
    [parent] = runs_of("tune")
    assert {run.data.tags["mlflow.parentRunId"] for run in trials} == {parent.info.run_id}
    # Both workers took the confirmation's runs from the queue, as they took trials.
    confirmed = runs_of("confirm")
    assert sorted(run.data.params["seed"] for run in confirmed) == ["1", "2"]
    assert {run.data.tags["mlflow.parentRunId"] for run in confirmed} == {parent.info.run_id}
    [version] = MlflowClient().search_model_versions("name = 'tiny-lstm'")
    assert version.run_id in {run.info.run_id for run in confirmed} and registered.n_seeds == 2


@pytest.mark.slow
def test_every_trials_model_is_released_whatever_its_ending(tmp_path, prepared_run, monkeypatch):
    models, alive_at_next_start = [], []
    real_build = training_module.build_model

    def tracked_build(*args, **kwargs):
        alive_at_next_start.append([ref() is not None for ref in models])
        model = real_build(*args, **kwargs)
        models.append(weakref.ref(model))
        return model

    endings = iter(["complete", "pruned", "failed", "oom", "complete"])

    def ending(metrics):
        kind = next(endings)
        if kind == "pruned":
            raise optuna.TrialPruned("forced")
        if kind == "failed":
            raise TrainingDiverged("forced")
        if kind == "oom":
            raise __import__("torch").cuda.OutOfMemoryError("forced")

    real_train = objective_module.train_and_log
    monkeypatch.setattr(training_module, "build_model", tracked_build)
    monkeypatch.setattr(
        objective_module,
        "train_and_log",
        lambda *a, on_epoch, **k: real_train(*a, on_epoch=lambda m: (on_epoch(m), ending(m)), **k),
    )
    tune(smoke(tmp_path, n_trials=5, pruner="none"), PrepareConfig(), prepared_run)
    assert [t.state.name for t in load(smoke(tmp_path)).trials] == ["COMPLETE", "PRUNED", "FAIL", "FAIL", "COMPLETE"]
    # Each trial's model was gone before the next one was built; and no model but the trials' was
    # built (no speed probe in the command that starts the study).
    assert alive_at_next_start == [[False] * n for n in range(5)]


@pytest.mark.slow
def test_a_summary_that_fails_is_not_recorded_and_the_rerun_registers(tmp_path, prepared_run, monkeypatch):
    real = summary.register_best

    def registry_down(*args, **kwargs):
        raise mlflow.exceptions.MlflowException("the model registry is unreachable")

    monkeypatch.setattr(summary, "register_best", registry_down)
    config = smoke(tmp_path, n_trials=2)
    with pytest.raises(mlflow.exceptions.MlflowException, match="unreachable"):
        tune(config, PrepareConfig(), prepared_run)
    assert "summarised_at" not in load(config).user_attrs  # not marked done: the rerun must summarise
    monkeypatch.setattr(summary, "register_best", real)
    registered = tune(config, PrepareConfig(), prepared_run)  # no trial left to run, but a summary owed
    assert registered is not None and str(registered.version) == "1"
    assert len(runs_of("trial")) == 2 and load(config).user_attrs["summarised_at"] == 2


def test_storage_urls_are_checked_in_one_line_without_their_password():
    assert storage.public_storage("postgresql://optuna:s3cret@db:5432/studies") == "postgresql://optuna:***@db:5432/studies"
    assert storage.public_storage("studies.journal") == "studies.journal"
    with pytest.raises(ParameterError, match=r"storage=postgresql://\.\.\. holds a password") as refused:
        storage.check_storage("postgresql://optuna:s3cret@db:5432/studies")
    assert "s3cret" not in str(refused.value)
    storage.check_storage("postgresql://optuna@db:5432/studies")  # psycopg 3: the plain form works
    storage.check_storage("postgresql://optuna:${OPTUNA_DB_PASSWORD}@db:5432/studies")  # read from the environment
    with pytest.raises(ParameterError, match="SQLite is not safe for several workers"):
        storage.check_storage("sqlite:///studies.db", n_workers=2)
    with pytest.raises(ParameterError, match=r"storage=mysql://\.\.\. is not allowed"):
        storage.check_storage("mysql://u@db/studies")
    # A driver that is not installed (this project installs psycopg 3, not psycopg2) is one line.
    with pytest.raises(ParameterError, match=r"storage=postgresql\+psycopg2://\.\.\. needs the Python package 'psycopg2'"):
        storage.check_storage("postgresql+psycopg2://optuna@db:5432/studies")


@pytest.mark.slow
def test_a_command_whose_workers_fail_exits_with_an_error_naming_them_once_the_others_end(
    tracking, tmp_path, monkeypatch, capsys
):
    jobs = [WorkerJob(TuneConfig(device="cpu"), "parent", "0", "data", str(tmp_path), worker=i, workers=3) for i in range(3)]
    monkeypatch.setattr(tune_module, "tune", lambda *args, **kwargs: run_workers(jobs, target=end_as_numbered))
    monkeypatch.setenv("MPLBACKEND", "Agg")  # what main() sets for its workers, restored after the test
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as exit:
            tune_module.main(["--device", "cpu"])
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    assert exit.value.code == 1 and (tmp_path / "worker-0-ended").exists()
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: tune-worker-1 exited with code 3, tune-worker-2 was killed by SIGKILL; "
        "the study keeps their finished trials: rerun the same command to run any trial left"
    )


@pytest.mark.slow
def test_workers_spread_over_every_gpu_and_several_share_one(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with three GPUs, faked
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    config = TuneConfig(device="auto", workers_per_gpu=2)
    assert gpu_assignment(config) == ["0", "1", "2", "0", "1", "2"]  # n_workers=auto: GPUs x workers_per_gpu
    assert gpu_assignment(dataclasses.replace(config, n_workers="4")) == ["0", "1", "2", "0"]  # worker i on GPU i mod 3
    assert gpu_assignment(dataclasses.replace(config, device="cpu")) == [None]
    assert gpu_assignment(dataclasses.replace(config, device="cpu", n_workers="2")) == [None, None]

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")  # a scheduler gave this job GPUs 5 and 7
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    gpus = gpu_assignment(dataclasses.replace(config, workers_per_gpu=2))
    assert gpus == ["5", "7", "5", "7"]
    jobs = [WorkerJob(config, "parent", "0", "data", str(tmp_path), worker=i, workers=4, gpu=gpu) for i, gpu in enumerate(gpus)]
    run_workers(jobs, target=record_environment)
    seen = [json.loads((tmp_path / f"worker-{i}.json").read_text()) for i in range(4)]
    assert [s["CUDA_VISIBLE_DEVICES"] for s in seen] == gpus  # each worker sees its own GPU only
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5,7"  # and the launcher's environment is as it was
