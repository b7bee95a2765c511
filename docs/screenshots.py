"""Screenshots of the MLflow UI from real runs, for the README; and the browser test of the records.

By default, in a throwaway folder with its own tracking store (sqlite, and an artifact root beside
it), this runs what a user runs, through `mlflow run`: two small pipelines that differ only in
learning_rate, and a small Optuna study (the `smoke` space). With --store it makes no runs: it
photographs runs that already exist, a real default pipeline and study, from a copy of that sqlite
store (the store itself is only read, once, to copy it). Either way it then serves the store with
`mlflow server` and has headless Chromium take three pictures into --out:

    runs-table.png       the runs table: the newest pipelines expanded, their stages nested under them,
                         and the study (expanded too when it has at most 20 child runs)
    study-compare.png    the study's complete trials compared (at most --chart-trials, the best by
                         best_val_accuracy): its searched parameters against best_val_accuracy
                         (parallel coordinates), and their val_accuracy curves
    learning-curves.png  the chart view: val_accuracy and train_loss per epoch of the fully trained
                         models, the pipelines' train runs and the study's confirm runs

Pruned trials are left out of the study's chart: they stop before logging best_val_accuracy, so
the parallel coordinates cannot place them. A picture with nothing to draw (a store without a
finished pipeline, a study without a complete trial or confirm run yet) is skipped: the others are
taken, and the script names each skipped picture and why, and exits with status 1.

Each page is also read back as a DOM: the script fails, naming the page and the runs it misses, if
a page does not show the runs it should. It is a tool run by hand when the pictures are remade, not
part of the test suite: setup.sh does not install Chromium (a large package) and the runs it makes
would add minutes to every CI run.

Needs Debian's `chromium` (apt-get install chromium); by default also the MNIST files under
--data-dir. By default about 5 minutes on a busy 2-core machine (3.5 minutes of CPU), mostly the
start-up of stage processes; with --store 1 to 2 minutes, the browser's.

    .venv/bin/python docs/screenshots.py --data-dir ../shared/data
    .venv/bin/python docs/screenshots.py --data-dir ../shared/data --out /tmp/pictures --keep
    .venv/bin/python docs/screenshots.py --store sqlite:////path/to/mlflow.db --study NAME --out /tmp/pictures

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
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from mlflow.tracking import MlflowClient
from ui_pages import Runs, find_runs, find_study, pages  # docs/ui_pages.py, beside this script

PROJECT_DIR = Path(__file__).resolve().parent.parent
EXPERIMENT = "lstm-mnist"
STUDY = "smoke-study"
LEARNING_RATES = (0.002, 0.01)  # one pipeline per value: two runs that differ in one parameter
# What every run shares: a small model on a slice of MNIST (seconds of training per stage).
PIPELINE = {"hidden_size": 64, "num_layers": 1, "batch_size": 128}
TUNE = {"study": "smoke", "n_workers": 1}  # tiny one-layer LSTMs, one worker


def run(command: list[str], env: dict, log: Path) -> None:
    """Run one `mlflow run` command; on failure, stop with the tail of its output."""
    print("$", " ".join(command), file=sys.stderr, flush=True)
    with open(log, "ab") as out:
        done = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        entry_point = command[command.index("-e") + 1] if "-e" in command else "main"
        sys.exit(f"screenshots: mlflow run -e {entry_point} failed with status {done.returncode}; its output ends:\n{tail}")


def make_runs(work: Path, tracking_uri: str, args: argparse.Namespace) -> None:
    """Two pipelines and a study through `mlflow run`, into the new store ``tracking_uri``."""
    MlflowClient(tracking_uri).create_experiment(EXPERIMENT, artifact_location=(work / "artifacts").as_uri())
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


def flags(params: dict) -> list[str]:
    return [item for name, value in params.items() for item in ("-P", f"{name}={value}")]


def copy_store(store: str, copy: Path) -> None:
    """Copy the sqlite tracking store ``store`` (a sqlite:/// URI, its file, or a folder holding
    mlflow.db) to ``copy``. The store is read once, here; all else reads and serves the copy."""
    if store.startswith("sqlite:///"):
        path = Path(store.removeprefix("sqlite:///"))
    elif "://" in store:
        sys.exit(f"screenshots: --store {store}: only a sqlite store can be copied")
    else:
        path = Path(store) / "mlflow.db" if Path(store).is_dir() else Path(store)
    if not path.is_file():
        sys.exit(f"screenshots: --store {store}: no sqlite file at {path}")
    # SQLite's backup API, the source opened read-only: a consistent copy even while a study writes.
    source = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    target = sqlite3.connect(copy)
    try:
        source.backup(target)
    finally:
        target.close()
        source.close()


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
    # The pages read no artifacts (runs keep their own artifact URIs); the root only keeps anything
    # the server would write in the throwaway folder, not in ./mlartifacts.
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


def take_pictures(args: argparse.Namespace, work: Path, tracking_uri: str, runs: Runs) -> list[str]:
    """Take the pictures that have something to draw; return, for each other one, why it was skipped."""
    taken = [page for page in pages(runs) if not page.skipped]
    port = free_port()
    for page in taken:  # one browser profile per page: the view state is per experiment
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
        for page in taken:
            print(f"{page.file}: {url}{page.url}", file=sys.stderr, flush=True)
            profile = work / "profiles" / page.file
            chromium(args, profile, f"--screenshot={args.out / page.file}", url=url + page.url)
            dom = chromium(args, profile, "--dump-dom", url=url + page.url)
            absent = [label for label, text, count in page.expected if dom.count(text) < count]
            if absent:
                missing.append(f"{page.file} ({url}{page.url}) does not show: {', '.join(absent)}")
    if missing:
        sys.exit("screenshots: the MLflow UI does not show the runs:\n  " + "\n  ".join(missing))
    if taken:
        print(f"wrote {', '.join(str(args.out / page.file) for page in taken)}")
    return [f"{page.file}: {page.skipped}" for page in pages(runs) if page.skipped]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "images", help="folder for the PNGs (default: docs/images)"
    )
    parser.add_argument(
        "--store",
        metavar="URI_OR_FOLDER",
        help="photograph this sqlite tracking store's runs (a sqlite:/// URI, or a folder holding mlflow.db) "
        "instead of making runs; only a copy of it is read and served (default: make runs)",
    )
    parser.add_argument("--study", help="with --store: the study to show, its parent run's name (required with --store)")
    parser.add_argument("--experiment", help="with --store: the experiment to show (default: the one holding --study)")
    parser.add_argument("--pipelines", type=int, default=3, help="the newest finished pipelines shown (default: 3)")
    parser.add_argument(
        "--chart-trials", type=int, default=20, help="most trials the study's chart draws, the best ones (default: 20)"
    )
    made = parser.add_argument_group("without --store: the runs made")
    made.add_argument("--data-dir", default="data", help="folder holding MNIST/raw (default: data)")
    made.add_argument("--train-limit", type=int, default=5000, help="training images per run (default: 5000)")
    made.add_argument("--val-size", type=int, default=2000, help="validation images (default: 2000)")
    made.add_argument("--epochs", type=int, default=3, help="of each pipeline and trial (default: 3)")
    made.add_argument("--n-trials", type=int, default=4, help="of the study (default: 4)")
    parser.add_argument("--window-size", default="1600,1000", help="browser window, width,height in pixels (default: 1600,1000)")
    parser.add_argument("--time-budget", type=int, default=60000, help="virtual ms each page gets to load (default: 60000)")
    parser.add_argument("--chromium", default="chromium", help="the browser's command (default: chromium)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary store and print where it is (default: delete it)")
    args = parser.parse_args(argv)
    if bool(args.store) != bool(args.study) or (args.experiment and not args.store):
        parser.error("--store needs --study, and --study and --experiment need --store")
    if not shutil.which(args.chromium):
        parser.exit(2, f"screenshots: error: {args.chromium!r} not found; on Debian: apt-get install chromium\n")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="lstm-mnist-screenshots-"))
    tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
    try:
        if args.store:
            copy_store(args.store, work / "mlflow.db")
        else:
            started = time.monotonic()
            make_runs(work, tracking_uri, args)
            print(f"runs done in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
        client = MlflowClient(tracking_uri)
        study = find_study(client, args.study or STUDY, args.experiment or (None if args.store else EXPERIMENT))
        runs = find_runs(client, study, args.pipelines, args.chart_trials)
        skipped = take_pictures(args, work, tracking_uri, runs)
    finally:
        if args.keep:
            print(f"kept {work}: mlflow ui --backend-store-uri {tracking_uri}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    if skipped:
        sys.exit("screenshots: skipped, nothing to draw:\n  " + "\n  ".join(skipped))


if __name__ == "__main__":
    main()
