"""This machine's share of a study: what each of its workers needs, in plain values that cross a
process boundary (experiments/gpus.py spawns workers with it), and the name a worker goes by."""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass

from pipeline.config import TuneConfig


@dataclass(frozen=True)
class WorkerJob:
    config: TuneConfig
    parent_run_id: str
    experiment_id: str
    data_ref: str  # the prepare run: the lineage every trial's run and model carries
    data_folder: str
    worker: int = 0
    workers: int = 1  # how many run on this machine: they share its CPU threads
    gpu: str | None = None  # the GPU this worker is pinned to (its CUDA_VISIBLE_DEVICES); None: not pinned
    deadline: float = math.inf  # -P budget: when the command must end (time.time())


def worker_id(pid: int | None = None) -> str:
    """``host:pid`` (this process's by default): the worker that holds a trial's lease and trained a run."""
    return f"{socket.gethostname()}:{pid or os.getpid()}"
