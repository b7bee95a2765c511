"""Budgets that fit the question (hyperband over epochs, pruner=auto) and a champion confirmed over
seeds: tiny studies (smoke definition, 1000 real MNIST images) on the CPU."""

from __future__ import annotations

import dataclasses
import re
import time
from datetime import datetime, timedelta

import mlflow
import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from experiments import attributes, budget, confirm, summary
from experiments import objective as objective_module
from experiments.job import WorkerJob
from experiments.studies import STUDIES, make_pruner, min_epochs, resolve_pruner, rungs
from experiments.trials import best_configurations
from experiments.tune import tune
from pipeline import prepare
from pipeline.config import ParameterError, PrepareConfig
from pipeline.tables import with_spread
from tests.conftest import tiny_prepared
from tests.test_tune import load, runs_of, smoke


@pytest.fixture
def prepared_run(tracking, mnist_dir, monkeypatch) -> str:
    """tests/test_tune.py's: 1000 real MNIST images, prepared. Without Optuna's plots (seconds a summary)."""
    monkeypatch.setattr(summary, "log_study_plots", lambda study, folder: None)
    prepare.main(["--data-dir", str(mnist_dir), "--train-limit", "1000", "--val-size", "500"])
    [run] = MlflowClient().search_runs(["0"])
    return run.info.run_id


# --- budgets that fit the question ----------------------------------------------------------------


def test_hyperband_spends_epochs_on_the_promising_and_judges_after_a_few():
    assert (min_epochs(12), rungs(12)) == (3, [3, 9])  # judged after 3 epochs, then 9; 12 = the study's epochs
    assert (min_epochs(3), rungs(3)) == (1, [1]) and rungs(1) == []
    pruner = make_pruner("hyperband", 12)
    assert isinstance(pruner, optuna.pruners.HyperbandPruner)
    assert (pruner._min_resource, pruner._max_resource, pruner._reduction_factor) == (3, 12, 3)  # noqa: SLF001


def test_pruner_auto_is_hyperband_for_a_new_study_and_the_studys_own_after():
    assert resolve_pruner("auto", None, multi_objective=False) == "hyperband"
    assert resolve_pruner("auto", {"pruner": "median"}, multi_objective=False) == "median"  # made before auto existed
    assert resolve_pruner("median", None, multi_objective=False) == "median"
    assert resolve_pruner("auto", None, multi_objective=True) == "none" == resolve_pruner("hyperband", None, True)


def test_a_study_made_with_the_median_pruner_extends_with_the_default_and_refuses_another(tmp_path, prepared_run):
    tune(smoke(tmp_path, n_trials=1, pruner="median"), PrepareConfig(), prepared_run)
    tune(smoke(tmp_path, n_trials=2, pruner="auto"), PrepareConfig(), prepared_run)  # the default: its own pruner
    assert len(load(smoke(tmp_path)).trials) == 2 and attributes.SETTINGS.read(load(smoke(tmp_path)))["pruner"] == "median"
    with pytest.raises(ParameterError, match=r"created with pruner=median \(this command: hyperband\)"):
        tune(smoke(tmp_path, n_trials=3, pruner="hyperband"), PrepareConfig(), prepared_run)


def test_a_trial_is_never_pruned_after_its_last_epoch(tmp_path, prepared_run):
    """Nothing is left to save then: it completes, with its value, whatever the pruner says."""
    config = smoke(tmp_path, epochs=1, n_trials=1)
    tune(config, PrepareConfig(), prepared_run, pruner=optuna.pruners.ThresholdPruner(lower=1.01))
    assert [t.state.name for t in load(config).trials] == ["COMPLETE"]


# --- a champion confirmed over seeds --------------------------------------------------------------


def runs_table(rows: list[tuple[int, int, float]]) -> pd.DataFrame:
    return pd.DataFrame([confirm.SeedRun(t, s, f"run-{t}-{s}", v, f"models:/m-{t}-{s}") for t, s, v in rows])


def test_the_champion_is_the_best_mean_over_seeds_not_the_luckiest_run():
    study = optuna.create_study(direction="maximize")
    distributions = {"hidden_size": optuna.distributions.IntDistribution(4, 16)}
    for hidden, value in [(16, 0.95), (8, 0.93), (8, 0.93), (4, 0.80)]:  # trial 2 re-ran trial 1's parameters
        study.add_trial(optuna.trial.create_trial(params={"hidden_size": hidden}, distributions=distributions, value=value))
    assert [t.number for t in best_configurations(study, 3)] == [0, 1, 3]  # one per configuration
    # Trial 0 was the best single run; over seeds its configuration is the worse one.
    runs = runs_table([(0, 1, 0.90), (0, 2, 0.97), (0, 3, 0.88), (1, 1, 0.94), (1, 2, 0.93), (1, 3, 0.95)])
    table = confirm.confirmation_table(study, runs)
    assert table["trial"].tolist() == [1, 0] and table["hidden_size"].tolist() == [8, 16]
    assert table["val_accuracy_mean"].tolist() == pytest.approx([0.94, 0.9167], abs=1e-4)
    assert table["val_accuracy_std"].tolist() == pytest.approx([pd.Series([0.94, 0.93, 0.95]).std(), 0.0473], abs=1e-4)
    assert table["n_seeds"].tolist() == [3, 3]
    assert confirm.champion_run(runs, table) == confirm.SeedRun(1, 3, "run-1-3", 0.95, "models:/m-1-3")  # its best seed
    assert with_spread(table)["val_accuracy"].tolist() == ["0.9400 ± 0.0100", "0.9167 ± 0.0473"]


def study_of(trials: list[tuple[int, float, float]]) -> optuna.Study:
    """A smoke study of complete trials, each (hidden_size, val_accuracy, minutes it took)."""
    study = optuna.create_study(direction="maximize")
    space = STUDIES["smoke"].space
    for hidden, value, minutes in trials:
        params = {"hidden_size": hidden, "learning_rate": 0.01}
        trial = optuna.trial.create_trial(params=params, distributions={name: space[name] for name in params}, value=value)
        trial.datetime_start = datetime(2026, 1, 1)
        trial.datetime_complete = trial.datetime_start + timedelta(minutes=minutes)
        study.add_trial(trial)
    return study


def test_a_budget_confirms_the_best_configuration_and_the_next_ones_only_while_they_fit(tracking, tmp_path, monkeypatch, capsys):
    study = study_of([(16, 0.95, 4), (4, 0.94, 1), (8, 0.93, 100)])
    queue = optuna.create_study(direction="maximize")
    monkeypatch.setattr(confirm, "reused", lambda *args: None)
    with mlflow.start_run() as parent:
        pass
    config = smoke(tmp_path, confirm_top=3, confirm_seeds=2, budget=3600)
    # 15 minutes left: the best (2 runs of 4 min) and the next (2 of 1 min) fit, the third (2 of 100) does not.
    job = WorkerJob(config, parent.info.run_id, "0", "data", "", deadline=time.time() + 15 * 60)
    confirm.plan(study, queue, job, tiny_prepared())
    queued = [attributes.WORK.read(item) for item in queue.get_trials(states=(optuna.trial.TrialState.WAITING,))]
    assert [[item["trial"], item["seed"]] for item in queued] == [[0, 1], [0, 2], [1, 1], [1, 2]]
    assert attributes.CONFIRM_PLAN.read(queue) == {"at": 3, "runs": [{k: v for k, v in i.items() if k != "at"} for i in queued]}
    assert (
        "trial 2's configuration left out: with its 2 runs the confirmation takes about 210 min, and 15 min of -P budget "
        "are left" in capsys.readouterr().err
    )
    confirm.plan(study, queue, job, tiny_prepared())  # planned once per round, whoever asks again
    assert len(queue.trials) == 4
    # 9 minutes: one run at a time, the next no longer fits (10 min); two at a time, it does (5 min).
    best = best_configurations(study, 3)
    assert [t.number for t in budget.fitting(best, config, time.time() + 9 * 60)] == [0]
    assert [t.number for t in budget.fitting(best, config, time.time() + 9 * 60, processes=2)] == [0, 1]
    assert [t.number for t in budget.fitting(best, config, time.time() + 60)] == [0]  # the best, even over budget
    assert budget.makespan([3, 3, 2, 2, 2], 2) == 7 and budget.makespan([3, 3, 2, 2, 2], 1) == 12


def fake_accuracy(monkeypatch, module, accuracy) -> list:
    """Train for real (a model to register and test), but report ``accuracy(config)`` as the best
    val_accuracy, so that a test decides which trial and which seed look best."""
    real, trained = module.train_and_log, []

    def train_and_log(config, data, **kwargs):
        result, model = real(config, data, **kwargs)
        value = accuracy(config)
        mlflow.log_metric("best_val_accuracy", value, step=1)  # the run's latest value, as a reused run is read
        trained.append((config.learning_rate, config.seed))
        return dataclasses.replace(result, best_val_accuracy=value), model

    monkeypatch.setattr(module, "train_and_log", train_and_log)
    return trained


CONFIRM_LINE = r"\[confirm\] trial (\d)'s configuration, seed (\d): val_accuracy (0\.\d{4}) \(run \w+; (.+)\)"


@pytest.mark.slow
def test_a_confirmed_study_registers_the_best_mean_configuration_and_reuses_its_runs(tmp_path, prepared_run, monkeypatch, capsys):
    baseline = 1e-2  # trial 0's learning rate (the smoke study's baseline); trial 1 samples another
    fake_accuracy(monkeypatch, objective_module, lambda config: 0.95 if config.learning_rate == baseline else 0.93)
    seeds = {True: {1: 0.90, 2: 0.91}, False: {1: 0.94, 2: 0.93}}  # trial 0's configuration: worse over seeds
    trained = fake_accuracy(monkeypatch, confirm, lambda config: seeds[config.learning_rate == baseline][config.seed])
    config = smoke(tmp_path, n_trials=2, confirm_top=2, confirm_seeds=2)
    registered = tune(config, PrepareConfig(), prepared_run)

    study = load(config)
    assert study.best_trial.number == 0  # the best single trial ...
    assert (registered.trial, registered.seed) == (1, 1)  # ... is not the champion: trial 1's configuration, seed 1
    assert registered.val_accuracy == 0.94 and registered.val_accuracy_mean == pytest.approx(0.935) and registered.champion
    assert registered.n_seeds == 2 and registered.val_accuracy_std == pytest.approx(pd.Series([0.94, 0.93]).std())
    client = MlflowClient()
    [parent] = runs_of("tune")
    confirmed = {(r.data.tags["optuna.trial_number"], r.data.params["seed"]): r for r in runs_of("confirm")}
    assert sorted(confirmed) == [("0", "1"), ("0", "2"), ("1", "1"), ("1", "2")]
    assert {r.data.tags["mlflow.parentRunId"] for r in confirmed.values()} == {parent.info.run_id}
    for (number, _), run in confirmed.items():  # each trained its trial's configuration
        assert run.data.params["learning_rate"] == str(study.trials[int(number)].params["learning_rate"])
    # The registered version is the confirm run's own model; tested once, that version only.
    version = client.get_model_version_by_alias("tiny-lstm", "champion")
    assert version.run_id == confirmed[("1", "1")].info.run_id and version.tags["confirm.seed"] == "1"
    assert version.tags["val_accuracy"] == "0.940000" and version.tags["confirm.val_accuracy_mean"] == "0.935000"
    assert "trained again with seed 1" in version.description
    # Tested once each, after the choice: the registered version and the configuration's other seed model.
    evaluations = {r.data.tags["pipeline.model"]: r.data.metrics["test_accuracy"] for r in runs_of("evaluate")}
    seed_2_model = confirmed[("1", "2")].data.tags["confirm.model_uri"]
    assert sorted(evaluations) == sorted([f"models:/tiny-lstm/{version.version}", seed_2_model])
    # The parent run holds the table, mean ± std per configuration, best mean first; and so does the end report.
    table = mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/confirmation.md")
    assert table.index("0.9350 ± 0.0071") < table.index("0.9050 ± 0.0071")
    assert "confirmation.json" in {f.path for f in client.list_artifacts(parent.info.run_id)}
    parent = client.get_run(parent.info.run_id)
    assert parent.data.metrics["confirmed_val_accuracy_mean"] == pytest.approx(0.935)
    assert parent.data.metrics["confirmed_test_accuracy_mean"] == pytest.approx(pd.Series(evaluations).mean())
    assert parent.data.metrics["confirmed_test_accuracy_std"] == pytest.approx(pd.Series(evaluations).std())
    assert parent.data.tags["confirmed.trial_number"] == "1" and parent.data.tags["best.trial_number"] == "0"
    err = capsys.readouterr().err
    assert "confirm: the best 2 configurations train again with seeds 1 to 2 (4 runs of 1 epochs)" in err
    assert "from trial 1's configuration, seed 1 (mean val_accuracy 0.9350 ± 0.0071 over 2 seeds)" in err
    assert "test_accuracy of the champion configuration's 2 models, each tested once after the choice: seed 1 " in err
    # Each confirm run is said as it ends, with how many are done: the confirmation can take an hour.
    assert re.findall(CONFIRM_LINE, err) == [
        ("0", "1", "0.9000", "1 of 4 trained"),
        ("0", "2", "0.9100", "2 of 4 trained"),
        ("1", "1", "0.9400", "3 of 4 trained"),
        ("1", "2", "0.9300", "4 of 4 trained"),
    ]

    # Extended by a worse trial: the same two configurations, their runs reused, nothing registered again.
    trained.clear()
    again = tune(dataclasses.replace(config, n_trials=3), PrepareConfig(), prepared_run)
    assert trained == [] and len(runs_of("confirm")) == 4
    said = re.findall(
        r"\[confirm\] trial \d's configuration, seed \d: val_accuracy 0\.\d{4} \(run \w+; (.+)\)", capsys.readouterr().err
    )
    assert said == ["reused: trained before"] * 4
    assert (again.version, again.trial, again.seed) == (registered.version, 1, 1) and len(runs_of("evaluate")) == 2
