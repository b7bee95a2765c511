"""Targets for the worker processes that experiments/gpus.py spawns in tests. A spawned process imports
its target's module: this one imports next to nothing, where a test module would import torch, MLflow
and Optuna (about 10 s of CPU per process here)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from experiments.job import WorkerJob


def record_environment(job: WorkerJob) -> None:
    """A spawned worker's first look at its world (module level: a spawned process imports it)."""
    seen = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")}
    Path(job.data_folder, f"worker-{job.worker}.json").write_text(json.dumps(seen))


def end_as_numbered(job: WorkerJob) -> None:
    """A spawned worker that ends as its number says: 1 exits with code 3, 2 is killed (as by the OOM killer),
    0 ends well, last."""
    if job.worker == 1:
        os._exit(3)
    if job.worker == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(2)
    Path(job.data_folder, "worker-0-ended").touch()
