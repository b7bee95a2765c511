"""One measurement in a fresh process, its peak memory, threads and oneDNN setting its own: ``python -m
benchmarks.measure '<job as JSON>'``, the job naming a kind (``epoch``, ``matmul_peak``, ``data_memory``)
and its arguments; the last line of stdout is the result as JSON."""

from __future__ import annotations

import contextlib
import gc
import json
import sys
import timeit
from pathlib import Path

import torch

from benchmarks.tutorial_baseline import train_tutorial
from pipeline.config import TrainConfig
from pipeline.data import PreparedData, Split, load_prepared, load_raw
from pipeline.training import train

MNIST_TRAIN_IMAGES = 60_000


def memory_mib(field: str) -> float | None:
    """The process's resident memory, ``VmRSS`` (now) or ``VmHWM`` (its peak), in MiB; None off Linux."""
    try:
        line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) / 1024  # the kernel reports kB


def pick_indices(train_samples: int, val_samples: int, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) indices into the MNIST training set: a seeded permutation, validation first."""
    order = torch.randperm(MNIST_TRAIN_IMAGES, generator=torch.Generator().manual_seed(seed)).tolist()
    return order[val_samples : val_samples + train_samples], order[:val_samples]


def run_loop(loop, config, raw_root, mnist_train, train_indices, val_indices):
    """Train with ``loop`` ("project" or "baseline"); returns its per-epoch history and the precision it
    trained in (``precision=auto`` resolves per device; the tutorial's loop is float32)."""
    if loop == "baseline":
        history = train_tutorial(raw_root, train_indices, val_indices, config)
        return history, "fp32"
    train_split = Split(mnist_train.images[train_indices], mnist_train.labels[train_indices])
    val_split = Split(mnist_train.images[val_indices], mnist_train.labels[val_indices])
    pixels = train_split.images.float().div(255)  # the statistics the prepare stage records
    manifest = {"pixel_mean": pixels.mean().item(), "pixel_std": pixels.std().item()}
    result = train(config, PreparedData(train_split, val_split, val_split, manifest), progress=False)
    return result.history, result.precision


def measure_epoch(loop, config, raw_root, samples, val_samples, seconds=0.0, warmup_batches=2, seed=42):
    """One warm-up epoch of ``warmup_batches`` batches, then one timed epoch of ``samples`` images
    (with ``samples`` 0, sized from the warm-up's speed to last about ``seconds``)."""
    config = TrainConfig(**{**config, "epochs": 1})
    mnist_train = load_raw("mnist", raw_root)[0] if loop == "project" else None  # the tutorial reads its own
    warmup_indices, val_indices = pick_indices(warmup_batches * config.batch_size, val_samples, seed)
    warmup = run_loop(loop, config, raw_root, mnist_train, warmup_indices, val_indices)[0][-1]
    if not samples:
        batches = max(warmup_batches, round(warmup.samples_per_second * seconds / config.batch_size))
        samples = min(batches * config.batch_size, MNIST_TRAIN_IMAGES - val_samples)
    history, precision = run_loop(loop, config, raw_root, mnist_train, pick_indices(samples, val_samples, seed)[0], val_indices)
    result = {"samples": samples, "val_samples": val_samples, "precision": precision, "peak_rss_mib": memory_mib("VmHWM")}
    result["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20 if config.device == "cuda" else None
    return result | {"samples_per_second": history[-1].samples_per_second, "epoch_seconds": history[-1].epoch_seconds}


def measure_matmul_peak(device: str, size: int, precision: str = "fp32", repeats: int = 5) -> dict:
    """FLOP/s of a ``size`` x ``size`` matmul in fp32 or bf16, best of ``repeats`` after a warm-up: a
    practical peak. On CUDA fp32 runs on TF32 tensor cores, as training does there."""
    torch.backends.cuda.matmul.allow_tf32 = True  # a fresh process: nothing else to restore
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    seconds = timeit.repeat(lambda: (torch.matmul(a, b), sync()), number=1, repeat=repeats + 1)[1:]  # the first: a warm-up
    return {"size": size, "precision": precision, "best_flops": 2 * size**3 / min(seconds)}


def measure_data_memory(prepared_dir: str) -> dict:
    """What holding a prepared split costs, as the train stage loads it (the bytes are uint8 images, int64 labels)."""
    before = memory_mib("VmRSS")
    splits = (data := load_prepared(prepared_dir)).train, data.val, data.test
    gc.collect()
    held = None if before is None else memory_mib("VmRSS") - before
    mib = {f"{kind}_mib": sum(getattr(s, kind).nbytes for s in splits) / 2**20 for kind in ("images", "labels")}
    return {"images": [len(s.labels) for s in splits], "rss_held_mib": held, **mib}


KINDS = {"epoch": measure_epoch, "matmul_peak": measure_matmul_peak, "data_memory": measure_data_memory}


def main(argv: list[str] | None = None) -> None:
    job = json.loads((argv or sys.argv[1:])[0])
    threads, mkldnn = job.pop("threads", 0), job.pop("mkldnn", True)
    if threads:
        torch.set_num_threads(threads)
    # oneDNN is on by default; only switching it off needs the context manager
    with contextlib.nullcontext() if mkldnn else torch.backends.mkldnn.flags(enabled=False):
        result = KINDS[job.pop("kind")](**job)
    print(json.dumps({**result, "threads": torch.get_num_threads(), "mkldnn": mkldnn}))


if __name__ == "__main__":
    main()
