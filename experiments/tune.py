"""The ``tune`` entry point: an Optuna study over the pipeline's training loop, tracked in MLflow.

Reads:  a prepared split (``--data``, a prepare run id; or the prepare parameters, whose
        finished prepare run is reused or run once).
Writes: an Optuna study in ``--storage`` (rerun the command to continue or extend it), and in
        MLflow one parent run per study with a child run per trial (docs/tuning.md). When the search
        ends, the best configurations train again over seeds (experiments/confirm.py), and the winner
        is registered and may take the alias ``champion`` (experiments/summary.py).

Any number of workers may run the same command, on one machine (journal file) or many
(PostgreSQL): this module opens (or joins) the study and its parent run, experiments/worker.py
runs the trials (experiments/gpus.py several on one machine).

    python -m experiments.tune --study-name lstm-rows --n-trials 40 --data-dir ../shared/data
"""

from __future__ import annotations

import dataclasses
import os
import signal
import tempfile
import time

import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from experiments import attributes
from experiments.budget import time_left
from experiments.coordination import NextStep, next_step, open_storage, single_sqlite_worker, study_lock
from experiments.gpus import WorkersFailed, gpu_assignment, run_workers
from experiments.job import WorkerJob, worker_id
from experiments.parent_run import log_parent_params, open_parent_run, record_trials_run, record_worker, run_exists
from experiments.registry import Registered, champion_version, model_name
from experiments.storage import check_storage, storage_kind
from experiments.studies import OBJECTIVE_METRIC, STUDIES, describe, describe_pruner, resolve_pruner, study_for
from experiments.trials import complete, most_accurate, needs_summary, trials_left
from experiments.warm_start import enqueue, warm_start
from experiments.worker import on_stale_trial, run_worker
from pipeline.config import (
    OneLineParser,
    ParameterError,
    PrepareConfig,
    TuneConfig,
    add_config_arguments,
    add_env_manager_argument,
    build_configs,
    fail,
    run_entry_point,
    say,
    user_path,
)
from pipeline.data import PreparedData, load_prepared
from pipeline.main import StageFailed, code_version, run_stage
from pipeline.numerics import resolve_device
from pipeline.signals import raise_terminated
from pipeline.tracking import ERROR_TAG, PREPARED_ARTIFACT, download

# --- the study ------------------------------------------------------------------------------------


def study_settings(config: TuneConfig) -> dict:
    """What every trial of a study must share; a rerun that asks for other values is refused.
    Call with the pruner resolved (``resolve_pruner``): ``auto`` is never stored."""
    settings = {
        "study": config.study,
        "epochs": config.epochs,
        "sampler": config.sampler,
        "pruner": config.pruner,
        "search_space": describe(STUDIES[config.study].space),
    }
    if config.cost != "none":  # only then: studies made before costs existed keep comparing equal
        settings["cost"] = config.cost
    return settings


def refuse_other_settings(study: optuna.Study, stored: dict, config: TuneConfig) -> None:
    """A rerun must ask for the study's settings. A warm start happens when a study is created: a rerun
    may omit -P warm_start, not name another."""
    asked = study_settings(config)
    if changed := [f"{key}={stored.get(key)} (this command: {asked[key]})" for key in asked if stored.get(key) != asked[key]]:
        raise ParameterError(
            f"study {study.study_name!r} was created with {'; '.join(changed)}: its trials would not compare; "
            "rerun with its settings, or start a new study with another -P study_name"
        )
    started_from = attributes.WARM_START.read(study).get("study", "")
    if config.warm_start and config.warm_start != started_from:
        raise ParameterError(
            f"study {study.study_name!r} was created "
            + (f"warm-started from {started_from!r}" if started_from else "without a warm start")
            + f", not from {config.warm_start!r}: a warm start applies only when a study is created; "
            "rerun without -P warm_start, or start a new -P study_name"
        )


def open_study(
    storage: optuna.storages.BaseStorage, config: TuneConfig, launched_run: str | None
) -> tuple[optuna.Study, str, TuneConfig]:
    """Create the study or load it; return it, its parent run id, and ``config`` with the pruner
    it uses (``pruner=auto``: its own). Call holding the study lock: the worker that creates it
    records its settings, trial 0, its warm start and parent run before any other looks."""
    exists = config.study_name in optuna.study.get_all_study_names(storage)
    study = optuna.load_study(study_name=config.study_name, storage=storage) if exists else None
    stored = attributes.SETTINGS.read(study) if study else None
    config = dataclasses.replace(config, pruner=resolve_pruner(config.pruner, stored, config.cost != "none"))
    if stored:
        refuse_other_settings(study, stored, config)
    else:  # new, or its creator died before recording anything
        # Looked up before the study is created, so that a warm start refused creates nothing.
        start = warm_start(storage, config.warm_start, config.warm_start_k, STUDIES[config.study]) if config.warm_start else None
        directions = ["maximize"] if config.cost == "none" else ["maximize", "minimize"]  # val_accuracy up, a cost down
        study = study or optuna.create_study(study_name=config.study_name, storage=storage, directions=directions)
        if not study.get_trials(deepcopy=False):
            study.enqueue_trial(STUDIES[config.study].baseline)  # trial 0: the known configuration to beat
            if start:
                enqueue(study, start)
                left_out = f"; not carried (outside this search space): {'; '.join(start.left_out)}" if start.left_out else ""
                say(
                    f"warm start: enqueued {len(start.configurations)} configuration(s) of study {start.study!r} "
                    f"(its trials {', '.join(map(str, start.trials))}) after trial 0{left_out}"
                )
        attributes.SETTINGS.write(study, study_settings(config))  # last: a creator that died before it is redone
    parent_run_id = attributes.PARENT_RUN.read(study)
    if parent_run_id and not run_exists(parent_run_id):
        say(f"the study's parent run {parent_run_id} is not in this tracking store; opening a new one")
        parent_run_id = None
    if not parent_run_id:
        parent_run_id = open_parent_run(config, launched_run)
        attributes.PARENT_RUN.write(study, parent_run_id)
    return study, parent_run_id, config


def finished_line(study: optuna.Study, n_trials: int) -> str | None:
    """One line when the study has nothing left to do: all its trials counted and summarised (enqueued
    trials past ``n_trials`` wait for an extension)."""
    if next_step(study, n_trials) is not NextStep.STOP or needs_summary(study):
        return None
    line = f"study {study.study_name} is complete: {attributes.SUMMARISED_AT.read(study)} trials"
    if finished := complete(study):
        best = most_accurate(finished)
        line += f"; best trial {best.number}, {OBJECTIVE_METRIC} {best.values[0]:.4f}"
    if registered := attributes.REGISTERED.read(study):
        held = champion_version(registered["name"])
        champion = f"champion: version {held.version}" if held else "no champion"
        line += (
            f"; registered as {registered['name']} version {registered['version']} "
            f"(test_accuracy {registered['test_accuracy']:.4f}), {champion}"
        )
    return line + ". Raise -P n_trials to extend it."


def registered_of(study: optuna.Study) -> Registered | None:
    return Registered(**registered) if (registered := attributes.REGISTERED.read(study)) else None


def check_data(study: optuna.Study, data: PreparedData) -> None:
    """Record the data the study tunes on, or refuse other data (call holding the study lock)."""
    sha256 = {split: data.manifest["splits"][split]["sha256"] for split in ("train", "val")}
    stored = attributes.DATA_CHECKSUMS.read(study)
    if stored is None:
        attributes.DATA_CHECKSUMS.write(study, sha256)
    elif stored != sha256:
        raise ParameterError(
            f"study {study.study_name!r} was created on other data (train/val checksums differ): "
            "its trials would not compare; use the same prepare parameters, or another -P study_name"
        )


# --- one command: join the study, run this machine's workers --------------------------------------


def tune(
    config: TuneConfig,
    prepare_config: PrepareConfig,
    data_ref: str = "",
    env_manager: str = "local",
    pruner: optuna.pruners.BasePruner | None = None,
    launched_run: str | None = None,
) -> Registered | None:
    """Run (or continue, or extend) the study, ``study=auto`` as this machine's device says; the worker that
    ends it summarises it. Returns what the study registered, if anything. ``launched_run`` (the run `mlflow
    run` opened) becomes a new study's parent run, else this worker's record under the parent; ``pruner``
    overrides the named one (tests force pruning with it)."""
    started = time.time()  # -P budget counts from here
    config = dataclasses.replace(config, study=study_for(config.study, resolve_device(config.device).type == "cuda"))
    if config.cost != "none" and config.pruner not in ("auto", "none"):  # Optuna's pruners judge a single objective
        say(f"note: cost={config.cost} makes a multi-objective study, which is not pruned (pruner=none)")
    storage = open_storage(config, on_stale_trial)
    with study_lock(config.storage, config.study_name):
        study, parent_run_id, config = open_study(storage, config, launched_run)
    if launched_run and launched_run != parent_run_id:
        record_worker(launched_run, parent_run_id, config)
    if line := finished_line(study, config.n_trials):
        say(line)
        return registered_of(study)
    with study_lock(config.storage, config.study_name):  # MLflow's tag upsert is not atomic: one writer at a time
        log_parent_params(parent_run_id, config, study)
    try:
        with tempfile.TemporaryDirectory(prefix="tune-data-") as tmp:
            job, data = prepare_job(study, config, prepare_config, data_ref, env_manager, parent_run_id, tmp)
            if config.budget:
                job = dataclasses.replace(job, deadline=started + config.budget)
            workers = run_here(study, job, data, pruner)
        if launched_run and launched_run != parent_run_id:
            record_trials_run(launched_run, study, workers)
    except KeyboardInterrupt:
        if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            MlflowClient().set_terminated(parent_run_id, "KILLED")  # a rerun continues it
        raise
    except StageFailed:
        MlflowClient().set_terminated(parent_run_id, "FAILED")  # its prepare failed; a rerun continues the study
        raise
    return registered_of(study)


def prepare_job(
    study: optuna.Study,
    config: TuneConfig,
    prepare_config: PrepareConfig,
    data_ref: str,
    env_manager: str,
    parent_run_id: str,
    folder: str,
) -> tuple[WorkerJob, PreparedData]:
    """The data the study tunes on (``data_ref``, or a prepare run reused or run here, downloaded
    into ``folder``), checked against the study's; and the job this machine's workers run. One prepare
    per study: commands started at once take turns, and the later ones reuse the first's run."""
    parent = MlflowClient().get_run(parent_run_id)
    if not data_ref:
        # A lock of its own, not the study's: a prepare (maybe a download) must not hold up other workers' trials.
        lock = study_lock(config.storage, f"{config.study_name} (prepare)")
        if not lock.acquire(blocking=False):
            say(f"[tune] prepare: another command of study {config.study_name!r} is preparing its data; waiting for it")
            lock.acquire()
        try:
            data_ref = run_stage("prepare", dataclasses.asdict(prepare_config), parent, env_manager, code_version())
        finally:
            lock.release()
    downloaded = download(data_ref, PREPARED_ARTIFACT, folder)
    data = load_prepared(downloaded)
    config = dataclasses.replace(config, register_name=model_name(config.register_name, data.manifest["dataset"]))
    with study_lock(config.storage, config.study_name):
        check_data(study, data)
        # Under the lock: the server's select-then-insert lets two workers' inserts meet (UniqueViolation on PostgreSQL).
        MlflowClient().set_tag(parent_run_id, "pipeline.data", data_ref)
    return WorkerJob(config, parent_run_id, parent.info.experiment_id, data_ref, str(downloaded)), data


def run_here(study: optuna.Study, job: WorkerJob, data: PreparedData, pruner: optuna.pruners.BasePruner | None) -> set[str]:
    """Say what runs, then run this machine's workers (in this process, or one process each); their ids."""
    gpus = gpu_assignment(job.config)
    announce(study, job.config, len(data.train.labels), gpus)
    if len(gpus) == 1:
        run_worker(job, pruner)
        return {worker_id()}
    on = f" on GPUs {', '.join(map(str, gpus))}" if gpus[0] is not None else ""
    say(f"{len(gpus)} workers{on}")
    return run_workers([dataclasses.replace(job, worker=i, workers=len(gpus), gpu=gpu) for i, gpu in enumerate(gpus)])


def announce(study: optuna.Study, config: TuneConfig, images: int, gpus: list[str | None]) -> None:
    """The first lines, before any trial: what was chosen, how the champion is confirmed, and how
    long it takes here by the study's own trials (a new study says it when its first epoch is timed)."""
    to_run = trials_left(study, config.n_trials)
    if not to_run:
        return
    lines = [
        f"tune: study {config.study_name!r} ({config.study}: {STUDIES[config.study].description}) on "
        f"{resolve_device(config.device).type}, {len(gpus)} worker(s): {to_run} trial(s) left of {config.n_trials}, "
        f"{config.epochs} epochs on {images:,} images each; {describe_pruner(config.pruner, config.epochs)}",
        f"confirm: the best {config.confirm_top} configurations train again with seeds 1 to {config.confirm_seeds} "
        f"({config.confirm_top * config.confirm_seeds} runs of {config.epochs} epochs), and the best mean "
        f"{OBJECTIVE_METRIC} is registered (-P confirm_top=0: the best trial's own model)"
        if config.confirm_top
        else "confirm: none (-P confirm_top=0): the best trial's own model is registered",
        time_left(study, config, to_run, workers=max(1, len(gpus))),
    ]
    if config.budget:
        lines.append(
            f"budget: {config.budget / 60:.0f} min for this command: a trial starts only if it and the champion's "
            "confirmation end in time even as the space's largest configuration; the next configurations are "
            "confirmed while they fit"
        )
    say("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(prog="tune", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data", default="", help="prepare run id or folder to tune on (default: reuse or run prepare with the data flags)"
    )
    add_env_manager_argument(parser, "environment a prepare run starts in")
    add_config_arguments(parser, TuneConfig, PrepareConfig)
    args, (config, prepare_config) = build_configs(parser, argv, TuneConfig, PrepareConfig)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress lines below say it once
    signal.signal(signal.SIGTERM, raise_terminated)  # ends like Ctrl-C: the trial in progress is re-queued
    os.environ.setdefault("MPLBACKEND", "Agg")  # the summary's PNG plots: no window, here and in spawned workers
    # Absolute from here on: the prepare stage this may start runs in the project folder (`mlflow.run`).
    if storage_kind(config.storage) == "journal":
        config = dataclasses.replace(config, storage=user_path(config.storage, args.launch_dir))
    # Read once and removed: neither the trials nor spawned workers may log into the run `mlflow run` opened.
    launched_run = os.environ.pop("MLFLOW_RUN_ID", None)
    try:
        check_storage(config.storage, len(gpu_assignment(config)))
        with single_sqlite_worker(config.storage):
            tune(config, prepare_config, args.data, args.env_manager, launched_run=launched_run)
    except (StageFailed, WorkersFailed) as error:
        fail(str(error))
    except ParameterError as error:
        if launched_run:
            MlflowClient().set_tag(launched_run, ERROR_TAG, str(error))  # `mlflow run` ends it FAILED
        parser.error(str(error))
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (Terminated, or TrainingInterrupted inside a trial)
        number = getattr(stop, "signal_number", signal.SIGINT)
        then = "the trial in progress was re-queued: rerun the same command to continue the study"
        fail(f"{signal.Signals(number).name}; {then}", 128 + number)


if __name__ == "__main__":
    run_entry_point(main)
