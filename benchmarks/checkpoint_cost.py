"""What the per-epoch checkpoint upload costs a trial, on this CPU: for the smoke-sized and the default
model, the checkpoint file the training loop writes after an epoch, then rounds of its local save (what
the loop pays anyway), of ``upload_checkpoint`` to a run in a local store and to a run on an
``mlflow server`` (proxied artifacts, docs/scale-out.md), and of ``download_checkpoint`` from each;
against one training epoch of 55,000 MNIST images with validation on 5,000.

A study's trial uploads its newest checkpoint after every epoch (experiments/runs.py), in the loop, so
the upload adds to every epoch; a re-queued trial downloads it once.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import mlflow
import torch
from mlflow import MlflowClient

from benchmarks.bench import run_job
from benchmarks.measure import MNIST_TRAIN_IMAGES
from benchmarks.report import RESULTS, describe, environment, flag, log, render, write_report
from experiments.runs import download_checkpoint, upload_checkpoint
from pipeline.checkpoints import Checkpoints
from pipeline.config import OneLineParser, PrepareConfig, TrainConfig
from pipeline.data import PreparedData, Split, load_raw
from pipeline.training import train
from tests.infra import mlflow_server

MODELS = {"smoke h8-l1": {"hidden_size": 8, "num_layers": 1}, "default h256-l2": {}}  # TrainConfig overrides
VAL_IMAGES = PrepareConfig().val_size  # 5,000: validation of every epoch
TRAIN_IMAGES = MNIST_TRAIN_IMAGES - VAL_IMAGES  # 55,000: the training split of every epoch
STEPS = ("save", "upload_local", "download_local", "upload_server", "download_server")
COLUMNS = {
    "model": "{model}",
    "checkpoint MB": "{checkpoint_mb:.2f}",
    "threads": "{threads}",
    **{f"{step.replace('_', ' ')} s": f"{{{step}}}" for step in STEPS},
    "epoch s": "{epoch}",
    "upload local % of epoch": "{upload_local_percent:.2g}",
    "upload server % of epoch": "{upload_server_percent:.2g}",
}


def checkpoint_file(config: TrainConfig, mnist: Split, folder: Path) -> Path:
    """The file the loop writes after epoch 1 (weights, best weights, Adam's moments, ...), trained on
    256 images: its size does not depend on how many."""
    few = Split(mnist.images[:256], mnist.labels[:256])
    pixels = few.images.float().div(255)
    data = PreparedData(few, few, few, {"pixel_mean": pixels.mean().item(), "pixel_std": pixels.std().item()})
    train(dataclasses.replace(config, epochs=1), data, checkpoint_dir=folder, keep_checkpoints=True, progress=False)
    return Checkpoints(folder).paths()[-1]


def tensor_mb(value) -> float:
    """MB (10^6 bytes) of the tensors in a checkpoint entry."""
    if isinstance(value, torch.Tensor):
        return value.nbytes / 1e6
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list | tuple) else []
    return sum(map(tensor_mb, items))


def round_trip(run_id: str, path: Path, folder: Path) -> dict[str, float]:
    """Seconds of one upload of ``path`` to ``run_id`` and one download of it, through the current tracking URI."""
    started = time.perf_counter()
    uploaded = upload_checkpoint(run_id, path)
    middle = time.perf_counter()
    downloaded = download_checkpoint(run_id, folder)
    ended = time.perf_counter()
    if not (uploaded and downloaded):
        raise RuntimeError(f"checkpoint of run {run_id} not {'downloaded' if uploaded else 'uploaded'}: see the warning above")
    shutil.rmtree(folder)
    return {"upload": middle - started, "download": ended - middle}


def epoch_seconds(config: TrainConfig, data_dir: str, fraction: float, threads: int, seed: int) -> float:
    """One epoch of 55,000 training and 5,000 validation images, from a fresh process timing ``fraction``
    of each on ``threads`` torch threads (benchmarks/measure.py, after its warm-up), scaled up."""
    samples, val_samples = round(fraction * TRAIN_IMAGES), round(fraction * VAL_IMAGES)
    job = {"kind": "epoch", "loop": "project", "config": dataclasses.asdict(config), "raw_root": data_dir, "seed": seed}
    result = run_job({**job, "samples": samples, "val_samples": val_samples, "threads": threads})
    return result["epoch_seconds"] * TRAIN_IMAGES / samples


def spread(values: list[float]) -> str:
    """Median (min-max), three significant digits (all digits above the point)."""
    shown = [f"{value:.3g}" if value < 100 else f"{value:.0f}" for value in (statistics.median(values), min(values), max(values))]
    return f"{shown[0]} ({shown[1]}-{shown[2]})"


def measure(args, tmp: Path) -> dict:
    """The checkpoint of each model, then rounds that interleave every measurement, so that a change in
    the machine's load hits them alike: seconds of each step, and of an epoch per thread count."""
    configs = {name: TrainConfig(**overrides, device="cpu") for name, overrides in MODELS.items()}
    mnist = load_raw("mnist", args.data_dir)[0]
    files = {name: checkpoint_file(config, mnist, tmp / "loop" / name) for name, config in configs.items()}
    states = {name: torch.load(path, weights_only=True) for name, path in files.items()}
    times = {(name, step): [] for name in MODELS for step in STEPS}
    epochs = {(name, threads): [] for name in MODELS for threads in args.epoch_threads}
    local = f"sqlite:///{tmp}/local.db"
    local_experiment = MlflowClient(local).create_experiment("checkpoint-cost", artifact_location=(tmp / "artifacts").as_uri())
    server_options = {"workers": args.server_workers, "job_execution": False, "timeout": 600}
    with mlflow_server(tmp / "server", f"sqlite:///{tmp}/server/server.db", **server_options) as server:
        stores = {"local": local, "server": server.uri}
        experiment_ids = {"local": local_experiment, "server": MlflowClient(server.uri).create_experiment("checkpoint-cost")}
        runs = {(s, n): MlflowClient(u).create_run(experiment_ids[s]).info.run_id for s, u in stores.items() for n in MODELS}
        for number, name in ((n, name) for n in range(-1, max(args.rounds, args.epoch_rounds)) for name in MODELS):
            if number < args.rounds:
                started = time.perf_counter()
                Checkpoints(tmp / "save" / name).save("epoch-0001", states[name])
                steps = {"save": time.perf_counter() - started}
                for store, uri in stores.items():
                    mlflow.set_tracking_uri(uri)  # upload_checkpoint takes no URI: it reads the process's, as in a worker
                    trip = round_trip(runs[store, name], files[name], tmp / "download")
                    steps |= {f"{step}_{store}": value for step, value in trip.items()}
                for step, value in steps.items() if number >= 0 else []:  # round -1: a warm-up, as a worker's first epoch
                    times[name, step].append(value)
            for threads in args.epoch_threads if 0 <= number < args.epoch_rounds else []:
                seconds = epoch_seconds(configs[name], args.data_dir, args.epoch_fraction, threads, seed=42 + number)
                epochs[name, threads].append(seconds)
            log(f"round {number + 1} of {max(args.rounds, args.epoch_rounds)}: {name} measured")
    sizes = {name: path.stat().st_size / 1e6 for name, path in files.items()}
    parts = {name: {key: tensor_mb(value) for key, value in states[name].items()} for name in MODELS}
    return {"sizes": sizes, "parts": parts, "times": times, "epochs": epochs}


def table(measured: dict) -> list[dict]:
    """One row per model and epoch thread count: median (min-max) of each step, the upload as % of an epoch."""
    rows = []
    for (name, threads), epochs in measured["epochs"].items():
        times = {step: measured["times"][name, step] for step in STEPS}
        row = {"model": name, "checkpoint_mb": measured["sizes"][name], "threads": threads, "epoch": spread(epochs)}
        row |= {step: spread(values) for step, values in times.items()}
        row |= {
            f"upload_{s}_percent": 100 * statistics.median(times[f"upload_{s}"]) / statistics.median(epochs)
            for s in ("local", "server")
        }
        rows.append(row | {"seconds": times, "epoch_seconds": epochs})
    return rows


def main() -> None:
    parser = OneLineParser(prog="python -m benchmarks.checkpoint_cost", description=__doc__.split("\n\n")[0])
    flag(parser, "--data-dir", "data", "folder holding MNIST/raw, .gz or not")
    flag(parser, "--rounds", 7, "timed rounds of save, uploads and downloads, after one warm-up round", type=int)
    flag(parser, "--epoch-rounds", 3, "fresh processes timing an epoch, per model and thread count", type=int)
    flag(parser, "--epoch-fraction", 0.1, "fraction of an epoch's images each of them times, scaled up", type=float)
    threads = torch.get_num_threads()
    flag(
        parser,
        "--epoch-threads",
        [threads],
        "torch thread counts of the timed epochs",
        f"torch's, {threads}",
        nargs="+",
        type=int,
    )
    flag(parser, "--server-workers", 1, "uvicorn workers of the MLflow server; one client needs one", type=int)
    flag(parser, "--out", RESULTS, "folder for the .json and .md results", type=Path)
    args = parser.parse_args()
    if args.rounds < 1 or args.epoch_rounds < 1 or not 0 < args.epoch_fraction <= 1:
        parser.error("--rounds and --epoch-rounds must be at least 1, --epoch-fraction in (0, 1]")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # a bar per download, dozens in all
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="checkpoint-cost-") as tmp:
        measured = measure(args, Path(tmp))
    rows = table(measured)
    env = environment(torch.device("cpu")) | {"load_average_before": load_before, "load_average_after": os.getloadavg()}
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    report = {"environment": env, "settings": settings, "rows": rows, "checkpoint_tensor_mb": measured["parts"]}
    contents = "; ".join(
        f"{name}: " + ", ".join(f"{key} {mb:.3g}" for key, mb in parts.items() if mb >= 0.01 * measured["sizes"][name])
        for name, parts in measured["parts"].items()
    )
    text = (
        f"# checkpoint cost: {describe(env)}\n\n"
        f"The machine was shared: load average {load_before[0]:.1f} before, {env['load_average_after'][0]:.1f} after "
        f"({os.cpu_count()} cores). Each transfer cell: median (min-max) of {args.rounds} rounds after a warm-up; 'save' "
        "is the loop's own atomic torch.save of the checkpoint; 'upload' is experiments.runs.upload_checkpoint to a "
        "run in a local SQLite store with an artifact folder, or on an `mlflow server` on 127.0.0.1 (SQLite, proxied "
        f"artifacts, {args.server_workers} worker(s)); 'download' is download_checkpoint from it. 'epoch s': one epoch of "
        f"55,000 training and 5,000 validation images on 'threads' torch threads, median (min-max) of {args.epoch_rounds} "
        f"fresh processes each timing {args.epoch_fraction:g} of it after a warm-up, scaled up. Tensors in MB: {contents}."
        f"\n\n`{env['command']}`\n\n"
    )
    text += render(rows, COLUMNS) + "\n"
    stem = write_report(args.out, "checkpoint-cost", report, text)
    print(text + f"\nwritten: {stem}.json, {stem}.md")


if __name__ == "__main__":
    main()
