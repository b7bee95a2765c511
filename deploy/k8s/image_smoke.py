"""By hand, not in CI: a built image runs a tiny study as the manifests here run it, on this machine.

A throwaway PostgreSQL (databases optuna, mlflow, mlflow_auth) and an MLflow server with basic-auth on
loopback (tests/infra.py); containers on the host network, credentials only in their environment.
One container prepares the data (prepare-job.yaml), two workers started at once tune on it with
-P data=<run id> (tune-job.yaml), then a third worker gets `docker stop` (SIGTERM, as the kubelet sends)
in the middle of a trial, which must be re-queued. Needs dockerd (DOCKER_HOST) and Debian's postgresql.

    python deploy/k8s/image_smoke.py lstm-mnist:dev --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import mlflow
import optuna

from experiments.attributes import REGISTERED
from tests.infra import mlflow_server, postgres_cluster

EXPERIMENT = "k8s-smoke"


def docker_run(image: str, data_dir: Path, env: dict, name: str, *args: str) -> subprocess.Popen:
    """`docker run` the image's own command line; the variables go by name, their values stay out of argv."""
    command = ["docker", "run", "--rm", "--name", name, "--network", "host", "-v", f"{data_dir.resolve()}:/data:ro"]
    command += [arg for key in env for arg in ("-e", key)]
    command += [image, "mlflow", "run", ".", "--env-manager", "local", "--experiment-name", EXPERIMENT, *args]
    print("$", " ".join(command), flush=True)
    return subprocess.Popen(command, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen) -> str:
    output = process.communicate(timeout=900)[0]
    print(f"  exit {process.returncode}, last line: {output.strip().splitlines()[-1] if output.strip() else ''}", flush=True)
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("image")
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"), help="holds MNIST/raw (default: ../shared/data)")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="image-smoke-") as tmp, postgres_cluster(Path(tmp) / "pg") as pg:
        optuna_url, mlflow_url, auth_url = (pg.create_database(name) for name in ("optuna", "mlflow", "mlflow_auth"))
        with mlflow_server(Path(tmp) / "mlflow", mlflow_url, auth_url) as server:
            os.environ.update(server.env(*server.admin))
            experiment_id = mlflow.MlflowClient(server.uri).create_experiment(EXPERIMENT)
            server.create_user("tuner", "tuner-long-secret")
            server.grant("tuner", experiment_id, "MANAGE")  # docs/scale-out.md: checkpoints are removed
            db = urlsplit(optuna_url)  # the password goes in PGPASSWORD, never in -P
            storage = f"postgresql://{db.username}@{db.hostname}:{db.port}{db.path}"
            env = {**server.env("tuner", "tuner-long-secret"), "PGPASSWORD": db.password}

            started = time.monotonic()
            output = finish(docker_run(args.image, args.data_dir, env, "prepare", "-e", "prepare", "-P", "data_dir=/data"))
            print(f"prepare: {time.monotonic() - started:.0f} s")
            data = re.search(r"; run ([0-9a-f]{32})", output).group(1)
            tune = ["-e", "tune", "-P", f"storage={storage}", "-P", "study=smoke", "-P", "n_workers=1", "-P", f"data={data}"]
            started = time.monotonic()
            workers = [docker_run(args.image, args.data_dir, env, f"worker-{i}", *tune, "-P", "study_name=smoke",
                                  "-P", "n_trials=2", "-P", "epochs=1") for i in range(2)]  # fmt: skip
            for worker in workers:
                finish(worker)
            codes = [worker.returncode for worker in workers]
            study = optuna.load_study(study_name="smoke", storage=optuna_url)
            smoke = [t.state.name for t in study.trials]
            print(f"two workers: exit codes {codes}, {time.monotonic() - started:.0f} s, trials {smoke}")
            print(f"  best val_accuracy {study.best_value:.4f}; registered {REGISTERED.read(study)}")

            stopped = docker_run(args.image, args.data_dir, env, "worker-stop", *tune, "-P", "study_name=smoke-stop",
                                 "-P", "n_trials=1", "-P", "epochs=200", "-P", "pruner=none")  # fmt: skip
            while not any(t.intermediate_values for t in running(optuna_url)):  # a trial has reported an epoch
                time.sleep(1)
            sent = time.monotonic()
            subprocess.run(["docker", "stop", "--time", "120", "worker-stop"], check=True, capture_output=True)
            finish(stopped)
            stop = [t.state.name for t in optuna.load_study(study_name="smoke-stop", storage=optuna_url).trials]
            print(f"docker stop: exit {stopped.returncode} after {time.monotonic() - sent:.1f} s, trials {stop}")
    sys.exit(0 if codes == [0, 0] and smoke == ["COMPLETE"] * 2 and stop == ["FAIL", "WAITING"] else 1)


def running(storage: str) -> list[optuna.trial.FrozenTrial]:
    try:
        study = optuna.load_study(study_name="smoke-stop", storage=storage)
    except KeyError:  # not created yet
        return []
    return study.get_trials(states=(optuna.trial.TrialState.RUNNING,))


if __name__ == "__main__":
    main()
