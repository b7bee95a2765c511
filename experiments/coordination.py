"""How the workers of one study agree, on primitives the storage engine or the kernel guarantees
(docs/tuning.md, "How the workers agree"): the study lock, which only its holder's release or death
frees, never its age; a lease per running trial, whose loss means the trial lost its worker; and
re-queueing such a trial, or an interrupted one, once, so a study ends with exactly ``n_trials``.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
import time
import warnings
from contextlib import ExitStack, contextmanager
from enum import Enum
from pathlib import Path

import optuna
import sqlalchemy
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial, TrialState

from experiments import attributes
from experiments.job import worker_id
from experiments.storage import (
    DATABASE_RESTART_LIMIT,
    first_line,
    restarting,
    seconds_since_database_back,
    storage_kind,
    wait_out_restarts,
)
from experiments.trials import requeued_numbers, trials_left
from pipeline.config import ParameterError, TuneConfig, say
from pipeline.signals import signals_held_back

MAX_LOST_WORKERS = 3  # parameters that kill their worker this often are counted as failed, not retried


class NextStep(Enum):
    RUN = "run"  # ask for a trial and train it
    WAIT = "wait"  # every trial is taken, but other workers' trials still run (and may be re-queued)
    STOP = "stop"  # nothing runs and nothing is left to ask for


# --- the study lock ---------------------------------------------------------------------------------


def lock_folder(storage: str) -> Path:
    """Where the lock files of a file-based storage live: ``<file>.locks/`` beside it."""
    path = storage if storage_kind(storage) == "journal" else sqlalchemy.make_url(storage).database
    folder = Path(f"{path}.locks")
    folder.mkdir(exist_ok=True)
    return folder


def file_name(study_name: str) -> str:
    """A file name for any study name (they may hold '/', spaces, ...)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in study_name)[:60]
    return f"{safe}-{hashlib.sha256(study_name.encode()).hexdigest()[:12]}"


class Lock:
    """``with lock:`` holds it for the block, waiting as long as it takes; ``acquire(blocking=False)``
    returns False where another holds it."""

    def confirm(self) -> None:
        """Raise if the lock was lost while held (only a database restart can take it)."""

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc_info):
        self.release()


class FileLock(Lock):
    """``flock`` on one file, dropped by the kernel when the holder's process dies; not re-entrant (a
    second acquire in the holding thread raises). Stands in for ``filelock.FileLock``: where a filesystem
    has no ``flock`` that falls back to a soft lock a killed holder never releases (this one fails
    instead), and the study lock shares ``confirm`` with the PostgreSQL lock."""

    held: set[tuple[Path, int]] = set()  # (path, thread) held here: that thread's second acquire would wait for itself

    def __init__(self, path: Path):
        self.path, self.fd = path, None

    def acquire(self, blocking: bool = True) -> bool:
        if (self.path, threading.get_ident()) in FileLock.held:
            raise RuntimeError(f"{self.path} is already held by this thread")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd, self.owner = fd, threading.get_ident()
        FileLock.held.add((self.path, self.owner))
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = None
            FileLock.held.discard((self.path, self.owner))


class AdvisoryLock(Lock):
    """A session-level PostgreSQL advisory lock, taken on a connection of its own: the server drops it
    when that connection ends, so a holder that dies (kill -9, a lost machine) frees it."""

    def __init__(self, url: str, name: str, reached: bool = True):
        self.engine = sqlalchemy.create_engine(os.path.expandvars(url), poolclass=sqlalchemy.pool.NullPool)
        wait_out_restarts(self.engine, reached)  # ``reached``: the storage was opened, so a refusal means a restart
        digest = hashlib.sha256(f"lstm-mnist study lock: {name}".encode()).digest()
        self.key = int.from_bytes(digest[:8], "big", signed=True)  # advisory lock keys are bigint
        self.connection = None

    def acquire(self, blocking: bool = True) -> bool:
        connection = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        if blocking:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": self.key})
        elif not connection.execute(sqlalchemy.text("SELECT pg_try_advisory_lock(:key)"), {"key": self.key}).scalar():
            connection.close()
            return False
        self.connection = connection
        return True

    def confirm(self) -> None:
        self.connection.execute(sqlalchemy.text("SELECT 1"))  # a session a restart ended took its lock along

    def release(self) -> None:
        if self.connection is not None:
            self.connection.close()  # ending the session releases its advisory locks
            self.connection = None
        self.engine.dispose()  # no connection stays open between holdings; the engine serves the lock's next one


def study_lock(storage: str, name: str) -> Lock:
    if storage_kind(storage) == "postgresql":
        return AdvisoryLock(storage, name)
    return FileLock(lock_folder(storage) / f"study-{file_name(name)}.lock")


@contextmanager
def single_sqlite_worker(storage: str):
    """SQLite is not safe for several workers: refuse a second one, from any command, in one line."""
    with ExitStack() as held:
        if storage_kind(storage) == "sqlite":
            lock = FileLock(lock_folder(storage) / "worker.lock")
            if not lock.acquire(blocking=False):
                raise ParameterError(
                    "storage=sqlite://... is used by another tune worker, and SQLite is not safe for several: "
                    "wait for it, or use a journal file (one machine) or PostgreSQL (many)"
                )
            held.callback(lock.release)
        yield


class JournalLock:
    """Optuna's own journal lock (the file every Optuna process takes, optuna-dashboard's included),
    with Ctrl-C and SIGTERM held back from its acquire to its release. Optuna's lock turns a signal that
    lands inside its acquire or release into FileNotFoundError, or leaves its file for every worker to
    wait out a 30 s grace; the trial in progress then fails instead of being re-queued."""

    def __init__(self, journal: str):
        self.lock, self.held_back = optuna.storages.journal.JournalFileOpenLock(journal), ExitStack()

    def acquire(self) -> bool:
        self.held_back.enter_context(signals_held_back())
        try:
            return self.lock.acquire()
        except BaseException:
            self.held_back.close()
            raise

    def release(self) -> None:
        try:
            self.lock.release()
        finally:
            self.held_back.close()  # a signal held back is raised here, once the lock is free


def open_storage(config: TuneConfig, on_stale_trial=None) -> optuna.storages.BaseStorage:
    """A journal file (crash-safe, shared by the processes of one machine), or an RDB storage with
    heartbeats: ``on_stale_trial(study, trial)`` runs for a trial whose worker stopped beating.
    ``${VAR}`` in the URL is read from the environment, so a password can stay out of the command."""
    if storage_kind(config.storage) == "journal":
        backend = optuna.storages.journal.JournalFileBackend(config.storage, lock_obj=JournalLock(config.storage))
        return optuna.storages.JournalStorage(backend)
    deadline = time.monotonic() + DATABASE_RESTART_LIMIT
    while True:
        try:
            with warnings.catch_warnings(action="ignore", category=ExperimentalWarning):  # heartbeats are 'experimental'
                # Workers starting on a new database race to create its tables. First contact: a database that
                # refuses connections is refused at once (a wrong host or port), one restarting is waited for.
                with AdvisoryLock(config.storage, "optuna schema", reached=False):
                    storage = optuna.storages.RDBStorage(
                        os.path.expandvars(config.storage),
                        engine_kwargs={"pool_pre_ping": True},  # a connection cut by a restart is replaced, not used
                        heartbeat_interval=config.heartbeat_interval,
                        grace_period=3 * config.heartbeat_interval,
                        heartbeat_stale_trial_callback=on_stale_trial,
                    )
            wait_out_restarts(storage.engine)
            return storage
        except sqlalchemy.exc.DBAPIError as error:
            if not restarting(error.orig, reached=False) or time.monotonic() >= deadline:
                raise ParameterError(
                    f"storage={config.storage.split('://')[0]}://... cannot be opened: {first_line(error.orig)}"
                ) from None
            time.sleep(1)


# --- liveness: a lease per running trial ----------------------------------------------------------


class TrialLease:
    """Held by a trial's worker from its ask (under the study lock) until its result is told:
    Optuna's heartbeats on PostgreSQL, ``flock`` on the trial's own file on a journal."""

    def __init__(self, study: optuna.Study, storage: optuna.storages.BaseStorage, config: TuneConfig, trial: optuna.Trial):
        self.stop, self.lock = threading.Event(), None
        if storage_kind(config.storage) == "postgresql":
            trial_id = storage.get_trial_id_from_study_id_trial_number(
                storage.get_study_id_from_name(study.study_name), trial.number
            )
            storage.record_heartbeat(trial_id)  # before the study lock is released: never RUNNING without one
            threading.Thread(target=self._beat, args=(storage, trial_id, config.heartbeat_interval), daemon=True).start()
        else:
            self.lock = FileLock(lease_path(config, study.study_name, trial.number))
            self.lock.acquire()
        attributes.WORKER.write(trial, worker_id())  # last: a trial with this attribute has its lease

    def _beat(self, storage, trial_id: int, interval: int) -> None:
        while not self.stop.wait(interval):
            try:
                storage.record_heartbeat(trial_id)
            except Exception as error:  # a database blip: the next beat tries again
                say(f"warning: heartbeat of trial id {trial_id} failed: {error}")

    def release(self) -> None:
        """Call after the trial's result is told: a checker that then finds the lease free sees it finished."""
        self.stop.set()
        if self.lock:
            self.lock.path.unlink(missing_ok=True)
            self.lock.release()


def lease_path(config: TuneConfig, study_name: str, number: int) -> Path:
    return lock_folder(config.storage) / f"trial-{file_name(study_name)}-{number}.lock"


def lease_held(config: TuneConfig, study_name: str, trial: FrozenTrial) -> bool:
    """Whether the worker of a journal trial still holds its lease (call holding the study lock)."""
    if attributes.WORKER.read(trial) is None:  # it died between asking and taking its lease
        return False
    try:
        fd = os.open(lease_path(config, study_name, trial.number), os.O_RDWR)
    except FileNotFoundError:  # released: the trial ended, or its worker never took it
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


# --- counting, and the trials that lost their worker ----------------------------------------------


def requeue(study: optuna.Study, trial: FrozenTrial, reason: str, lost_worker: bool) -> None:
    """Queue ``trial``'s parameters once more and end it FAIL; it no longer counts. Call holding the
    study lock; safe to repeat after a crash halfway: a trial is copied once.

    Stands in for Optuna's ``RetryHeartbeatStaleTrialCallback``: that serves heartbeats on an RDB
    only (a journal has none, and Ctrl-C or SIGTERM re-queue too), copies a trial each time it is
    called, and records the first original where a resumed copy needs the attempt it continues."""
    lost = attributes.LOST_WORKERS.read(trial) + lost_worker
    if trial.number not in requeued_numbers(study.get_trials(deepcopy=False)) and lost < MAX_LOST_WORKERS:
        study.enqueue_trial(trial.params, user_attrs=attributes.requeued_copy(trial, reason, lost))
    study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)


def fail_lost_trials(study: optuna.Study, config: TuneConfig, on_lost) -> None:
    """Re-queue the running trials of a journal study whose worker is gone (call holding the study
    lock). On PostgreSQL Optuna does it from heartbeats, calling the storage's stale-trial callback."""
    postgresql = storage_kind(config.storage) == "postgresql"
    # After an outage every heartbeat is old: the workers that live beat again within a grace of
    # the database's return, so a worker judges heartbeats only a grace after it saw it return.
    if postgresql and seconds_since_database_back() >= 3 * config.heartbeat_interval:
        with warnings.catch_warnings(action="ignore", category=ExperimentalWarning):  # heartbeats are 'experimental'
            optuna.storages.fail_stale_trials(study)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if postgresql and attributes.WORKER.read(trial) is None:  # asked under this lock, its lease never taken (a database cut)
            reason = "its worker lost the database before it started the trial"
        elif not postgresql and not lease_held(config, study.study_name, trial):
            reason = f"its worker {attributes.WORKER.read(trial) or attributes.NOT_RECORDED} stopped while running it"
            # Free lease: either the worker died, or it told its result and let go just now. Look again.
            trial = study.get_trials(deepcopy=False)[trial.number]
        else:
            continue
        if trial.state == TrialState.RUNNING:
            requeue(study, trial, reason, lost_worker=True)
            on_lost(study, trial, reason)


def next_step(study: optuna.Study, n_trials: int) -> NextStep:
    """What a worker does next; call holding the study lock, after ``fail_lost_trials``. Only the count
    decides: an enqueued trial (a warm start's configuration) runs within ``n_trials`` like a sampled
    one, and those past it wait for an extension."""
    if trials_left(study, n_trials):
        return NextStep.RUN
    return NextStep.WAIT if study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) else NextStep.STOP
