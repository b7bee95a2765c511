"""Load test of the shared tuning infrastructure: K worker processes, one Optuna study, one MLflow server.

Each worker process runs tune.py's worker loop (``run_trials``: the study's lock, ask, lease, tell) with
near-zero-cost trials against ONE Optuna study in PostgreSQL (RDBStorage with heartbeats) and
logs each trial as a nested MLflow run to ONE ``mlflow server --app-name basic-auth`` whose store
is the same cluster. A trial's bookkeeping is what tune.py does around training: the study lock (a
PostgreSQL advisory lock), the check for lost trials, ask, the first heartbeat, suggest 3 params,
a child run under the study's parent run (tags, params, 3 metrics), tell. The study's budget is
K x trials-per-worker, shared as in tune.py.

    python -m benchmarks.load_test                       # K = 2 4 8 16, about 5 minutes on 2 cores
    python -m benchmarks.load_test --workers 2 --trials-per-worker 3 --out /tmp/load   # smoke run

Everything (cluster, server, logs) lives in a temp folder that is removed at the end; results go
to ``--out``/load-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.report import add_common_flags, write_report
from experiments.infra import mlflow_server, postgres_cluster
from pipeline.tables import markdown_table


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def worker(
    storage_url: str, study_name: str, experiment_id: str, parent_run_id: str, env: dict, n_trials: int, start, results
) -> None:
    """One worker process running tune.py's own worker loop (lock, ask, child run, tell) with
    trials that cost nothing but that bookkeeping; puts its timings on ``results``."""
    import mlflow
    import optuna

    from experiments.coordination import open_storage
    from experiments.worker import on_stale_trial, run_trials
    from pipeline.config import TuneConfig

    os.environ.update(env, MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT="true")  # one "View run" line per trial
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    config = TuneConfig(
        study="smoke", study_name=study_name, storage=storage_url, n_trials=n_trials, sampler="random", heartbeat_interval=10
    )
    storage = open_storage(config, on_stale_trial)
    study = optuna.load_study(study_name=study_name, storage=storage)
    latencies, mlflow_seconds, errors = [], [], []
    last = [0.0]

    def objective(trial: optuna.Trial) -> float:
        # The gap since the previous trial began is one whole trial's bookkeeping: tell, lock, ask, lease ... run.
        now = time.perf_counter()
        latencies.append(now - last[0])
        last[0] = now
        hidden_size = trial.suggest_int("hidden_size", 16, 512, log=True)
        num_layers = trial.suggest_int("num_layers", 1, 3)
        learning_rate = trial.suggest_float("learning_rate", 1e-4, 1e-1, log=True)
        val_accuracy = 1 - learning_rate / (hidden_size * num_layers)  # stands in for training
        began = time.perf_counter()
        with mlflow.start_run(
            run_name=f"trial-{trial.number}",
            experiment_id=experiment_id,
            parent_run_id=parent_run_id,
            tags={"optuna.study_name": study_name, "optuna.trial_number": str(trial.number)},
        ) as run:
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            mlflow.log_params(trial.params)
            mlflow.log_metrics({"val_accuracy": val_accuracy, "val_loss": 1 - val_accuracy, "train_loss": learning_rate})
            mlflow.set_tag("optuna.trial_state", "COMPLETE")
        mlflow_seconds.append(time.perf_counter() - began)
        return val_accuracy

    start.wait()  # all workers of this round begin together, after their imports
    began = last[0] = time.perf_counter()
    try:
        run_trials(study, storage, config, objective)
    except Exception as error:  # the storage or the server gave up
        errors.append(f"{type(error).__name__}: {error}")
    ended = time.perf_counter()
    mine = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("worker", "").endswith(f":{os.getpid()}")]
    errors += [f"trial {t.number}: {t.state.name}" for t in mine if t.state != optuna.trial.TrialState.COMPLETE]
    results.put(
        {
            "began": began,
            "ended": ended,
            "latencies": latencies,
            "mlflow_seconds": mlflow_seconds,
            "errors": errors,
            "trials": len(latencies),
        }
    )


def run_round(k: int, trials_per_worker: int, storage_url: str, experiment_id: str, tracking_env: dict) -> dict:
    """K workers on a fresh study and parent run; their combined timings."""
    import optuna
    from mlflow.tracking import MlflowClient

    study_name = f"load-{k}"
    optuna.create_study(study_name=study_name, storage=storage_url, direction="maximize")
    client = MlflowClient(tracking_env["MLFLOW_TRACKING_URI"])
    parent = client.create_run(experiment_id, run_name=study_name, tags={"optuna.study_name": study_name})

    # forkserver: workers fork from a clean process that imported mlflow and optuna once, so
    # 16 of them start in seconds on 2 cores and share no connections with this process.
    context = multiprocessing.get_context("forkserver")
    start, results = context.Barrier(k), context.Queue()
    processes = [
        context.Process(
            target=worker,
            args=(
                storage_url,
                study_name,
                experiment_id,
                parent.info.run_id,
                tracking_env,
                k * trials_per_worker,
                start,
                results,
            ),
        )
        for _ in range(k)
    ]
    for process in processes:
        process.start()
    reports = [results.get(timeout=600) for _ in processes]
    for process in processes:
        process.join()
    client.set_terminated(parent.info.run_id)

    latencies = [t for r in reports for t in r["latencies"]]
    mlflow_seconds = [t for r in reports for t in r["mlflow_seconds"]]
    wall = max(r["ended"] for r in reports) - min(r["began"] for r in reports)
    errors = [e for r in reports for e in r["errors"]] + [f"worker exited {p.exitcode}" for p in processes if p.exitcode]
    completed = len(latencies) - sum(e.startswith("trial ") for e in errors)
    return {
        "workers": k,
        "trials": len(latencies),
        "completed": completed,
        "wall_s": wall,
        "trials_per_s": completed / wall if wall else float("nan"),
        "p50_ms": 1000 * percentile(latencies, 50),
        "p95_ms": 1000 * percentile(latencies, 95),
        "mlflow_p50_ms": 1000 * percentile(mlflow_seconds, 50),
        "mlflow_p95_ms": 1000 * percentile(mlflow_seconds, 95),
        "errors": len(errors),
        "error_samples": errors[:5],
    }


def markdown(report: dict) -> str:
    header = (
        f"# load test: {report['cpus']} CPU(s), {report['date']}\n\n"
        f"One Optuna study (PostgreSQL, RandomSampler, heartbeat 10 s) and one MLflow server "
        f"(basic-auth, {report['server_workers']} uvicorn worker(s), auth cache {report['auth_cache_ttl']} s) "
        f"shared by K worker processes, {report['trials_per_worker']} trials each; a trial is bookkeeping only. "
        f"Latency: one trial's bookkeeping, from one trial's start to the next; mlflow: its start_run..end_run part.\n\n"
        f"`{report['command']}`\n\n"
    )
    rows = [
        {
            "K workers": r["workers"],
            "trials": r["trials"],
            "trials/s": f"{r['trials_per_s']:.2f}",
            "p50 ms": f"{r['p50_ms']:.0f}",
            "p95 ms": f"{r['p95_ms']:.0f}",
            "mlflow p50 ms": f"{r['mlflow_p50_ms']:.0f}",
            "mlflow p95 ms": f"{r['mlflow_p95_ms']:.0f}",
            "errors": r["errors"],
        }
        for r in report["rounds"]
    ]
    return header + markdown_table(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[2, 4, 8, 16],
        help="worker process counts K, one round each (default: 2 4 8 16)",
    )
    parser.add_argument("--trials-per-worker", type=int, default=3, help="trials each worker runs per round (default: 3)")
    parser.add_argument("--server-workers", type=int, default=2, help="uvicorn workers of the MLflow server (default: 2)")
    parser.add_argument(
        "--auth-cache-ttl",
        type=int,
        default=60,
        help="seconds the server trusts a checked password; 0 hashes it on every request (default: 60)",
    )
    add_common_flags(parser, device=False, data_dir=False)
    args = parser.parse_args()

    multiprocessing.get_context("forkserver").set_forkserver_preload(["mlflow", "optuna", "psycopg"])
    with tempfile.TemporaryDirectory(prefix="load-test-") as tmp, postgres_cluster(Path(tmp) / "postgres") as postgres:
        storage_url = postgres.create_database("optuna")
        with mlflow_server(
            Path(tmp) / "mlflow",
            postgres.create_database("tracking"),
            postgres.create_database("auth"),
            workers=args.server_workers,
            auth_cache_ttl=args.auth_cache_ttl,
            job_execution=False,
        ) as server:
            tuner = ("tuner", os.urandom(16).hex())  # the workers' MLflow user, given EDIT on the experiment
            server.create_user(*tuner)
            from mlflow.tracking import MlflowClient

            os.environ.update(server.env(*server.admin))
            experiment_id = MlflowClient(server.uri).create_experiment("load-test")
            server.grant(tuner[0], experiment_id, "EDIT")
            os.environ.update(server.env(*tuner))
            rounds = []
            for k in args.workers:
                rounds.append(run_round(k, args.trials_per_worker, storage_url, experiment_id, server.env(*tuner)))
                r = rounds[-1]
                print(
                    f"K={k}: {r['trials_per_s']:.2f} trials/s, p50 {r['p50_ms']:.0f} ms, p95 {r['p95_ms']:.0f} ms, "
                    f"{r['errors']} error(s)",
                    flush=True,
                )

    now = datetime.datetime.now()
    import mlflow
    import optuna

    report = {
        "date": now.isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "mlflow": mlflow.__version__,
        "optuna": optuna.__version__,
        "command": "python -m benchmarks.load_test " + " ".join(sys.argv[1:]),
        "trials_per_worker": args.trials_per_worker,
        "server_workers": args.server_workers,
        "auth_cache_ttl": args.auth_cache_ttl,
        "rounds": rounds,
    }
    text = markdown(report)
    stem = write_report(args.out, "load", report, text)
    print(text + f"\nwritten: {stem}.json, {stem}.md")


if __name__ == "__main__":
    main()
