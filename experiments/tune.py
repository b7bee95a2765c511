"""The ``tune`` entry point: an Optuna study over the pipeline's training loop, tracked in MLflow.

Reads:  a prepared split (``--data``, a prepare run id; or the prepare parameters, whose
        finished prepare run is reused or run once).
Writes: an Optuna study in ``--storage`` (rerun the command to continue or extend it), and in
        MLflow one parent run per study with a child run per trial (params, per-epoch metrics,
        trial number and state as tags; pruned trials end KILLED, failed ones FAILED). When no
        trial runs any more, the parent gets a leaderboard and Optuna's plots, and the best
        trial's own model is registered as ``--register-name``, tested once, and takes the alias
        ``champion`` if its val_accuracy beats the champion's (experiments/summary.py). With
        ``--warm-start``, a new study's first trials after trial 0 are an earlier study's best
        configurations (experiments/warm_start.py). With ``--cost parameter_count`` the study is
        multi-objective (not pruned): its Pareto front is logged and the ``compact_within`` rule's
        pick takes the alias ``compact`` (experiments/pareto.py).

Any number of workers may run the same command, on one machine (journal file) or many
(PostgreSQL): this module opens (or joins) the study and its parent run, experiments/worker.py
runs the trials, experiments/coordination.py says how workers agree, and experiments/summary.py
what a finished study leaves.

    python -m experiments.tune --study-name lstm-rows --n-trials 40 --data-dir ../shared/data
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import signal
import sys
import tempfile

import mlflow
import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from experiments.coordination import (
    WORKER_ATTR,
    check_storage,
    counted,
    open_storage,
    public_storage,
    single_sqlite_worker,
    storage_kind,
    study_lock,
    worker_id,
)
from experiments.pareto import complete, most_accurate
from experiments.studies import OBJECTIVE_METRIC, SETTINGS_ATTR, STUDIES, relative_cost, study_for, typical_cost
from experiments.summary import CHAMPION, REGISTERED_ATTR, Registered, model_name, needs_summary
from experiments.warm_start import WARM_START_ATTR, WarmStart, enqueue, warm_start
from experiments.worker import WorkerJob, best_value, gpu_assignment, on_stale_trial, run_worker, run_workers, trial_config
from pipeline.config import (
    OneLineParser,
    ParameterError,
    PrepareConfig,
    TuneConfig,
    add_config_arguments,
    build_configs,
    fail,
    user_path,
)
from pipeline.data import PreparedData, Split, load_prepared
from pipeline.main import StageFailed, code_version, run_stage
from pipeline.signals import raise_terminated
from pipeline.tracking import ERROR_TAG, PREPARED_ARTIFACT, download, log_params
from pipeline.training import resolve_device, train

PARENT_RUN_ATTR = "mlflow_parent_run_id"  # study user attribute: the study's one MLflow parent run
DATA_ATTR = "data_sha256"  # study user attribute: the checksums of the train and val splits it tunes on


# --- the study ------------------------------------------------------------------------------------


def study_settings(config: TuneConfig) -> dict:
    """What every trial of a study must share; a rerun that asks for other values is refused."""
    settings = {
        "study": config.study,
        "epochs": config.epochs,
        "sampler": config.sampler,
        "pruner": config.pruner,
        "search_space": STUDIES[config.study].search_space,
    }
    if config.cost != "none":  # only then: studies made before costs existed keep comparing equal
        settings["cost"] = config.cost
    return settings


def directions(config: TuneConfig) -> list[str]:
    """val_accuracy up; with a cost, the cost down too (a multi-objective study)."""
    return ["maximize"] if config.cost == "none" else ["maximize", "minimize"]


def differences(stored: dict, asked: dict) -> list[str]:
    return [f"{name}={stored.get(name)} (this command: {asked[name]})" for name in asked if stored.get(name) != asked[name]]


def refuse_other_settings(study_name: str, stored: dict, asked: dict) -> None:
    if changed := differences(stored, asked):
        raise ParameterError(
            f"study {study_name!r} was created with {'; '.join(changed)}: its trials would not compare; "
            "rerun with its settings, or start a new study with another -P study_name"
        )


def open_study(storage: optuna.storages.BaseStorage, config: TuneConfig, launched_run: str | None) -> tuple[optuna.Study, str]:
    """Create the study or load it, and return it with its parent run id. Call holding the study
    lock: the worker that creates it records its settings, trial 0, its warm start and parent run
    before any other looks."""
    exists = config.study_name in optuna.study.get_all_study_names(storage)
    study = optuna.load_study(study_name=config.study_name, storage=storage) if exists else None
    if study and SETTINGS_ATTR in study.user_attrs:
        refuse_other_settings(config.study_name, study.user_attrs[SETTINGS_ATTR], study_settings(config))
        refuse_other_warm_start(study, config)
    else:  # new, or its creator died before recording anything
        # Looked up before the study is created, so that a warm start refused creates nothing.
        start = warm_start(storage, config.warm_start, config.warm_start_k, STUDIES[config.study]) if config.warm_start else None
        study = study or optuna.create_study(study_name=config.study_name, storage=storage, directions=directions(config))
        if not study.get_trials(deepcopy=False):
            study.enqueue_trial(STUDIES[config.study].baseline)  # trial 0: the known configuration to beat
            if start:
                enqueue(study, start)
                say_warm_start(start)
        study.set_user_attr(SETTINGS_ATTR, study_settings(config))  # last: a creator that died before it is redone
    parent_run_id = study.user_attrs.get(PARENT_RUN_ATTR)
    if parent_run_id and not run_exists(parent_run_id):
        print(f"the study's parent run {parent_run_id} is not in this tracking store; opening a new one", file=sys.stderr)
        parent_run_id = None
    if not parent_run_id:
        parent_run_id = open_parent_run(config, launched_run)
        study.set_user_attr(PARENT_RUN_ATTR, parent_run_id)
    return study, parent_run_id


def refuse_other_warm_start(study: optuna.Study, config: TuneConfig) -> None:
    """A warm start happens when a study is created; a rerun may omit -P warm_start, not name another."""
    started_from = study.user_attrs.get(WARM_START_ATTR, {}).get("study", "")
    if config.warm_start and config.warm_start != started_from:
        raise ParameterError(
            f"study {study.study_name!r} was created "
            + (f"warm-started from {started_from!r}" if started_from else "without a warm start")
            + f", not from {config.warm_start!r}: a warm start applies only when a study is created; "
            "rerun without -P warm_start, or start a new -P study_name"
        )


def say_warm_start(start: WarmStart) -> None:
    print(
        f"warm start: enqueued {len(start.configurations)} configuration(s) of study {start.study!r} "
        f"(its trials {', '.join(map(str, start.trials))}) after trial 0"
        + (f"; not carried (outside this search space): {'; '.join(start.left_out)}" if start.left_out else ""),
        file=sys.stderr,
        flush=True,
    )


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
        for key, value in tags.items():
            client.set_tag(launched_run, key, value)
        return launched_run
    from pipeline.tracking import current_experiment_id

    return client.create_run(current_experiment_id(), run_name=config.study_name, tags=tags).info.run_id


def record_worker(launched_run: str, parent_run_id: str, config: TuneConfig) -> None:
    """`mlflow run` opened a run for this command, but the study already has its parent: make it this
    worker's record, nested under the parent, rather than an empty run at the top of the table.

    (It cannot be deleted: MLflow 3.17's `mlflow run` ends its run after the command exits, and
    ending a deleted run fails, which would fail the command.)"""
    client = MlflowClient()
    client.update_run(launched_run, name=f"worker {worker_id()}")
    tags = {
        "mlflow.parentRunId": parent_run_id,
        "pipeline.stage": "worker",
        "pipeline.joined_run": parent_run_id,
        "optuna.study_name": config.study_name,
    }
    for key, value in tags.items():
        client.set_tag(launched_run, key, value)


def log_parent_params(parent_run_id: str, config: TuneConfig, study: optuna.Study) -> None:
    started_from = study.user_attrs.get(WARM_START_ATTR, {})
    params = {
        "study": config.study,
        "study_name": config.study_name,
        "storage": public_storage(config.storage),
        "sampler": config.sampler,
        "pruner": config.pruner,
        "epochs": config.epochs,
        "seed": config.seed,
        "search_space": str(STUDIES[config.study].search_space),
        "objective": f"maximize {OBJECTIVE_METRIC}" + (f", minimize {config.cost}" if config.cost != "none" else ""),
        # where the enqueued configurations came from: the earlier study and its trial numbers, best first
        "warm_start": started_from.get("study", ""),
        "warm_start_trials": " ".join(map(str, started_from.get("trials", []))),
    }
    if config.cost != "none":
        params["compact_within"] = config.compact_within
    with mlflow.start_run(run_id=parent_run_id):
        log_params(params)
        mlflow.set_tag("optuna.pruner", config.pruner)  # the one in use: `mlflow run` logged -P pruner as typed
    MlflowClient().update_run(parent_run_id, status="RUNNING")  # until the summary ends it


def finished_line(study: optuna.Study, n_trials: int) -> str | None:
    """One line when the study has nothing left to do: all its trials counted and summarised."""
    trials = study.get_trials(deepcopy=False)
    if len(counted(trials)) < n_trials or any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials):
        return None
    if needs_summary(study):
        return None
    line = f"study {study.study_name} is complete: {len(counted(trials))} trials"
    if best_value(study) > -math.inf:
        best = most_accurate(complete(study))
        line += f"; best trial {best.number}, {OBJECTIVE_METRIC} {best.values[0]:.4f}"
    if registered := study.user_attrs.get(REGISTERED_ATTR):
        line += (
            f"; registered as {registered['name']} version {registered['version']} "
            f"(test_accuracy {registered['test_accuracy']:.4f}), {champion_of(registered['name'])}"
        )
    return line + ". Raise -P n_trials to extend it."


def champion_of(name: str) -> str:
    try:
        return f"champion: version {MlflowClient().get_model_version_by_alias(name, CHAMPION).version}"
    except mlflow.exceptions.MlflowException:
        return "no champion"


def tune(
    config: TuneConfig,
    prepare_config: PrepareConfig,
    data_ref: str = "",
    env_manager: str = "local",
    pruner: optuna.pruners.BasePruner | None = None,
    launched_run: str | None = None,
) -> Registered | None:
    """Run (or continue, or extend) the study; the worker that ends it summarises it.

    ``launched_run`` is the run `mlflow run` opened for this command: it becomes the study's parent
    run if the study is new, and this worker's record under the parent otherwise. ``pruner``
    overrides the named one (tests use it to force pruning). Returns what was registered from the
    study's best trial, if anything.
    """
    config = dataclasses.replace(config, study=study_for(config.study, resolve_device(config.device).type == "cuda"))
    if config.cost != "none" and config.pruner != "none":  # Optuna's pruners judge a single objective
        print(f"note: cost={config.cost} makes a multi-objective study, which is not pruned (pruner=none)", file=sys.stderr)
        config = dataclasses.replace(config, pruner="none")
    storage = open_storage(config, on_stale_trial)
    with study_lock(config.storage, config.study_name):
        study, parent_run_id = open_study(storage, config, launched_run)
    if launched_run and launched_run != parent_run_id:
        record_worker(launched_run, parent_run_id, config)
    if line := finished_line(study, config.n_trials):
        print(line, file=sys.stderr)
        return registered_of(study)
    with study_lock(config.storage, config.study_name):  # MLflow's tag upsert is not atomic: one writer at a time
        log_parent_params(parent_run_id, config, study)
    parent = MlflowClient().get_run(parent_run_id)
    try:
        with tempfile.TemporaryDirectory(prefix="tune-data-") as tmp:
            if not data_ref:
                data_ref = run_stage("prepare", dataclasses.asdict(prepare_config), parent, env_manager, code_version())
            folder = download(data_ref, PREPARED_ARTIFACT, tmp)
            data = load_prepared(folder)
            config = dataclasses.replace(config, register_name=model_name(config.register_name, data.manifest["dataset"]))
            with study_lock(config.storage, config.study_name):
                check_data(study, data)
                # Under the lock: workers started at once each inserted this tag, and the server's
                # select-then-insert let two inserts meet (UniqueViolation on PostgreSQL).
                MlflowClient().set_tag(parent_run_id, "pipeline.data", data_ref)
            job = WorkerJob(config, parent_run_id, parent.info.experiment_id, data_ref, str(folder))
            gpus = gpu_assignment(config)
            announce(study, config, data, gpus)
            if len(gpus) == 1:
                run_worker(job, pruner)
                workers = {worker_id()}
            else:
                print(
                    f"{len(gpus)} workers" + (f" on GPUs {', '.join(map(str, gpus))}" if gpus[0] is not None else ""),
                    file=sys.stderr,
                    flush=True,
                )
                workers = run_workers(
                    [dataclasses.replace(job, worker=i, workers=len(gpus), gpu=gpu) for i, gpu in enumerate(gpus)]
                )
            if launched_run and launched_run != parent_run_id:  # what this worker's record shows
                ran = [t.number for t in study.get_trials(deepcopy=False) if t.user_attrs.get(WORKER_ATTR) in workers]
                MlflowClient().log_metric(launched_run, "trials_run", len(ran))
                MlflowClient().set_tag(launched_run, "optuna.trial_numbers", " ".join(map(str, ran)))
    except KeyboardInterrupt:
        if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            MlflowClient().set_terminated(parent_run_id, "KILLED")  # a rerun continues it
        raise
    except StageFailed:
        MlflowClient().set_terminated(parent_run_id, "FAILED")  # its prepare failed; a rerun continues the study
        raise
    return registered_of(study)


def announce(study: optuna.Study, config: TuneConfig, data: PreparedData, gpus: list[str | None]) -> None:
    """Say, before the first trial, what was chosen and about how long it takes here: trial 0's
    speed is measured on a slice of the data; each enqueued trial (trial 0, a warm start's) is
    scaled by its own size, the trials still to be sampled by the space's typical cost."""
    device = resolve_device(config.device)
    trials = study.get_trials(deepcopy=False)
    to_run = max(0, config.n_trials - len(counted(trials)) - sum(t.state == TrialState.RUNNING for t in trials))
    if not to_run:
        return
    definition = STUDIES[config.study]
    probe = PreparedData(Split(*(t[:2048] for t in data.train)), Split(*(t[:256] for t in data.val)), data.test, data.manifest)
    baseline = trial_config(config, optuna.trial.FixedTrial(definition.baseline))
    with contextlib.redirect_stderr(io.StringIO()):  # the probe's epoch lines are not news
        # The second epoch's speed: the first also pays for thread pools, kernels and caches.
        speed = train(dataclasses.replace(baseline, epochs=2), probe).history[-1].samples_per_second
    queued = [t.system_attrs.get("fixed_params", {}) for t in trials if t.state == TrialState.WAITING]
    if not trials:
        queued = [definition.baseline]  # trial 0, enqueued when the first worker starts
    queued = queued[:to_run]
    baselines = sum(relative_cost(definition, params) for params in queued)
    baselines += (to_run - len(queued)) * typical_cost(definition)
    parallel = len({gpu for gpu in gpus if gpu is not None}) or 1  # workers sharing a GPU (or the CPU) share its speed
    seconds = baselines * config.epochs * len(data.train.labels) / speed / parallel
    print(
        f"tune: study {config.study_name!r} ({config.study}: {definition.description}) on {device.type}, {len(gpus)} worker(s): "
        f"{to_run} trial(s) left of {config.n_trials}, {config.epochs} epochs on {len(data.train.labels):,} images each; "
        f"about {max(1, round(seconds / 60))} min here if none is pruned (trial 0 trains {speed:,.0f} images/s)",
        file=sys.stderr,
        flush=True,
    )


def registered_of(study: optuna.Study) -> Registered | None:
    registered = study.user_attrs.get(REGISTERED_ATTR)
    return Registered(**registered) if registered else None


def check_data(study: optuna.Study, data: PreparedData) -> None:
    """Record the data the study tunes on, or refuse other data (call holding the study lock)."""
    sha256 = {split: data.manifest["splits"][split]["sha256"] for split in ("train", "val")}
    stored = study.user_attrs.get(DATA_ATTR)
    if stored is None:
        study.set_user_attr(DATA_ATTR, sha256)
    elif stored != sha256:
        raise ParameterError(
            f"study {study.study_name!r} was created on other data (train/val checksums differ): "
            "its trials would not compare; use the same prepare parameters, or another -P study_name"
        )


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(prog="tune", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data", default="", help="prepare run id to tune on (default: reuse or run prepare with the data flags)"
    )
    parser.add_argument(
        "--env-manager",
        default="local",
        choices=("local", "virtualenv", "uv", "conda"),
        help="environment a prepare run starts in (default: local)",
    )
    add_config_arguments(parser, TuneConfig)
    add_config_arguments(parser, PrepareConfig, skip=("seed",))
    args, (config, prepare_config) = build_configs(parser, argv, TuneConfig, PrepareConfig)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress lines below say it once
    signal.signal(signal.SIGTERM, raise_terminated)  # ends like Ctrl-C: the trial in progress is re-queued
    # Relative paths mean what they meant where the user started (`mlflow run` starts this in the project folder).
    prepare_config = dataclasses.replace(prepare_config, data_dir=user_path(prepare_config.data_dir))
    if storage_kind(config.storage) == "journal":
        config = dataclasses.replace(config, storage=user_path(config.storage))
    # Read once and removed: neither the trials nor spawned workers may log into the run `mlflow run` opened.
    launched_run = os.environ.pop("MLFLOW_RUN_ID", None)
    try:
        check_storage(config.storage, len(gpu_assignment(config)))
        with single_sqlite_worker(config.storage):
            tune(config, prepare_config, args.data, args.env_manager, launched_run=launched_run)
    except StageFailed as error:
        fail(str(error))
    except ParameterError as error:
        if launched_run:
            MlflowClient().set_tag(launched_run, ERROR_TAG, str(error))  # `mlflow run` ends it FAILED
        parser.exit(2, f"tune: error: {error}\n")
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (Terminated, or TrainingInterrupted inside a trial)
        number = getattr(stop, "signal_number", signal.SIGINT)
        then = "the trial in progress was re-queued: rerun the same command to continue the study"
        fail(f"{signal.Signals(number).name}; {then}", 128 + number)


if __name__ == "__main__":
    main()
