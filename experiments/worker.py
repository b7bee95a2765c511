"""A tuning worker: the loop that every worker of a study runs, on any machine, and the work it trains.

Under the study's lock (experiments/coordination.py) the loop re-queues work that lost its worker
and decides the next step: a trial while the search goes on, then the items of the study's queue
(experiments/confirm.py): the confirmation's trainings, then its summary. It trains with the lock
released; a retried trial or training resumes from its lost attempt's checkpoint (experiments/runs.py).
"""

from __future__ import annotations

import gc
import math
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import mlflow
import optuna
import torch
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from experiments import attributes
from experiments.budget import another_trial_fits, say_budget_end, say_budget_wait
from experiments.confirm import companion, pending, plan, queue_summary, say_trained, train_seed
from experiments.coordination import NextStep, TrialLease, fail_lost_trials, next_step, open_storage, requeue, study_lock
from experiments.job import WorkerJob
from experiments.objective import objective
from experiments.progress import say_done, say_time_left_once
from experiments.runs import checkpoint_runs, forget_checkpoints
from experiments.storage import DATABASE_ERRORS, first_line
from experiments.studies import make_pruner, make_sampler
from experiments.summary import report, summarise
from experiments.trials import n_counted, needs_summary, requeued_numbers
from pipeline.config import TuneConfig, say
from pipeline.data import PreparedData, load_prepared
from pipeline.numerics import share_cpu
from pipeline.signals import raise_if_terminated, raise_terminated, signal_handler, signals_held_back
from pipeline.tracking import set_tags, unreachable, when_reachable
from pipeline.training import TrainingDiverged


@dataclass
class Work:
    """A trial asked for, of the study or of its queue, with its lease and what trains it."""

    study: optuna.Study
    trial: optuna.Trial
    lease: TrialLease
    run: Callable[[optuna.Trial], float | tuple[float, float]]
    say: Callable[[optuna.Study, optuna.trial.FrozenTrial], None]  # one line once its result is told


def run_trials(
    study: optuna.Study,
    storage: optuna.storages.BaseStorage,
    config: TuneConfig,
    objective: Callable[[optuna.Trial], float],
    *,
    after_search: Callable[[object, bool], Work | NextStep] | None = None,
    worker: int = 0,
    workers: int = 1,
    budget_deadline: float = math.inf,
) -> None:
    """Train work until there is none; once the search has ended, ``after_search(lock, over_budget)``
    gives the next item of the study's queue, or says to wait or stop.

    Stands in for Optuna's ``study.optimize`` with ``MaxTrialsCallback``: optimize asks without a
    lock and the callback counts after a trial ends, so workers started together overshoot
    ``n_trials``, and neither knows a re-queued copy from its original, a budget, or the queue after it.
    """
    lock = study_lock(config.storage, config.study_name)
    deadline = time.monotonic() + (config.timeout or math.inf)
    said_done = partial(say_done, worker=worker, n_trials=config.n_trials)
    waiting = None
    while True:
        raise_if_terminated()  # a SIGTERM whose exception was lost on the way (see pipeline/signals.py)
        try:
            with lock:
                step, over_budget = decide(study, config, deadline, budget_deadline, workers)
                if step is NextStep.RUN:
                    # seeded by the trial count: asks take turns under the lock, so no two workers or resumed study replay draws
                    study.sampler = make_sampler(config.sampler, config.seed + 1009 * len(study.get_trials(deepcopy=False)))
                    step = Work(study, *take(study, storage, config, lock), objective, said_done)
                elif step is NextStep.STOP and after_search:
                    step = after_search(lock, over_budget)
        except DATABASE_ERRORS as error:  # a call cut by a database restart: look again once it is back
            say(f"[worker {worker}] the study's database failed ({first_line(error)}); looking again")
            time.sleep(1)
            continue
        if step is NextStep.STOP:
            return
        if step is NextStep.WAIT:
            if (waiting := waiting or Waiting(study, worker)).over(deadline, over_budget):
                return
            time.sleep(1)
            continue
        waiting = None  # a wait, or a budget that holds this worker, later is said again
        try:
            if finished := run_one(step, lock, worker):
                step.say(step.study, finished)
            say_time_left_once(study, config, worker, workers)
        except DATABASE_ERRORS as error:  # cut after the training: its result is told, or its trial re-queued as lost
            say(f"[worker {worker}] the study's database failed ({first_line(error)}); looking again")
        gc.collect()  # the finished trial's tensors, held by tracebacks in reference cycles, before the next allocates
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()


def decide(
    study: optuna.Study, config: TuneConfig, deadline: float, budget_deadline: float, workers: int
) -> tuple[NextStep, bool]:
    """Under the study lock: re-queue the trials that lost their worker, then say what this worker may
    do, and whether the budget holds a trial back. No trial starts after the timeout (``deadline``), nor
    one that ``budget_deadline`` leaves too little time: while others run, decided again when they end."""
    fail_lost_trials(study, config, on_lost=say_lost)
    step = next_step(study, config.n_trials)
    over_budget = step is NextStep.RUN and not another_trial_fits(study, config, budget_deadline, workers)
    if step is NextStep.RUN and (time.monotonic() >= deadline or over_budget):
        step = next_step(study, n_trials=0)  # start nothing new: wait for the running trials, or stop
    return step, over_budget


class Waiting:
    """A worker with nothing to take waits for the others' work: one that loses its worker is
    re-queued, and someone must run it. The bound only decides when to leave that to them; it never
    judges a trial dead. A budget that holds back a trial waits for the running ones, past the bound."""

    def __init__(self, study: optuna.Study, worker: int):
        self.study, self.worker = study, worker
        self.since, self.budget_said = None, False

    def over(self, deadline: float, over_budget: bool) -> bool:
        """Whether to leave: the bound, or the study's timeout, has passed."""
        if over_budget:  # decided again when the running trials, timed, have ended
            self.budget_said = self.budget_said or say_budget_wait(self.worker)
            return False
        if self.since is None:
            self.since, self.patience = time.monotonic(), wait_bound(self.study)
            say(
                f"[worker {self.worker}] nothing left to take; waiting up to {self.patience:.0f} s for the work other "
                "workers run (a lost one is re-queued and run here)"
            )
        if time.monotonic() < min(deadline, self.since + self.patience):
            return False
        say(
            f"[worker {self.worker}] other workers still run the study's last work and will summarise it; leaving "
            "(rerun this command if they die)"
        )
        return True


def wait_bound(study: optuna.Study) -> float:
    """How long a worker with nothing to ask waits for the others: twice the longest trial so far, at least a minute."""
    durations = [t.duration.total_seconds() for t in study.get_trials(deepcopy=False) if t.duration is not None]
    return max(60.0, 2 * max(durations, default=0.0))


def take(study: optuna.Study, storage, config: TuneConfig, lock) -> tuple[optuna.Trial, TrialLease]:
    """The next trial of ``study`` (its oldest enqueued one first) and its lease; call holding the
    study lock, so no RUNNING trial lacks a lease."""
    lock.confirm()  # still ours: a database restart may have ended the session that held it
    with warnings.catch_warnings():  # Optuna expects heartbeats under optimize(); TrialLease beats here
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        trial = study.ask()
    return trial, TrialLease(study, storage, config, trial)


def run_one(work: Work, lock, worker: int) -> optuna.trial.FrozenTrial | None:
    """Run ``work`` and tell its result; return its trial as told (its checkpoints removed), or None if
    it was re-queued (interrupted, cut off, or given up by the other workers: its copy resumes from its checkpoint)."""
    study, trial = work.study, work.trial
    label = f"[worker {worker}] {'item' if attributes.WORK.read(trial) else 'trial'} {trial.number}"

    trained = False  # its training has ended, and ended its run as it ended (experiments/runs.py)

    def requeue_it(reason: str, said: str) -> None:
        with signals_held_back(), lock:  # `mlflow run` follows a Ctrl-C with a SIGTERM: it waits for the re-queue
            trials = study.get_trials(deepcopy=False)
            now = trials[trial.number]
            if now.state != TrialState.RUNNING and trial.number not in requeued_numbers(trials):
                forget_checkpoints(checkpoint_runs(study, now))  # its tell reached the database before the cut
                say(f"{label} {now.state.name}: its result was told before the cut")
                return
            if now.state == TrialState.RUNNING:  # else the other workers gave it up
                requeue(study, now, reason, lost_worker=False)
            if trained:  # a run that ended as its training did would count beside its copy's
                end_requeued_run(trial, reason, "KILLED")
            say(f"{label}{said}")

    try:
        try:
            outcome = {"values": work.run(trial)}
        except optuna.TrialPruned:
            outcome = {"state": TrialState.PRUNED}
        except (TrainingDiverged, torch.cuda.OutOfMemoryError):  # marked FAIL (and counted); the study goes on
            outcome = {"state": TrialState.FAIL}
        trained = True
        checkpoints = checkpoint_runs(study, trial)  # read before the tell: a database cut just after it keeps none
        tell(study, trial, **outcome)
    except optuna.exceptions.UpdateFinishedTrialError:  # the other workers gave it up: its lease lapsed (a cut, a stall)
        end_requeued_run(trial, "given up by the other workers while it ran", "KILLED")  # its copy's run counts
        say(f"{label} was given up by the other workers while it ran (its lease lapsed); its copy resumes from its checkpoint")
        return None
    except DATABASE_ERRORS as error:
        requeue_it(f"its database call failed ({first_line(error)})", ": the study's database failed; re-queued")
        return None
    except KeyboardInterrupt as stop:
        requeue_it(f"interrupted ({type(stop).__name__})", " interrupted: re-queued, it resumes on the next start")
        raise
    except BaseException as error:
        if not unreachable(error):  # the tracking server did not answer: re-queued; anything else fails the trial
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            raise
        requeue_it("its tracking server did not answer", ": the tracking server does not answer; re-queued")
        when_reachable(lambda: MlflowClient().search_experiments(max_results=1), f"worker {worker}")
        return None
    finally:
        work.lease.release()
    forget_checkpoints(checkpoints)
    return study.get_trials(deepcopy=False)[trial.number]


def tell(study: optuna.Study, trial: optuna.Trial, **outcome) -> None:
    """``study.tell``, raising UpdateFinishedTrialError where another worker has ended the trial: Optuna raises
    that when it ends during the tell, and ValueError when the tell finds it ended."""
    try:
        study.tell(trial, **outcome)
    except ValueError:
        if not study.get_trials(deepcopy=False)[trial.number].state.is_finished():
            raise
        raise optuna.exceptions.UpdateFinishedTrialError(f"trial {trial.number} was ended by another worker") from None


def say_lost(study: optuna.Study, trial: optuna.trial.FrozenTrial, reason: str) -> None:
    """A trial lost its worker: end its MLflow run FAILED (the re-queued copy gets a run of its own)."""
    end_requeued_run(trial, reason, "FAILED")
    say(f"trial {trial.number}: {reason}; re-queued with the same parameters")


def end_requeued_run(trial: optuna.Trial | optuna.trial.FrozenTrial, reason: str, status: str) -> None:
    """End the MLflow run of a trial whose re-queued copy goes on: tagged REQUEUED, with ``reason``."""
    if run_id := attributes.RUN_ID.read(trial):
        try:
            set_tags(run_id, {"optuna.trial_state": "REQUEUED", "optuna.fail_reason": reason})
            MlflowClient().set_terminated(run_id, status)
        except mlflow.exceptions.MlflowException as error:
            say(f"warning: could not end the MLflow run of trial {trial.number}: {error}")


def on_stale_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """PostgreSQL: Optuna failed a trial whose heartbeats stopped; re-queue it once."""
    reason = f"its worker {attributes.WORKER.read(trial) or attributes.NOT_RECORDED} stopped sending heartbeats"
    requeue(study, trial, reason, lost_worker=True)
    say_lost(study, trial, reason)


class AfterSearch:
    """What a worker takes once the search has ended: the queue's confirmation trainings, planned by
    the first worker to get here, then the summary, queued when every training has ended. Called
    holding the study lock; nothing is trained under it."""

    def __init__(self, study: optuna.Study, storage, job: WorkerJob, data: PreparedData):
        self.study, self.storage, self.job, self.data = study, storage, job, data
        self.queue, self.budget_said = None, False

    def __call__(self, lock, over_budget: bool) -> Work | NextStep:
        if not needs_summary(self.study):
            return NextStep.STOP
        job = self.job
        if over_budget and not self.budget_said:  # said once, before the confirmation
            say_budget_end(self.study, job.config, job.worker, job.deadline, job.workers)
            self.budget_said = True
        self.queue = self.queue or companion(self.storage, self.study.study_name)
        fail_lost_trials(self.queue, job.config, on_lost=say_lost)
        plan(self.study, self.queue, job, self.data)
        items = pending(self.queue)
        if not items:
            queue_summary(self.queue, n_counted(self.study))
        elif all(item.state == TrialState.RUNNING for item in items):
            return NextStep.WAIT
        return Work(self.queue, *take(self.queue, self.storage, job.config, lock), self.run_item, self.say_item)

    def run_item(self, item: optuna.Trial) -> float:
        work = attributes.WORK.read(item)
        if not work.get("summary"):
            return train_seed(item, self.study, self.job, self.data)
        at = n_counted(self.study)
        if work["at"] != at or len(pending(self.queue)) > 1:  # the study was extended since it was queued
            say(f"[worker {self.job.worker}] the summary of {work['at']} trials is superseded")
            return float(work["at"])
        registered = summarise(self.study, self.queue, self.job, self.data)
        say(report(self.study, registered, self.job.experiment_id))
        return float(at)

    def say_item(self, queue: optuna.Study, item: optuna.trial.FrozenTrial) -> None:
        if not attributes.WORK.read(item).get("summary"):
            say_trained(queue, item, self.job.worker)


def run_worker(job: WorkerJob, pruner: optuna.pruners.BasePruner | None = None) -> None:
    """One worker of the study; any number may run at once (experiments/gpus.py starts several on one machine)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if job.workers > 1:
        share_cpu(job.workers)
    data = load_prepared(job.data_folder)
    storage = open_storage(job.config, on_stale_trial)
    study = optuna.load_study(
        study_name=job.config.study_name, storage=storage, pruner=pruner or make_pruner(job.config.pruner, job.config.epochs)
    )
    with signal_handler(raise_terminated, signal.SIGTERM):  # a SIGTERM re-queues the trial in progress
        run_trials(
            study,
            storage,
            job.config,
            partial(objective, job=job, data=data),
            after_search=AfterSearch(study, storage, job, data),
            worker=job.worker,
            workers=job.workers,
            budget_deadline=job.deadline,
        )
