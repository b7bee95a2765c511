"""Several workers on one machine: one process each, worker *i* pinned to GPU *i* mod the GPU count.

``tune`` starts them when ``n_workers`` (or ``auto`` on a machine with several GPUs) asks for more
than one; each runs ``experiments.worker.run_worker`` and they share the study as workers on other
machines do (experiments/coordination.py).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable
from contextlib import contextmanager

import torch

from experiments.job import WorkerJob, worker_id
from experiments.worker import run_worker
from pipeline.config import TuneConfig


def gpu_assignment(config: TuneConfig) -> list[str | None]:
    """The GPU each worker of this machine is pinned to, as CUDA_VISIBLE_DEVICES names them (or by
    index); None on a CPU (or MPS). ``n_workers=auto`` is one per GPU times ``workers_per_gpu``."""
    gpus = []
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        visible = torch.cuda.device_count()
        listed = [name.strip() for name in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if name.strip()]
        gpus = (listed or [str(i) for i in range(visible)])[:visible]
    count = int(config.n_workers) if config.n_workers != "auto" else max(1, len(gpus) * config.workers_per_gpu)
    return [gpus[i % len(gpus)] if gpus else None for i in range(count)]


class WorkersFailed(RuntimeError):
    """Worker processes of this machine ended with an error."""


def run_workers(jobs: list[WorkerJob], target: Callable[[WorkerJob], None] = run_worker) -> set[str]:
    """Run ``jobs`` in processes of their own, each pinned to its GPU; return their worker ids (host:pid).
    Raise ``WorkersFailed`` naming those that failed, once all have ended: a crash is never a success."""
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    processes = [context.Process(target=target, args=(job,), name=f"tune-worker-{job.worker}") for job in jobs]
    for job, process in zip(jobs, processes, strict=True):
        with pinned_to(job.gpu):  # in the environment the worker starts with: set before CUDA starts there
            process.start()
    try:
        for process in processes:
            process.join()
    except KeyboardInterrupt:  # Ctrl-C reached the workers too: let them re-queue their trials
        for process in processes:
            process.join()
        raise
    if failed := [process for process in processes if process.exitcode != 0]:
        raise WorkersFailed(
            f"{', '.join(f'{p.name} {ending(p.exitcode)}' for p in failed)}; the study keeps their finished "
            "trials: rerun the same command to run any trial left"
        )
    return {worker_id(p.pid) for p in processes}


def ending(exitcode: int) -> str:
    """How a process ended, from ``Process.exitcode``: a negative one is the signal that killed it."""
    if exitcode >= 0:
        return f"exited with code {exitcode}"
    try:
        return f"was killed by {signal.Signals(-exitcode).name}"
    except ValueError:  # a signal Python has no name for
        return f"was killed by signal {-exitcode}"


@contextmanager
def pinned_to(gpu: str | None):
    """CUDA_VISIBLE_DEVICES=``gpu`` inside the block (a process started there sees only that GPU)."""
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before
