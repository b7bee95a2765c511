"""What a run records about where it ran: the GPU it used, and MLflow's system metrics.

No GPU here: the CUDA queries are faked, so a mistake in reading them shows on the CPU.
"""

from __future__ import annotations

import os
import threading
import time
from types import SimpleNamespace

import mlflow
import pytest
import torch

from pipeline.tracking import SYSTEM_METRICS_INTERVAL_SECONDS, device_params, start_run_with_system_metrics

GPUS = {  # index -> (name, total memory in bytes, compute capability)
    0: ("NVIDIA H200", 150_122_151_936, (9, 0)),
    1: ("NVIDIA A100-SXM4-40GB", 42_297_524_224, (8, 0)),
}


@pytest.fixture
def fake_gpus(monkeypatch):
    """torch.cuda answering as a machine with GPUS, the current one being index 0."""

    def properties(index):
        name, total_memory, (major, minor) = GPUS[index]
        return SimpleNamespace(name=name, total_memory=total_memory, major=major, minor=minor)

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: GPUS[index][0])
    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)


def test_a_gpu_run_records_the_gpus_name_index_and_memory(fake_gpus):
    assert device_params(torch.device("cuda")) == {
        "resolved_device": "cuda",
        "gpu_name": "NVIDIA H200",
        "gpu_index": 0,
        "gpu_capability": "9.0",
        "gpu_memory_gb": 150.1,
    }
    assert device_params(torch.device("cuda:1")) == {  # the GPU asked for, not the current one
        "resolved_device": "cuda",
        "gpu_name": "NVIDIA A100-SXM4-40GB",
        "gpu_index": 1,
        "gpu_capability": "8.0",
        "gpu_memory_gb": 42.3,
    }


def test_a_cpu_run_records_only_the_device_type():
    assert device_params(torch.device("cpu")) == {"resolved_device": "cpu"}


def monitor_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "SystemMetricsMonitor" and thread.is_alive()]


def test_system_metrics_are_sampled_every_second_and_stop_with_the_run(tracking, monkeypatch):
    monkeypatch.delenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", raising=False)  # restored after the test
    with start_run_with_system_metrics() as run:
        assert len(monitor_threads()) == 1
        time.sleep(3.5 * SYSTEM_METRICS_INTERVAL_SECONDS)
    assert monitor_threads() == []  # ended with the run: nothing leaks into the next test
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    assert len(history) >= 2  # MLflow's default interval, 10 s, would have logged none
    assert "system/system_memory_usage_megabytes" in mlflow.get_run(run.info.run_id).data.metrics


def test_a_sampling_interval_set_by_the_user_is_kept(tracking, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "30")
    with start_run_with_system_metrics():
        pass
    assert os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] == "30"
