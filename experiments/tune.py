"""The ``tune`` entry point: an Optuna study over the pipeline's training loop, tracked in MLflow.

Reads:  a prepared split (``--data``, a prepare run id; or the prepare parameters, whose
        finished prepare run is reused or run once).
Writes: an Optuna study in ``--storage`` (rerun the command to continue or extend it), and in
        MLflow one parent run per study with a child run per trial (params, per-epoch metrics,
        trial number and state as tags; pruned trials end KILLED, failed ones FAILED). When no
        trial runs any more, the parent gets a leaderboard and Optuna's plots, and the best
        trial's own model is registered as ``--register-name``, tested once, and takes the alias
        ``champion`` if its val_accuracy beats the champion's (experiments/summary.py).

Any number of workers may run the same command, on one machine (journal file) or many
(PostgreSQL); experiments/coordination.py says how they agree.

    python -m experiments.tune --study-name lstm-rows --n-trials 40 --data-dir ../shared/data
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import io
import math
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlflow
import optuna
import torch
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from experiments.coordination import (NextStep, TrialLease, storage_kind, check_storage, counted, fail_lost_trials, next_step, open_storage,
                                      WORKER_ATTR, public_storage, requeue, single_sqlite_worker, study_lock, worker_id)
from experiments.studies import OBJECTIVE_METRIC, STUDIES, make_pruner, make_sampler, study_for, typical_cost
from experiments.summary import (MLFLOW_RUN_ATTR, MODEL_URI_ATTR, REGISTERED_ATTR, Registered, needs_summary, report,
                                 summarise)
from pipeline.config import (OneLineParser, ParameterError, PrepareConfig, TrainConfig, TuneConfig, add_config_arguments, build_configs,
                             fail, user_path)
from pipeline.data import PreparedData, Split, load_prepared
from pipeline.main import StageFailed, code_version, run_stage
from pipeline.tracking import (ERROR_TAG, PREPARED_ARTIFACT, Terminated, download, log_params, raise_terminated,
                               start_run_with_system_metrics)
from pipeline.train import log_trained_model, train_and_log
from pipeline.training import TrainingDiverged, resolve_device, train

PARENT_RUN_ATTR = "mlflow_parent_run_id"  # study user attribute: the study's one MLflow parent run
SETTINGS_ATTR = "settings"  # study user attribute: what its trials must share (see study_settings)
DATA_ATTR = "data_sha256"  # study user attribute: the checksums of the train and val splits it tunes on
# A trial that fails with one of these is marked FAIL (and counted) and the study goes on.
TRIAL_ERRORS = (TrainingDiverged, torch.cuda.OutOfMemoryError)


# --- one trial ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerJob:
    """What a worker process needs: plain values only, so it crosses a process boundary."""

    config: TuneConfig
    parent_run_id: str
    experiment_id: str
    data_ref: str  # the prepare run: the lineage every trial's run and model carries
    data_folder: str
    worker: int = 0
    workers: int = 1  # how many run on this machine: they share its CPU threads
    gpu: str | None = None  # the GPU this worker is pinned to (its CUDA_VISIBLE_DEVICES); None: not pinned


def trial_config(config: TuneConfig, trial: optuna.Trial) -> TrainConfig:
    definition = STUDIES[config.study]
    overrides = {**definition.fixed, **definition.suggest(trial)}
    return TrainConfig(**overrides, epochs=config.epochs, seed=config.seed, device=config.device)


def objective(trial: optuna.Trial, job: WorkerJob, data: PreparedData) -> float:
    """Train one sampled configuration in its own child run; return its best val_accuracy.

    The model is logged only when it beats every trial finished so far, so the study's best
    trial always has its own model to register, and no retrain is needed.
    """
    config = trial_config(job.config, trial)
    tags = {"pipeline.stage": "trial", "pipeline.data": job.data_ref, "optuna.study_name": job.config.study_name,
            "optuna.trial_number": str(trial.number)}
    if job.gpu is not None:
        tags["pipeline.cuda_visible_devices"] = job.gpu  # the machine's GPU; gpu_index counts within what the worker sees
    with start_run_with_system_metrics(run_name=f"trial-{trial.number}", experiment_id=job.experiment_id,
                                       parent_run_id=job.parent_run_id, tags=tags) as run:
        trial.set_user_attr(MLFLOW_RUN_ATTR, run.info.run_id)
        device = resolve_device(config.device)
        if device.type == "cuda":  # the allocator's peak, this trial's alone
            torch.cuda.reset_peak_memory_stats(device)

        def report_epoch(metrics):
            trial.report(metrics.val_accuracy, metrics.epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"val_accuracy {metrics.val_accuracy:.4f} at epoch {metrics.epoch} is below the pruner's bar")

        try:
            result, _ = train_and_log(config, data, on_epoch=report_epoch, log_model=False, data_ref=job.data_ref)
            if device.type == "cuda":
                mlflow.log_metric("peak_gpu_memory_mb", torch.cuda.max_memory_allocated(device) / 2**20)
            if result.best_val_accuracy > best_value(trial.study):
                trial.set_user_attr(MODEL_URI_ATTR, log_trained_model(result.model, data, config.reading_order).model_uri)
        except optuna.TrialPruned as pruned:
            mlflow.set_tags({"optuna.trial_state": "PRUNED", "optuna.prune_reason": str(pruned)})
            mlflow.end_run("KILLED")
            raise
        except BaseException as error:
            interrupted = isinstance(error, KeyboardInterrupt)
            state = "REQUEUED" if interrupted else "FAIL"  # an interrupted trial runs again, and only that run counts
            mlflow.set_tags({"optuna.trial_state": state, "optuna.fail_reason": f"{type(error).__name__}: {error}"[:5000]})
            mlflow.end_run("KILLED" if interrupted else "FAILED")
            raise
        mlflow.set_tag("optuna.trial_state", "COMPLETE")
        return result.best_val_accuracy


def best_value(study: optuna.Study) -> float:
    try:
        return study.best_value
    except ValueError:  # no complete trial yet
        return -math.inf


def release_memory() -> None:
    """Free the finished trial's tensors before the next trial allocates its own. Call it once the
    trial's frames are gone: after its exception, if any, was handled and dropped."""
    gc.collect()  # tracebacks hold frames in reference cycles, which only the collector frees
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


# --- the worker loop ------------------------------------------------------------------------------


def run_trials(study: optuna.Study, storage: optuna.storages.BaseStorage, config: TuneConfig,
               objective: Callable[[optuna.Trial], float], *, summarise: Callable[[], None] | None = None,
               worker: int = 0) -> None:
    """The loop every worker runs, on any machine: under the study's lock, re-queue trials that lost
    their worker and decide the next step; train one trial at a time with the lock released.

    The worker that finds no trial running and the summary stale runs ``summarise``, still holding the lock.
    """
    lock = study_lock(config.storage, config.study_name)
    deadline = time.monotonic() + (config.timeout or math.inf)
    sampler_seeded = False
    waiting_since = patience = None
    while True:
        with lock:
            fail_lost_trials(study, config, on_lost=say_lost)
            step = next_step(study, config.n_trials)
            if step is NextStep.RUN and time.monotonic() >= deadline:  # timeout: start nothing new
                step = NextStep.WAIT if study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) else NextStep.STOP
            if step is NextStep.RUN:
                if not sampler_seeded:  # seeded, yet no two workers and no resumed study replay the same draws
                    study.sampler = make_sampler(config.sampler, config.seed + 1009 * len(study.get_trials(deepcopy=False)))
                    sampler_seeded = True
                with warnings.catch_warnings():  # Optuna expects heartbeats under optimize(); TrialLease beats here
                    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
                    trial = study.ask()
                lease = TrialLease(study, storage, config, trial)  # before the lock goes: no RUNNING trial lacks one
            elif step is NextStep.STOP and summarise and needs_summary(study):
                summarise()
        if step is NextStep.STOP:
            return
        if step is NextStep.WAIT:
            # Wait for the others' trials: one that loses its worker is re-queued, and someone must run
            # it. The bound only decides when to leave that to them; it never judges a trial dead.
            if waiting_since is None:
                waiting_since, patience = time.monotonic(), wait_bound(study)
                print(f"[worker {worker}] every trial is taken; waiting up to {patience:.0f} s for the running ones "
                      "(a lost one is re-queued and run here)", file=sys.stderr, flush=True)
            if time.monotonic() >= min(deadline, waiting_since + patience):
                running = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
                print(f"[worker {worker}] trials {', '.join(map(str, running))} still run in other workers, which will "
                      "summarise the study; leaving (rerun this command if they die)", file=sys.stderr, flush=True)
                return
            time.sleep(1)
            continue
        waiting_since = None
        run_one(study, trial, lease, objective, lock, worker)
        release_memory()


def wait_bound(study: optuna.Study) -> float:
    """How long a worker with nothing to ask waits for the others: twice the longest trial so far, at least a minute."""
    durations = [t.duration.total_seconds() for t in study.get_trials(deepcopy=False) if t.duration is not None]
    return max(60.0, 2 * max(durations, default=0.0))


def run_one(study: optuna.Study, trial: optuna.Trial, lease: TrialLease, objective, lock, worker: int) -> None:
    """Run ``trial`` and tell its result; an interrupted one is re-queued, and the interrupt goes on."""
    try:
        value = objective(trial)
    except optuna.TrialPruned:
        study.tell(trial, state=TrialState.PRUNED)
    except TRIAL_ERRORS:
        study.tell(trial, state=TrialState.FAIL)
    except KeyboardInterrupt as stop:
        with lock:
            requeue(study, study.get_trials(deepcopy=False)[trial.number], f"interrupted ({type(stop).__name__})",
                    lost_worker=False)
        print(f"[worker {worker}] trial {trial.number} interrupted: re-queued, it will run again on the next start",
              file=sys.stderr, flush=True)
        raise
    except BaseException:
        study.tell(trial, state=TrialState.FAIL)
        raise
    else:
        study.tell(trial, value)
    finally:
        lease.release()
    say_done(study, study.get_trials(deepcopy=False)[trial.number], worker)


def say_done(study: optuna.Study, trial: optuna.trial.FrozenTrial, worker: int) -> None:
    value = f" {OBJECTIVE_METRIC} {trial.value:.4f}" if trial.value is not None else ""
    best = best_value(study)
    best_text = f"best {best:.4f} (trial {study.best_trial.number})" if best > -math.inf else "no complete trial yet"
    print(f"[worker {worker}] trial {trial.number} {trial.state.name}{value} | {best_text}", file=sys.stderr, flush=True)


def say_lost(study: optuna.Study, trial: optuna.trial.FrozenTrial, reason: str) -> None:
    """A trial lost its worker: end its MLflow run FAILED (the re-queued copy gets a run of its own)."""
    if run_id := trial.user_attrs.get(MLFLOW_RUN_ATTR):
        client = MlflowClient()
        try:
            client.set_tag(run_id, "optuna.trial_state", "REQUEUED")
            client.set_tag(run_id, "optuna.fail_reason", reason)
            client.set_terminated(run_id, "FAILED")
        except mlflow.exceptions.MlflowException as error:
            print(f"warning: could not end the MLflow run of trial {trial.number}: {error}", file=sys.stderr)
    print(f"trial {trial.number}: {reason}; re-queued with the same parameters", file=sys.stderr, flush=True)


def on_stale_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """PostgreSQL: Optuna failed a trial whose heartbeats stopped; re-queue it once."""
    reason = f"its worker {trial.user_attrs.get('worker', '(not yet recorded)')} stopped sending heartbeats"
    requeue(study, trial, reason, lost_worker=True)
    say_lost(study, trial, reason)


def run_worker(job: WorkerJob, pruner: optuna.pruners.BasePruner | None = None) -> None:
    """One worker: train trials until the study has ``n_trials``; any number may run at once."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    signal.signal(signal.SIGTERM, raise_terminated)  # a spawned worker's SIGTERM re-queues its trial too
    if job.workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // job.workers))
    data = load_prepared(job.data_folder)
    storage = open_storage(job.config, on_stale_trial)
    study = optuna.load_study(study_name=job.config.study_name, storage=storage,
                              pruner=pruner or make_pruner(job.config.pruner, job.config.epochs))

    def summarise_study() -> None:
        registered = summarise(study, job.parent_run_id, job.config.register_name, data, job.data_ref, job.config.device)
        print(report(study, registered), file=sys.stderr, flush=True)

    run_trials(study, storage, job.config, lambda trial: objective(trial, job, data), summarise=summarise_study,
               worker=job.worker)


def visible_gpus() -> list[str]:
    """The GPUs this process may use, named as CUDA_VISIBLE_DEVICES names them (or by index)."""
    count = torch.cuda.device_count()
    listed = [name.strip() for name in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if name.strip()]
    return (listed or [str(i) for i in range(count)])[:count]


def gpu_assignment(config: TuneConfig) -> list[str | None]:
    """One entry per worker of this machine: the GPU it is pinned to, worker i on GPU i mod count;
    None for workers on a CPU (or MPS). ``n_workers=auto`` is one per GPU times ``workers_per_gpu``."""
    on_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    gpus = visible_gpus() if on_cuda else []
    if config.n_workers != "auto":
        count = int(config.n_workers)
    else:
        count = len(gpus) * config.workers_per_gpu if gpus else 1
    return [gpus[i % len(gpus)] if gpus else None for i in range(count)]


def run_workers(jobs: list[WorkerJob], target: Callable[[WorkerJob], None] = run_worker) -> set[str]:
    """Run ``jobs`` in processes of their own, each pinned to its GPU; return their worker ids (host:pid)."""
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    processes = [context.Process(target=target, args=(job,), name=f"tune-worker-{job.worker}") for job in jobs]
    for job, process in zip(jobs, processes):
        with pinned_to(job.gpu):  # in the environment the worker starts with: set before CUDA starts there
            process.start()
    try:
        for process in processes:
            process.join()
    except KeyboardInterrupt:  # Ctrl-C reached the workers too: let them re-queue their trials
        for process in processes:
            process.join()
        raise
    failed = [p.name for p in processes if p.exitcode != 0]
    if failed:
        print(f"warning: {', '.join(failed)} exited with an error; the study keeps their finished trials", file=sys.stderr)
    return {f"{socket.gethostname()}:{p.pid}" for p in processes}


@contextmanager
def pinned_to(gpu: str | None):
    """CUDA_VISIBLE_DEVICES=``gpu`` inside the block (a process started there sees only that GPU)."""
    if gpu is None:
        yield
        return
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    try:
        yield
    finally:
        if before is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


# --- the study ------------------------------------------------------------------------------------


def study_settings(config: TuneConfig) -> dict:
    """What every trial of a study must share; a rerun that asks for other values is refused."""
    return {"study": config.study, "epochs": config.epochs, "sampler": config.sampler, "pruner": config.pruner,
            "search_space": STUDIES[config.study].search_space}


def differences(stored: dict, asked: dict) -> list[str]:
    return [f"{name}={stored.get(name)} (this command: {asked[name]})" for name in asked if stored.get(name) != asked[name]]


def refuse_other_settings(study_name: str, stored: dict, asked: dict) -> None:
    if changed := differences(stored, asked):
        raise ParameterError(f"study {study_name!r} was created with {'; '.join(changed)}: its trials would not compare; "
                             "rerun with its settings, or start a new study with another -P study_name")


def open_study(storage: optuna.storages.BaseStorage, config: TuneConfig, launched_run: str | None) -> tuple[optuna.Study, str]:
    """Create the study or load it, and return it with its parent run id. Call holding the study
    lock: the worker that creates it records its settings, trial 0 and parent run before any other looks."""
    try:
        study = optuna.create_study(study_name=config.study_name, storage=storage, direction="maximize")
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=config.study_name, storage=storage)
    if SETTINGS_ATTR in study.user_attrs:
        refuse_other_settings(config.study_name, study.user_attrs[SETTINGS_ATTR], study_settings(config))
    else:  # new, or its creator died before recording anything
        study.set_user_attr(SETTINGS_ATTR, study_settings(config))
        if not study.get_trials(deepcopy=False):
            study.enqueue_trial(STUDIES[config.study].baseline)  # trial 0: the known configuration to beat
    parent_run_id = study.user_attrs.get(PARENT_RUN_ATTR)
    if parent_run_id and not run_exists(parent_run_id):
        print(f"the study's parent run {parent_run_id} is not in this tracking store; opening a new one", file=sys.stderr)
        parent_run_id = None
    if not parent_run_id:
        parent_run_id = open_parent_run(config, launched_run)
        study.set_user_attr(PARENT_RUN_ATTR, parent_run_id)
    return study, parent_run_id


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
    tags = {"mlflow.parentRunId": parent_run_id, "pipeline.stage": "worker", "pipeline.joined_run": parent_run_id,
            "optuna.study_name": config.study_name}
    for key, value in tags.items():
        client.set_tag(launched_run, key, value)
def log_parent_params(parent_run_id: str, config: TuneConfig) -> None:
    params = {"study": config.study, "study_name": config.study_name, "storage": public_storage(config.storage),
              "sampler": config.sampler, "pruner": config.pruner, "epochs": config.epochs, "seed": config.seed,
              "search_space": str(STUDIES[config.study].search_space), "objective": f"maximize {OBJECTIVE_METRIC}"}
    with mlflow.start_run(run_id=parent_run_id):
        log_params(params)
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
        line += f"; best trial {study.best_trial.number}, {OBJECTIVE_METRIC} {study.best_value:.4f}"
    if registered := study.user_attrs.get(REGISTERED_ATTR):
        line += (f"; registered as {registered['name']} version {registered['version']} "
                 f"(test_accuracy {registered['test_accuracy']:.4f})")
    return line + ". Raise -P n_trials to extend it."


def tune(config: TuneConfig, prepare_config: PrepareConfig, data_ref: str = "", env_manager: str = "local",
         pruner: optuna.pruners.BasePruner | None = None, launched_run: str | None = None) -> Registered | None:
    """Run (or continue, or extend) the study; the worker that ends it summarises it.

    ``launched_run`` is the run `mlflow run` opened for this command: it becomes the study's parent
    run if the study is new, and this worker's record under the parent otherwise. ``pruner``
    overrides the named one (tests use it to force pruning). Returns what was registered from the
    study's best trial, if anything.
    """
    config = dataclasses.replace(config, study=study_for(config.study, resolve_device(config.device).type == "cuda"))
    storage = open_storage(config, on_stale_trial)
    with study_lock(config.storage, config.study_name):
        study, parent_run_id = open_study(storage, config, launched_run)
    if launched_run and launched_run != parent_run_id:
        record_worker(launched_run, parent_run_id, config)
    if line := finished_line(study, config.n_trials):
        print(line, file=sys.stderr)
        return registered_of(study)
    log_parent_params(parent_run_id, config)
    parent = MlflowClient().get_run(parent_run_id)
    try:
        with tempfile.TemporaryDirectory(prefix="tune-data-") as tmp:
            if not data_ref:
                data_ref = run_stage("prepare", dataclasses.asdict(prepare_config), parent, env_manager, code_version())
            folder = download(data_ref, PREPARED_ARTIFACT, tmp)
            data = load_prepared(folder)
            with study_lock(config.storage, config.study_name):
                check_data(study, data)
            MlflowClient().set_tag(parent_run_id, "pipeline.data", data_ref)
            job = WorkerJob(config, parent_run_id, parent.info.experiment_id, data_ref, str(folder))
            gpus = gpu_assignment(config)
            announce(study, config, data, gpus)
            if len(gpus) == 1:
                run_worker(job, pruner)
                workers = {worker_id()}
            else:
                print(f"{len(gpus)} workers" + (f" on GPUs {', '.join(map(str, gpus))}" if gpus[0] is not None else ""),
                      file=sys.stderr, flush=True)
                workers = run_workers([dataclasses.replace(job, worker=i, workers=len(gpus), gpu=gpu) for i, gpu in enumerate(gpus)])
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
    speed is measured on a slice of the data, the rest scaled by the space's typical cost."""
    device = resolve_device(config.device)
    trials = study.get_trials(deepcopy=False)
    to_run = max(0, config.n_trials - len(counted(trials)) - sum(t.state == TrialState.RUNNING for t in trials))
    if not to_run:
        return
    definition = STUDIES[config.study]
    probe = PreparedData(Split(*(t[:2048] for t in data.train)), Split(*(t[:256] for t in data.val)), data.test, data.manifest)
    with contextlib.redirect_stderr(io.StringIO()):  # the probe's epoch line is not news
        speed = train(dataclasses.replace(trial_config(config, optuna.trial.FixedTrial(definition.baseline)), epochs=1),
                      probe).history[0].samples_per_second
    trial_zero_left = not trials or trials[0].state in (TrialState.WAITING, TrialState.RUNNING)
    baselines = (1 if trial_zero_left else 0) + (to_run - (1 if trial_zero_left else 0)) * typical_cost(definition)
    parallel = len({gpu for gpu in gpus if gpu is not None}) or 1  # workers sharing a GPU (or the CPU) share its speed
    seconds = baselines * config.epochs * len(data.train.labels) / speed / parallel
    print(f"tune: study {config.study_name!r} ({config.study}: {definition.description}) on {device.type}, {len(gpus)} worker(s): "
          f"{to_run} trial(s) left of {config.n_trials}, {config.epochs} epochs on {len(data.train.labels):,} images each; "
          f"at most about {max(1, round(seconds / 60))} min here (trial 0 trains {speed:,.0f} images/s; pruning ends weak "
          "trials sooner)", file=sys.stderr, flush=True)


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
        raise ParameterError(f"study {study.study_name!r} was created on other data (train/val checksums differ): "
                             "its trials would not compare; use the same prepare parameters, or another -P study_name")


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(prog="tune", description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="", help="prepare run id to tune on (default: reuse or run prepare with the data flags)")
    parser.add_argument("--env-manager", default="local", choices=("local", "virtualenv", "uv", "conda"),
                        help="environment a prepare run starts in (default: local)")
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
    except Terminated:
        fail("SIGTERM; the trial in progress was re-queued: rerun the same command to continue the study", 143)
    except KeyboardInterrupt:
        fail("interrupted; the trial in progress was re-queued: rerun the same command to continue the study", 130)


if __name__ == "__main__":
    main()
