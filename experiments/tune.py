"""The ``tune`` entry point: an Optuna study over the pipeline's training loop, tracked in MLflow.

Reads:  a prepared split (``--data``, a prepare run id; or the prepare parameters, whose
        finished prepare run is reused or run once).
Writes: an Optuna study in ``--storage`` (resumable: rerun the command to continue it), and in
        MLflow one parent run per study with a nested child run per trial (params, per-epoch
        metrics, trial number and state as tags; pruned trials end KILLED, failed ones FAILED).
        When the search ends, the parent gets ``best_val_accuracy``, the best parameters (tags
        ``best.<name>``), a leaderboard (CSV, HTML) and Optuna's plots (HTML, PNG); the best
        parameters are retrained and evaluated on the test set once, and that model is registered
        as ``--register-name``, taking the alias ``champion`` only if it beats the current one.

    python -m experiments.tune --study-name lstm-rows --n-trials 40 --data-dir ../shared/data
"""

from __future__ import annotations

import dataclasses
import gc
import math
import multiprocessing
import os
import random
import resource
import socket
import sys
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlflow
import optuna
import torch
from mlflow.tracking import MlflowClient
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from experiments.studies import OBJECTIVE_METRIC, STUDIES, make_pruner, make_sampler
from pipeline.config import (EvaluateConfig, OneLineParser, ParameterError, PrepareConfig, TrainConfig, TuneConfig,
                             add_config_arguments, build_configs, fail)
from pipeline.data import SEQUENCE_SHAPES, PreparedData, load_prepared
from pipeline.evaluate import evaluate_and_log
from pipeline.main import code_version, run_stage
from pipeline.tracking import PREPARED_ARTIFACT, download, log_params, process_alive
from pipeline.train import train_and_log
from pipeline.training import TrainingDiverged

PARENT_RUN_ATTR = "mlflow_parent_run_id"  # study user attribute: the study's MLflow parent run
SUMMARISED_ATTR = "summarised_at_trials"  # study user attribute: the trial count last summarised
CHAMPION = "champion"
# A trial that fails with one of these is marked FAIL and the study goes on.
TRIAL_ERRORS = (TrainingDiverged, torch.cuda.OutOfMemoryError)


# --- storage --------------------------------------------------------------------------------------


def open_storage(config: TuneConfig) -> optuna.storages.BaseStorage:
    """An RDB storage with heartbeats (a trial whose worker died is failed and retried once), or a
    journal file (crash-safe, shared by the processes of one machine).

    ``${VAR}`` in the URL is read from the environment, so a password can stay out of the command.
    """
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats are 'experimental'
    if "://" not in config.storage:
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(config.storage))
    from sqlalchemy.exc import DBAPIError

    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(
                os.path.expandvars(config.storage),
                engine_kwargs={"pool_pre_ping": True},  # survive a database restart between trials
                heartbeat_interval=config.heartbeat_interval,
                grace_period=3 * config.heartbeat_interval,
                heartbeat_stale_trial_callback=retry_stale_trial,
            )
        except DBAPIError as error:  # workers starting together on a new database race to create its tables
            if "already exists" not in str(error) or attempt == 4:
                raise
            time.sleep(random.uniform(0.2, 1.0))


def public_storage(storage: str) -> str:
    """``storage`` with any password replaced by ***, fit to log."""
    if "://" not in storage:
        return storage
    from sqlalchemy.engine import make_url

    return make_url(storage).render_as_string(hide_password=True)


def check_storage(storage: str) -> None:
    if "://" in storage:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError, NoSuchModuleError

        scheme = storage.split("://")[0]
        try:
            url = make_url(storage)
            url.get_dialect()
        except (ArgumentError, NoSuchModuleError, ValueError):  # the URL is not echoed: it may hold a password
            raise ParameterError(f"storage={scheme}://... is not allowed: must be a journal file path or an RDB URL "
                                 "(sqlite://, postgresql://, mysql://)") from None
        if url.password and not (url.password.startswith("${") and url.password.endswith("}")):
            raise ParameterError(f"storage={scheme}://... holds a password, which `mlflow run` would log as a param: "
                                 "put it in the environment (PGPASSWORD, ~/.pgpass, or ${VAR} in the URL)")
    elif not Path(storage).resolve().parent.is_dir():
        raise ParameterError(f"storage={storage!r} is not allowed: its folder {Path(storage).resolve().parent} does not exist")


# --- one trial ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerJob:
    """What a worker process needs: plain values only, so it crosses a process boundary."""

    config: TuneConfig
    parent_run_id: str
    experiment_id: str
    data_folder: str
    worker: int = 0


def trial_config(config: TuneConfig, trial: optuna.Trial) -> TrainConfig:
    definition = STUDIES[config.study]
    overrides = {**definition.fixed, **definition.suggest(trial)}
    return TrainConfig(**overrides, epochs=config.epochs, seed=config.seed, device=config.device)


def objective(trial: optuna.Trial, job: WorkerJob, data: PreparedData, started: Callable[[], None] = lambda: None) -> float:
    """Train one sampled configuration in its own child run; return its best val_accuracy."""
    started()  # the trial exists: other workers may ask for theirs
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    config = trial_config(job.config, trial)
    tags = {"pipeline.stage": "trial", "optuna.study_name": job.config.study_name, "optuna.trial_number": str(trial.number)}
    with mlflow.start_run(run_name=f"trial-{trial.number}", experiment_id=job.experiment_id,
                          parent_run_id=job.parent_run_id, nested=mlflow.active_run() is not None, tags=tags) as run:
        trial.set_user_attr("mlflow_run_id", run.info.run_id)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

        def report(metrics):
            trial.report(metrics.val_accuracy, metrics.epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"val_accuracy {metrics.val_accuracy:.4f} at epoch {metrics.epoch} is below the pruner's bar")

        try:
            result, _ = train_and_log(config, data, on_epoch=report, log_model=False)
        except optuna.TrialPruned as pruned:
            mlflow.set_tags({"optuna.trial_state": "PRUNED", "optuna.prune_reason": str(pruned)})
            mlflow.end_run("KILLED")
            raise
        except BaseException as error:
            reason = f"{type(error).__name__}: {error}"
            mlflow.set_tags({"optuna.trial_state": "FAIL", "optuna.fail_reason": reason[:5000]})
            mlflow.end_run("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
            raise
        finally:
            log_peak_memory()
            release_memory()
        mlflow.set_tag("optuna.trial_state", "COMPLETE")
        return result.best_val_accuracy


def log_peak_memory() -> None:
    metrics = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB
    if torch.cuda.is_available():
        metrics["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    mlflow.log_metrics(metrics)


def release_memory() -> None:
    """Free the finished trial's tensors before the next trial allocates its own."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- workers sharing one study, on one machine or many --------------------------------------------


class StudyLock:
    """Mutual exclusion among all workers of a study, on any machine that reaches its storage.

    The lock is a helper study named ``<study>.lock`` that exists while someone holds it:
    creating a study is atomic in every Optuna storage. It is held only while a worker asks for
    its next trial, so one that stays ``stale_after`` seconds belongs to a dead worker and is broken.
    """

    def __init__(self, storage: optuna.storages.BaseStorage, study_name: str, stale_after: float = 60.0):
        self.storage, self.name, self.stale_after = storage, f"{study_name}.lock", stale_after
        self.held = False

    def acquire(self) -> None:
        token = uuid.uuid4().hex
        seen, seen_since = None, time.monotonic()
        delay = 0.01  # doubles up to 0.5 s: many waiting workers must not flood the database
        while True:
            try:
                optuna.create_study(study_name=self.name, storage=self.storage).set_user_attr("holder", token)
                self.held = True
                return
            except optuna.exceptions.DuplicatedStudyError:
                pass
            try:
                holder = optuna.load_study(study_name=self.name, storage=self.storage).user_attrs.get("holder")
            except KeyError:  # released meanwhile
                continue
            if holder != seen:
                seen, seen_since = holder, time.monotonic()
            elif time.monotonic() - seen_since > self.stale_after:
                print(f"breaking the lock {self.name}: held for over {self.stale_after:.0f} s by a dead worker", file=sys.stderr)
                self._delete()
            time.sleep(random.uniform(0.5, 1.0) * delay)
            delay = min(2 * delay, 0.5)

    def release(self) -> None:
        if self.held:
            self.held = False
            self._delete()

    def _delete(self) -> None:
        try:
            optuna.delete_study(study_name=self.name, storage=self.storage)
        except KeyError:  # someone else broke it
            pass


def retry_stale_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """A trial whose worker died: end its MLflow run FAILED and queue its parameters once more."""
    worker = trial.user_attrs.get("worker", "its worker")
    if run_id := trial.user_attrs.get("mlflow_run_id"):
        client = MlflowClient()
        try:
            client.set_tag(run_id, "optuna.trial_state", "FAIL")
            client.set_tag(run_id, "optuna.fail_reason", f"{worker} stopped while running it")
            client.set_terminated(run_id, "FAILED")
        except mlflow.exceptions.MlflowException as error:
            print(f"warning: could not end the MLflow run of trial {trial.number}: {error}", file=sys.stderr)
    RetryHeartbeatStaleTrialCallback(max_retry=1)(study, trial)
    print(f"trial {trial.number}: {worker} stopped while running it; failed it and queued a retry", file=sys.stderr, flush=True)


def fail_dead_local_trials(study: optuna.Study, trials: list[optuna.trial.FrozenTrial]) -> bool:
    """The journal storage has no heartbeat: fail running trials whose process on this machine is
    gone. Whether any was."""
    dead = [trial for trial in trials if trial.state == TrialState.RUNNING
            and not process_alive(*trial.user_attrs.get("worker", ":").rsplit(":", 1))]
    for trial in dead:
        study.tell(trial.number, state=TrialState.FAIL)
        retry_stale_trial(study, trial)
    return bool(dead)


def next_step(study: optuna.Study, n_trials: int) -> str:
    """``run`` a trial, ``wait`` for the running ones (a dead worker's is retried when found), or ``done``.

    Call it holding the study's lock: the count and the trial asked for next must agree.
    """
    optuna.storages.fail_stale_trials(study)  # RDB storage: trials whose heartbeat stopped
    trials = study.get_trials(deepcopy=False)
    if fail_dead_local_trials(study, trials):
        trials = study.get_trials(deepcopy=False)
    retried = {RetryHeartbeatStaleTrialCallback.retried_trial_number(trial) for trial in trials} - {None}
    states = {trial.state for trial in trials}
    if TrialState.WAITING in states or len(trials) - len(retried) < n_trials:
        return "run"
    return "wait" if TrialState.RUNNING in states else "done"


def run_worker(job: WorkerJob, pruner: optuna.pruners.BasePruner | None = None) -> None:
    """One worker: train trials until the study has ``n_trials``; any number may run at once."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if job.config.n_workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // job.config.n_workers))
    data = load_prepared(job.data_folder)
    storage = open_storage(job.config)
    study = optuna.load_study(study_name=job.config.study_name, storage=storage,
                              pruner=pruner or make_pruner(job.config.pruner, job.config.epochs))
    run_trials(study, storage, job.config, lambda trial, started: objective(trial, job, data, started),
               callbacks=[print_progress(job.worker)])


def run_trials(study: optuna.Study, storage: optuna.storages.BaseStorage, config: TuneConfig,
               objective: Callable[[optuna.Trial, Callable[[], None]], float], callbacks=()) -> None:
    """The loop every worker runs: under the study's lock, find the next step; run one trial at a time.

    ``objective(trial, started)`` must call ``started()`` first: that lets the next worker ask.
    """
    lock = StudyLock(storage, config.study_name)
    deadline = time.monotonic() + (config.timeout or math.inf)
    seeded = False
    while time.monotonic() < deadline:
        lock.acquire()
        try:
            step = next_step(study, config.n_trials)
            if step == "run":
                if not seeded:  # seeded, yet no two workers and no resumed study replay the same draws
                    study.sampler = make_sampler(config.sampler, config.seed + 1009 * len(study.get_trials(deepcopy=False)))
                    seeded = True
                study.optimize(lambda trial: objective(trial, lock.release), n_trials=1, catch=TRIAL_ERRORS,
                               callbacks=list(callbacks))
        finally:
            lock.release()
        if step == "done":
            return
        if step == "wait":  # for the last trials to finish, or a dead worker's to go stale
            time.sleep(1)


def print_progress(worker: int):
    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        value = f"{OBJECTIVE_METRIC} {trial.value:.4f}" if trial.value is not None else ""
        try:
            best = f"best {study.best_value:.4f} (trial {study.best_trial.number})"
        except ValueError:
            best = "no complete trial yet"
        print(f"[worker {worker}] trial {trial.number} {trial.state.name} {value} | {best}", file=sys.stderr, flush=True)

    return callback


# --- the study --------------------------------------------------------------------------------


def create_or_load_study(config: TuneConfig, storage: optuna.storages.BaseStorage) -> tuple[optuna.Study, bool]:
    """The study, and whether this call created it: of workers starting together, exactly one does."""
    try:
        return optuna.create_study(study_name=config.study_name, storage=storage, direction="maximize"), True
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.load_study(study_name=config.study_name, storage=storage), False


def start_parent_run(study: optuna.Study, config: TuneConfig, created: bool) -> mlflow.ActiveRun:
    """Join the study's parent run; the worker that created the study opens it and records it there."""
    if not created:
        deadline = time.monotonic() + 120
        while not (run_id := study.user_attrs.get(PARENT_RUN_ATTR)) and time.monotonic() < deadline:
            time.sleep(0.2)  # its creator records the run moments after creating the study
        try:
            MlflowClient().get_run(run_id)
            if (launched := os.environ.get("MLFLOW_RUN_ID")) and launched != run_id:  # the run `mlflow run` opened
                MlflowClient().set_tag(launched, "pipeline.joined_run", run_id)  # stays empty: say where the work went
            return mlflow.start_run(run_id=run_id)
        except mlflow.exceptions.MlflowException:
            print(f"the study's parent run {run_id} is not in this tracking store; opening a new one", file=sys.stderr)
    run = mlflow.start_run(run_name=config.study_name, tags={"pipeline.stage": "tune", "optuna.study_name": config.study_name})
    study.set_user_attr(PARENT_RUN_ATTR, run.info.run_id)
    return run


def tune(config: TuneConfig, prepare_config: PrepareConfig, data_ref: str = "", env_manager: str = "local",
         pruner: optuna.pruners.BasePruner | None = None) -> dict:
    """Run (or continue) the study, then summarise, retrain the best and register it.

    ``pruner`` overrides the named one (tests use it to force pruning). Returns a summary dict.
    """
    storage = open_storage(config)
    study, created = create_or_load_study(config, storage)
    if created:
        study.enqueue_trial(STUDIES[config.study].baseline)  # trial 0: the known configuration to beat
    parent = start_parent_run(study, config, created)
    try:
        summary = search(study, storage, config, prepare_config, parent, data_ref, env_manager, pruner)
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")  # never left RUNNING; the rerun resumes this run
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run()
    return summary


def search(study: optuna.Study, storage: optuna.storages.BaseStorage, config: TuneConfig, prepare_config: PrepareConfig,
           parent: mlflow.ActiveRun, data_ref: str, env_manager: str, pruner: optuna.pruners.BasePruner | None) -> dict:
    """Inside the open parent run: get the data, run the workers, then summarise and retrain."""
    definition = STUDIES[config.study]
    with tempfile.TemporaryDirectory(prefix="tune-data-") as tmp:
        log_params({
            "study": config.study, "study_name": config.study_name, "storage": public_storage(config.storage),
            "sampler": config.sampler, "pruner": config.pruner, "epochs": config.epochs, "seed": config.seed,
            "search_space": str(definition.search_space), "objective": f"maximize {OBJECTIVE_METRIC}",
        })
        if not data_ref:
            data_ref = run_stage("prepare", dataclasses.asdict(prepare_config), parent, env_manager, code_version())
        mlflow.set_tag("pipeline.data", data_ref)
        folder = download(data_ref, PREPARED_ARTIFACT, tmp)
        job = WorkerJob(config, parent.info.run_id, parent.info.experiment_id, str(folder))
        if config.n_workers == 1:
            run_worker(job, pruner)
        else:
            run_workers([dataclasses.replace(job, worker=i) for i in range(config.n_workers)])

        if not claim_summary(study, storage):
            print("another worker of this study summarises it and retrains its best trial", file=sys.stderr)
            return {"trials": len(study.get_trials(deepcopy=False)), "summarised_here": False}
        summary = summarise(study)
        if summary["complete_trials"]:
            summary.update(retrain_best(study, config, load_prepared(folder)))
    return summary


def claim_summary(study: optuna.Study, storage: optuna.storages.BaseStorage) -> bool:
    """Whether this worker summarises the study: the first to ask at each trial count does."""
    lock = StudyLock(storage, study.study_name)
    lock.acquire()
    try:
        count = len(study.get_trials(deepcopy=False))
        if study.user_attrs.get(SUMMARISED_ATTR) == count:
            return False
        study.set_user_attr(SUMMARISED_ATTR, count)
        return True
    finally:
        lock.release()


def run_workers(jobs: list[WorkerJob]) -> None:
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    processes = [context.Process(target=run_worker, args=(job,), name=f"tune-worker-{job.worker}") for job in jobs]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    failed = [p.name for p in processes if p.exitcode != 0]
    if failed:
        print(f"warning: {', '.join(failed)} exited with an error; the study keeps their finished trials", file=sys.stderr)


def summarise(study: optuna.Study) -> dict:
    """Log the leaderboard, the best trial and Optuna's plots to the active (parent) run."""
    import pandas as pd

    trials = study.trials_dataframe(attrs=("number", "value", "state", "params", "duration", "user_attrs"))
    trials = trials.rename(columns={"value": OBJECTIVE_METRIC}).sort_values(OBJECTIVE_METRIC, ascending=False, na_position="last")
    trials["duration"] = trials["duration"].dt.total_seconds().round(1) if "duration" in trials else None
    counts = trials["state"].value_counts().to_dict()
    with tempfile.TemporaryDirectory() as tmp:
        trials.to_csv(f"{tmp}/leaderboard.csv", index=False)
        trials.to_html(f"{tmp}/leaderboard.html", index=False, float_format="{:.4f}".format, na_rep="")
        log_study_plots(study, Path(tmp) / "plots")
        mlflow.log_artifacts(tmp)
    summary = {"trials": len(trials), "complete_trials": counts.get("COMPLETE", 0), "pruned_trials": counts.get("PRUNED", 0),
               "failed_trials": counts.get("FAIL", 0)}
    mlflow.log_metrics({f"n_{k}": v for k, v in summary.items()})
    if summary["complete_trials"]:
        best = study.best_trial
        mlflow.log_metric("best_val_accuracy", best.value)
        mlflow.set_tags({"best.trial_number": str(best.number), **{f"best.{k}": str(v) for k, v in best.params.items()}})
        summary.update(best_val_accuracy=best.value, best_params=best.params, best_trial=best.number)
    pd.set_option("display.width", 200)
    print(trials.head(10).to_string(index=False), file=sys.stderr)
    return summary


PLOTS = ("optimization_history", "intermediate_values", "param_importances", "parallel_coordinate", "slice", "contour")


def log_study_plots(study: optuna.Study, folder: Path) -> None:
    """Optuna's plots as interactive HTML (plotly) and PNG (matplotlib); skip those the study can't draw yet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization as interactive
    import optuna.visualization.matplotlib as static

    folder.mkdir(parents=True, exist_ok=True)
    for name in PLOTS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # matplotlib plots are 'experimental'
                getattr(interactive, f"plot_{name}")(study).write_html(folder / f"{name}.html", include_plotlyjs="cdn")
                axes = getattr(static, f"plot_{name}")(study)
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).get_figure()
            figure.savefig(folder / f"{name}.png", dpi=110, bbox_inches="tight")
            plt.close(figure)
        except (ValueError, RuntimeError, ZeroDivisionError) as error:  # e.g. importances of one trial
            print(f"note: no {name} plot yet ({error})", file=sys.stderr)


def retrain_best(study: optuna.Study, config: TuneConfig, data: PreparedData) -> dict:
    """Retrain the best parameters, evaluate once on the test set, register, maybe crown champion."""
    best_config = trial_config(config, optuna.trial.FixedTrial(study.best_trial.params))  # replay its suggestions
    with mlflow.start_run(run_name="best-retrain", nested=True, tags={"pipeline.stage": "train", "optuna.study_name": config.study_name}) as run:
        result, model_info = train_and_log(best_config, data)
        model_uri = model_info.model_uri
    with mlflow.start_run(run_name="best-evaluate", nested=True, tags={"pipeline.stage": "evaluate", "pipeline.model": model_uri}):
        evaluation = evaluate_and_log(result.model, data.test.to(result.device), SEQUENCE_SHAPES[best_config.reading_order], data.manifest["dataset"], EvaluateConfig(device=config.device))
    mlflow.log_metric("best_test_accuracy", evaluation.test_accuracy)
    version, crowned = register(model_uri, config, evaluation.test_accuracy)
    return {"test_accuracy": evaluation.test_accuracy, "model_version": version, "champion": crowned, "retrain_run": run.info.run_id}


def register(model_uri: str, config: TuneConfig, test_accuracy: float) -> tuple[str, bool]:
    client = MlflowClient()
    version = mlflow.register_model(model_uri, config.register_name).version
    client.set_model_version_tag(config.register_name, version, "test_accuracy", f"{test_accuracy:.6f}")
    client.set_model_version_tag(config.register_name, version, "optuna.study_name", config.study_name)
    try:
        champion = client.get_model_version_by_alias(config.register_name, CHAMPION)
        to_beat = float(champion.tags.get("test_accuracy", "-1"))
    except mlflow.exceptions.MlflowException:  # no champion yet
        to_beat = -1.0
    crowned = test_accuracy > to_beat
    if crowned:
        client.set_registered_model_alias(config.register_name, CHAMPION, version)
    print(f"registered {config.register_name} version {version} (test_accuracy {test_accuracy:.4f}); "
          f"{'now' if crowned else 'not'} the {CHAMPION}", file=sys.stderr)
    return version, crowned


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(prog="tune", description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="", help="prepare run id to tune on (default: reuse or run prepare with the data flags)")
    parser.add_argument("--env-manager", default="local", choices=("local", "virtualenv", "uv", "conda"),
                        help="environment a prepare run starts in (default: local)")
    add_config_arguments(parser, TuneConfig)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress lines below say it once
    add_config_arguments(parser, PrepareConfig, skip=("seed",))
    args, (config, prepare_config) = build_configs(parser, argv, TuneConfig, PrepareConfig)
    try:
        check_storage(config.storage)
    except ParameterError as error:
        parser.exit(2, f"tune: error: {error}\n")
    try:
        summary = tune(config, dataclasses.replace(prepare_config, data_dir=str(Path(prepare_config.data_dir).resolve())),
                       args.data, args.env_manager)
    except KeyboardInterrupt:
        fail("interrupted; rerun the same command to continue the study", 130)
    print(f"\nstudy {config.study_name}: {summary}")


if __name__ == "__main__":
    main()
