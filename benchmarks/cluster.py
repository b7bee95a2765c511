"""A study on a cluster, on one machine: N ``mlflow run -e tune`` commands started apart, one worker
each (as N tasks of a job array), and the share of their workers' time spent training.

    python -m benchmarks.cluster --data-dir ../shared/data          # 4 commands, 5 s apart: 3 to 8 min on this shared 2-core CPU
    python -m benchmarks.cluster --project /tmp/other-checkout --data-dir ../shared/data   # that checkout's code

In a fresh folder it creates an SQLite tracking store (once, before any command: the first use of a
fresh store migrates it, and commands doing that at once race), runs prepare once, then starts the
commands on one journal study, each logging to its own file. From the runs under the study's parent
run (their ``pipeline.stage`` tag, start and end) and the commands' own start and end:

- share = busy worker-seconds (the trial and confirm runs' durations, summed) / (workers x wall),
  wall from the first trial's start to the last command's end;
- the confirmation's wall: from the first confirm run's start to the last one's end;
- per command: its exit code, and the trials and confirm runs it trained: by the run's ``optuna.worker``
  tag (host:pid of the worker that trained it) matched to the processes the command started, or, for
  code that sets no such tag, by what the command's log names.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
from mlflow.tracking import MlflowClient

from benchmarks.report import RESULTS, describe, environment, flag, log, render, write_report

EXPERIMENT, STUDY_NAME = "cluster", "cluster"
# Each command one worker; no pruning, so that every trial is as long and the best 2 are always there to confirm.
TUNE = {"study": "smoke", "n_workers": 1, "pruner": "none", "confirm_top": 2, "confirm_seeds": 2}
TRIAL_DONE = re.compile(r"\] trial (\d+) (?:COMPLETE|PRUNED|FAIL)")  # a worker's line as its trial ends
WORKER_TAG, KEY_TAG = "optuna.worker", "confirm.key"  # who trained a run (host:pid); which (configuration, seed) it is


def mlflow_run(project: Path, entry_point: str, params: dict, work: Path, name: str, env: dict) -> subprocess.Popen:
    """``mlflow run <project> -e <entry_point> --env-manager local`` with ``params`` as -P, launched in
    ``work`` (relative outputs land there) and logging to ``work/logs/<name>.log``."""
    command = [str(Path(sys.executable).with_name("mlflow")), "run", str(project), "-e", entry_point]
    command += ["--env-manager", "local", "--experiment-name", EXPERIMENT]
    command += [arg for key, value in params.items() for arg in ("-P", f"{key}={value}")]
    with (work / "logs" / f"{name}.log").open("w") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=work, start_new_session=True)


def start_commands(args, work: Path, env: dict, data_run: str) -> list[dict]:
    """Start ``args.commands`` tune commands ``args.apart`` seconds apart; wait for them (stopping any still
    running ``args.timeout`` s after the first started); each one's start, end, exit code, log and the pids
    of the processes it started (`mlflow run`'s, its shell's, the worker's)."""
    params = TUNE | {"study_name": STUDY_NAME, "storage": work / "studies.journal", "data": data_run}
    params |= {"epochs": args.epochs, "n_trials": args.n_trials} | dict(p.split("=", 1) for p in args.param)
    commands = []
    for i in range(args.commands):
        if i:
            time.sleep(args.apart)
        process = mlflow_run(args.project, "tune", params, work, f"tune-{i}", env)
        commands.append({"log": str(work / "logs" / f"tune-{i}.log"), "start": time.time(), "process": process})
        commands[-1]["pids"] = {process.pid}
        log(f"command {i} started: {commands[-1]['log']}")
    seen = 0.0
    while running := [c for c in commands if "end" not in c]:
        if time.time() - seen > 1:  # the worker lives minutes: a look each second finds it
            seen = time.time()
            for c in running:
                c["pids"] |= descendants(c["process"].pid)
        late = time.time() - commands[0]["start"] - args.timeout  # > 0: stop them; > 60: kill them
        for c in running:
            if c["process"].poll() is not None:
                c |= {"end": time.time(), "exit_code": c["process"].returncode}
            elif late > 0 and c.get("stopped_with") != (sig := signal.SIGKILL if late > 60 else signal.SIGTERM).name:
                os.killpg(c["process"].pid, sig)  # the whole command: tune re-queues its trial and exits
                c["stopped_with"] = sig.name
        time.sleep(0.2)
    for c in commands:
        del c["process"]
        c["pids"] = sorted(c["pids"])
    return commands


def descendants(pid: int) -> set[int]:
    """The pids of the processes under ``pid`` now (none once it has ended)."""
    try:
        return {child.pid for child in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def runs_of_study(client: MlflowClient, experiment_id: str) -> list[dict]:
    """The runs under the study's parent run: stage, id, start and end (s), trial number."""
    parents = client.search_runs([experiment_id], f"tags.`optuna.study_name` = '{STUDY_NAME}' and tags.`pipeline.stage` = 'tune'")
    if not parents:
        return []
    children = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'", max_results=1000)
    return [
        {
            "stage": run.data.tags.get("pipeline.stage"),
            "run_id": run.info.run_id,
            "status": run.info.status,
            "start": run.info.start_time / 1000,
            "end": run.info.end_time / 1000 if run.info.end_time else None,
            "trial": run.data.tags.get("optuna.trial_number"),
            "worker": run.data.tags.get(WORKER_TAG),
            "key": run.data.tags.get(KEY_TAG),
        }
        for run in children
    ]


def measure(commands: list[dict], runs: list[dict], workers: int) -> dict:
    """The share of worker time spent training, the phases' walls, and who trained what."""
    training = [r for r in runs if r["stage"] in ("trial", "confirm") and r["end"]]
    trials, confirms = ([r for r in training if r["stage"] == stage] for stage in ("trial", "confirm"))
    last_end = max(c["end"] for c in commands)
    numbers = {"trials": len(trials), "confirm_runs": len(confirms), "workers": workers}
    numbers["unfinished_runs"] = [r["run_id"] for r in runs if r["stage"] in ("trial", "confirm") and not r["end"]]
    numbers["commands_wall_s"] = last_end - min(c["start"] for c in commands)
    if trials:
        first = min(r["start"] for r in trials)
        numbers["busy_worker_s"] = sum(r["end"] - r["start"] for r in training)
        numbers["wall_s"] = last_end - first
        numbers["share"] = numbers["busy_worker_s"] / (workers * numbers["wall_s"])
        numbers["search_wall_s"] = max(r["end"] for r in trials) - first
    if confirms:
        numbers["confirm_wall_s"] = max(r["end"] for r in confirms) - min(r["start"] for r in confirms)
        numbers["after_confirm_s"] = last_end - max(r["end"] for r in confirms)
    keys = [r["key"] for r in confirms if r["key"]]
    numbers["confirm_keys_trained_twice"] = sorted({k for k in keys if keys.count(k) > 1})
    for c in commands:
        c["trials"], c["confirm_runs"] = trained_by(c, trials, confirms)
    numbers["unattributed_runs"] = sorted(
        {r["run_id"] for r in training} - {run_id for c in commands for run_id in c["confirm_runs"] + c["trial_runs"]}
    )
    numbers["confirm_runs_per_command"] = [len(c["confirm_runs"]) for c in commands]
    numbers["trials_per_command"] = [len(c["trials"]) for c in commands]
    numbers["exit_codes"] = [c["exit_code"] for c in commands]
    return numbers


def trained_by(command: dict, trials: list[dict], confirms: list[dict]) -> tuple[list[int], list[str]]:
    """The trial numbers and confirm run ids ``command`` trained (and its trial runs' ids in
    ``command["trial_runs"]``): by the runs' worker tag where they have one, else by its log."""
    pids = {str(pid) for pid in command["pids"]}
    ours = [r for r in trials + confirms if r["worker"] and r["worker"].rsplit(":", 1)[-1] in pids]
    text = Path(command["log"]).read_text(errors="replace")
    said = {int(n) for n in TRIAL_DONE.findall(text)}  # code without the tag: the trials its worker said it ended
    ours += [r for r in trials if not r["worker"] and int(r["trial"]) in said]
    command["trial_runs"] = [r["run_id"] for r in ours if r["stage"] == "trial"]
    numbers = {int(r["trial"]) for r in ours if r["stage"] == "trial"}
    confirm_runs = [r["run_id"] for r in ours if r["stage"] == "confirm"]
    untagged = [r for r in confirms if not r["worker"]]
    trained = [line for line in text.splitlines() if "reused" not in line]  # a confirm run it trained, not one it reused
    confirm_runs += [r["run_id"] for r in untagged if any(r["run_id"] in line for line in trained)]
    return sorted(numbers), confirm_runs


def code_of(project: Path, env: dict) -> dict:
    """Which checkout a command in ``project`` imports (`mlflow run` starts it there: its folder comes first)."""
    check = [sys.executable, "-c", "import experiments; print(experiments.__file__)"]
    where = subprocess.run(check, cwd=project, env=env, capture_output=True, text=True)
    commit = subprocess.run(["git", "-C", str(project), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return {"imports": where.stdout.strip() or where.stderr.strip()[-300:], "commit": commit.stdout.strip()}


COLUMNS = {"commands": "{commands} x 1 worker", "trials": "{trials}", "confirm runs": "{confirm_runs}"}
COLUMNS |= {"commands wall s": "{commands_wall_s:.0f}"}
COLUMNS |= {"busy worker-s": "{busy_worker_s:.0f}", "wall s": "{wall_s:.0f}", "share training": "{share:.0%}"}
COLUMNS |= {"confirmation wall s": "{confirm_wall_s:.0f}", "confirm runs per command": "{per_command}", "exit codes": "{codes}"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    here = Path(__file__).resolve().parents[1]
    flag(parser, "--project", here, "project folder the commands run", "this repository", type=Path)
    flag(parser, "--commands", 4, "tune commands, one worker each", type=int)
    flag(parser, "--apart", 5.0, "seconds between two commands' starts", type=float)
    flag(parser, "--n-trials", 8, "the study's trials", type=int)
    flag(parser, "--epochs", 2, "epochs per trial and confirm run", type=int)
    flag(parser, "--train-limit", 2000, "training images", type=int)
    flag(parser, "--val-size", 1000, "validation images", type=int)
    flag(parser, "--data-dir", "data", "folder holding MNIST/raw")
    flag(parser, "--param", [], "more tune parameters, NAME=VALUE, as -P", "none", nargs="*")
    # 4 processes of 2 torch threads each on these 2 cores: libgomp's spinning waits cut a tiny LSTM
    # to 11-30 images/s each, against 3,000-3,500 with passive waits; on a cluster each task has its own cores.
    flag(parser, "--env", ["OMP_WAIT_POLICY=passive"], "NAME=VALUE set for the commands; --env alone: none", nargs="*")
    flag(parser, "--timeout", 1800.0, "seconds after the first start at which commands still running are stopped", type=float)
    flag(parser, "--work-dir", None, "folder for the store, the study and the logs; kept", "a new temp folder", type=Path)
    flag(parser, "--out", RESULTS, "folder for the .json and .md results", type=Path)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    args.project = args.project.resolve()
    work = (args.work_dir or Path(tempfile.mkdtemp(prefix="cluster-"))).resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"} | {"MLFLOW_TRACKING_URI": uri}
    env |= dict(setting.split("=", 1) for setting in args.env)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `python` in MLproject: this venv's
    client = MlflowClient(uri)
    experiment_id = client.create_experiment(EXPERIMENT, artifact_location=str(work / "artifacts"))  # migrates the store once
    code = code_of(args.project, env)
    log(f"work folder {work}; the commands import {code['imports']} ({code['commit']})")

    data = {"data_dir": Path(args.data_dir).resolve(), "train_limit": args.train_limit, "val_size": args.val_size}
    if mlflow_run(args.project, "prepare", data, work, "prepare", env).wait():
        sys.exit(f"prepare failed: see {work / 'logs' / 'prepare.log'}")
    data_run = client.search_runs([experiment_id], "tags.`pipeline.stage` = 'prepare' and attributes.status = 'FINISHED'")[0]
    load = [os.getloadavg()[0]]  # other jobs on the machine skew the numbers: said beside them
    commands = start_commands(args, work, env, data_run.info.run_id)
    load.append(os.getloadavg()[0])
    runs = runs_of_study(client, experiment_id)
    numbers = measure(commands, runs, workers=args.commands)

    env_info = environment(torch.device("cpu")) | {"load_before_after": load, "code": code, "work_dir": str(work)}
    report = {"environment": env_info, "settings": {k: str(v) for k, v in vars(args).items()}, "numbers": numbers}
    report |= {"commands": commands, "runs": runs}
    text = report_text(args, env_info, numbers, commands)
    stem = write_report(args.out, "cluster", report, text)
    print(text + f"\nwritten: {stem}.json, {stem}.md")


def report_text(args: argparse.Namespace, env_info: dict, numbers: dict, commands: list[dict]) -> str:
    """The results as markdown: where they ran, one table row, and what went wrong, if anything."""
    code, load, work = env_info["code"], env_info["load_before_after"], env_info["work_dir"]
    row = numbers | {"commands": args.commands, "per_command": " / ".join(map(str, numbers["confirm_runs_per_command"]))}
    row["codes"] = " ".join(map(str, numbers["exit_codes"]))
    text = (
        f"# a study on a cluster, on one machine: {describe(env_info)}\n\nproject {args.project} ({code['commit']}); "
        f"logs in {Path(work) / 'logs'}; load average {load[0]:.1f} before the commands, {load[1]:.1f} after; "
        f"commands' environment: {' '.join(args.env) or 'as is'}\n\n"
        f"`{env_info['command']}`\n\n" + render([row], COLUMNS) + "\n"
    )
    if failed := [i for i, c in enumerate(commands) if c["exit_code"]]:
        text += f"\ncommand(s) {failed} failed: see their logs\n"
    if numbers["confirm_keys_trained_twice"]:
        text += f"\n(configuration, seed) trained in more than one confirm run: {numbers['confirm_keys_trained_twice']}\n"
    if numbers["unattributed_runs"] or numbers["unfinished_runs"]:
        text += f"\nruns no command claims: {numbers['unattributed_runs']}; unfinished: {numbers['unfinished_runs']}\n"
    return text


if __name__ == "__main__":
    main()
