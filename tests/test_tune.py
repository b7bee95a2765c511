"""Optuna studies tracked in MLflow, in process: tiny studies (smoke definition, 1000 real MNIST images) on the CPU."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import weakref
from datetime import datetime, timedelta
from pathlib import Path

import mlflow
import optuna
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from plotly.offline import get_plotlyjs

from experiments import attributes, coordination, pareto, storage, studies, summary, warm_start
from experiments import worker as worker_module
from experiments.attributes import MLFLOW_RUN_ATTR, RETRY_OF_ATTR
from experiments.coordination import counted
from experiments.gpus import gpu_assignment, run_workers
from experiments.studies import STUDIES, relative_cost, study_for, typical_cost
from experiments.tune import tune
from experiments.worker import WorkerJob
from pipeline import prepare
from pipeline import training as training_module
from pipeline.config import ParameterError, PrepareConfig, TuneConfig
from pipeline.cost import forward_flops
from pipeline.data import PreparedData, save_prepared
from pipeline.training import TrainingDiverged
from tests.conftest import tiny_prepared


@pytest.fixture
def prepared_run(tracking, mnist_dir) -> str:
    prepare.main(["--data-dir", str(mnist_dir), "--train-limit", "1000", "--val-size", "500"])
    [run] = MlflowClient().search_runs(["0"])
    return run.info.run_id


def smoke(tmp_path, **overrides) -> TuneConfig:
    settings = {
        "study": "smoke",
        "study_name": "tiny",
        "storage": str(tmp_path / "studies.journal"),
        "n_trials": 3,
        "epochs": 1,
        "device": "cpu",
        "register_name": "tiny-lstm",
        "confirm_top": 0,  # the best trial's own model: confirming over seeds has tests of its own
    }
    return TuneConfig(**{**settings, **overrides})


def runs_of(stage: str):
    return MlflowClient().search_runs(["0"], filter_string=f"tags.`pipeline.stage` = '{stage}'")


def load(config: TuneConfig) -> optuna.Study:
    return optuna.load_study(study_name=config.study_name, storage=coordination.open_storage(config))


def test_a_tiny_study_is_one_parent_with_a_child_per_trial_and_registers_its_best_trial(tmp_path, prepared_run, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")  # these trials last a fraction of a second
    config = smoke(tmp_path)
    registered = tune(config, PrepareConfig(), prepared_run)

    [parent] = runs_of("tune")
    trials = runs_of("trial")
    assert parent.info.status == "FINISHED" and len(trials) == 3
    assert {run.data.tags["mlflow.parentRunId"] for run in trials} == {parent.info.run_id}
    assert sorted(run.data.tags["optuna.trial_number"] for run in trials) == ["0", "1", "2"]
    assert all(run.info.status == "FINISHED" and run.data.tags["optuna.trial_state"] == "COMPLETE" for run in trials)
    assert all(run.data.tags["pipeline.data"] == prepared_run for run in trials)  # lineage of every model
    assert all("system/cpu_utilization_percentage" in run.data.metrics for run in trials)  # MLflow's system metrics
    assert all([m.step for m in MlflowClient().get_metric_history(run.info.run_id, "val_accuracy")] == [1] for run in trials)

    study = load(config)
    assert study.trials[0].params == {k: v for k, v in STUDIES["smoke"].baseline.items() if k in study.trials[0].params}
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(study.best_value)
    assert parent.data.params["study_name"] == "tiny" and parent.data.params["sampler"] == "tpe"
    artifacts = {f.path for f in MlflowClient().list_artifacts(parent.info.run_id)}
    assert {"leaderboard.csv", "leaderboard.html", "plots"} <= artifacts
    plots = {f.path: f.file_size for f in MlflowClient().list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/study.html", "plots/optimization_history.png", "plots/slice.png"} <= set(plots)
    page = Path(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="plots/study.html")).read_text()
    assert "<script src=" not in page and page.count("Plotly.newPlot") >= 3  # offline: plotly.js inlined, once
    assert plots["plots/study.html"] < 1.5 * len(get_plotlyjs())

    # The best trial's own model is registered: no retrain, picked by validation.
    version = MlflowClient().get_model_version_by_alias("tiny-lstm", "champion")
    best_run = study.best_trial.user_attrs[MLFLOW_RUN_ATTR]
    assert str(version.version) == "1" and version.run_id == best_run and registered.champion
    assert float(version.tags["val_accuracy"]) == pytest.approx(study.best_value, abs=1e-6)
    assert not MlflowClient().search_runs(["0"], filter_string="attributes.run_name = 'best-retrain'")
    # Its lineage, readable on the version: data, study and trial, parameters, precision, code.
    manifest = json.loads(
        Path(mlflow.artifacts.download_artifacts(run_id=prepared_run, artifact_path="prepared/manifest.json")).read_text()
    )
    assert version.tags["data.dataset"] == "mnist"
    assert all(version.tags[f"data.{split}_sha256"] == manifest["splits"][split]["sha256"] for split in ("train", "val", "test"))
    assert version.tags["optuna.study_name"] == "tiny" and version.tags["optuna.trial_number"] == str(study.best_trial.number)
    assert {f"param.{k}": str(v) for k, v in study.best_trial.params.items()}.items() <= version.tags.items()
    assert version.tags["precision"] in ("fp32", "bf16") and len(version.tags["code_version"]) == 64
    assert f"Study tiny, trial {study.best_trial.number}" in version.description and "tested once" in version.description
    # Its page shows what describes it: the trial's val_accuracy and the test metrics of the evaluate run.
    model_id = mlflow.models.get_model_info(f"models:/tiny-lstm/{version.version}").model_id
    model_metrics = {metric.key: metric.value for metric in MlflowClient().get_logged_model(model_id).metrics}
    assert model_metrics["best_val_accuracy"] == pytest.approx(study.best_value)
    assert {"test_accuracy", "test_macro_f1"} <= model_metrics.keys()
    # The test set is read once, on the registered artifact, and only reported.
    [evaluation] = runs_of("evaluate")
    assert evaluation.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert evaluation.data.tags["pipeline.model"] == "models:/tiny-lstm/1"
    assert float(version.tags["test_accuracy"]) == pytest.approx(evaluation.data.metrics["test_accuracy"], abs=1e-6)


MNIST = {summary.DATASET_TAG: "mnist", summary.VAL_DIGEST_TAG: "a" * 64}


def test_the_champion_is_chosen_by_validation_not_by_test(tracking, tmp_path):
    client = MlflowClient()

    client.create_registered_model("m")

    def version(val: float, test: float) -> str:
        tags = {"val_accuracy": str(val), "test_accuracy": str(test), **MNIST}
        return str(client.create_model_version("m", source=str(tmp_path), tags=tags).version)

    first = version(val=0.95, test=0.90)
    assert summary.crown_if_better("m", first, 0.95, MNIST) == ""
    better_on_test_only = version(val=0.94, test=0.99)
    assert "has val_accuracy 0.9500 on the same data" in summary.crown_if_better("m", better_on_test_only, 0.94, MNIST)
    assert str(client.get_model_version_by_alias("m", "champion").version) == first
    better_on_validation = version(val=0.96, test=0.80)
    assert summary.crown_if_better("m", better_on_validation, 0.96, MNIST) == ""
    assert str(client.get_model_version_by_alias("m", "champion").version) == better_on_validation


@pytest.mark.parametrize(
    "other",
    [
        {summary.DATASET_TAG: "fashion-mnist", summary.VAL_DIGEST_TAG: "b" * 64},  # another dataset
        {summary.DATASET_TAG: "mnist", summary.VAL_DIGEST_TAG: "c" * 64},  # a smaller or other validation split
        {},  # registered before the data was recorded
    ],
)
def test_a_version_validated_on_other_data_never_takes_the_alias(tracking, tmp_path, other):
    client = MlflowClient()
    client.create_registered_model("m")
    champion = str(client.create_model_version("m", source=str(tmp_path), tags={"val_accuracy": "0.90", **other}).version)
    client.set_registered_model_alias("m", "champion", champion)
    challenger = str(client.create_model_version("m", source=str(tmp_path), tags={"val_accuracy": "0.99", **MNIST}).version)
    why_not = summary.crown_if_better("m", challenger, 0.99, MNIST)
    assert why_not.startswith(f"not compared with champion version {champion}, validated on other data")
    assert str(client.get_model_version_by_alias("m", "champion").version) == champion


def test_the_default_study_fits_the_device_starts_with_the_tutorial_configuration_and_says_how_long(
    tmp_path, prepared_run, capsys
):
    config = smoke(tmp_path, study="auto", n_trials=2, pruner="auto")  # on a CPU: the CPU-sized space
    tune(config, PrepareConfig(), prepared_run)
    announced = capsys.readouterr().err
    # The first lines: what was chosen, how the champion is picked, and when the time is known.
    lines = announced.splitlines()
    first = lines[lines.index(next(line for line in lines if line.startswith("tune: "))) :][:3]
    assert first[0].startswith("tune: study 'tiny' (lstm-cpu: the CPU-sized space: smaller models")
    assert "on cpu, 1 worker(s): 2 trial(s) left of 2, 1 epochs on 1,000 images each; pruner hyperband" in first[0]
    assert first[1] == "confirm: none (-P confirm_top=0): the best trial's own model is registered"
    assert first[2] == "time: estimated when the first trial finishes"  # nothing trained to find out
    assert "\n[worker 0] trial 0 epoch 1/1  train_loss" in announced  # each epoch's line says whose it is
    # Once trial 0 finished, its own timing says how long the rest takes.
    after_first = announced[announced.index("[worker 0] trial 0 COMPLETE") :]
    assert re.search(r"\[worker 0\] time: about \d+ min here for the 1 trial\(s\) left if none is pruned", after_first)
    # It ends with a table of the best trials and the link to them in the UI's runs table.
    assert re.search(r"best 5:\n +number +val_accuracy +state +batch_size +bidirectional +dropout +hidden_size", announced)
    [parent] = runs_of("tune")
    page = f"/#/experiments/{parent.info.experiment_id}/runs?workflowType=machine_learning"
    assert announced.rstrip().endswith(
        f"see the trials: mlflow ui --backend-store-uri {mlflow.get_tracking_uri()}, then open http://127.0.0.1:5000{page}"
    )
    assert attributes.settings(load(config))["study"] == "lstm-cpu"
    assert attributes.settings(load(config))["pruner"] == "hyperband"  # pruner=auto, for a new study
    first = load(config).trials[0]
    assert first.number == 0
    assert {k: first.params[k] for k in ("hidden_size", "num_layers", "learning_rate")} == {
        "hidden_size": 256,
        "num_layers": 2,
        "learning_rate": 1e-3,
    }


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
    real, calls = worker_module.train_and_log, []

    def train_and_log(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(worker_module, "train_and_log", train_and_log)


def test_a_failed_trial_counts_and_the_study_goes_on(tmp_path, prepared_run, monkeypatch):
    second_trial_raises(monkeypatch, TrainingDiverged("train_loss is nan in epoch 1"))
    tune(smoke(tmp_path), PrepareConfig(), prepared_run)
    assert [t.state.name for t in load(smoke(tmp_path)).trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    [failed] = [run for run in runs_of("trial") if run.info.status == "FAILED"]
    assert failed.data.tags["optuna.trial_state"] == "FAIL"
    assert "TrainingDiverged: train_loss is nan" in failed.data.tags["optuna.fail_reason"]


def test_an_interrupted_trial_is_requeued_not_counted_and_runs_on_the_rerun(tmp_path, prepared_run, monkeypatch):
    second_trial_raises(monkeypatch, KeyboardInterrupt())
    config = smoke(tmp_path, n_trials=2)
    with pytest.raises(KeyboardInterrupt):
        tune(config, PrepareConfig(), prepared_run)
    trials = load(config).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "WAITING"]
    assert trials[2].user_attrs[RETRY_OF_ATTR] == 1 and len(counted(trials)) == 1
    [interrupted] = [run for run in runs_of("trial") if run.data.tags["optuna.trial_number"] == "1"]
    assert interrupted.info.status == "KILLED" and interrupted.data.tags["optuna.trial_state"] == "REQUEUED"

    tune(config, PrepareConfig(), prepared_run)  # the rerun runs the re-queued copy, and no more
    trials = load(config).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert trials[2].params == trials[1].params and len(counted(trials)) == 2
    [parent] = runs_of("tune")
    assert parent.info.status == "FINISHED"


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


def test_a_rerun_with_other_settings_is_refused(tmp_path, prepared_run):
    tune(smoke(tmp_path, n_trials=1), PrepareConfig(), prepared_run)
    with pytest.raises(ParameterError, match=r"created with epochs=1 \(this command: 2\); sampler=tpe \(this command: random\)"):
        tune(smoke(tmp_path, n_trials=2, epochs=2, sampler="random"), PrepareConfig(), prepared_run)
    with pytest.raises(ParameterError, match="study=smoke"):
        tune(smoke(tmp_path, n_trials=2, study="lstm-cpu"), PrepareConfig(), prepared_run)
    assert len(load(smoke(tmp_path)).trials) == 1


@pytest.mark.parametrize("orphan", ["no worker recorded", "a live pid without its lease", "a dead pid"])
def test_a_running_trial_that_lost_its_worker_is_requeued_when_the_study_resumes(tmp_path, prepared_run, orphan):
    config = smoke(tmp_path, n_trials=2)
    tune(config, PrepareConfig(), prepared_run)
    study = load(config)
    lost = study.ask(study.trials[0].distributions)  # left RUNNING by a worker that is gone
    child = MlflowClient().create_run("0", tags={"pipeline.stage": "trial", "optuna.trial_number": str(lost.number)})
    lost.set_user_attr(MLFLOW_RUN_ATTR, child.info.run_id)
    if orphan == "a live pid without its lease":  # a pid reused by another process: alive, but not a worker
        lost.set_user_attr("worker", f"{os.uname().nodename}:{os.getpid()}")
    elif orphan == "a dead pid":
        dead = subprocess.Popen(["true"])
        dead.wait()
        lost.set_user_attr("worker", f"{os.uname().nodename}:{dead.pid}")

    tune(smoke(tmp_path, n_trials=3), PrepareConfig(), prepared_run)
    trials = load(config).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE"]
    assert trials[3].user_attrs[RETRY_OF_ATTR] == lost.number and trials[3].params == trials[2].params
    lost_run = MlflowClient().get_run(child.info.run_id)
    assert lost_run.info.status == "FAILED" and "stopped while running it" in lost_run.data.tags["optuna.fail_reason"]
    assert not [run for run in runs_of("trial") if run.info.status == "RUNNING"]


def test_a_worker_with_nothing_to_ask_waits_for_a_live_trial_with_a_bound_then_a_lost_one_is_rerun(
    tmp_path, prepared_run, monkeypatch, capsys
):
    config = smoke(tmp_path, n_trials=2)
    tune(smoke(tmp_path, n_trials=1), PrepareConfig(), prepared_run)
    study = load(config)
    running = study.ask(study.trials[0].distributions)  # a live worker's trial, on another host say
    running.set_user_attr("worker", "another-host:1")
    lease = coordination.lease_path(config, "tiny", running.number)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time; f = open(sys.argv[1], 'w'); "
            "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(600)",
            str(lease),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        monkeypatch.setattr(worker_module, "wait_bound", lambda study: 2.0)
        began = time.monotonic()
        tune(config, PrepareConfig(), prepared_run)  # nothing to ask: waits 2 s for the live trial, then leaves
        assert time.monotonic() - began < 60
        assert load(config).trials[running.number].state.name == "RUNNING"  # a live lease is never taken over
        captured = capsys.readouterr()
        assert "still run in other workers" in captured.err
    finally:
        holder.kill()
        holder.wait()
    tune(config, PrepareConfig(), prepared_run)  # its worker is gone now: re-queued, run here, summarised
    trials = load(config).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"] and len(counted(trials)) == 2


def test_two_worker_processes_share_one_study(tmp_path, prepared_run):
    config = smoke(tmp_path, n_trials=4, n_workers="2")
    tune(config, PrepareConfig(), prepared_run)
    assert sorted(t.number for t in load(config).trials) == [0, 1, 2, 3]
    trials = runs_of("trial")
    assert sorted(run.data.tags["optuna.trial_number"] for run in trials) == ["0", "1", "2", "3"]
    [parent] = runs_of("tune")
    assert {run.data.tags["mlflow.parentRunId"] for run in trials} == {parent.info.run_id}
    assert len(MlflowClient().search_model_versions("name = 'tiny-lstm'")) == 1


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

    real_train = worker_module.train_and_log
    monkeypatch.setattr(training_module, "build_model", tracked_build)
    monkeypatch.setattr(
        worker_module, "train_and_log", lambda *a, on_epoch, **k: real_train(*a, on_epoch=lambda m: (on_epoch(m), ending(m)), **k)
    )
    tune(smoke(tmp_path, n_trials=5, pruner="none"), PrepareConfig(), prepared_run)
    assert [t.state.name for t in load(smoke(tmp_path)).trials] == ["COMPLETE", "PRUNED", "FAIL", "FAIL", "COMPLETE"]
    # Each trial's model was gone before the next one was built; and no model but the trials' was
    # built (no speed probe in the command that starts the study).
    assert alive_at_next_start == [[False] * n for n in range(5)]


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


def record_environment(job: WorkerJob) -> None:
    """A spawned worker's first look at its world (module level: a spawned process imports it)."""
    seen = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")}
    Path(job.data_folder, f"worker-{job.worker}.json").write_text(json.dumps(seen))


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


def test_auto_picks_the_space_by_device():
    assert study_for("auto", on_cuda=True) == "lstm" and study_for("auto", on_cuda=False) == "lstm-cpu"
    assert study_for("smoke", on_cuda=True) == "smoke"
    assert typical_cost(STUDIES["lstm-cpu"]) < 0.3 < 1 < typical_cost(STUDIES["lstm"])  # per image, against trial 0


def test_the_estimate_comes_from_the_trials_own_timing_and_counts_enqueued_trials_at_their_size(tmp_path):
    # A warm start enqueues the earlier study's best, large configurations: scaling them by the
    # space's typical (small) trial said 7 minutes for a study that took about 30.
    definition = STUDIES["lstm-cpu"]
    small = {"hidden_size": 128, "num_layers": 1, "bidirectional": False}
    assert relative_cost(definition, small) == forward_flops(128, 1) / forward_flops(256, 2)
    assert relative_cost(definition, {}) == 1  # left-out parameters count at the baseline's value
    config = smoke(tmp_path, study="lstm-cpu", n_trials=9, epochs=2, confirm_top=1, confirm_seeds=2)
    study = optuna.create_study(direction="maximize")
    assert studies.time_left(study, config, 9, workers=1) == "time: estimated when the first trial finishes"

    space, start = warm_start.search_space(definition), datetime(2026, 1, 1)

    def finished(params: dict, accuracies: list[float], seconds: float, state=optuna.trial.TrialState.COMPLETE) -> None:
        trial = optuna.trial.create_trial(
            params=params,
            distributions={name: space[name] for name in params},
            value=accuracies[-1] if state == optuna.trial.TrialState.COMPLETE else None,
            intermediate_values=dict(enumerate(accuracies, start=1)),
            state=state,
        )
        trial.datetime_start, trial.datetime_complete = start, start + timedelta(seconds=seconds)
        study.add_trial(trial)

    # Trial 0, the baseline, took 120 s for its 2 epochs; a small trial pruned after 1 epoch took
    # its relative cost of 60 s: one epoch of the baseline takes 60 s here.
    finished(definition.baseline, [0.8, 0.9], 120)
    finished(small, [0.5], 60 * relative_cost(definition, small), optuna.trial.TrialState.PRUNED)
    assert studies.baseline_epoch_seconds(definition, study.trials, epochs=2) == pytest.approx(60)
    for _ in range(6):
        study.enqueue_trial(definition.baseline)  # as large as trial 0: 2 min each
    # 6 baselines and one typical trial of 2 epochs; then the best configuration (the baseline)
    # with 2 seeds: 4 min. Two workers on this machine share the work.
    search = math.ceil((6 + typical_cost(definition)) * 2)
    assert studies.time_left(study, config, 7, workers=1) == (
        f"time: about {search} min here for the 7 trial(s) left if none is pruned, then about 4 min to confirm "
        "(the baseline takes 60 s an epoch here, by the finished trials' timing)"
    )
    assert "about 7 min here" in studies.time_left(study, config, 7, workers=2)


def test_a_cpu_machine_runs_one_worker_by_default(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_assignment(smoke(tmp_path, device="auto")) == [None]
    assert smoke(tmp_path).n_workers == "auto" and TuneConfig().n_workers == "auto"
    with pytest.raises(ParameterError, match="n_workers='0' is not allowed: must be auto or an integer from 1 to 64"):
        smoke(tmp_path, n_workers="0")


# --- warm starts ----------------------------------------------------------------------------------


def test_a_warm_start_cuts_the_earlier_configurations_to_the_new_search_space():
    storage = optuna.storages.InMemoryStorage()
    earlier = optuna.create_study(study_name="cpu", storage=storage, direction="maximize")
    space = {
        "hidden_size": optuna.distributions.IntDistribution(4, 256, log=True),
        "learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True),
        "batch_size": optuna.distributions.CategoricalDistribution([128, 256]),
    }
    for value, hidden, lr in [(0.9, 128, 0.02), (0.95, 8, 0.05), (0.8, 16, 0.01), (0.7, 8, 0.05)]:
        params = {"hidden_size": hidden, "learning_rate": lr, "batch_size": 128}
        earlier.add_trial(optuna.trial.create_trial(params=params, distributions=space, value=value))
    start = warm_start.warm_start(storage, "cpu", 5, STUDIES["smoke"])
    # Best first; smoke does not search batch_size, and hidden_size 128 and learning_rate 0.05 are
    # outside its ranges (its sampler draws them); the 0.7 trial is the 0.95 one again, once cut.
    assert start.trials == [1, 0, 2] and start.study == "cpu"
    assert start.configurations == [{"hidden_size": 8}, {"learning_rate": 0.02}, {"hidden_size": 16, "learning_rate": 0.01}]
    assert {"trial 0: hidden_size=128", "trial 1: learning_rate=0.05", "trial 1: batch_size=128"} <= set(start.left_out)
    with pytest.raises(ParameterError, match="warm_start='gone': no study of that name in this storage"):
        warm_start.warm_start(storage, "gone", 5, STUDIES["smoke"])
    optuna.create_study(study_name="empty", storage=storage)
    with pytest.raises(ParameterError, match="warm_start='empty': that study has no complete trial"):
        warm_start.warm_start(storage, "empty", 5, STUDIES["smoke"])


def test_a_warm_started_study_begins_from_the_earlier_studys_best_trials_once(tmp_path, prepared_run, capsys, monkeypatch):
    monkeypatch.setattr(summary, "log_study_plots", lambda study, folder: None)  # seconds each, and not what is tested
    first = smoke(tmp_path, study_name="first")
    earlier = optuna.create_study(study_name="first", storage=coordination.open_storage(first), direction="maximize")
    space = {
        "hidden_size": optuna.distributions.IntDistribution(4, 16, log=True),
        "learning_rate": optuna.distributions.FloatDistribution(1e-3, 3e-2, log=True),
    }
    for value, hidden, lr in [(0.5, 8, 0.01), (0.7, 12, 0.02), (0.6, 5, 0.003), (0.4, 16, 0.001)]:  # an earlier study's results
        params = {"hidden_size": hidden, "learning_rate": lr}
        earlier.add_trial(optuna.trial.create_trial(params=params, distributions=space, value=value))
    best = [earlier.trials[1], earlier.trials[2]]

    second = smoke(tmp_path, study_name="second", n_trials=3, warm_start="first", warm_start_k=2)
    tune(second, PrepareConfig(), prepared_run)
    trials = load(second).trials
    assert trials[0].params == {"hidden_size": 8, "learning_rate": 1e-2}  # trial 0 is still the known configuration
    assert [t.params for t in trials[1:3]] == [t.params for t in best]
    assert f"warm start: enqueued 2 configuration(s) of study 'first' (its trials {best[0].number}, {best[1].number})" in (
        capsys.readouterr().err
    )
    [parent] = [run for run in runs_of("tune") if run.info.run_name == "second"]
    assert parent.data.params["warm_start"] == "first"
    assert parent.data.params["warm_start_trials"] == f"{best[0].number} {best[1].number}"

    tune(dataclasses.replace(second, n_trials=4), PrepareConfig(), prepared_run)  # an extension enqueues nothing
    trials = load(second).trials
    assert len(trials) == 4 and [t.params for t in trials].count(best[0].params) == 1
    with pytest.raises(ParameterError, match="was created warm-started from 'first', not from 'second'"):
        tune(dataclasses.replace(second, warm_start="second"), PrepareConfig(), prepared_run)
    with pytest.raises(ParameterError, match="warm_start='missing': no study of that name"):
        tune(smoke(tmp_path, study_name="third", warm_start="missing"), PrepareConfig(), prepared_run)
    assert "third" not in optuna.study.get_all_study_names(coordination.open_storage(first))  # refused: nothing created


# --- multi-objective studies ----------------------------------------------------------------------


def test_the_compact_rule_picks_the_smallest_model_within_the_margin_of_the_best():
    def trial(number, accuracy, count):
        made = optuna.trial.create_trial(values=[accuracy, count])
        made.number = number
        return made

    trials = [trial(0, 0.990, 900), trial(1, 0.989, 300), trial(2, 0.9885, 300), trial(3, 0.987, 100), trial(4, 0.990, 800)]
    assert pareto.compact_trial(trials, within=0.002).number == 1  # 0.2 points: 300 parameters, the more accurate of two
    assert pareto.compact_trial(trials, within=0.0035).number == 3
    assert pareto.compact_trial(trials, within=0.0).number == 4  # the best accuracy, and the smaller of the two
    assert pareto.most_accurate(trials).number == 4
    assert not pareto.on_front((0.989, 400), trials) and pareto.on_front((0.991, 1000), trials)


def test_a_multi_objective_study_logs_its_pareto_front_and_registers_a_compact_model(tmp_path, prepared_run, monkeypatch):
    monkeypatch.setattr(summary, "log_study_plots", lambda study, folder: None)  # seconds each, and not what is tested
    config = smoke(tmp_path, n_trials=4, cost="parameter_count", compact_within=0.05)
    tune(config, PrepareConfig(), prepared_run)
    study = load(config)
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    assert study.user_attrs["settings"]["pruner"] == "none"  # Optuna's pruners judge one objective
    trials = pareto.complete(study)
    assert len(trials) == 4 and all(t.values[1] == t.values[1] // 1 > 0 for t in trials)

    [parent] = runs_of("tune")
    assert parent.data.tags["optuna.pruner"] == "none"
    front = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="pareto_front.csv"))
    assert set(front["number"]) == {t.number for t in study.best_trials}
    for row in front.itertuples():  # non-dominated, among every complete trial
        assert pareto.on_front((row.val_accuracy, row.parameter_count), trials)
    table = Path(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="pareto_front.md")).read_text()
    assert re.match(r"\| number +\| val_accuracy +\| parameter_count +\| hidden_size +\| learning_rate +\|\n", table)
    assert "plots/pareto_front.png" in {f.path for f in MlflowClient().list_artifacts(parent.info.run_id, "plots")}

    # The compact rule, by hand: the fewest parameters within 0.05 of the best val_accuracy.
    best = max(t.values[0] for t in trials)
    expected = min((t for t in trials if t.values[0] >= best - 0.05), key=lambda t: (t.values[1], -t.values[0], t.number))
    client = MlflowClient()
    compact = client.get_model_version_by_alias("tiny-lstm", "compact")
    champion = client.get_model_version_by_alias("tiny-lstm", "champion")
    assert compact.tags["optuna.trial_number"] == str(expected.number) == parent.data.tags["compact.trial_number"]
    assert champion.tags["optuna.trial_number"] == str(pareto.most_accurate(trials).number)
    # Test is read once per registered version.
    evaluated = sorted(run.data.tags["pipeline.model"] for run in runs_of("evaluate"))
    assert evaluated == sorted({f"models:/tiny-lstm/{v.version}" for v in (compact, champion)})


def test_a_latency_study_measures_each_trial_once_and_logs_it_where_people_compare(tmp_path, prepared_run, monkeypatch):
    monkeypatch.setattr(summary, "log_study_plots", lambda study, folder: None)
    config = smoke(tmp_path, n_trials=3, cost="latency_ms", compact_within=0.05)
    tune(config, PrepareConfig(), prepared_run)
    study = load(config)
    trials = pareto.complete(study)
    assert len(trials) == 3 and all(0 < t.values[1] < 1000 for t in trials)  # milliseconds for one image
    for trial in trials:  # the value Optuna minimised is the metric on the trial's run, for the runs table
        run = MlflowClient().get_run(trial.user_attrs["mlflow_run_id"])
        assert run.data.metrics["latency_ms"] == trial.values[1]

    [parent] = runs_of("tune")
    assert parent.data.params["objective"] == "maximize val_accuracy, minimize latency_ms"
    assert parent.data.tags["compact.rule"] == "smallest latency_ms within 0.05 of the best val_accuracy"
    front = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="pareto_front.csv"))
    assert set(front["number"]) == {t.number for t in study.best_trials}
    for row in front.itertuples():
        assert pareto.on_front((row.val_accuracy, row.latency_ms), trials)
    compact = MlflowClient().get_model_version_by_alias("tiny-lstm", "compact")
    picked = study.trials[int(compact.tags["optuna.trial_number"])]
    assert float(compact.tags["latency_ms"]) == pytest.approx(picked.values[1], abs=0.0005)


def test_study_plots_do_not_flood_the_log_when_a_parameter_holds_one_value(tmp_path):
    study = optuna.create_study(direction="maximize")
    space = {
        "hidden_size": optuna.distributions.IntDistribution(32, 256),
        "learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2),
        "num_layers": optuna.distributions.IntDistribution(1, 2),
    }
    for hidden, rate, accuracy in [(32, 0.001, 0.9), (64, 0.003, 0.95), (128, 0.01, 0.93)]:
        params = {"hidden_size": hidden, "learning_rate": rate, "num_layers": 2}  # num_layers: one value
        study.add_trial(optuna.trial.create_trial(params=params, distributions=space, value=accuracy))
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("optuna").addHandler(handler)
    before = optuna.logging.get_verbosity()  # a tuning worker earlier in this process may have set WARNING
    optuna.logging.set_verbosity(optuna.logging.INFO)  # Optuna's default
    try:
        summary.log_study_plots(study, tmp_path)
        assert optuna.logging.get_verbosity() == optuna.logging.INFO  # as it was before
    finally:
        logging.getLogger("optuna").removeHandler(handler)
        optuna.logging.set_verbosity(before)
    assert (tmp_path / "contour.png").exists()
    assert not [r.getMessage() for r in records if r.levelno >= logging.WARNING]


def test_a_trial_that_ties_the_best_logs_its_model(tracking, monkeypatch):
    """Two parallel trials reach the same val_accuracy; the one told second may have the earlier
    number, which the champion's rule picks among equals: it must have its model too."""
    study = optuna.create_study(direction="maximize")
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=0.9))  # finished first, with a model
    result = type("Result", (), {"best_val_accuracy": 0.9, "model": None})()
    monkeypatch.setattr(worker_module, "train_and_log", lambda *args, **kwargs: (result, None))
    logged = type("Logged", (), {"model_uri": "models:/m-tie", "model_id": "m-tie"})()
    monkeypatch.setattr(worker_module, "log_trained_model", lambda *args: logged)
    monkeypatch.setattr(worker_module.mlflow, "log_metric", lambda *args, **kwargs: None)  # no model m-tie to link to
    config = TuneConfig(study="smoke", study_name="ties", device="cpu")
    job = WorkerJob(config, mlflow.MlflowClient().create_run("0").info.run_id, "0", "data", "folder")
    trial = study.ask()
    assert worker_module.objective(trial, job, tiny_prepared()) == 0.9
    assert attributes.model_uri(study.trials[-1]) == "models:/m-tie"


def logged_prepared(data: PreparedData, dataset: str) -> str:
    """A prepare run holding ``data`` as ``dataset``, as `mlflow run -e prepare` leaves one; its id."""
    folder = Path(tempfile.mkdtemp()) / "prepared"
    save_prepared(folder, {"train": data.train, "val": data.val, "test": data.test}, {"dataset": dataset, "seed": 0})
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(folder), "prepared")
    return run.info.run_id


def test_each_dataset_has_its_own_champion_and_other_validation_data_never_takes_it(tmp_path, prepared_run, capsys):
    """The README's studies in order on one store: MNIST, Fashion-MNIST, then a small MNIST study."""
    mnist = tune(smoke(tmp_path, study_name="mnist", register_name="auto", n_trials=1), PrepareConfig(), prepared_run)
    fashion_data = logged_prepared(tiny_prepared(), "fashion-mnist")
    fashion = tune(smoke(tmp_path, study_name="fashion", register_name="auto", n_trials=1), PrepareConfig(), fashion_data)
    small_data = logged_prepared(tiny_prepared(n_val=64), "mnist")  # another validation split: not comparable
    small = tune(smoke(tmp_path, study_name="small", register_name="auto", n_trials=1), PrepareConfig(), small_data)

    assert (mnist.name, fashion.name, small.name) == ("lstm-mnist", "lstm-fashion-mnist", "lstm-mnist")
    assert mnist.champion and fashion.champion and not small.champion
    assert small.why_not_champion.startswith(f"not compared with champion version {mnist.version}, validated on other data")
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("lstm-mnist", "champion").version) == mnist.version
    assert str(client.get_model_version_by_alias("lstm-fashion-mnist", "champion").version) == fashion.version
    assert f"not the champion: {small.why_not_champion}" in capsys.readouterr().err  # the end report says why
