"""The research questions of README.md, as studies in process: a warm start from an earlier
study's best, and accuracy against a cost (parameter count, latency) with its Pareto front."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from types import SimpleNamespace

import mlflow
import optuna
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from experiments import coordination, pareto, summary, warm_start
from experiments import trials as trials_module
from experiments.coordination import NextStep
from experiments.studies import STUDIES
from experiments.tune import tune
from pipeline.config import ParameterError, PrepareConfig, TuneConfig
from tests.tuning import load, runs_of, smoke


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


def earlier_study(tmp_path) -> optuna.Study:
    """Study "first" in the smoke storage: four results of the smoke space, trials 1, 2, 0, 3 best first."""
    first = smoke(tmp_path, study_name="first")
    earlier = optuna.create_study(study_name="first", storage=coordination.open_storage(first), direction="maximize")
    space = {
        "hidden_size": optuna.distributions.IntDistribution(4, 16, log=True),
        "learning_rate": optuna.distributions.FloatDistribution(1e-3, 3e-2, log=True),
    }
    for value, hidden, lr in [(0.5, 8, 0.01), (0.7, 12, 0.02), (0.6, 5, 0.003), (0.4, 16, 0.001)]:  # an earlier study's results
        params = {"hidden_size": hidden, "learning_rate": lr}
        earlier.add_trial(optuna.trial.create_trial(params=params, distributions=space, value=value))
    return earlier


@pytest.mark.slow
def test_a_warm_started_study_begins_from_the_earlier_studys_best_trials_once(tmp_path, prepared_run, capsys, monkeypatch):
    monkeypatch.setattr(summary, "log_study_plots", lambda study, folder: None)  # seconds each, and not what is tested
    first = smoke(tmp_path, study_name="first")
    earlier = earlier_study(tmp_path)
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


def test_enqueued_configurations_count_inside_n_trials_and_a_lost_trial_frees_its_place():
    study = optuna.create_study(direction="maximize")
    for learning_rate in (0.01, 0.02, 0.03, 0.04):  # trial 0 and a warm start of three
        study.enqueue_trial({"learning_rate": learning_rate})
    space = {"learning_rate": optuna.distributions.FloatDistribution(1e-3, 3e-2)}
    for _ in range(2):
        study.tell(study.ask(space), 0.9)
    # n_trials=2 is reached: the two configurations still enqueued wait for an extension.
    assert coordination.next_step(study, 2) is NextStep.STOP and trials_module.trials_left(study, 2) == 0
    assert coordination.next_step(study, 3) is NextStep.RUN and trials_module.trials_left(study, 3) == 1
    lost = study.ask(space)  # the third, whose worker is lost: its re-queued copy replaces it in the count
    assert coordination.next_step(study, 3) is NextStep.WAIT
    coordination.requeue(study, study.trials[lost.number], "its worker stopped while running it", lost_worker=True)
    assert coordination.next_step(study, 3) is NextStep.RUN and trials_module.trials_left(study, 3) == 1


@pytest.mark.slow
def test_a_warm_start_larger_than_n_trials_runs_n_trials_and_the_rest_wait_for_an_extension(
    tmp_path, prepared_run, capsys, monkeypatch
):
    monkeypatch.setattr(summary, "log_study_plots", lambda study, folder: None)  # seconds each, and not what is tested
    earlier = earlier_study(tmp_path)
    second = smoke(tmp_path, study_name="second", n_trials=2, warm_start="first", warm_start_k=3)  # trial 0 and 3 enqueued
    tune(second, PrepareConfig(), prepared_run)
    trials = load(second).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "WAITING", "WAITING"]
    assert len(trials_module.counted(trials)) == 2
    err = capsys.readouterr().err
    assert "1 worker(s): 2 trial(s) left of 2," in err  # the first lines and the end agree
    assert "| 2 of 2 done" in err and "study second: 2 trials counted" in err
    [parent] = [run for run in runs_of("tune") if run.info.run_name == "second"]
    assert parent.info.status == "FINISHED"
    assert [m.step for m in MlflowClient().get_metric_history(parent.info.run_id, "n_complete_trials")] == [2]

    tune(second, PrepareConfig(), prepared_run)  # the same command again: complete, the waiting ones left waiting
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("study second is complete: 2 trials; best trial")

    tune(dataclasses.replace(second, n_trials=4), PrepareConfig(), prepared_run)  # an extension runs them
    trials = load(second).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    assert [t.params for t in trials[1:]] == [earlier.trials[n].params for n in (1, 2, 3)]  # its trial 0 is the baseline
    assert "2 trial(s) left of 4" in capsys.readouterr().err


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
    assert trials_module.most_accurate(trials).number == 4
    assert not pareto.on_front((0.989, 400), trials) and pareto.on_front((0.991, 1000), trials)


def test_a_latency_study_picks_its_compact_model_on_latency_measured_alone(tracking, capsys):
    """A trial times itself while other workers train: here noise made a large model look the
    fastest and a small one the slowest. Measured again alone, the small one is the compact pick."""
    study = optuna.create_study(directions=["maximize", "minimize"], study_name="latency")
    space = {
        "num_layers": optuna.distributions.IntDistribution(1, 2),
        "hidden_size": optuna.distributions.IntDistribution(32, 256, log=True),
        "learning_rate": optuna.distributions.FloatDistribution(3e-4, 3e-2, log=True),
        "batch_size": optuna.distributions.CategoricalDistribution([128, 256]),
        "bidirectional": optuna.distributions.CategoricalDistribution([False, True]),
    }
    large = {"num_layers": 2, "hidden_size": 128, "learning_rate": 1e-3, "batch_size": 128, "bidirectional": True}
    small = {**large, "num_layers": 1, "hidden_size": 32, "bidirectional": False}
    middle = {**large, "hidden_size": 64, "bidirectional": False}
    for params, values in [(large, [0.990, 0.01]), (small, [0.989, 50.0]), (middle, [0.95, 0.001])]:
        extra = {"dropout": optuna.distributions.FloatDistribution(0.0, 0.5)} if params["num_layers"] > 1 else {}
        params = {**params, "dropout": 0.1} if extra else params
        made = optuna.trial.create_trial(params=params, distributions={**space, **extra}, values=values)
        made.set_user_attr("model_uri", f"models:/m-{len(study.trials)}")  # as a trial on the front when it finished
        study.add_trial(made)
    study.add_trial(optuna.trial.create_trial(params=small, distributions=space, values=[0.9895, 40.0]))  # logged no model
    study.set_user_attr("settings", {"cost": "latency_ms"})
    config = TuneConfig(study="lstm-cpu", cost="latency_ms", compact_within=0.002, device="cpu")
    data = SimpleNamespace(val=SimpleNamespace(images=torch.zeros(1, 28, 28, dtype=torch.uint8)))
    parent = MlflowClient().create_run(MlflowClient().create_experiment("latency")).info.run_id

    assert pareto.compact_trial(trials_module.complete(study), 0.002).number == 0  # the trials' own values
    assert pareto.compact_pick(study, config, data, parent).number == 1

    table = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=parent, artifact_path="latency_alone.csv"))
    assert list(table["number"]) == [1, 2, 0]  # within reach (0, 1; 3 has no model) and on the front (0, 2), cheapest first
    assert table["latency_ms_alone"].iloc[0] < table["latency_ms_alone"].iloc[2]
    assert table["in_trial_ratio"].tolist() == pytest.approx((table["latency_ms"] / table["latency_ms_alone"]).tolist())
    metrics = MlflowClient().get_run(parent).data.metrics
    assert metrics["latency_in_trial_ratio_max"] == pytest.approx(table["in_trial_ratio"].max())
    assert "measured again alone" in capsys.readouterr().err


@pytest.mark.slow
def test_a_multi_objective_study_logs_its_pareto_front_and_registers_a_compact_model(tmp_path, prepared_run, monkeypatch):
    monkeypatch.setattr(summary, "log_study_plots", lambda study, folder: None)  # seconds each, and not what is tested
    config = smoke(tmp_path, n_trials=4, cost="parameter_count", compact_within=0.05)
    tune(config, PrepareConfig(), prepared_run)
    study = load(config)
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    assert study.user_attrs["settings"]["pruner"] == "none"  # Optuna's pruners judge one objective
    trials = trials_module.complete(study)
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
    assert champion.tags["optuna.trial_number"] == str(trials_module.most_accurate(trials).number)
    # Test is read once per registered version.
    evaluated = sorted(run.data.tags["pipeline.model"] for run in runs_of("evaluate"))
    assert evaluated == sorted({f"models:/tiny-lstm/{v.version}" for v in (compact, champion)})


@pytest.mark.slow
def test_a_latency_study_measures_each_trial_once_and_logs_it_where_people_compare(tmp_path, prepared_run, monkeypatch):
    monkeypatch.setattr(summary, "log_study_plots", lambda study, folder: None)
    config = smoke(tmp_path, n_trials=3, cost="latency_ms", compact_within=0.05)
    tune(config, PrepareConfig(), prepared_run)
    study = load(config)
    trials = trials_module.complete(study)
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
