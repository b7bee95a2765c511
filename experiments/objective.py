"""The study's objective: one trial's sampled configuration trained in a run of its own, each epoch
reported to the pruner. A retried trial resumes from its lost attempt's checkpoint (experiments/runs.py).
"""

from __future__ import annotations

from functools import partial

import mlflow
import optuna
import torch

from experiments import attributes
from experiments.job import WorkerJob
from experiments.pareto import measure_cost, on_front
from experiments.runs import training_run
from experiments.studies import trial_config
from experiments.trials import best_value, complete
from pipeline.data import PreparedData
from pipeline.numerics import resolve_device
from pipeline.tracking import when_reachable
from pipeline.train import log_trained_model, train_and_log


def objective(trial: optuna.Trial, job: WorkerJob, data: PreparedData) -> float | tuple[float, float]:
    """The trial's best val_accuracy (and, multi-objective, its cost, also logged as a metric).

    Its model is logged only when no finished trial beats (multi-objective: dominates) it, so the best
    trial and every trial on the Pareto front has a model to register. A tie logs too: the tied trial
    that finishes second may be the one the champion's rule picks (the earlier number)."""
    config = trial_config(job.config, trial)
    multi_objective = job.config.cost != "none"
    tags = {"pipeline.stage": "trial", "optuna.study_name": job.config.study_name, "optuna.trial_number": str(trial.number)}
    with training_run(trial, job, f"trial-{trial.number}", tags) as checkpoints:
        device = resolve_device(config.device)
        if device.type == "cuda":  # the allocator's peak, this trial's alone
            torch.cuda.reset_peak_memory_stats(device)
        report = None if multi_objective else partial(report_epoch, trial, config.epochs)
        for metrics in checkpoints.restored() if report else ():  # the pruner sees the whole curve
            report(metrics)
        result, _ = train_and_log(
            config,
            data,
            checkpoint_dir=checkpoints.folder,
            on_epoch=checkpoints.after_epoch(report),
            log_model=False,
            data_ref=job.data_ref,
            label=f"[worker {job.worker}] trial {trial.number}",
        )
        accuracy = result.best_val_accuracy
        cost = measure_cost(job.config.cost, result.model, data, config.reading_order) if multi_objective else None

        def log_result() -> None:
            if device.type == "cuda":
                mlflow.log_metric("peak_gpu_memory_mb", torch.cuda.max_memory_allocated(device) / 2**20)
            if multi_objective:
                mlflow.log_metric(job.config.cost, cost)
            if on_front((accuracy, cost), complete(trial.study)) if multi_objective else accuracy >= best_value(trial.study):
                logged = log_trained_model(result.model, data, config.reading_order)
                mlflow.log_metric("best_val_accuracy", accuracy, model_id=logged.model_id)  # shown on its model page
                attributes.MODEL_URI.write(trial, logged.model_uri)

        when_reachable(log_result, f"trial {trial.number}'s model")
        return (accuracy, cost) if multi_objective else accuracy


def report_epoch(trial: optuna.Trial, epochs: int, metrics) -> None:
    """Report an epoch's val_accuracy to Optuna and prune when its pruner says so; never after the
    last epoch, when there is nothing left to save (Optuna takes intermediate values of
    single-objective studies only)."""
    trial.report(metrics.val_accuracy, metrics.epoch)
    if metrics.epoch < epochs and trial.should_prune():
        raise optuna.TrialPruned(f"val_accuracy {metrics.val_accuracy:.4f} at epoch {metrics.epoch} is below the pruner's bar")
