"""A champion confirmed over seeds: before an alias moves, the study's ``confirm_top`` best
configurations train again with seeds 1 to ``confirm_seeds`` (a trial's rank mixes its
configuration's quality with its seed's luck), and the best mean val_accuracy wins (docs/tuning.md).

Each (configuration, seed) is a trial of the **companion study** ``<study>:confirm``, a queue
every worker takes from as it takes trials (experiments/worker.py), whose last item is the summary;
a study of its own, so that the study's sampler, pruner and ``n_trials`` read the study's trials only.

Writes: per configuration and seed a ``confirm`` run (its model too) under the study's parent run,
        reused by an extended study while configuration, seed, epochs, data and code stay the same
        (tag ``confirm.key``); on the parent run ``confirmation.md`` and ``confirmation.json``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import mlflow
import optuna
import pandas as pd
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState

from experiments import attributes
from experiments.budget import fitting
from experiments.job import WorkerJob
from experiments.runs import training_run
from experiments.studies import OBJECTIVE_METRIC, trial_config
from experiments.trials import best_configurations, n_counted
from pipeline.config import TrainConfig, TuneConfig, say
from pipeline.data import PreparedData
from pipeline.tables import markdown_table, over_seeds, plus_minus, with_spread
from pipeline.tracking import digest, finished_run, set_tags, when_reachable
from pipeline.train import train_and_log

KEY_TAG = "confirm.key"
MODEL_URI_TAG = "confirm.model_uri"


@dataclasses.dataclass(frozen=True)
class SeedRun:
    """One configuration (the trial that found it) trained with one confirmation seed."""

    trial: int
    seed: int
    run_id: str
    val_accuracy: float  # its best val_accuracy, as a trial's value is
    model_uri: str


def companion(storage: optuna.storages.BaseStorage, study_name: str) -> optuna.Study:
    """Study ``study_name``'s queue of work after the search (created if new). Its trials are only
    ever enqueued, so its sampler never samples: the cheapest one is given."""
    return optuna.create_study(
        study_name=f"{study_name}:confirm", storage=storage, sampler=optuna.samplers.RandomSampler(), load_if_exists=True
    )


def pending(queue: optuna.Study) -> list[FrozenTrial]:
    """The queue's items waiting or in training."""
    return queue.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING))


def plan(study: optuna.Study, queue: optuna.Study, job: WorkerJob, data: PreparedData) -> None:
    """Queue this round's trainings, unless planned already (call holding the study lock once no
    trial runs): each best configuration's seeds that no finished confirm run holds, as many
    configurations as ``job.deadline`` (``-P budget``) lets end in time (``fitting``)."""
    at = n_counted(study)
    if attributes.CONFIRM_PLAN.read(queue).get("at") == at:
        return
    from pipeline.main import code_version

    config, code = job.config, code_version()
    runs = [
        {"trial": trial.number, "seed": seed, "key": run_key(seed_config(config, trial, seed), data, code)}
        for trial in fitting(best_configurations(study, config.confirm_top), config, job.deadline, job.workers)
        for seed in range(1, config.confirm_seeds + 1)
    ]
    waiting = {attributes.WORK.read(t).get("key") for t in queue.get_trials(deepcopy=False, states=(TrialState.WAITING,))}
    for run in runs:
        if found := reused(run, job):
            accuracy = f"{OBJECTIVE_METRIC} {found.val_accuracy:.4f}"
            say_confirm(found.trial, found.seed, f"{accuracy} (run {found.run_id}; reused: trained before)")
        elif run["key"] not in waiting:
            queue.enqueue_trial({}, user_attrs={attributes.WORK.key: {**run, "at": at}})
    attributes.CONFIRM_PLAN.write(queue, {"at": at, "runs": runs})  # last: a planner that died before it is redone


def seed_config(config: TuneConfig, trial: FrozenTrial, seed: int) -> TrainConfig:
    return dataclasses.replace(trial_config(config, optuna.trial.FixedTrial(trial.params)), seed=seed)


def run_key(train_config: TrainConfig, data: PreparedData, code: str) -> str:
    """What makes two confirm runs the same training: configuration, seed, data and code."""
    return digest({"config": dataclasses.asdict(train_config), "data": data.manifest["splits"], "code": code})


def queue_summary(queue: optuna.Study, at: int) -> None:
    """Queue round ``at``'s summary: the queue's last item (call holding the study lock)."""
    queue.enqueue_trial({}, user_attrs={attributes.WORK.key: {"summary": True, "at": at}})


def train_seed(item: optuna.Trial, study: optuna.Study, job: WorkerJob, data: PreparedData) -> float:
    """Train a queued (configuration, seed) in a confirm run under the parent, logging its model, as
    a trial trains (resuming an earlier attempt's checkpoint); its best val_accuracy."""
    work = attributes.WORK.read(item)
    source = study.get_trials(deepcopy=False)[work["trial"]]
    config = seed_config(job.config, source, work["seed"])
    tags = {"pipeline.stage": "confirm", "optuna.trial_number": str(source.number), KEY_TAG: work["key"]}
    name = f"confirm trial-{source.number} seed-{config.seed}"
    with training_run(item, job, name, tags) as checkpoints:
        result, model = train_and_log(
            config,
            data,
            checkpoint_dir=checkpoints.folder,
            on_epoch=checkpoints.after_epoch(),
            data_ref=job.data_ref,
            label=f"[worker {job.worker}] [{name}]",
        )
        when_reachable(lambda: mlflow.set_tag(MODEL_URI_TAG, model.model_uri), "the confirm run's model")
    return result.best_val_accuracy


def say_trained(queue: optuna.Study, item: FrozenTrial, worker: int) -> None:
    """One line per finished training of the queue, with how many of its round are done."""
    work = attributes.WORK.read(item)
    planned, left = len(attributes.CONFIRM_PLAN.read(queue).get("runs", [])), len(pending(queue))
    value = f"{OBJECTIVE_METRIC} {item.value:.4f}" if item.state == TrialState.COMPLETE else item.state.name
    run = f"run {attributes.RUN_ID.read(item)}; {planned - left} of {planned} trained"
    say_confirm(work["trial"], work["seed"], f"{value} ({run})", f"[worker {worker}] ")


def say_confirm(trial: int, seed: int, what: str, worker: str = "") -> None:
    say(f"{worker}[confirm] trial {trial}'s configuration, seed {seed}: {what}")


def seed_runs(queue: optuna.Study, job: WorkerJob) -> pd.DataFrame:
    """One row per ``SeedRun`` of the round's plan that finished (a failed one is said and left out)."""
    rows = []
    for run in attributes.CONFIRM_PLAN.read(queue).get("runs", []):
        if found := reused(run, job):
            rows.append(dataclasses.asdict(found))
        else:
            say_confirm(run["trial"], run["seed"], "no finished run; left out")
    return pd.DataFrame(rows, columns=[field.name for field in dataclasses.fields(SeedRun)])


def reused(run: dict, job: WorkerJob) -> SeedRun | None:
    """The study's finished confirm run of ``run["key"]``, if there is one."""
    found = finished_run(job.experiment_id, {KEY_TAG: run["key"], "mlflow.parentRunId": job.parent_run_id})
    if found is None:
        return None
    seed, accuracy = int(found.data.params["seed"]), found.data.metrics["best_val_accuracy"]
    return SeedRun(run["trial"], seed, found.info.run_id, accuracy, found.data.tags[MODEL_URI_TAG])


def confirmation_table(study: optuna.Study, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration, the best mean val_accuracy first (among equals the earlier
    trial): trial, its parameters, then ``over_seeds``'s columns."""
    table = over_seeds(runs, "trial", ["val_accuracy"]).sort_values(["val_accuracy_mean", "trial"], ascending=[False, True])
    params = pd.DataFrame([study.trials[number].params for number in table["trial"]], index=table.index)
    return pd.concat([table[["trial"]], params, table.drop(columns="trial")], axis=1).reset_index(drop=True)


def champion_run(runs: pd.DataFrame, table: pd.DataFrame) -> SeedRun:
    """The seed run to register: the champion configuration's best val_accuracy (among equals the lower seed)."""
    mine = runs[runs["trial"] == table["trial"].iloc[0]].sort_values(["val_accuracy", "seed"], ascending=[False, True])
    return SeedRun(**mine.iloc[0].to_dict())


def log_confirmation(parent_run_id: str, table: pd.DataFrame, seeds: int, step: int) -> str:
    """Record the table on the parent run; return it as markdown, to print."""
    client = MlflowClient()
    markdown = markdown_table(with_spread(table))
    client.log_text(parent_run_id, markdown + "\n", "confirmation.md")
    client.log_table(parent_run_id, table, "confirmation.json")
    best = table.iloc[0]
    client.log_metric(parent_run_id, "confirmed_val_accuracy_mean", float(best["val_accuracy_mean"]), step=step)
    if pd.notna(best["val_accuracy_std"]):
        client.log_metric(parent_run_id, "confirmed_val_accuracy_std", float(best["val_accuracy_std"]), step=step)
    seeds_tag = " ".join(map(str, range(1, seeds + 1)))
    set_tags(parent_run_id, {"confirmed.trial_number": int(best["trial"]), "confirmed.seeds": seeds_tag})
    return markdown


def test_seed_models(job: WorkerJob, seed_models, registered, test: Callable[[str], float]) -> str:
    """Test each of the champion configuration's seed models once, now that it is chosen (the registered
    one was; an earlier summary's evaluate run counts), and log their mean test accuracy (and std); the line to print."""
    client, parent_run_id = MlflowClient(), job.parent_run_id
    accuracies = pd.Series(dtype=float)
    for seed, uri in seed_models:
        evaluated = {"pipeline.stage": "evaluate", "pipeline.model": uri, "mlflow.parentRunId": parent_run_id}
        if seed == registered.seed:
            accuracies[seed] = registered.test_accuracy
        elif run := finished_run(job.experiment_id, evaluated):
            accuracies[seed] = run.data.metrics["test_accuracy"]
        else:
            accuracies[seed] = test(uri)
    client.log_metric(parent_run_id, "confirmed_test_accuracy_mean", float(accuracies.mean()))
    if len(accuracies) > 1:
        client.log_metric(parent_run_id, "confirmed_test_accuracy_std", float(accuracies.std()))
    each = ", ".join(f"seed {seed} {accuracy:.4f}" for seed, accuracy in accuracies.items())
    return (
        f"test_accuracy of the champion configuration's {len(accuracies)} models, each tested once after the choice: "
        f"{each}; mean {plus_minus(accuracies.mean(), accuracies.std())}"
    )
