"""A champion confirmed over seeds: before an alias moves, the study's best configurations train
again with fresh seeds, and the best mean val_accuracy wins.

A trial trains once, with the study's seed, so the best trial's rank mixes its configuration's
quality with that seed's luck. Here the ``confirm_top`` best configurations by val_accuracy (its
complete trials, one per configuration) each train with seeds 1 to ``confirm_seeds``, as
``-e repeat`` does by default, through the trials' own path: ``train_and_log``, each in a run of
its own under the study's parent run (stage tag ``confirm``); as many at once as the machine runs
workers, each in a process of its own. The champion is the configuration
with the best mean val_accuracy; what is registered is its seed run with the best val_accuracy
(the models differ by seed only; the pick reads validation too). The test set is read only
afterwards, once per model: the version registered (experiments/summary.py), and the champion
configuration's other seed models, for its mean test accuracy (``test_seed_models``).

Reads:  the study's complete trials, the prepared data.
Writes: per configuration and seed a ``confirm`` run (params, per-epoch metrics, its model);
        on the parent run ``confirmation.md`` and the MLflow table ``confirmation.json`` (per
        configuration: trial, parameters, val_accuracy mean ± sample std, n_seeds).
Reuses: a finished confirm run of the study (under its parent run) with the same configuration,
        seed, epochs, data and code (its tag ``confirm.key``): an extended study, or a summary
        rerun after Ctrl-C, trains only what is new.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import TYPE_CHECKING

import mlflow
import optuna
import pandas as pd
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial

from experiments.pareto import complete
from experiments.studies import OBJECTIVE_METRIC, trial_config
from pipeline.config import TuneConfig
from pipeline.data import PreparedData, load_prepared
from pipeline.numerics import share_cpu
from pipeline.tables import markdown_table
from pipeline.tracking import digest, start_run_with_system_metrics
from pipeline.train import train_and_log

if TYPE_CHECKING:  # experiments/worker.py imports this module (through the summary)
    from experiments.worker import WorkerJob

KEY_TAG = "confirm.key"
MODEL_URI_TAG = "confirm.model_uri"


@dataclass(frozen=True)
class SeedRun:
    """One configuration (the trial that found it) trained with one confirmation seed."""

    trial: int
    seed: int
    run_id: str
    val_accuracy: float  # its best val_accuracy, as a trial's value is
    model_uri: str


def configurations(study: optuna.Study, top: int) -> list[FrozenTrial]:
    """The ``top`` best complete trials by val_accuracy, one per configuration (a re-queued trial
    repeats its original's parameters); among equals the earlier."""
    picked: list[FrozenTrial] = []
    for trial in sorted(complete(study), key=lambda t: (-t.values[0], t.number)):
        if all(trial.params != other.params for other in picked):
            picked.append(trial)
    return picked[:top]


def confirm(study: optuna.Study, job: WorkerJob, data: PreparedData) -> pd.DataFrame:
    """Train (or reuse) each of the best configurations with seeds 1..confirm_seeds; one row per
    ``SeedRun``. The best is always confirmed; each next one only if all the runs, timed as their
    trials took, end before ``job.deadline`` (``-P budget``), else it is left out, saying so. With
    several workers on this machine (``job.workers``) as many runs train at once, one process each."""
    from pipeline.main import code_version

    config, code = job.config, code_version()
    planned = []
    for trial in fitting(configurations(study, config.confirm_top), config, job.deadline, job.workers):
        for seed in range(1, config.confirm_seeds + 1):
            train_config = dataclasses.replace(trial_config(config, optuna.trial.FixedTrial(trial.params)), seed=seed)
            key = digest({"config": dataclasses.asdict(train_config), "data": data.manifest["splits"], "code": code})
            planned.append((trial, train_config, key))
    done = {key: run for trial, _, key in planned if (run := reused(trial, job.parent_run_id, job.experiment_id, key))}
    for run in done.values():
        say_seed_run(run, "reused: trained before this command")
    to_train = [(trial, train_config, key) for trial, train_config, key in planned if key not in done]
    done |= train_all(to_train, job, data)
    rows = [dataclasses.asdict(done[key]) for _, _, key in planned]
    return pd.DataFrame(rows, columns=[field.name for field in dataclasses.fields(SeedRun)])


def say_seed_run(run: SeedRun, how: str) -> None:
    print(
        f"[confirm] trial {run.trial}'s configuration, seed {run.seed}: {OBJECTIVE_METRIC} {run.val_accuracy:.4f} "
        f"(run {run.run_id}; {how})",
        file=sys.stderr,
        flush=True,
    )


def fitting(trials: list[FrozenTrial], config: TuneConfig, deadline: float, processes: int = 1) -> list[FrozenTrial]:
    """The configurations to confirm: the best always, each next one if all the chosen runs (each
    as long as its trial took), ``processes`` at a time, end before ``deadline`` (``time.time()``);
    one left out is said."""
    chosen, runs = [], []
    for rank, trial in enumerate(trials):
        mine = [seconds_of(trial)] * config.confirm_seeds
        ends = time.time() + makespan(runs + mine, processes)
        if rank and ends > deadline:
            left = max(0.0, deadline - time.time())
            print(
                f"[confirm] trial {trial.number}'s configuration left out: with its {config.confirm_seeds} runs the "
                f"confirmation takes about {(ends - time.time()) / 60:.0f} min, and {left / 60:.0f} min of -P budget are left",
                file=sys.stderr,
                flush=True,
            )
            continue
        chosen.append(trial)
        runs += mine
    return chosen


def makespan(seconds: list[float], processes: int) -> float:
    """How long runs of these lengths take, ``processes`` at a time, the longest first, each to
    the first process free (as ``train_all`` hands them out)."""
    loads = [0.0] * max(1, processes)
    for length in sorted(seconds, reverse=True):
        loads[loads.index(min(loads))] += length
    return max(loads)


def train_all(planned: list[tuple], job: WorkerJob, data: PreparedData) -> dict[str, SeedRun]:
    """Train each planned (trial, config, key) in a confirm run, by key: here, or ``job.workers``
    at a time in processes of their own (spawned: they inherit this one's environment and GPU),
    the longest first. Each run is said as it ends, with how many of them are done."""
    trained = {}

    def finished(key: str, run: SeedRun) -> None:
        trained[key] = run
        say_seed_run(run, f"{len(trained)} of {len(planned)} trained")

    if job.workers == 1 or len(planned) <= 1:
        for trial, config, key in planned:
            finished(key, train_seed(config, trial.number, key, job, data))
        return trained
    longest_first, processes = sorted(planned, key=lambda item: -seconds_of(item[0])), min(job.workers, len(planned))
    say = f"[confirm] {len(planned)} runs to train, {processes} at a time, each in a process of its own"
    print(say, file=sys.stderr, flush=True)
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        keys = {pool.submit(train_seed_in_process, config, trial.number, key, job): key for trial, config, key in longest_first}
        for future in as_completed(keys):  # each said as it ends: the confirmation can take an hour
            finished(keys[future], future.result())
    return trained


def seconds_of(trial: FrozenTrial) -> float:
    """How long ``trial`` took (0 if not recorded): how long one of its confirm runs takes."""
    return trial.duration.total_seconds() if trial.duration else 0.0


def train_seed_in_process(config, trial_number: int, key: str, job: WorkerJob) -> SeedRun:
    """``train_seed`` in a process of ``train_all``'s, with its share of the cores as a trial had:
    the prepared data read from the job's folder."""
    share_cpu(job.workers)
    return train_seed(config, trial_number, key, job, load_prepared(job.data_folder))


def reused(trial: FrozenTrial, parent_run_id: str, experiment_id: str, key: str) -> SeedRun | None:
    """The study's finished confirm run of ``key``, if there is one."""
    run = finished_child(parent_run_id, experiment_id, {KEY_TAG: key})
    if run is None:
        return None
    seed, accuracy = int(run.data.params["seed"]), run.data.metrics["best_val_accuracy"]
    return SeedRun(trial.number, seed, run.info.run_id, accuracy, run.data.tags[MODEL_URI_TAG])


def train_seed(config, trial_number: int, key: str, job: WorkerJob, data: PreparedData) -> SeedRun:
    """Train ``config`` in a confirm run under the parent, logging its model, as a trial trains."""
    tags = {
        "pipeline.stage": "confirm",
        "pipeline.data": job.data_ref,
        "optuna.trial_number": str(trial_number),
        KEY_TAG: key,
    }
    name = f"confirm trial-{trial_number} seed-{config.seed}"
    with start_run_with_system_metrics(
        run_name=name, experiment_id=job.experiment_id, parent_run_id=job.parent_run_id, tags=tags
    ) as run:
        try:
            result, model = train_and_log(config, data, data_ref=job.data_ref, label=f"[{name}]")
        except KeyboardInterrupt:
            mlflow.end_run("KILLED")  # a rerun trains it again
            raise
        mlflow.set_tag(MODEL_URI_TAG, model.model_uri)
    return SeedRun(trial_number, config.seed, run.info.run_id, result.best_val_accuracy, model.model_uri)


def confirmation_table(study: optuna.Study, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration, the best mean val_accuracy first (among equals the earlier
    trial): trial, its parameters, ``val_accuracy_mean``, ``val_accuracy_std`` (sample std) and
    ``n_seeds``."""
    table = runs.groupby("trial")["val_accuracy"].agg(val_accuracy_mean="mean", val_accuracy_std="std", n_seeds="count")
    table = table.reset_index().sort_values(["val_accuracy_mean", "trial"], ascending=[False, True])
    params = pd.DataFrame([study.trials[number].params for number in table["trial"]], index=table.index)
    return pd.concat([table[["trial"]], params, table.drop(columns="trial")], axis=1).reset_index(drop=True)


def champion_run(runs: pd.DataFrame, table: pd.DataFrame) -> SeedRun:
    """The seed run to register: the champion configuration's best val_accuracy (among equals the lower seed)."""
    mine = runs[runs["trial"] == table["trial"].iloc[0]].sort_values(["val_accuracy", "seed"], ascending=[False, True])
    return SeedRun(**mine.iloc[0].to_dict())


def shown(table: pd.DataFrame) -> pd.DataFrame:
    """The table as people read it: val_accuracy as one ``0.9104 ± 0.0014`` cell."""
    cells = [
        f"{mean:.4f}" + ("" if pd.isna(std) else f" ± {std:.4f}")
        for mean, std in zip(table["val_accuracy_mean"], table["val_accuracy_std"], strict=True)
    ]
    return table.drop(columns=["val_accuracy_mean", "val_accuracy_std"]).assign(**{OBJECTIVE_METRIC: cells})


def log_confirmation(parent_run_id: str, table: pd.DataFrame, seeds: int, step: int) -> str:
    """Record the table on the parent run; return it as markdown, to print."""
    client = MlflowClient()
    markdown = markdown_table(shown(table))
    client.log_text(parent_run_id, markdown + "\n", "confirmation.md")
    client.log_table(parent_run_id, table, "confirmation.json")
    best = table.iloc[0]
    client.log_metric(parent_run_id, "confirmed_val_accuracy_mean", float(best["val_accuracy_mean"]), step=step)
    if pd.notna(best["val_accuracy_std"]):
        client.log_metric(parent_run_id, "confirmed_val_accuracy_std", float(best["val_accuracy_std"]), step=step)
    client.set_tag(parent_run_id, "confirmed.trial_number", str(int(best["trial"])))
    client.set_tag(parent_run_id, "confirmed.seeds", " ".join(map(str, range(1, seeds + 1))))
    return markdown


def test_seed_models(parent_run_id: str, seed_models, registered, test: Callable[[str], float]) -> str:
    """Test each of the champion configuration's seed models once, now that it is chosen (the
    registered one already was; one tested by an earlier summary keeps its evaluate run): the
    configuration's test accuracy over seeds, not one seed's. Logs ``confirmed_test_accuracy_mean``
    (and ``_std``) on the parent run; returns the line to print."""
    accuracies = pd.Series(
        {
            seed: registered.test_accuracy if seed == registered.seed else tested(parent_run_id, uri, test)
            for seed, uri in seed_models
        }
    )
    client = MlflowClient()
    client.log_metric(parent_run_id, "confirmed_test_accuracy_mean", float(accuracies.mean()))
    spread = ""
    if len(accuracies) > 1:
        client.log_metric(parent_run_id, "confirmed_test_accuracy_std", float(accuracies.std()))
        spread = f" ± {accuracies.std():.4f}"
    each = ", ".join(f"seed {seed} {accuracy:.4f}" for seed, accuracy in accuracies.items())
    return (
        f"test_accuracy of the champion configuration's {len(accuracies)} models, each tested once after the choice: "
        f"{each}; mean {accuracies.mean():.4f}{spread}"
    )


def tested(parent_run_id: str, model_uri: str, test: Callable[[str], float]) -> float:
    """The test_accuracy of ``model_uri``'s finished evaluate run under the parent, else ``test(model_uri)``."""
    experiment_id = MlflowClient().get_run(parent_run_id).info.experiment_id
    run = finished_child(parent_run_id, experiment_id, {"pipeline.stage": "evaluate", "pipeline.model": model_uri})
    return run.data.metrics["test_accuracy"] if run else test(model_uri)


def finished_child(parent_run_id: str, experiment_id: str, tags: dict[str, str]) -> Run | None:
    """A finished run nested under the parent with these tags, if there is one."""
    conditions = [f"tags.`{name}` = '{value}'" for name, value in {**tags, "mlflow.parentRunId": parent_run_id}.items()]
    found = " and ".join([*conditions, "attributes.status = 'FINISHED'"])
    runs = MlflowClient().search_runs([experiment_id], filter_string=found, max_results=1)
    return runs[0] if runs else None
