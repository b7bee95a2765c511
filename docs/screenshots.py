"""Screenshots of the MLflow UI from real runs, for the README; and the browser test of the records.

In a throwaway folder with its own tracking store (sqlite, and an artifact root beside it), this
runs what a user runs, through `mlflow run`: two small pipelines that differ only in learning_rate,
and a small Optuna study (the `smoke` space). It then serves that store with `mlflow server` and
has headless Chromium take three pictures into --out:

    runs-table.png       the runs table, each pipeline's stages and the study's trials nested under them
    study-compare.png    the study's trials compared: hidden_size and learning_rate against
                         best_val_accuracy (parallel coordinates), and their val_accuracy curves
    learning-curves.png  the chart view: val_accuracy and train_loss per epoch of every trained model

Each page is also read back as a DOM: the script fails, naming the page and the runs it misses, if
a page does not show the runs it should. It is a tool run by hand when the pictures are remade, not
part of the test suite: setup.sh does not install Chromium (a large package) and the runs it makes
would add minutes to every CI run.

Needs Debian's `chromium` (apt-get install chromium) and the MNIST files under --data-dir. About
5 minutes on a busy 2-core machine (3.5 minutes of CPU), mostly the start-up of stage processes.

    .venv/bin/python docs/screenshots.py --data-dir ../shared/data
    .venv/bin/python docs/screenshots.py --data-dir ../shared/data --out /tmp/pictures --keep

All three are the classic runs page (MLflow 3.17 opens an experiment in its GenAI view otherwise),
set up as a user would with a few clicks, through the browser's local storage (MLflow 3.17's keys,
written before the server starts, from a page on the port it then takes): parents expanded, a
few columns, the runs the charts draw, which charts, two to a row; and the MLflow Assistant panel,
which opens by itself on a first visit, closed. Should a later MLflow keep these elsewhere, the
pictures change and the DOM check says what went missing. (MLflow's compare-runs page is not used:
its parallel coordinates plot the first metric the server lists, system/cpu_utilization_percentage
as often as val_accuracy, and nothing in its URL chooses another.)
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mlflow.tracking import MlflowClient
from ui_pages import pages  # docs/ui_pages.py, beside this script

PROJECT_DIR = Path(__file__).resolve().parent.parent
EXPERIMENT = "lstm-mnist"
STUDY = "smoke-study"
LEARNING_RATES = (0.002, 0.01)  # one pipeline per value: two runs that differ in one parameter
# What every run shares: a small model on a slice of MNIST (seconds of training per stage).
PIPELINE = {"hidden_size": 64, "num_layers": 1, "batch_size": 128}
TUNE = {"study": "smoke", "n_workers": 1}  # tiny one-layer LSTMs, one worker


@dataclass
class Runs:
    """The run ids a finished set of runs left, by role."""

    experiment_id: str
    pipelines: dict[str, list[str]]  # parent run id -> its stage run ids
    study: str  # the study's parent run id
    trials: list[str]  # its trial run ids, trial 0 first
    trained: list[str]  # runs with per-epoch learning curves: train stages and trials
    names: dict[str, str]  # run id -> run name


def run(command: list[str], env: dict, log: Path) -> None:
    """Run one `mlflow run` command; on failure, stop with the tail of its output."""
    print("$", " ".join(command), file=sys.stderr, flush=True)
    with open(log, "ab") as out:
        done = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        entry_point = command[command.index("-e") + 1] if "-e" in command else "main"
        sys.exit(f"screenshots: mlflow run -e {entry_point} failed with status {done.returncode}; its output ends:\n{tail}")


def make_runs(work: Path, tracking_uri: str, args: argparse.Namespace) -> Runs:
    """Two pipelines and a study through `mlflow run`, into the new store ``tracking_uri``."""
    client = MlflowClient(tracking_uri)
    experiment_id = client.create_experiment(EXPERIMENT, artifact_location=(work / "artifacts").as_uri())
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    # MLflow starts each stage with the shell's `python`: make it this interpreter.
    env.update(
        MLFLOW_TRACKING_URI=tracking_uri,
        MLFLOW_EXPERIMENT_NAME=EXPERIMENT,
        PATH=str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""),
    )
    data = {"data_dir": str(Path(args.data_dir).resolve()), "train_limit": args.train_limit, "val_size": args.val_size}
    mlflow_run = [sys.executable, "-m", "mlflow", "run", str(PROJECT_DIR), "--env-manager", "local"]
    log = work / "runs.log"
    for learning_rate in LEARNING_RATES:
        params = {
            **data,
            **PIPELINE,
            "epochs": args.epochs,
            "learning_rate": learning_rate,
            "checkpoint_dir": work / "checkpoints",
        }
        run([*mlflow_run, *flags(params)], env, log)
    params = {
        **data,
        **TUNE,
        "study_name": STUDY,
        "n_trials": args.n_trials,
        "epochs": args.epochs,
        "storage": work / "optuna.journal",
    }
    run([*mlflow_run, "-e", "tune", *flags(params)], env, log)
    return find_runs(client, experiment_id)


def flags(params: dict) -> list[str]:
    return [item for name, value in params.items() for item in ("-P", f"{name}={value}")]


def find_runs(client: MlflowClient, experiment_id: str) -> Runs:
    runs = client.search_runs([experiment_id], order_by=["attributes.start_time ASC"])
    children: dict[str, list] = {}
    for r in runs:
        children.setdefault(r.data.tags.get("mlflow.parentRunId"), []).append(r)
    stage = {r.info.run_id: r.data.tags.get("pipeline.stage") for r in runs}
    pipelines = {
        r.info.run_id: [c.info.run_id for c in children.get(r.info.run_id, [])]
        for r in children[None]
        if stage[r.info.run_id] == "main"
    }
    (study,) = [r.info.run_id for r in children[None] if stage[r.info.run_id] == "tune"]
    trials = sorted(
        (c for c in children.get(study, []) if "optuna.trial_number" in c.data.tags),
        key=lambda c: int(c.data.tags["optuna.trial_number"]),
    )
    trial_ids = [t.info.run_id for t in trials]
    trained = [r.info.run_id for r in runs if stage[r.info.run_id] == "train"] + trial_ids
    return Runs(experiment_id, pipelines, study, trial_ids, trained, {r.info.run_id: r.info.run_name for r in runs})


# --- the browser ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def browser_environment() -> Iterator[dict[str, str]]:
    """The environment Chromium runs in: TMPDIR a short folder of its own. Chromium puts its
    singleton socket under TMPDIR, and a Unix socket's path holds at most 107 bytes (pytest's
    tmp_path under `pytest -n 2` is longer)."""
    folder = tempfile.mkdtemp(prefix="chromium-", dir="/tmp" if os.path.isdir("/tmp") else None)
    try:
        yield {**os.environ, "TMPDIR": folder}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def chromium(args: argparse.Namespace, profile: Path, *action: str, url: str) -> str:
    """One headless Chromium call on a copy of ``profile``; returns its stdout (the DOM for --dump-dom)."""
    with tempfile.TemporaryDirectory(prefix="chromium-", dir=profile.parent) as copy:
        shutil.copytree(profile, copy, dirs_exist_ok=True)  # each page starts from the same local storage
        command = [
            args.chromium,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            f"--user-data-dir={copy}",
            f"--window-size={args.window_size}",
            f"--virtual-time-budget={args.time_budget}",  # virtual ms: long enough for the app to fetch and draw
            *action,
            url,
        ]
        with browser_environment() as env:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode:
        sys.exit(f"screenshots: chromium failed with status {done.returncode} on {url}:\n{done.stderr[-3000:]}")
    return done.stdout


def prime_local_storage(args: argparse.Namespace, profile: Path, port: int, items: dict[str, str]) -> None:
    """Write ``items`` into the browser's local storage for http://127.0.0.1:<port>, before MLflow listens there.

    Local storage belongs to an origin (scheme, host, port), so a page served on the port that the
    MLflow server takes next can set what the MLflow app reads."""
    script = "".join(f"localStorage.setItem({json.dumps(k)}, {json.dumps(v)});" for k, v in items.items())
    page = f"<html><body><script>{script} document.body.textContent = 'primed';</script></body></html>".encode()

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *_):
            pass

    server = http.server.HTTPServer(("127.0.0.1", port), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        profile.mkdir(parents=True, exist_ok=True)
        command = [
            args.chromium,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            f"--user-data-dir={profile}",
        ]
        with browser_environment() as env:
            url = f"http://127.0.0.1:{port}/"
            done = subprocess.run([*command, "--dump-dom", url], env=env, capture_output=True, text=True, timeout=120)
        if "primed" not in done.stdout:
            sys.exit(f"screenshots: chromium did not run the page that sets local storage:\n{done.stderr[-3000:]}")
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def mlflow_server(tracking_uri: str, work: Path, port: int) -> Iterator[str]:
    """`mlflow server` on ``tracking_uri`` at 127.0.0.1:<port>; stopped, with its workers, on exit."""
    log = work / "mlflow-server.log"
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri]
    command += [
        "--default-artifact-root",
        (work / "artifacts").as_uri(),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    with open(log, "wb") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
                sys.exit(f"screenshots: mlflow server did not answer at {url}; its output ends:\n{tail}")
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(url + "/health", timeout=5).status == 200:
                    break
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)  # its own process group: the workers stop with it
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def take_pictures(args: argparse.Namespace, work: Path, tracking_uri: str, runs: Runs) -> None:
    port = free_port()
    for page in pages(runs):  # one browser profile per page: the view state is per experiment
        prime_local_storage(
            args,
            work / "profiles" / page.file,
            port,
            {
                f'MLflowLocalStorage-1.1-ExperimentPage-["{runs.experiment_id}"]-ReactComponentState': json.dumps(page.view),
                "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true",
                "mlflow.assistant.panelOpen_v1": "false",
            },
        )
    args.out.mkdir(parents=True, exist_ok=True)
    missing = []
    with mlflow_server(tracking_uri, work, port) as url:
        for page in pages(runs):
            print(f"{page.file}: {url}{page.url}", file=sys.stderr, flush=True)
            profile = work / "profiles" / page.file
            chromium(args, profile, f"--screenshot={args.out / page.file}", url=url + page.url)
            dom = chromium(args, profile, "--dump-dom", url=url + page.url)
            absent = [label for label, text, count in page.expected if dom.count(text) < count]
            if absent:
                missing.append(f"{page.file} ({url}{page.url}) does not show: {', '.join(absent)}")
    if missing:
        sys.exit("screenshots: the MLflow UI does not show the runs:\n  " + "\n  ".join(missing))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "images", help="folder for the PNGs (default: docs/images)"
    )
    parser.add_argument("--data-dir", default="data", help="folder holding MNIST/raw (default: data)")
    parser.add_argument("--train-limit", type=int, default=5000, help="training images per run (default: 5000)")
    parser.add_argument("--val-size", type=int, default=2000, help="validation images (default: 2000)")
    parser.add_argument("--epochs", type=int, default=3, help="of each pipeline and trial (default: 3)")
    parser.add_argument("--n-trials", type=int, default=4, help="of the study (default: 4)")
    parser.add_argument("--window-size", default="1600,1000", help="browser window, width,height in pixels (default: 1600,1000)")
    parser.add_argument("--time-budget", type=int, default=60000, help="virtual ms each page gets to load (default: 60000)")
    parser.add_argument("--chromium", default="chromium", help="the browser's command (default: chromium)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary store and print where it is (default: delete it)")
    args = parser.parse_args(argv)
    if not shutil.which(args.chromium):
        parser.exit(2, f"screenshots: error: {args.chromium!r} not found; on Debian: apt-get install chromium\n")

    work = Path(tempfile.mkdtemp(prefix="lstm-mnist-screenshots-"))
    tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
    try:
        started = time.monotonic()
        runs = make_runs(work, tracking_uri, args)
        print(f"runs done in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
        take_pictures(args, work, tracking_uri, runs)
    finally:
        if args.keep:
            print(f"kept {work}: mlflow ui --backend-store-uri {tracking_uri}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {', '.join(str(args.out / page.file) for page in pages(runs))}")


if __name__ == "__main__":
    main()
