"""One measurement in a fresh process: ``python -m benchmarks.measure '<job as JSON>'``.

``bench.py`` starts one process per measurement so each peak RSS (and CUDA peak memory) belongs
to that measurement alone, and thread count and oneDNN settings never leak between runs. The
job names a kind (``epoch``, ``time_to_accuracy``, ``matmul_peak``, ``data_memory``) and its
arguments; the last line of stdout is the result as JSON. Both training loops see the same
images: a seeded permutation of the 60,000 MNIST training images, validation images first.
"""

from __future__ import annotations

import contextlib
import gc
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.tutorial_baseline import train_tutorial
from pipeline.config import TrainConfig
from pipeline.data import SEQUENCE_SHAPES, PreparedData, Split, load_prepared, load_raw
from pipeline.training import resolve_device, train

MNIST_TRAIN_IMAGES = 60_000


class StopTraining(Exception):
    """Raised from an epoch callback to end a time-to-accuracy run."""


# --- memory ------------------------------------------------------------------------------------


def _proc_status_mib(field: str) -> float | None:
    """A ``VmRSS``/``VmHWM`` line of /proc/self/status in MiB (None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # the kernel reports kB
    except OSError:
        pass
    return None


def rss_mib() -> float | None:
    return _proc_status_mib("VmRSS")


def peak_rss_mib() -> float:
    """The process's peak RSS since start, or since the last ``reset_peak_rss``."""
    peak = _proc_status_mib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Reset the peak RSS to the current RSS (Linux's clear_refs), so a phase can be measured alone."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# --- data --------------------------------------------------------------------------------------


def pick_indices(train_samples: int, val_samples: int, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) indices into the MNIST training set: a seeded permutation, validation first."""
    if train_samples + val_samples > MNIST_TRAIN_IMAGES:
        raise ValueError(f"{train_samples} + {val_samples} images asked for; MNIST has {MNIST_TRAIN_IMAGES} training images")
    order = torch.randperm(MNIST_TRAIN_IMAGES, generator=torch.Generator().manual_seed(seed)).tolist()
    return order[val_samples : val_samples + train_samples], order[:val_samples]


def prepared_data(mnist_train: Split, train_indices: list[int], val_indices: list[int]) -> PreparedData:
    """The project's in-memory dataset for these images, with the manifest statistics ``train`` needs."""
    train_split = Split(mnist_train.images[train_indices], mnist_train.labels[train_indices])
    val_split = Split(mnist_train.images[val_indices], mnist_train.labels[val_indices])
    pixels = train_split.images.float().div(255)  # as the prepare stage computes them
    manifest = {"pixel_mean": pixels.mean().item(), "pixel_std": pixels.std().item()}
    return PreparedData(train_split, val_split, val_split, manifest)  # test is unused by train()


# --- the two loops behind one call -------------------------------------------------------------


def run_loop(loop, config, raw_root, mnist_train, train_indices, val_indices, *, num_workers=0, on_epoch=None):
    """Train with ``loop`` ("project" or "baseline"); returns its per-epoch history and the precision
    it trained in (``fp32`` or ``bf16``: the project's ``precision=auto`` resolves per device).

    Each history entry has ``epoch_seconds``, ``samples_per_second`` and ``val_accuracy``.
    """
    if loop == "project":
        data = prepared_data(mnist_train, train_indices, val_indices)
        result = train(config, data, on_epoch=on_epoch, progress=False)
        return result.history, result.precision
    if loop == "baseline":  # the tutorial's loop trains in float32
        history = train_tutorial(
            raw_root,
            train_indices,
            val_indices,
            hidden_size=config.hidden_size,
            num_layers=config.num_layers,
            batch_size=config.batch_size,
            epochs=config.epochs,
            device=resolve_device(config.device),
            seq_shape=SEQUENCE_SHAPES[config.reading_order],
            learning_rate=config.learning_rate,
            seed=config.seed,
            num_workers=num_workers,
            on_epoch=on_epoch,
        )
        return history, "fp32"
    raise ValueError(f"unknown loop {loop!r}: project or baseline")


def load_mnist_train(loop: str, raw_root: str) -> Split | None:
    """The full MNIST training split as the project's loop takes it (uint8 tensors)."""
    if loop != "project":
        return None  # the tutorial's loop builds torchvision datasets itself, inside train_tutorial
    mnist_train, _, _ = load_raw("mnist", raw_root)
    return mnist_train


# --- the kinds of job --------------------------------------------------------------------------


def measure_epoch(loop, config, raw_root, samples, val_samples, seconds=0.0, warmup_batches=2, num_workers=0, seed=42):
    """One warm-up epoch of ``warmup_batches`` batches, then one timed epoch of ``samples`` images.

    With ``samples`` 0, the timed epoch is sized from the warm-up's speed to last about ``seconds``.
    """
    config = TrainConfig(**{**config, "epochs": 1})
    mnist_train = load_mnist_train(loop, raw_root)
    rss_before = rss_mib()  # imports and data, before any model exists
    load_peak = peak_rss_mib()
    phase_peak_measured = reset_peak_rss()
    on_cuda = config.device == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()

    warmup_samples = warmup_batches * config.batch_size
    warmup_indices, val_indices = pick_indices(warmup_samples, val_samples, seed)
    warmup = run_loop(loop, config, raw_root, mnist_train, warmup_indices, val_indices, num_workers=num_workers)[0][-1]
    if not samples:
        batches = max(warmup_batches, round(warmup.samples_per_second * seconds / config.batch_size))
        samples = min(batches * config.batch_size, MNIST_TRAIN_IMAGES - val_samples)
    train_indices, _ = pick_indices(samples, val_samples, seed)
    history, precision = run_loop(loop, config, raw_root, mnist_train, train_indices, val_indices, num_workers=num_workers)
    timed = history[-1]
    train_peak = peak_rss_mib() if phase_peak_measured else None
    return {
        "samples": samples,
        "val_samples": val_samples,
        "samples_per_second": timed.samples_per_second,
        "epoch_seconds": timed.epoch_seconds,
        "precision": precision,  # what the timed epoch trained in: its FLOP/s compare with this precision's peak
        "warmup_samples_per_second": warmup.samples_per_second,
        "rss_before_train_mib": rss_before,
        "peak_rss_mib": max(load_peak, train_peak or peak_rss_mib()),
        # what training (model, optimizer, batches, DataLoader) added on top of imports and data
        "train_rss_growth_mib": None if train_peak is None or rss_before is None else train_peak - rss_before,
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if on_cuda else None,
    }


def measure_time_to_accuracy(
    loop, config, raw_root, samples, val_samples, target_accuracy, max_epochs, max_seconds, num_workers=0, seed=42
):
    """Wall time from calling the loop (cold) until val_accuracy >= ``target_accuracy``, or a cap."""
    config = TrainConfig(**{**config, "epochs": max_epochs})
    mnist_train = load_mnist_train(loop, raw_root)
    train_indices, val_indices = pick_indices(samples, val_samples, seed)
    curve = []  # (seconds since start, val_accuracy) after each epoch
    started = time.perf_counter()

    def on_epoch(metrics):
        curve.append((time.perf_counter() - started, metrics.val_accuracy))
        if metrics.val_accuracy >= target_accuracy or curve[-1][0] >= max_seconds:
            raise StopTraining

    try:
        run_loop(loop, config, raw_root, mnist_train, train_indices, val_indices, num_workers=num_workers, on_epoch=on_epoch)
    except StopTraining:
        pass
    reached = [seconds for seconds, accuracy in curve if accuracy >= target_accuracy]
    return {
        "samples": samples,
        "val_samples": val_samples,
        "target_accuracy": target_accuracy,
        "seconds_to_target": reached[0] if reached else None,
        "epochs_to_target": len(curve) if reached else None,
        "best_val_accuracy": max((accuracy for _, accuracy in curve), default=None),
        "curve": curve,
    }


MATMUL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def measure_matmul_peak(device: str, size: int, precision: str = "fp32", repeats: int = 5) -> dict:
    """FLOP/s of a large ``size`` x ``size`` matmul in ``precision`` (fp32 or bf16), best of ``repeats``
    after a warm-up: a practical peak for this device, precision and thread count. On CUDA, fp32 runs
    on TF32 tensor cores, as the project's training does there (``numeric_settings``)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # a fresh process: nothing else to restore
    a, b = (torch.randn(size, size, device=device, dtype=MATMUL_DTYPES[precision]) for _ in range(2))
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        torch.matmul(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    flops = 2 * size**3
    return {
        "size": size,
        "precision": precision,
        "repeats": repeats,
        "best_flops": flops / min(times[1:]),
        "median_flops": flops / statistics.median(times[1:]),
    }


def measure_data_memory(prepared_dir: str) -> dict:
    """RSS cost of the prepared MNIST splits as the train stage holds them, against their tensor bytes."""
    before = rss_mib()
    data = load_prepared(prepared_dir)
    gc.collect()
    held = rss_mib()
    splits = {"train": data.train, "val": data.val, "test": data.test}
    image_bytes = sum(s.images.nbytes for s in splits.values())
    label_bytes = sum(s.labels.nbytes for s in splits.values())
    count = sum(len(s.labels) for s in splits.values())
    return {
        "images": {name: len(s.labels) for name, s in splits.items()},
        "uint8_image_mib": image_bytes / 2**20,
        "uint8_label_mib": count / 2**20,  # as stored on disk
        "label_mib": label_bytes / 2**20,  # int64 in memory
        "float32_image_mib": 4 * image_bytes / 2**20,  # what converting all images up front would cost
        "rss_held_mib": None if before is None else held - before,
        "rss_peak_while_loading_mib": None if before is None else peak_rss_mib() - before,
    }


KINDS = {
    "epoch": measure_epoch,
    "time_to_accuracy": measure_time_to_accuracy,
    "matmul_peak": measure_matmul_peak,
    "data_memory": measure_data_memory,
}


def main(argv: list[str] | None = None) -> None:
    job = json.loads((argv or sys.argv[1:])[0])
    threads, mkldnn = job.pop("threads", 0), job.pop("mkldnn", True)
    if threads:
        torch.set_num_threads(threads)
    # oneDNN is on by default; only switching it off needs the context manager
    with contextlib.nullcontext() if mkldnn else torch.backends.mkldnn.flags(enabled=False):
        result = KINDS[job.pop("kind")](**job)
    result["threads"] = torch.get_num_threads()
    result["mkldnn"] = mkldnn
    print(json.dumps(result))


if __name__ == "__main__":
    main()
