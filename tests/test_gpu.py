"""On a CUDA GPU: the pipeline and a study through the user's door (`mlflow run`), bf16 against
fp32, and GPU memory after an out-of-memory trial. Skipped without a GPU: benchmarks/gpu_check.sh
runs them on one (with MNIST_DATA_DIR pointing at the raw files)."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import weakref
from types import SimpleNamespace

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from experiments import attributes
from experiments import objective as objective_module
from experiments.tune import tune
from pipeline import prepare
from pipeline.config import PrepareConfig, TrainConfig, TuneConfig
from pipeline.data import load_prepared
from pipeline.training import train
from tests.conftest import REPO

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run benchmarks/gpu_check.sh on one"),
]

# MLflow's system metrics name GPUs by their NVML index on the machine: on a one-GPU machine, gpu_0.
GPU_UTILIZATION = "system/gpu_0_utilization_percentage"
MiB = 2**20


def visible_gpu() -> str:
    """The GPU a worker is pinned to, as CUDA_VISIBLE_DEVICES names it (the tuner's own naming)."""
    listed = [name.strip() for name in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if name.strip()]
    return listed[0] if listed else "0"


@pytest.fixture
def shell(tmp_path, store_uri, mnist_dir):
    """A user's shell in tmp_path: their own tracking store, and `python` and `mlflow` on PATH that are
    this interpreter's. MLflow starts each entry point with the shell's `python`, and a stage started
    from Python (mlflow.run) with the `mlflow` command: a machine may have neither (pip --target)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, command in (("python", ""), ("mlflow", " -m mlflow")):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec "{sys.executable}"{command} "$@"\n')
        (bin_dir / name).chmod(0o755)
    uri = store_uri
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_RUN_ID", None)

    def mlflow_run(entry_point: str, **params) -> subprocess.CompletedProcess:
        args = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", entry_point, "--env-manager", "local"]
        args += [arg for name, value in params.items() for arg in ("-P", f"{name}={value}")]
        return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)

    return SimpleNamespace(run=mlflow_run, client=MlflowClient(uri), journal=str(tmp_path / "studies.journal"))


def test_the_pipeline_trains_and_evaluates_on_the_gpu(shell, mnist_dir, tmp_path):
    done = shell.run(
        "main",
        data_dir=mnist_dir,
        train_limit=20000,
        epochs=2,
        hidden_size=128,
        num_layers=1,
        learning_rate=0.005,
        device="cuda",
        checkpoint_dir=tmp_path / "checkpoints",
    )
    assert done.returncode == 0, done.stderr[-3000:]

    runs = {run.data.tags["pipeline.stage"]: run for run in shell.client.search_runs(["0"])}
    assert set(runs) == {"main", "prepare", "train", "evaluate"}
    assert all(run.info.status == "FINISHED" for run in runs.values())
    trained, evaluated = runs["train"], runs["evaluate"]
    params = trained.data.params
    assert params["resolved_device"] == "cuda"
    assert params["gpu_name"] == torch.cuda.get_device_name(0)
    assert {"gpu_index", "gpu_memory_gb", "resolved_precision"} <= set(params)
    assert evaluated.data.params["resolved_device"] == "cuda"  # the logged model was loaded and run on the GPU
    assert evaluated.data.metrics["test_accuracy"] > 0.9
    assert GPU_UTILIZATION in trained.data.metrics, sorted(m for m in trained.data.metrics if m.startswith("system/"))


def test_two_workers_share_the_gpu_and_the_best_trial_becomes_champion(shell, mnist_dir):
    done = shell.run(
        "tune",
        study="smoke",
        study_name="gpu",
        storage=shell.journal,
        n_trials=4,
        n_workers="auto",
        workers_per_gpu=2,
        epochs=2,
        pruner="none",
        device="cuda",
        data_dir=mnist_dir,
        train_limit=2000,
        val_size=1000,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    gpu = visible_gpu()
    assert f"2 workers on GPUs {gpu}, {gpu}" in done.stderr

    trials = optuna.load_study(study_name="gpu", storage=JournalStorage(JournalFileBackend(shell.journal))).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    assert len({attributes.WORKER.read(t) for t in trials}) == 2  # host:pid: both workers ran trials
    trial_runs = shell.client.search_runs(["0"], filter_string="tags.`pipeline.stage` = 'trial'")
    assert len(trial_runs) == 4
    assert all(run.data.tags["pipeline.cuda_visible_devices"] == gpu for run in trial_runs)
    assert all(run.data.params["resolved_device"] == "cuda" for run in trial_runs)
    champion = shell.client.get_model_version_by_alias("lstm-mnist", "champion")
    assert 0 <= float(champion.tags["test_accuracy"]) <= 1  # tested once, on the GPU


@pytest.fixture(scope="module")
def mnist_20k(mnist_dir, tmp_path_factory):
    """20,000 real training images and 5,000 validation images, as the prepare stage splits them."""
    folder = tmp_path_factory.mktemp("prepared")
    prepare.prepare(PrepareConfig(data_dir=str(mnist_dir), train_limit=20000), folder)
    return load_prepared(folder)


def test_bf16_trains_as_well_as_fp32(mnist_20k, record_property, capsys):
    results = {}
    for precision in ("fp32", "bf16"):
        config = TrainConfig(hidden_size=128, num_layers=1, learning_rate=0.005, epochs=3, device="cuda", precision=precision)
        results[precision] = train(config, mnist_20k, progress=False)
        assert results[precision].precision == precision
    speed = {p: statistics.median(m.samples_per_second for m in r.history) for p, r in results.items()}
    accuracy = {p: r.best_val_accuracy for p, r in results.items()}
    for precision in results:
        record_property(f"{precision}_samples_per_second", round(speed[precision]))
        record_property(f"{precision}_val_accuracy", round(accuracy[precision], 4))
    with capsys.disabled():
        print(
            f"\nbf16 vs fp32 (hidden 128, 1 layer, 20,000 images, 3 epochs): samples/s {speed['bf16']:.0f} vs "
            f"{speed['fp32']:.0f} ({speed['bf16'] / speed['fp32']:.2f}x); "
            f"val_accuracy {accuracy['bf16']:.4f} vs {accuracy['fp32']:.4f}"
        )
    assert accuracy["fp32"] > 0.95
    assert abs(accuracy["bf16"] - accuracy["fp32"]) <= 0.01


@pytest.fixture
def prepared_run(tracking, mnist_dir) -> str:
    prepare.main(["--data-dir", str(mnist_dir), "--train-limit", "1000", "--val-size", "500"])
    [run] = MlflowClient().search_runs(["0"])
    return run.info.run_id


def test_gpu_memory_is_back_to_its_baseline_after_an_out_of_memory_trial(tmp_path, prepared_run, monkeypatch):
    hog_bytes = 8 * 2**30
    real = objective_module.train_and_log
    at_start, hogs = [], []  # (allocated, reserved, hog still alive) when each trial starts training

    def out_of_memory_in_the_second_trial(*args, **kwargs):
        at_start.append((torch.cuda.memory_allocated(), torch.cuda.memory_reserved(), any(ref() is not None for ref in hogs)))
        if len(at_start) == 2:
            hog = torch.empty(hog_bytes, dtype=torch.uint8, device="cuda")  # held by this frame's traceback
            hogs.append(weakref.ref(hog))
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (forced, holding {hog.numel() / 2**30:.0f} GiB)")
        return real(*args, **kwargs)

    monkeypatch.setattr(objective_module, "train_and_log", out_of_memory_in_the_second_trial)
    config = TuneConfig(
        study="smoke",
        study_name="oom",
        storage=str(tmp_path / "studies.journal"),
        n_trials=3,
        n_workers="1",
        epochs=1,
        pruner="none",
        device="cuda",
        register_name="oom-lstm",
    )
    before = torch.cuda.memory_allocated()
    tune(config, PrepareConfig(), prepared_run)
    after = torch.cuda.memory_allocated()

    trials = optuna.load_study(study_name="oom", storage=JournalStorage(JournalFileBackend(config.storage))).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]  # it failed, and the study went on
    [failed] = MlflowClient().search_runs(["0"], filter_string="tags.`optuna.trial_state` = 'FAIL'")
    assert failed.info.status == "FAILED" and "OutOfMemoryError" in failed.data.tags["optuna.fail_reason"]
    (allocated_2, reserved_2, _), (allocated_3, reserved_3, hog_alive) = at_start[1], at_start[2]
    assert not hog_alive
    assert allocated_3 - allocated_2 < 64 * MiB  # the next trial started without the 8 GiB
    assert reserved_3 - reserved_2 < 256 * MiB  # and the allocator gave it back to the driver
    assert after - before < 64 * MiB
