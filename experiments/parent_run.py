"""The study's MLflow parent run, under which every trial, confirmation and evaluate run nests:
opened once per study (its id is a study attribute), its parameters, and the ``worker`` record
each command that joins the study leaves under it.
"""

from __future__ import annotations

import mlflow
import optuna
from mlflow.tracking import MlflowClient

from experiments import attributes
from experiments.job import worker_id
from experiments.storage import public_storage
from experiments.studies import OBJECTIVE_METRIC, STUDIES, describe
from pipeline.config import TuneConfig
from pipeline.tracking import current_experiment_id, log_params, set_tags


def run_exists(run_id: str) -> bool:
    try:
        return MlflowClient().get_run(run_id).info.lifecycle_stage == "active"
    except mlflow.exceptions.MlflowException:
        return False


def open_parent_run(config: TuneConfig, launched_run: str | None) -> str:
    """The study's parent run: the run `mlflow run` opened for this command, or a new one."""
    client = MlflowClient()
    tags = {"pipeline.stage": "tune", "optuna.study_name": config.study_name}
    if launched_run:
        client.update_run(launched_run, name=config.study_name)
        set_tags(launched_run, tags)
        return launched_run
    return client.create_run(current_experiment_id(), run_name=config.study_name, tags=tags).info.run_id


def record_worker(launched_run: str, parent_run_id: str, config: TuneConfig) -> None:
    """`mlflow run` opened a run for this command, but the study already has its parent: make it this
    worker's record, nested under the parent, rather than an empty run at the top of the table (not
    deleted: `mlflow run` ends its run after the command exits, and ending a deleted run fails)."""
    MlflowClient().update_run(launched_run, name=f"worker {worker_id()}")
    set_tags(
        launched_run,
        {
            "mlflow.parentRunId": parent_run_id,
            "pipeline.stage": "worker",
            "pipeline.joined_run": parent_run_id,
            "optuna.study_name": config.study_name,
        },
    )


def log_parent_params(parent_run_id: str, config: TuneConfig, study: optuna.Study) -> None:
    started_from = attributes.WARM_START.read(study)
    params = {
        "study": config.study,
        "study_name": config.study_name,
        "storage": public_storage(config.storage),
        "sampler": config.sampler,
        "pruner": config.pruner,
        "epochs": config.epochs,
        "seed": config.seed,
        "search_space": str(describe(STUDIES[config.study].space)),
        "objective": f"maximize {OBJECTIVE_METRIC}" + (f", minimize {config.cost}" if config.cost != "none" else ""),
        # where the enqueued configurations came from: the earlier study and its trial numbers, best first
        "warm_start": started_from.get("study", ""),
        "warm_start_trials": " ".join(map(str, started_from.get("trials", []))),
        "confirm_top": config.confirm_top,
        "confirm_seeds": config.confirm_seeds,
    }
    if config.cost != "none":
        params["compact_within"] = config.compact_within
    with mlflow.start_run(run_id=parent_run_id):
        log_params(params)
        mlflow.set_tag("optuna.pruner", config.pruner)  # the one in use: `mlflow run` logged -P pruner as typed
    MlflowClient().update_run(parent_run_id, status="RUNNING")  # until the summary ends it


def record_trials_run(launched_run: str, study: optuna.Study, workers: set[str]) -> None:
    """What this command's worker record shows: the trials its workers ran."""
    ran = [t.number for t in study.get_trials(deepcopy=False) if attributes.WORKER.read(t) in workers]
    MlflowClient().log_metric(launched_run, "trials_run", len(ran))
    set_tags(launched_run, {"optuna.trial_numbers": " ".join(map(str, ran))})
