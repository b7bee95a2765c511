"""Optuna studies tracked in MLflow, in process: tiny studies (smoke definition, 1000 real MNIST images) on the CPU.
Trouble (failures, interruptions, lost workers, GPUs) is in test_tune_recovery.py."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

import mlflow
import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from plotly.offline import get_plotlyjs

from experiments import attributes, budget, plots, progress, registry, studies, summary
from experiments import objective as objective_module
from experiments.budget import relative_cost, typical_cost
from experiments.gpus import gpu_assignment
from experiments.job import WorkerJob
from experiments.studies import STUDIES, study_for
from experiments.tune import tune
from pipeline.config import ParameterError, PrepareConfig, TuneConfig
from pipeline.cost import forward_flops
from pipeline.data import PreparedData, save_prepared
from tests.conftest import tiny_prepared
from tests.tuning import load, runs_of, smoke


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
    best_run = attributes.RUN_ID.read(study.best_trial)
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


MNIST = {registry.DATASET_TAG: "mnist", registry.VAL_DIGEST_TAG: "a" * 64}


def test_a_study_tunes_on_a_prepared_folder(tmp_path, prepared_run):
    folder = mlflow.artifacts.download_artifacts(run_id=prepared_run, artifact_path="prepared", dst_path=str(tmp_path))
    registered = tune(smoke(tmp_path, n_trials=1), PrepareConfig(), folder)  # what --data <folder> passes, made absolute
    [trial] = runs_of("trial")
    assert trial.info.status == "FINISHED" and trial.data.tags["pipeline.data"] == folder
    assert registered and registered.trial == 0 and len(runs_of("prepare")) == 1  # the folder's own: tune prepared nothing


def test_the_champion_is_chosen_by_validation_not_by_test(tracking, tmp_path):
    client = MlflowClient()

    client.create_registered_model("m")

    def version(val: float, test: float) -> str:
        tags = {"val_accuracy": str(val), "test_accuracy": str(test), **MNIST}
        return str(client.create_model_version("m", source=str(tmp_path), tags=tags).version)

    first = version(val=0.95, test=0.90)
    assert registry.crown_if_better("m", first, 0.95, MNIST) == ""
    better_on_test_only = version(val=0.94, test=0.99)
    assert "has val_accuracy 0.9500 on the same data" in registry.crown_if_better("m", better_on_test_only, 0.94, MNIST)
    assert str(client.get_model_version_by_alias("m", "champion").version) == first
    better_on_validation = version(val=0.96, test=0.80)
    assert registry.crown_if_better("m", better_on_validation, 0.96, MNIST) == ""
    assert str(client.get_model_version_by_alias("m", "champion").version) == better_on_validation


def test_a_confirmed_version_takes_the_alias_by_its_mean_over_seeds_not_its_best_seed(tracking, tmp_path, monkeypatch):
    client = MlflowClient()
    client.create_registered_model("m")

    def register(study, pick, *args) -> tuple[str, float]:  # register_trial's tags, without a model to test
        tags = {"val_accuracy": f"{pick.val_accuracy:.6f}", **MNIST}
        if pick.val_accuracy_mean is not None:
            tags["confirm.val_accuracy_mean"] = f"{pick.val_accuracy_mean:.6f}"  # as lineage_tags writes it
        version = str(client.create_model_version("m", source=str(tmp_path), tags=tags).version)
        return registry.Registered("m", version, pick.trial.number, pick.val_accuracy, 0.9, False)

    monkeypatch.setattr(registry, "register_trial", register)
    data = PreparedData(*[None] * 3, manifest={"dataset": "mnist", "splits": {"val": {"sha256": "a" * 64}}})
    job = WorkerJob(TuneConfig(register_name="m", device="cpu"), "parent", "0", "data", "")

    def study_registers(val_accuracy: float, mean: float | None = None) -> registry.Registered:
        """A study of its own registers its pick: confirmed over 3 seeds (``mean``), or its best trial's model."""
        study = optuna.create_study(direction="maximize")
        study.add_trial(optuna.trial.create_trial(value=val_accuracy))
        confirmed = {"seed": 1, "val_accuracy_mean": mean, "n_seeds": 3} if mean is not None else {}
        pick = registry.Pick(study.trials[0], None, "uri", val_accuracy, **confirmed)
        return registry.register_best(study, pick, job, data)

    assert study_registers(0.951, mean=0.95).champion
    lucky = study_registers(0.96, mean=0.94)  # its best seed beats the champion's; its configuration does not
    assert not lucky.champion and lucky.why_not_champion == (
        "champion version 1 has mean val_accuracy over seeds 0.9500 on the same data, this one 0.9400 "
        "(means compared: both were confirmed over seeds)"
    )
    single = study_registers(0.9505)  # confirm_top=0: its own model against the champion's
    assert not single.champion and single.why_not_champion == (
        "champion version 1 has val_accuracy 0.9510 on the same data, this one 0.9505 "
        "(single models compared: this one was not confirmed over seeds)"
    )
    assert study_registers(0.952, mean=0.9501).champion
    assert str(client.get_model_version_by_alias("m", "champion").version) == "4"


@pytest.mark.parametrize(
    "other",
    [
        {registry.DATASET_TAG: "fashion-mnist", registry.VAL_DIGEST_TAG: "b" * 64},  # another dataset
        {registry.DATASET_TAG: "mnist", registry.VAL_DIGEST_TAG: "c" * 64},  # a smaller or other validation split
        {},  # registered before the data was recorded
    ],
)
def test_a_version_validated_on_other_data_never_takes_the_alias(tracking, tmp_path, other):
    client = MlflowClient()
    client.create_registered_model("m")
    champion = str(client.create_model_version("m", source=str(tmp_path), tags={"val_accuracy": "0.90", **other}).version)
    client.set_registered_model_alias("m", "champion", champion)
    challenger = str(client.create_model_version("m", source=str(tmp_path), tags={"val_accuracy": "0.99", **MNIST}).version)
    why_not = registry.crown_if_better("m", challenger, 0.99, MNIST)
    assert why_not.startswith(f"not compared with champion version {champion}, validated on other data")
    assert str(client.get_model_version_by_alias("m", "champion").version) == champion


@pytest.mark.slow
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
    assert first[2] == "time: estimated when the first epoch is timed"  # nothing trained to find out
    assert "\n[worker 0] trial 0 epoch 1/1  train_loss" in announced  # each epoch's line says whose it is
    # A finished trial says how far it trained, how long it took, and how many are done.
    assert re.search(
        r"\n\[worker 0\] trial 0 COMPLETE, 1 epoch \(\d+s\): val_accuracy 0\.\d{4} \| best 0\.\d{4} \(trial 0\) \| 1 of 2 done\n",
        announced,
    )
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
    assert attributes.SETTINGS.read(load(config))["study"] == "lstm-cpu"
    assert attributes.SETTINGS.read(load(config))["pruner"] == "hyperband"  # pruner=auto, for a new study
    first = load(config).trials[0]
    assert first.number == 0
    assert {k: first.params[k] for k in ("hidden_size", "num_layers", "learning_rate")} == {
        "hidden_size": 256,
        "num_layers": 2,
        "learning_rate": 1e-3,
    }


def test_the_search_space_is_declared_once_and_its_key_reads_as_stored_studies_hold_it():
    # The key a study stores when it is created, and a rerun must match: a study made earlier compares equal.
    assert studies.describe(STUDIES["lstm-cpu"].space) == {
        "hidden_size": "int 32..256, log",
        "num_layers": "int 1..2",
        "learning_rate": "float 3e-4..3e-2, log",
        "batch_size": "128, 256",
        "bidirectional": "false, true",
        "dropout": "float 0..0.5 when num_layers = 2",
    }
    assert studies.describe(STUDIES["lstm"].space)["dropout"] == "float 0..0.5 when num_layers > 1"
    wider = {**STUDIES["smoke"].space, "hidden_size": optuna.distributions.IntDistribution(4, 32, log=True)}
    assert studies.describe(wider)["hidden_size"] == "int 4..32, log"  # an edited range is another key
    # A trial samples exactly the declared distributions; dropout only with two layers or more.
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(30):
        trial = study.ask()
        params = studies.suggest(STUDIES["lstm"], trial)
        assert trial.distributions == {name: STUDIES["lstm"].space[name] for name in trial.distributions}
        assert ("dropout" in trial.distributions) == (params["num_layers"] > 1) and set(params) == set(STUDIES["lstm"].space)
    largest = studies.largest_configuration(STUDIES["lstm-cpu"])
    assert (largest["hidden_size"], largest["num_layers"], largest["bidirectional"]) == (256, 2, True)
    assert budget.largest_cost(STUDIES["lstm-cpu"]) == forward_flops(256, 2, True) / forward_flops(256, 2)


def test_auto_picks_the_space_by_device():
    assert study_for("auto", on_cuda=True) == "lstm" and study_for("auto", on_cuda=False) == "lstm-cpu"
    assert study_for("smoke", on_cuda=True) == "smoke"
    assert typical_cost(STUDIES["lstm-cpu"]) < 0.3 < 1 < typical_cost(STUDIES["lstm"])  # per image, against trial 0


def timed_trial(definition, params: dict, accuracies: list[float], seconds: float, state=optuna.trial.TrialState.COMPLETE):
    """A trial of ``definition``'s space that reported ``accuracies``, one an epoch, and ended ``seconds`` after it began."""
    space = definition.space
    trial = optuna.trial.create_trial(
        params=params,
        distributions={name: space[name] for name in params},
        value=accuracies[-1] if state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) else None,
        intermediate_values=dict(enumerate(accuracies, start=1)),
        state=state,
    )
    trial.datetime_start = datetime(2026, 1, 1)
    trial.datetime_complete = trial.datetime_start + timedelta(seconds=seconds)
    return trial


def test_the_estimate_comes_from_the_trials_own_timing_and_counts_enqueued_trials_at_their_size(tmp_path):
    # A warm start enqueues the earlier study's best, large configurations: scaling them by the
    # space's typical (small) trial said 7 minutes for a study that took about 30.
    definition = STUDIES["lstm-cpu"]
    small = {"hidden_size": 128, "num_layers": 1, "bidirectional": False}
    assert relative_cost(definition, small) == forward_flops(128, 1) / forward_flops(256, 2)
    assert relative_cost(definition, {}) == 1  # left-out parameters count at the baseline's value
    config = smoke(tmp_path, study="lstm-cpu", n_trials=9, epochs=2, confirm_top=1, confirm_seeds=2)
    study = optuna.create_study(direction="maximize")
    assert budget.time_left(study, config, 9, workers=1) == "time: estimated when the first epoch is timed"

    # Trial 0, the baseline, took 120 s for its 2 epochs; a small trial pruned after 1 epoch took
    # its relative cost of 60 s: one epoch of the baseline takes 60 s here.
    study.add_trial(timed_trial(definition, definition.baseline, [0.8, 0.9], 120))
    study.add_trial(timed_trial(definition, small, [0.5], 60 * relative_cost(definition, small), optuna.trial.TrialState.PRUNED))
    assert budget.epoch_time(definition, study.trials, epochs=2).of(1.0) == pytest.approx(60)
    for _ in range(6):
        study.enqueue_trial(definition.baseline)  # as large as trial 0: 2 min each
    # 6 baselines and one typical trial of 2 epochs; then the best configuration (the baseline)
    # with 2 seeds: 4 min. Two workers on this machine share the work.
    search = math.ceil((6 + typical_cost(definition)) * 2)
    assert budget.time_left(study, config, 7, workers=1) == (
        f"time: about {search} min here for the 7 trial(s) left if none is pruned, then about 4 min to confirm "
        "(the baseline takes 60 s an epoch here, by the trials' timing so far)"
    )
    assert "about 7 min here for the 7 trial(s) left if none is pruned, then about 2 min to confirm" in budget.time_left(
        study, config, 7, workers=2
    )


def test_each_finished_trial_says_how_far_it_trained_how_long_it_took_and_how_many_are_done(capsys):
    definition = STUDIES["lstm-cpu"]
    study = optuna.create_study(direction="maximize")
    study.add_trial(timed_trial(definition, definition.baseline, [0.85 + 0.005 * e for e in range(12)], 484))
    pruned = timed_trial(definition, {"hidden_size": 40}, [0.80, 0.84, 0.861], 72, optuna.trial.TrialState.PRUNED)
    study.add_trial(pruned)
    progress.say_done(study, study.trials[0], worker=1, n_trials=60)
    progress.say_done(study, study.trials[1], worker=0, n_trials=60)
    assert capsys.readouterr().err.splitlines() == [
        "[worker 1] trial 0 COMPLETE, 12 epochs (8m04s): val_accuracy 0.9050 | best 0.9050 (trial 0) | 2 of 60 done",
        "[worker 0] trial 1 PRUNED at epoch 3 (1m12s): val_accuracy 0.8610 | best 0.9050 (trial 0) | 2 of 60 done",
    ]


def test_a_budget_starts_a_trial_only_if_it_and_the_champions_confirmation_end_in_time_at_worst(tmp_path):
    definition = STUDIES["lstm-cpu"]
    config = smoke(tmp_path, study="lstm-cpu", epochs=2, confirm_top=2, confirm_seeds=3, budget=3600)
    study = optuna.create_study(direction="maximize")
    assert budget.another_trial_fits(study, config, time.time() + 1)  # nothing timed yet: trial 0 starts
    study.add_trial(timed_trial(definition, definition.baseline, [0.8, 0.9], 120))  # 2 epochs in 120 s
    assert budget.run_seconds(study, config, definition.baseline) == pytest.approx(120)
    largest = budget.run_seconds(study, config)  # the space's largest configuration: bidirectional, 2 layers, wide
    assert largest == pytest.approx(budget.largest_cost(definition) * 120) and largest > 2 * 120
    worst = 4 * largest  # that trial, then its confirmation with 3 seeds
    assert budget.another_trial_fits(study, config, time.time() + worst + 60)
    assert not budget.another_trial_fits(study, config, time.time() + worst - 60)
    unconfirmed = dataclasses.replace(config, confirm_top=0)  # the trial alone
    assert budget.another_trial_fits(study, unconfirmed, time.time() + largest + 60)
    # Two workers on this machine confirm two seeds at a time: the trial, then 2 rounds for 3 seeds.
    assert budget.another_trial_fits(study, config, time.time() + 3 * largest + 60, workers=2)
    assert not budget.another_trial_fits(study, config, time.time() + 3 * largest - 60, workers=2)


def test_a_small_trials_fixed_cost_per_epoch_does_not_make_the_largest_configuration_look_slower(tmp_path):
    # The baseline takes 42 s an epoch, a small 1-layer trial 3.4 s, mostly fixed cost: its seconds
    # over its relative cost (about 0.01) would make the baseline's epoch minutes long, and a 2-hour
    # budget would stop the study after those 2 trials.
    definition = STUDIES["lstm-cpu"]
    config = smoke(tmp_path, study="lstm-cpu", epochs=12, confirm_top=3, confirm_seeds=3, budget=7200)
    study = optuna.create_study(direction="maximize")
    small = {"hidden_size": 32, "num_layers": 1, "bidirectional": False}

    def finished(params: dict, seconds: float) -> None:
        study.add_trial(timed_trial(definition, params, [0.9] * 12, seconds))

    finished(definition.baseline, 504)
    finished(small, 41)
    timing = budget.epoch_time(definition, study.trials, epochs=12)
    assert timing.of(1.0) == pytest.approx(42) and timing.of(relative_cost(definition, small)) == pytest.approx(41 / 12)
    assert timing.overhead > 0.85 * 41 / 12  # the small trial's epoch is almost all fixed cost
    largest = 12 * timing.of(budget.largest_cost(definition))  # 256 hidden in 2 layers, both ways: about 21 min
    assert budget.run_seconds(study, config) == pytest.approx(largest) and largest < 22 * 60
    assert budget.another_trial_fits(study, config, time.time() + 111 * 60, workers=2)  # 9 minutes into a 2-hour budget
    # Points that give no line with a positive overhead (the smaller trial the slower): the line through zero.
    finished(small, 3600)
    assert budget.epoch_time(definition, study.trials, epochs=12).overhead == 0


def test_a_running_trials_reported_epochs_count_in_the_timing(tmp_path):
    # A small trial (37 hidden, 4.7 s an epoch, mostly fixed cost) finishes while trial 0, the
    # baseline, is in its second epoch: on the small trial's timing alone the baseline's epoch
    # would take 187 s (it takes 39), and a 2-hour budget would hold a worker idle.
    definition = STUDIES["lstm-cpu"]
    config = smoke(tmp_path, study="lstm-cpu", epochs=12, confirm_top=3, confirm_seeds=3, budget=7200)
    space, study = definition.space, optuna.create_study(direction="maximize")
    small = {"hidden_size": 37, "num_layers": 2, "bidirectional": False}
    trial = timed_trial(definition, small, [0.87] * 12, 56.75)
    study.add_trial(trial)
    alone = budget.epoch_time(definition, study.trials, epochs=12)
    assert alone.of(1.0) > 180  # the line through zero: the small trial's fixed cost scaled up
    assert not budget.another_trial_fits(study, config, time.time() + 119 * 60, workers=2)

    running = optuna.trial.create_trial(
        params=definition.baseline,
        distributions={name: space[name] for name in definition.baseline},
        intermediate_values={1: 0.83},
        state=optuna.trial.TrialState.RUNNING,
    )
    running.datetime_start = datetime.now() - timedelta(seconds=57)  # one epoch reported, the second under way
    study.add_trial(running)
    timing = budget.epoch_time(definition, study.trials, epochs=12)
    assert timing.of(1.0) == pytest.approx(57, rel=0.05)  # its time so far over its one reported epoch
    assert timing.of(relative_cost(definition, small)) == pytest.approx(56.75 / 12, rel=0.05)
    assert budget.another_trial_fits(study, config, time.time() + 119 * 60, workers=2)
    # A running trial with no epoch reported yet says nothing about its speed.
    running.intermediate_values.clear()
    assert budget.epoch_time(definition, [trial, running], epochs=12) == alone


@pytest.mark.slow
def test_a_study_over_budget_starts_no_more_trials_and_still_confirms_its_champion(tmp_path, prepared_run, monkeypatch, capsys):
    monkeypatch.setattr(budget, "largest_cost", lambda definition: 1e6)  # any next trial would take days
    config = smoke(tmp_path, n_trials=3, confirm_top=2, confirm_seeds=2, budget=3600)
    registered = tune(config, PrepareConfig(), prepared_run)
    assert [t.number for t in load(config).trials] == [0]  # timed by trial 0, nothing more fits
    assert registered.trial == 0 and registered.n_seeds == 2 and registered.champion  # its confirmation still ran
    err = capsys.readouterr().err
    assert "budget: 60 min for this command" in err
    # Said once, before the confirmation's runs: the search ended by the budget, not by n_trials.
    ended = "[worker 0] -P budget ends the search at 1 trial(s): another, at worst the space's largest configuration"
    assert err.count(ended) == 1 and err.index(ended) < err.index("[confirm]")


def test_a_cpu_machine_runs_one_worker_by_default(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_assignment(smoke(tmp_path, device="auto")) == [None]
    assert smoke(tmp_path).n_workers == "auto" and TuneConfig().n_workers == "auto"
    with pytest.raises(ParameterError, match="n_workers='0' is not allowed: must be auto or an integer from 1 to 64"):
        smoke(tmp_path, n_workers="0")


# --- warm starts ----------------------------------------------------------------------------------


def test_the_learning_curves_read_with_dozens_of_trials(tmp_path):
    # 35 trials: Optuna's PNG gives each its colour and legend entry, a legend taller than the plot.
    # One colour per outcome, the best trial labelled, a diverged trial off the chart.
    study = optuna.create_study(study_name="hb", direction="maximize")
    for number in range(35):
        pruned = number % 2 == 1
        curve = [0.80 + 0.01 * epoch + 0.0001 * number for epoch in range(3 if pruned else 12)]
        if number == 4:
            curve = [0.10] * 12  # diverged
        study.add_trial(
            optuna.trial.create_trial(
                value=None if pruned else curve[-1],
                intermediate_values=dict(enumerate(curve, start=1)),
                state=optuna.trial.TrialState.PRUNED if pruned else optuna.trial.TrialState.COMPLETE,
            )
        )
    axes = plots.learning_curves(study)
    assert [text.get_text() for text in axes.get_legend().get_texts()] == [
        "complete",
        "pruned, stopped at the x",
        "best: trial 34 (0.9134)",
    ]
    assert len([line for line in axes.lines if len(line.get_xdata()) > 1]) == 35 + 1  # the best drawn again, on top
    assert axes.get_ylim()[0] > 0.5 and axes.get_title() == "hb: 35 trials (18 complete, 17 pruned); 1 dip below the chart"
    summary.log_study_plots(study, tmp_path)
    assert (tmp_path / "intermediate_values.png").stat().st_size > 10_000


def test_the_contour_plot_shows_the_two_parameters_that_matter_most(tmp_path):
    """The GPU study's space has six parameters: the contour is the pair that decides val_accuracy, one
    readable panel, where Optuna's default is every pair (a 6 x 6 grid of panels)."""
    space = STUDIES["lstm"].space
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(30):
        trial = study.ask(space)  # only the learning rate and the depth count; the other four change nothing
        study.tell(trial, 0.9 - abs(math.log10(trial.params["learning_rate"]) + 3) / 10 - 0.05 * trial.params["num_layers"])
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    assert sorted(plots.most_important(study, evaluator)) == ["learning_rate", "num_layers"]
    plots.log_study_plots(study, tmp_path)
    contour = (tmp_path / "study.html").read_text().split("<h2>contour</h2>")[1]
    assert '"xaxis2"' not in contour and "learning_rate" in contour and "num_layers" in contour and "dropout" not in contour
    assert (tmp_path / "contour.png").exists()
    few = optuna.create_study()
    x = optuna.distributions.FloatDistribution(0, 2)
    few.add_trial(optuna.trial.create_trial(params={"x": 1.0}, distributions={"x": x}, value=1))
    assert plots.most_important(few, evaluator) == ["x"]  # two parameters or fewer: all of them, nothing to rank


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
    page = (tmp_path / "study.html").read_text()  # the axes say what is plotted
    assert "Objective Value" not in page and page.count('"text":"val_accuracy"') >= 4


def test_a_trial_that_ties_the_best_logs_its_model(tracking, monkeypatch):
    """Two parallel trials reach the same val_accuracy; the one told second may have the earlier
    number, which the champion's rule picks among equals: it must have its model too."""
    study = optuna.create_study(direction="maximize")
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=0.9))  # finished first, with a model
    result = type("Result", (), {"best_val_accuracy": 0.9, "model": None})()
    monkeypatch.setattr(objective_module, "train_and_log", lambda *args, **kwargs: (result, None))
    logged = type("Logged", (), {"model_uri": "models:/m-tie", "model_id": "m-tie"})()
    monkeypatch.setattr(objective_module, "log_trained_model", lambda *args: logged)
    monkeypatch.setattr(objective_module.mlflow, "log_metric", lambda *args, **kwargs: None)  # no model m-tie to link to
    config = TuneConfig(study="smoke", study_name="ties", device="cpu")
    job = WorkerJob(config, mlflow.MlflowClient().create_run("0").info.run_id, "0", "data", "folder")
    trial = study.ask()
    assert objective_module.objective(trial, job, tiny_prepared()) == 0.9
    assert attributes.MODEL_URI.read(study.trials[-1]) == "models:/m-tie"


def logged_prepared(data: PreparedData, dataset: str) -> str:
    """A prepare run holding ``data`` as ``dataset``, as `mlflow run -e prepare` leaves one; its id."""
    folder = Path(tempfile.mkdtemp()) / "prepared"
    save_prepared(folder, {"train": data.train, "val": data.val, "test": data.test}, {"dataset": dataset, "seed": 0})
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(folder), "prepared")
    return run.info.run_id


@pytest.mark.slow
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
