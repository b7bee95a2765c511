"""Outages lose nothing: PostgreSQL down for longer than the heartbeat grace, the tracking server
down during a trial, and PostgreSQL restarted while the study is summarised.

Each worker is a ``python -m experiments.tune`` process (``hooked_tune``) whose trainings and
model registrations pass gates: a gate the test holds stops the worker there until the test
opens it, so the test decides what is in progress when a server goes down. The PostgreSQL
outages stop a cluster of the study's own, so the MLflow server's database stays up. What must
hold after each: every worker ends with status 0, the study has exactly ``n_trials`` counted
trials, all COMPLETE, no configuration is trained from epoch 1 twice, a finished training's
val_accuracy is its trial's value, and the study is summarised once.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from sqlalchemy.engine import make_url

from tests.infra import postgres_cluster

HOOK_FOLDER_ENV, WORKER_ENV, HOLD_ENV = "OUTAGE_TEST_FOLDER", "OUTAGE_TEST_WORKER", "OUTAGE_TEST_HOLD"

# A beat lands seconds late on a loaded machine (the whole suite on 2 cores): LATE leaves 10 s of the grace.
HEARTBEAT = 5  # -P heartbeat_interval: a trial silent for 3 beats (15 s) is judged lost
OUTAGE = 20  # seconds PostgreSQL stays down: longer than the grace, with a beat to spare
LATE = 5  # at most this many seconds one worker reconnects after the others: well within the grace

# How long a worker may take to reach a gate or end: a hang, not slowness. Under the whole suite on
# 2 cores a 1-epoch trial on 512 images has taken 2.5 min (most of it saving its model).
PATIENCE = 480

# MLflow's client retries a request that finds no server for about 4 minutes (7 retries, backoff
# factor 2); with these it gives up after about 2 s, so that a 20 s outage stands for a longer one.
SHORT_MLFLOW_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


# --- the worker side: ``python -m experiments.tune`` with gates -----------------------------------


class Hook:
    """What a held worker records (``events.jsonl``) and the gates it waits at, in one folder."""

    def __init__(self, folder: Path, worker: str, hold: set[str]):
        self.folder, self.worker, self.hold = folder, worker, hold
        self.counts: collections.Counter = collections.Counter()

    def number(self, kind: str) -> int:
        self.counts[kind] += 1
        return self.counts[kind] - 1

    def record(self, event: str, **fields) -> None:
        with open(self.folder / "events.jsonl", "a") as events:  # one short line per write: appends do not interleave
            events.write(json.dumps({"worker": self.worker, "event": event, **fields}) + "\n")

    def gate(self, kind: str, name: str) -> None:
        """Say ``<worker>-<name>`` is reached; if ``kind`` is held, wait until the test opens it (or all)."""
        gate = f"{self.worker}-{name}"
        (self.folder / f"{gate}.reached").touch()
        while kind in self.hold and not any((self.folder / f"{g}.open").exists() for g in (gate, "all")):
            time.sleep(0.05)


def hooked_tune() -> None:
    """``python -m experiments.tune`` whose trainings pass the gates ``train-before`` and
    ``train-after`` and whose model registrations pass ``register``; every epoch trained and
    every training's result is recorded. Run as ``python -c "from tests.test_outages import
    hooked_tune; hooked_tune()" <tune flags>``. The patches go in before experiments/ is
    imported, so its ``from ... import`` lines bind the gated functions."""
    import mlflow

    from pipeline import training

    hold = set(filter(None, os.environ.get(HOLD_ENV, "").split(",")))
    hook = Hook(Path(os.environ[HOOK_FOLDER_ENV]), os.environ[WORKER_ENV], hold)
    real_train, real_register, real_create_version = training.train, mlflow.register_model, MlflowClient.create_model_version

    def train(config, data, *args, on_epoch=None, **kwargs):
        n, settings = hook.number("train"), dataclasses.asdict(config)
        hook.gate("train-before", f"train{n}-before")

        def epoch(metrics):
            hook.record("epoch", config=settings, epoch=metrics.epoch)
            if on_epoch:
                on_epoch(metrics)

        result = real_train(config, data, *args, on_epoch=epoch, **kwargs)
        hook.record("trained", config=settings, val_accuracy=result.best_val_accuracy)
        hook.gate("train-after", f"train{n}-after")
        return result

    def register_model(*args, **kwargs):
        hook.gate("register", f"register{hook.number('register')}")
        return real_register(*args, **kwargs)

    def create_model_version(self, *args, **kwargs):
        hook.gate("register", f"register{hook.number('register')}")
        return real_create_version(self, *args, **kwargs)

    training.train, mlflow.register_model, MlflowClient.create_model_version = train, register_model, create_model_version
    sys.argv = ["tune", *sys.argv[1:]]
    runpy.run_module("experiments.tune", run_name="__main__", alter_sys=True)


# --- the test side --------------------------------------------------------------------------------


class Workers:
    """Held ``tune`` workers of one study, each in a process group of its own, and their gates."""

    def __init__(self, cluster, storage: str, env: dict[str, str], folder: Path):
        self.cluster, self.storage, self.env, self.folder = cluster, storage, env, folder
        folder.mkdir()
        self.processes: dict[str, tuple[subprocess.Popen, Path]] = {}

    def start(self, name: str, n_trials: int, hold: tuple[str, ...] = (), **env: str) -> None:
        command = [sys.executable, "-c", "from tests.test_outages import hooked_tune; hooked_tune()"]
        command += ["--study", "smoke", "--study-name", self.cluster["name"], "--storage", self.storage]
        command += ["--n-trials", str(n_trials), "--epochs", "1", "--pruner", "none", "--device", "cpu"]
        command += ["--data", str(self.cluster["folder"]), "--register-name", self.cluster["name"], "--confirm-top", "0"]
        command += ["--heartbeat-interval", str(HEARTBEAT)]
        env = {**self.env, **env, HOOK_FOLDER_ENV: str(self.folder), WORKER_ENV: name, HOLD_ENV: ",".join(hold)}
        env["OMP_NUM_THREADS"] = "1"  # two workers and a server share two cores
        log = self.folder / f"{name}.log"
        with open(log, "w") as output:
            process = subprocess.Popen(
                command, cwd=self.cluster["tmp"], env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.processes[name] = (process, log)

    def log(self, name: str) -> str:
        return self.processes[name][1].read_text(errors="replace")

    def check_running(self) -> None:
        for name, (process, _) in self.processes.items():
            if process.poll() is not None:
                pytest.fail(f"worker {name} ended ({process.returncode}) too early:\n{self.log(name)[-4000:]}")

    def reached(self, gate: str) -> bool:
        return (self.folder / f"{gate}.reached").exists()

    def wait_for(self, *gates: str, timeout: float = PATIENCE) -> str:
        """Wait until a worker reaches one of ``gates``; the first found."""
        deadline = time.monotonic() + timeout
        while not (found := [gate for gate in gates if self.reached(gate)]):
            self.check_running()
            if time.monotonic() > deadline:
                pytest.fail(f"no worker reached {' or '.join(gates)} in {timeout:.0f} s")
            time.sleep(0.1)
        return found[0]

    def open(self, gate: str = "all") -> None:
        (self.folder / f"{gate}.open").touch()

    def signal(self, name: str, number: signal.Signals) -> None:
        os.killpg(self.processes[name][0].pid, number)

    def check_all_ended_well(self, timeout: float = PATIENCE) -> None:
        """Open every gate, wait for every worker and check each ended with status 0."""
        self.open()
        deadline = time.monotonic() + timeout
        for name, (process, _) in self.processes.items():
            try:
                process.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"worker {name} still runs after {timeout:.0f} s:\n{self.log(name)[-4000:]}")
            assert process.returncode == 0, f"worker {name} ended with status {process.returncode}:\n{self.log(name)[-4000:]}"

    def kill(self) -> None:
        for process, _ in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def events(self, event: str) -> list[dict]:
        path = self.folder / "events.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return [record for record in map(json.loads, lines) if record["event"] == event]

    def trained(self, name: str) -> list[dict]:
        """Worker ``name``'s finished trainings, in order: their config and best val_accuracy."""
        return [record for record in self.events("trained") if record["worker"] == name]

    def trained_from_epoch_1(self) -> collections.Counter:
        """How often each configuration was trained from epoch 1, by any worker (a resumed training starts later)."""
        return collections.Counter(json.dumps(e["config"], sort_keys=True) for e in self.events("epoch") if e["epoch"] == 1)


@pytest.fixture
def study_db(tmp_path):
    """A PostgreSQL cluster of the study's own (``.stop()``, ``.start()``), its URL with the
    password, and the storage URL a worker gets (the password in PGPASSWORD)."""
    with postgres_cluster(tmp_path / "study-postgres") as db:
        url = make_url(db.create_database("study"))
        storage = f"{url.drivername}://{url.username}@{url.host}:{url.port}/{url.database}"
        yield db, url.render_as_string(hide_password=False), storage, url.password


@pytest.fixture
def workers(cluster, tmp_path):
    """``workers(storage, password)``: a Workers of the ``cluster`` study on that storage; killed at the end."""
    made = []

    def make(storage: str, password: str) -> Workers:
        made.append(Workers(cluster, storage, {**cluster["env"], "PGPASSWORD": password}, tmp_path / "hooks"))
        return made[-1]

    yield make
    for held in made:
        held.kill()


def load(cluster, url: str) -> optuna.Study:
    return optuna.load_study(study_name=cluster["name"], storage=url)


def with_config(trials: list[optuna.trial.FrozenTrial], config: dict) -> list[optuna.trial.FrozenTrial]:
    """The trials whose parameters are ``config``'s."""
    return [t for t in trials if t.params and all(config.get(k) == v for k, v in t.params.items())]


def check_study(cluster, url: str, workers: Workers, n_trials: int) -> list[optuna.trial.FrozenTrial]:
    """Exactly ``n_trials`` counted trials, all COMPLETE, and no configuration trained from epoch 1
    twice; the counted trials."""
    from experiments.trials import counted

    trials = counted(load(cluster, url).trials)
    assert len(trials) == n_trials and {t.state.name for t in trials} == {"COMPLETE"}, [(t.number, t.state.name) for t in trials]
    again = {config: n for config, n in workers.trained_from_epoch_1().items() if n > 1}
    assert not again, f"trained again from epoch 1: {again}"
    runs = cluster["client"].search_runs([cluster["experiment_id"]], "tags.`pipeline.stage` = 'trial'")
    assert not [run.info.run_id for run in runs if cluster["client"].list_artifacts(run.info.run_id, "checkpoint")]
    return trials


# --- the outages ----------------------------------------------------------------------------------


@pytest.mark.slow(seconds=75)
def test_postgres_down_longer_than_the_grace_loses_no_training(cluster, study_db, workers):
    """Worker A trains through a PostgreSQL outage longer than the heartbeat grace while worker B,
    its own trial told, waits for A's. When the database is back, B looks first: A, heartbeats
    and all, reconnects up to ``LATE`` s later, within the grace. Then A's training ends, and it
    is what its trial (or a re-queued copy of it) keeps."""
    db, url, storage, password = study_db
    held = workers(storage, password)
    held.start("a", n_trials=2, hold=("train-after",))
    held.start("b", n_trials=2, hold=("train-after",))
    held.wait_for("a-train0-after")
    held.wait_for("b-train0-after")
    [a_training], [b_training] = held.trained("a"), held.trained("b")
    held.open("b-train0-after")
    while not [t for t in with_config(load(cluster, url).trials, b_training["config"]) if t.state.name == "COMPLETE"]:
        held.check_running()
        time.sleep(0.2)
    [a_trial] = [t.number for t in with_config(load(cluster, url).trials, a_training["config"])]

    db.stop()
    time.sleep(OUTAGE)
    held.signal("a", signal.SIGSTOP)
    db.start()
    back = time.monotonic()
    while time.monotonic() < back + LATE and load(cluster, url).trials[a_trial].state.name == "RUNNING":
        time.sleep(0.2)
    held.signal("a", signal.SIGCONT)
    held.open("a-train0-after")

    held.check_all_ended_well()
    trials = check_study(cluster, url, held, n_trials=2)
    [kept] = with_config(trials, a_training["config"])
    assert kept.value == a_training["val_accuracy"]


@pytest.mark.slow(seconds=70)
def test_a_tracking_server_outage_during_a_trial_loses_nothing(cluster, mlflow_server, workers):
    """The MLflow server stops as a trial starts training, for longer than the client's own
    retries (``SHORT_MLFLOW_RETRIES``), and starts again: the trial trains, logs and ends while it
    is down, and what it trained is its value."""
    held = workers(cluster["storage"], cluster["env"]["PGPASSWORD"])  # the study's database stays up
    held.start("w", n_trials=2, hold=("train-before",), **SHORT_MLFLOW_RETRIES)
    held.wait_for("w-train0-before")
    mlflow_server.stop()
    try:
        held.open("w-train0-before")
        time.sleep(20)
    finally:
        mlflow_server.start()  # the session's server, which later tests use

    held.check_all_ended_well()
    trials = check_study(cluster, cluster["url"], held, n_trials=2)
    [first, *_] = held.trained("w")
    [kept] = with_config(trials, first["config"])
    assert kept.value == first["val_accuracy"]


@pytest.mark.slow(seconds=55)
def test_postgres_restarted_during_the_summary_summarises_once(cluster, study_db, workers):
    """Two workers; PostgreSQL stops for 3 s while one of them summarises the study (held before it
    registers the best model), which ends every session it had open, and starts again. The
    study is summarised once: one version registered, tested once, one summary on the parent run."""
    db, url, storage, password = study_db
    held = workers(storage, password)
    held.start("a", n_trials=2, hold=("register",))
    held.start("b", n_trials=2, hold=("register",))
    summarising = held.wait_for("a-register0", "b-register0")
    db.stop()
    time.sleep(3)
    db.start()
    other = {"a-register0": "b-register0", "b-register0": "a-register0"}[summarising]
    deadline = time.monotonic() + 10  # the other worker's time to look at the study, and begin a summary if it may
    while time.monotonic() < deadline and not held.reached(other):
        time.sleep(0.2)

    held.check_all_ended_well()
    check_study(cluster, url, held, n_trials=2)
    client = cluster["client"]
    versions = client.search_model_versions(f"name = '{cluster['name']}'")
    assert len(versions) == 1, f"{len(versions)} versions registered: the study was summarised more than once"
    [parent] = client.search_runs([cluster["experiment_id"]], "tags.`pipeline.stage` = 'tune'")
    assert [m.step for m in client.get_metric_history(parent.info.run_id, "n_complete_trials")] == [2]
    assert len(client.search_runs([cluster["experiment_id"]], "tags.`pipeline.stage` = 'evaluate'")) == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="PostgreSQL's tools run as another user only when the tests run as root")
def test_a_cluster_outlives_another_pytest_session_starting(postgres, tmp_path_factory):
    """A pytest session that starts resets the shared pytest-of-<user> folder (or with --basetemp, that folder)
    to 0700; a running cluster still reaches its own files (a CHECKPOINT writes them) and answers."""
    import psycopg

    base = tmp_path_factory.getbasetemp()
    shared = next((folder for folder in (base, *base.parents) if folder.name.startswith("pytest-of-")), base)
    mode = shared.stat().st_mode
    shared.chmod(0o700)  # what another session's start does
    try:
        with psycopg.connect(
            host=postgres.host, port=postgres.port, user="postgres", password=postgres.password, autocommit=True
        ) as conn:
            conn.execute("CHECKPOINT")
        assert postgres.create_database("after_reset").startswith("postgresql://")
    finally:
        shared.chmod(mode)
