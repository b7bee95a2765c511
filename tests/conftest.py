"""Shared fixtures: a private MLflow store per test, real MNIST from ../shared/data, tiny IDX files.

Every test that touches MLflow gets its own SQLite store and artifact folder under ``tmp_path``
and runs with that folder as its working directory, so tests never see each other's runs.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path

if "PYTEST_XDIST_WORKER" in os.environ:  # `pytest -n 3`: set before torch is imported, here and in every child
    # One thread per test process and per process it starts: with more OpenMP threads than cores,
    # their spin-waits stall each other, and a test that trains runs many times slower.
    os.environ["OMP_NUM_THREADS"] = "1"

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline import data as data_module
from pipeline.data import DatasetSpec, RawFile

REPO = Path(__file__).resolve().parents[1]
pytest_plugins = ["tests.servers", "tests.slurm", "tests.tuning"]  # PostgreSQL, MLflow server, Slurm; studies


def pytest_collection_modifyitems(config, items):
    """The longest tests first, on every process: a long test started last keeps one process busy
    for minutes while the others have nothing left to run. ``@pytest.mark.slow(seconds=...)`` says
    how long a test took in the suite on a 2-core CPU (a slow test that does not: 30 s).

    Under ``-n N``, pytest-xdist's worksteal hands each process one contiguous slice of this list
    (sizes as it computes them), then moves tests from the end of a long queue to an idle process:
    the list is dealt so that every slice starts with its share of the longest tests."""
    items.sort(key=lambda item: -(marker.kwargs.get("seconds", 30) if (marker := item.get_closest_marker("slow")) else 0))
    processes = getattr(config, "workerinput", {}).get("workercount", 1)
    sizes, left = [], len(items)
    for process in range(processes):
        sizes.append(left // (processes - process))
        left -= sizes[-1]
    slices = [[] for _ in sizes]
    for index, item in enumerate(items):
        turn = index % processes
        while len(slices[turn]) == sizes[turn]:  # a full slice: only the last, quickest tests move on
            turn = (turn + 1) % processes
        slices[turn].append(item)
    items[:] = [item for part in slices for item in part]


def user_environment(tracking_uri: str) -> dict[str, str]:
    """A user's shell: this virtual environment activated, their own tracking store, no run of ours."""
    venv_bin = str(Path(sys.executable).parent)  # so the stages' `python` is this interpreter
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}  # nothing the person running the tests exported
    env.update(MLFLOW_TRACKING_URI=tracking_uri, PATH=venv_bin + os.pathsep + os.environ["PATH"])
    return env


def mlflow_run(*args: str, cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    """``mlflow run <this project> --env-manager local <args>``, typed in ``cwd``."""
    command = [sys.executable, "-m", "mlflow", "run", str(REPO), "--env-manager", "local", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its tables made, once per test process: MLflow's migrations take
    a second or more per new store, and over a hundred tests need one."""
    database = tmp_path_factory.mktemp("empty-store") / "mlflow.db"
    MlflowClient(f"sqlite:///{database}").search_experiments()
    return database


@pytest.fixture
def store_uri(tmp_path, empty_store) -> str:
    """A new, empty tracking store at tmp_path/mlflow.db, as MLflow makes it there (the Default
    experiment's artifacts in tmp_path/mlruns/0), copied from ``empty_store``; its URI."""
    database = tmp_path / "mlflow.db"
    shutil.copyfile(empty_store, database)
    connection = sqlite3.connect(database)
    with connection:
        default_artifacts = str(tmp_path / "mlruns" / "0")
        connection.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0", (default_artifacts,))
    connection.close()
    return f"sqlite:///{database}"


def nothing_tracked(uri: str) -> bool:
    """Whether the store holds nothing but its empty Default experiment: no run, no other experiment."""
    store = MlflowClient(uri)
    return [e.name for e in store.search_experiments()] == ["Default"] and not store.search_runs(["0"])


@pytest.fixture
def tracking(store_uri, tmp_path, monkeypatch) -> str:
    """A fresh MLflow tracking store under tmp_path (``store_uri``); the test runs in tmp_path."""
    uri = store_uri
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The real MNIST raw files (../shared/data, or $MNIST_DATA_DIR), which tests never download."""
    folder = Path(os.environ.get("MNIST_DATA_DIR", REPO.parent / "shared" / "data"))
    if not (folder / "MNIST" / "raw").is_dir():
        pytest.fail(f"real MNIST not found at {folder}/MNIST/raw; set MNIST_DATA_DIR to the folder holding MNIST/raw")
    return folder


# --- tiny IDX files -----------------------------------------------------------------------------


def idx_bytes(array: torch.Tensor) -> bytes:
    """IDX encoding of a uint8 tensor: magic 0x0800 | ndim, big-endian dims, then the bytes."""
    header = struct.pack(">I", 0x0800 | array.dim()) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.to(torch.uint8).numpy().tobytes()


def synthetic_images(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """28x28 uint8 images a model learns in a few steps: class k lights columns 2k, 2k+1 of the
    last row (the last step in either reading order), over noise."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 60, (len(labels), 28, 28), generator=generator, dtype=torch.uint8)
    for k in range(10):
        images[labels == k, 27, 2 * k : 2 * k + 2] = 255
    return images


def write_synthetic_mnist(root: Path, n_train: int = 400, n_test: int = 100, compress: bool = True) -> DatasetSpec:
    """Write tiny IDX files in torchvision's layout under ``root``; return a spec with their md5s."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    train_labels = torch.randint(0, 10, (n_train,), generator=generator)
    test_labels = torch.randint(0, 10, (n_test,), generator=generator)
    contents = {
        "train-images-idx3-ubyte": (idx_bytes(synthetic_images(train_labels, 1)), 0x803, n_train),
        "train-labels-idx1-ubyte": (idx_bytes(train_labels), 0x801, n_train),
        "t10k-images-idx3-ubyte": (idx_bytes(synthetic_images(test_labels, 2)), 0x803, n_test),
        "t10k-labels-idx1-ubyte": (idx_bytes(test_labels), 0x801, n_test),
    }
    files = []
    for name, (payload, magic, count) in contents.items():
        if compress:
            (raw / f"{name}.gz").write_bytes(gzip.compress(payload))
        else:
            (raw / name).write_bytes(payload)
        files.append(RawFile(name, hashlib.md5(payload).hexdigest(), magic, count))
    real = data_module.DATASETS["mnist"]
    return DatasetSpec(real.torchvision_class, real.folder, tuple(files))


def corrupt_file(root: Path, name: str = "train-images-idx3-ubyte") -> Path:
    """Flip one byte in the middle of a synthetic raw file; return its path."""
    path = root / "MNIST" / "raw" / f"{name}.gz"
    payload = bytearray(gzip.decompress(path.read_bytes()))
    payload[len(payload) // 2] ^= 0xFF
    path.write_bytes(gzip.compress(bytes(payload)))
    return path


@pytest.fixture
def synthetic_mnist(tmp_path, monkeypatch) -> Path:
    """A data_dir of tiny synthetic 'mnist' (400 train, 100 test images), trusted by its md5s."""
    root = tmp_path / "synthetic-data"
    monkeypatch.setitem(data_module.DATASETS, "mnist", write_synthetic_mnist(root))
    return root


def tiny_prepared(n_train: int = 512, n_val: int = 128, n_test: int = 128) -> data_module.PreparedData:
    """An in-memory PreparedData of learnable synthetic images."""
    generator = torch.Generator().manual_seed(3)
    splits = {}
    for seed, (name, n) in enumerate((("train", n_train), ("val", n_val), ("test", n_test))):
        labels = torch.randint(0, 10, (n,), generator=generator)
        splits[name] = data_module.Split(synthetic_images(labels, seed), labels)
    manifest = {"dataset": "mnist", "pixel_mean": 0.2, "pixel_std": 0.3, "splits": {"train": {"sha256": "0" * 64}}}
    return data_module.PreparedData(**splits, manifest=manifest)
