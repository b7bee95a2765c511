"""Load test of the shared tuning infrastructure: K worker processes, one Optuna study, one MLflow server.

    python -m benchmarks.load_test                       # K = 2 4 8 16, about 5 minutes on 2 cores
    python -m benchmarks.load_test --workers 2 --trials-per-worker 3 --out /tmp/load   # smoke run

Each worker runs tune's own worker loop (``experiments.worker.run_trials``) on a study in PostgreSQL,
with trials that cost only bookkeeping: 3 params, and a child run on an ``mlflow server --app-name
basic-auth`` in the same cluster. Everything lives in a temp folder removed at the end (``tests/infra.py``).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import optuna
import torch
from mlflow.tracking import MlflowClient

from benchmarks.report import RESULTS, describe, environment, flag, render, write_report
from experiments import attributes
from experiments.coordination import open_storage
from experiments.worker import on_stale_trial, run_trials
from pipeline.config import TuneConfig
from tests.infra import mlflow_server, postgres_cluster


def worker(storage_url: str, study_name: str, experiment_id: str, parent_run_id: str, env: dict, n_trials: int, start, results):
    """One worker process: tune's worker loop with trials of bookkeeping only; puts its timings on ``results``."""
    os.environ.update(env, MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT="true")  # no "View run" line per trial
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    settings = {"study": "smoke", "study_name": study_name, "storage": storage_url, "n_trials": n_trials, "sampler": "random"}
    config = TuneConfig(**settings, heartbeat_interval=10)
    storage = open_storage(config, on_stale_trial)
    study = optuna.load_study(study_name=study_name, storage=storage)
    latencies, mlflow_seconds, errors, last = [], [], [], [0.0]

    def objective(trial: optuna.Trial) -> float:
        now = time.perf_counter()  # since the previous trial began: one whole trial's bookkeeping
        latencies.append(now - last[0])
        last[0] = now
        hidden, layers = trial.suggest_int("hidden_size", 16, 512, log=True), trial.suggest_int("num_layers", 1, 3)
        learning_rate = trial.suggest_float("learning_rate", 1e-4, 1e-1, log=True)
        val_accuracy = 1 - learning_rate / (hidden * layers)  # stands in for training
        tags = {"optuna.study_name": study_name, "optuna.trial_number": str(trial.number)}
        with mlflow.start_run(experiment_id=experiment_id, parent_run_id=parent_run_id, tags=tags) as run:
            attributes.RUN_ID.write(trial, run.info.run_id)
            mlflow.log_params(trial.params)
            mlflow.log_metrics({"val_accuracy": val_accuracy, "val_loss": 1 - val_accuracy, "train_loss": learning_rate})
        mlflow_seconds.append(time.perf_counter() - now)
        return val_accuracy

    start.wait()  # the workers of a round begin together, after their imports
    began = last[0] = time.perf_counter()
    try:
        run_trials(study, storage, config, objective)
    except Exception as error:  # the storage or the server gave up
        errors.append(f"{type(error).__name__}: {error}")
    mine = [t for t in study.get_trials(deepcopy=False) if (attributes.WORKER.read(t) or "").endswith(f":{os.getpid()}")]
    errors += [f"trial {t.number}: {t.state.name}" for t in mine if t.state != optuna.trial.TrialState.COMPLETE]
    ended = time.perf_counter()
    results.put({"began": began, "ended": ended, "latencies": latencies, "mlflow": mlflow_seconds, "errors": errors})


def run_round(k: int, trials_per_worker: int, storage_url: str, experiment_id: str, tracking_env: dict) -> dict:
    """K workers on a fresh study and parent run; their combined timings."""
    study_name = f"load-{k}"
    optuna.create_study(study_name=study_name, storage=storage_url, direction="maximize")
    client = MlflowClient(tracking_env["MLFLOW_TRACKING_URI"])
    parent = client.create_run(experiment_id, run_name=study_name, tags={"optuna.study_name": study_name})
    # forkserver: workers fork from a clean process that imported mlflow and optuna once, so 16 of
    # them start in seconds on 2 cores and share no connections with this process.
    context = multiprocessing.get_context("forkserver")
    start, results = context.Barrier(k), context.Queue()
    arguments = (storage_url, study_name, experiment_id, parent.info.run_id, tracking_env, k * trials_per_worker, start, results)
    processes = [context.Process(target=worker, args=arguments) for _ in range(k)]
    for process in processes:
        process.start()
    reports = [results.get(timeout=600) for _ in processes]
    for process in processes:
        process.join()
    client.set_terminated(parent.info.run_id)
    latencies, mlflow_seconds = ([t for r in reports for t in r[key]] for key in ("latencies", "mlflow"))
    wall = max(r["ended"] for r in reports) - min(r["began"] for r in reports)
    errors = [e for r in reports for e in r["errors"]] + [f"worker exited {p.exitcode}" for p in processes if p.exitcode]
    completed = len(latencies) - sum(e.startswith("trial ") for e in errors)
    stats = {"workers": k, "trials": len(latencies), "trials_per_s": completed / wall, "errors": len(errors)}
    for name, seconds in (("", latencies), ("mlflow_", mlflow_seconds)):
        stats[f"{name}p50_ms"], stats[f"{name}p95_ms"] = np.percentile(1000 * np.array(seconds or [np.nan]), [50, 95])
    return stats | {"error_samples": errors[:5]}


COLUMNS = {"K workers": "{workers}", "trials": "{trials}", "trials/s": "{trials_per_s:.2f}", "p50 ms": "{p50_ms:.0f}"}
COLUMNS |= {"p95 ms": "{p95_ms:.0f}", "mlflow p50 ms": "{mlflow_p50_ms:.0f}", "mlflow p95 ms": "{mlflow_p95_ms:.0f}"}
COLUMNS |= {"errors": "{errors}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    flag(parser, "--workers", [2, 4, 8, 16], "worker process counts K, one round each", nargs="+", type=int)
    flag(parser, "--trials-per-worker", 3, "trials each worker runs per round", type=int)
    flag(parser, "--server-workers", 2, "uvicorn workers of the MLflow server", type=int)
    flag(parser, "--auth-cache-ttl", 60, "seconds the server trusts a checked password; 0 hashes it on every request", type=int)
    flag(parser, "--out", RESULTS, "folder for the .json and .md results", type=Path)
    args = parser.parse_args()

    multiprocessing.get_context("forkserver").set_forkserver_preload(["mlflow", "optuna", "psycopg"])
    rounds = []
    with tempfile.TemporaryDirectory(prefix="load-test-") as tmp, postgres_cluster(Path(tmp) / "postgres") as postgres:
        databases = [postgres.create_database(name) for name in ("optuna", "tracking", "auth")]
        server_options = {"workers": args.server_workers, "auth_cache_ttl": args.auth_cache_ttl, "job_execution": False}
        with mlflow_server(Path(tmp) / "mlflow", *databases[1:], **server_options) as server:
            tuner = ("tuner", os.urandom(16).hex())  # the workers' MLflow user, given EDIT on the experiment
            server.create_user(*tuner)
            os.environ.update(server.env(*server.admin))
            experiment_id = MlflowClient(server.uri).create_experiment("load-test")
            server.grant(tuner[0], experiment_id, "EDIT")
            for k in args.workers:
                rounds.append(run_round(k, args.trials_per_worker, databases[0], experiment_id, server.env(*tuner)))
                print(f"K={k}: {rounds[-1]['trials_per_s']:.2f} trials/s, {rounds[-1]['errors']} error(s)", flush=True)
    env = environment(torch.device("cpu"))
    report = {"environment": env, "settings": {k: v for k, v in vars(args).items() if k != "out"}, "rounds": rounds}
    text = (
        f"# load test: {describe(env)}\n\nOne Optuna study (PostgreSQL, RandomSampler, heartbeats every 10 s) and one MLflow "
        f"server (basic-auth, {args.server_workers} uvicorn worker(s), auth cache {args.auth_cache_ttl} s) shared by K "
        f"worker processes, {args.trials_per_worker} trials each; a trial is bookkeeping only. Latency: one trial's "
        f"bookkeeping, from one trial's start to the next; mlflow: its start_run..end_run part.\n\n`{env['command']}`\n\n"
    )
    text += render(rounds, COLUMNS) + "\n"
    stem = write_report(args.out, "load", report, text)
    print(text + f"\nwritten: {stem}.json, {stem}.md")


if __name__ == "__main__":
    main()
