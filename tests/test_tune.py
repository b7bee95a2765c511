"""Optuna studies tracked in MLflow: tiny studies (smoke definition, 1000 real MNIST images) on the CPU."""

from __future__ import annotations

import socket
import subprocess

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.storages import RetryHeartbeatStaleTrialCallback

from experiments import tune as tune_module
from experiments.studies import STUDIES
from experiments.tune import register, tune
from pipeline import prepare
from pipeline.config import ParameterError, PrepareConfig, TuneConfig
from pipeline.training import TrainingDiverged


@pytest.fixture
def prepared_run(tracking, mnist_dir) -> str:
    prepare.main(["--data-dir", str(mnist_dir), "--train-limit", "1000", "--val-size", "500"])
    [run] = MlflowClient().search_runs(["0"])
    return run.info.run_id


def smoke(tmp_path, **overrides) -> TuneConfig:
    settings = {"study": "smoke", "study_name": "tiny", "storage": str(tmp_path / "studies.journal"), "n_trials": 3,
                "epochs": 1, "device": "cpu", "register_name": "tiny-lstm"}
    return TuneConfig(**{**settings, **overrides})


def runs_of(stage: str):
    return MlflowClient().search_runs(["0"], filter_string=f"tags.`pipeline.stage` = '{stage}'")


def load(config: TuneConfig) -> optuna.Study:
    return optuna.load_study(study_name=config.study_name, storage=tune_module.open_storage(config))


def test_a_tiny_study_is_one_parent_with_a_child_per_trial(tmp_path, prepared_run):
    config = smoke(tmp_path)
    summary = tune(config, PrepareConfig(), prepared_run)

    [parent] = runs_of("tune")
    trials = runs_of("trial")
    assert parent.info.status == "FINISHED" and len(trials) == 3
    assert {run.data.tags["mlflow.parentRunId"] for run in trials} == {parent.info.run_id}
    assert sorted(run.data.tags["optuna.trial_number"] for run in trials) == ["0", "1", "2"]
    assert all(run.info.status == "FINISHED" and run.data.tags["optuna.trial_state"] == "COMPLETE" for run in trials)
    assert all([m.step for m in MlflowClient().get_metric_history(run.info.run_id, "val_accuracy")] == [1] for run in trials)

    study = load(config)
    assert study.trials[0].params == {k: v for k, v in STUDIES["smoke"].baseline.items() if k in study.trials[0].params}
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(study.best_value)
    assert parent.data.params["study_name"] == "tiny" and parent.data.params["sampler"] == "tpe"
    artifacts = {f.path for f in MlflowClient().list_artifacts(parent.info.run_id)}
    assert {"leaderboard.csv", "leaderboard.html", "plots"} <= artifacts
    plots = {f.path for f in MlflowClient().list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/optimization_history.html", "plots/optimization_history.png"} <= plots

    # The best parameters were retrained, evaluated once on the test set, registered and crowned.
    version = MlflowClient().get_model_version_by_alias("tiny-lstm", "champion")
    assert version.version == 1 and summary["champion"] is True
    assert float(version.tags["test_accuracy"]) == pytest.approx(summary["test_accuracy"], abs=1e-6)
    [evaluation] = runs_of("evaluate")
    assert evaluation.data.tags["mlflow.parentRunId"] == parent.info.run_id

    # A worse model is registered but does not take the alias; a better one does.
    assert register(version.source, config, test_accuracy=0.0) == (2, False)
    assert MlflowClient().get_model_version_by_alias("tiny-lstm", "champion").version == 1
    assert register(version.source, config, test_accuracy=1.0) == (3, True)
    assert MlflowClient().get_model_version_by_alias("tiny-lstm", "champion").version == 3


def test_the_default_study_starts_with_the_tutorial_configuration(tmp_path, prepared_run):
    config = smoke(tmp_path, study="lstm", n_trials=1)
    tune(config, PrepareConfig(), prepared_run)
    first = load(config).trials[0]
    assert first.number == 0
    assert {k: first.params[k] for k in ("hidden_size", "num_layers", "learning_rate")} == {
        "hidden_size": 256, "num_layers": 2, "learning_rate": 1e-3}


def test_pruned_trials_end_killed(tmp_path, prepared_run):
    config = smoke(tmp_path, epochs=2, n_trials=2)
    # No accuracy reaches 1.01, so this pruner must stop every trial at its first report.
    summary = tune(config, PrepareConfig(), prepared_run, pruner=optuna.pruners.ThresholdPruner(lower=1.01))
    assert summary["pruned_trials"] == 2 and summary["complete_trials"] == 0
    for run in runs_of("trial"):
        assert run.info.status == "KILLED" and run.data.tags["optuna.trial_state"] == "PRUNED"
        assert len(MlflowClient().get_metric_history(run.info.run_id, "val_accuracy")) == 1  # stopped after epoch 1


def test_a_failed_trial_is_recorded_and_the_study_goes_on(tmp_path, prepared_run, monkeypatch):
    real = tune_module.train_and_log
    calls = []

    def diverge_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise TrainingDiverged("train_loss is nan in epoch 1")
        return real(*args, **kwargs)

    monkeypatch.setattr(tune_module, "train_and_log", diverge_once)
    summary = tune(smoke(tmp_path), PrepareConfig(), prepared_run)
    assert (summary["failed_trials"], summary["complete_trials"]) == (1, 2)
    [failed] = [run for run in runs_of("trial") if run.info.status == "FAILED"]
    assert failed.data.tags["optuna.trial_state"] == "FAIL"
    assert "TrainingDiverged: train_loss is nan" in failed.data.tags["optuna.fail_reason"]


def test_rerunning_continues_the_study_under_the_same_parent(tmp_path, prepared_run, capsys):
    tune(smoke(tmp_path, n_trials=2), PrepareConfig(), prepared_run)
    tune(smoke(tmp_path, n_trials=4), PrepareConfig(), prepared_run)  # n_trials counts the whole study
    assert [t.number for t in load(smoke(tmp_path)).trials] == [0, 1, 2, 3]
    [parent] = runs_of("tune")
    assert parent.info.status == "FINISHED"
    assert sorted(run.data.tags["optuna.trial_number"] for run in runs_of("trial")) == ["0", "1", "2", "3"]
    assert len(runs_of("evaluate")) == 2  # each new result was retrained and evaluated

    capsys.readouterr()
    summary = tune(smoke(tmp_path, n_trials=4), PrepareConfig(), prepared_run)  # nothing left to do
    assert summary == {"trials": 4, "summarised_here": False} and len(runs_of("trial")) == 4
    assert len(runs_of("evaluate")) == 2


def test_a_trial_whose_worker_died_is_failed_and_retried_when_the_study_resumes(tmp_path, prepared_run):
    config = smoke(tmp_path, n_trials=2)
    tune(config, PrepareConfig(), prepared_run)
    # A worker of this machine died mid-trial: its trial and its MLflow run were left RUNNING.
    dead = subprocess.Popen(["true"])
    dead.wait()
    study = load(config)
    orphan = study.ask(study.trials[0].distributions)  # sampled like any trial of the study
    child = MlflowClient().create_run("0", tags={"pipeline.stage": "trial", "optuna.trial_number": str(orphan.number)})
    orphan.set_user_attr("worker", f"{socket.gethostname()}:{dead.pid}")
    orphan.set_user_attr("mlflow_run_id", child.info.run_id)

    tune(smoke(tmp_path, n_trials=3), PrepareConfig(), prepared_run)
    trials = load(config).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE"]
    retry = trials[3]
    assert RetryHeartbeatStaleTrialCallback.retried_trial_number(retry) == orphan.number
    assert retry.params == trials[2].params  # the same parameters, run again
    orphan_run = MlflowClient().get_run(child.info.run_id)
    assert orphan_run.info.status == "FAILED" and "stopped while running it" in orphan_run.data.tags["optuna.fail_reason"]
    assert not [run for run in runs_of("trial") if run.info.status == "RUNNING"]


def test_two_worker_processes_share_one_study(tmp_path, prepared_run):
    config = smoke(tmp_path, n_trials=4, n_workers=2)
    tune(config, PrepareConfig(), prepared_run)
    numbers = [t.number for t in load(config).trials]
    assert sorted(numbers) == [0, 1, 2, 3]
    trials = runs_of("trial")
    assert sorted(run.data.tags["optuna.trial_number"] for run in trials) == ["0", "1", "2", "3"]
    [parent] = runs_of("tune")
    assert {run.data.tags["mlflow.parentRunId"] for run in trials} == {parent.info.run_id}


def test_passwords_stay_out_of_the_logged_storage():
    assert tune_module.public_storage("postgresql://optuna:s3cret@db:5432/studies") == "postgresql://optuna:***@db:5432/studies"
    assert tune_module.public_storage("studies.journal") == "studies.journal"
    with pytest.raises(ParameterError, match=r"storage=postgresql://\.\.\. holds a password") as refused:
        tune_module.check_storage("postgresql://optuna:s3cret@db:5432/studies")
    assert "s3cret" not in str(refused.value)
    tune_module.check_storage("postgresql://optuna@db:5432/studies")  # PGPASSWORD or ~/.pgpass
    tune_module.check_storage("postgresql://optuna:${OPTUNA_DB_PASSWORD}@db:5432/studies")  # read from the environment
