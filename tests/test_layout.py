"""Dependencies point one way: stages -> tracking/training -> the pieces below them; tests never
import benchmarks. Only an entry point's ``main()`` changes process state: a stage's work leaves it as it was."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys

import matplotlib
import mlflow
import pytest

from pipeline.config import TrainConfig
from pipeline.data import load_prepared, save_prepared
from pipeline.train import train_and_log
from tests.conftest import REPO, tiny_prepared

LAYERS = {  # a module may import modules of lower layers only
    "pipeline.config": 0,
    "pipeline.signals": 0,
    "pipeline.tables": 0,
    "pipeline.inference": 0,
    "pipeline.data": 1,
    "pipeline.numerics": 1,
    "pipeline.model": 2,
    "pipeline.cost": 2,
    "pipeline.checkpoints": 2,
    "pipeline.serving": 2,
    "pipeline.tracking": 3,
    "pipeline.training": 3,
    "pipeline.prepare": 4,
    "pipeline.train": 4,
    "pipeline.evaluate": 4,
    "pipeline.main": 5,
}


def project_imports(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "pipeline":  # from pipeline import serving
            names.update(f"pipeline.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name for name in names if name.split(".")[0] in ("pipeline", "experiments", "benchmarks", "tests")}


@pytest.mark.parametrize("module", LAYERS)
def test_pipeline_modules_import_only_lower_layers(module):
    path = REPO / (module.replace(".", "/") + ".py")
    for imported in project_imports(path):
        assert imported in LAYERS, f"{module} imports {imported}, outside pipeline/"
        assert LAYERS[imported] < LAYERS[module], (
            f"{module} (layer {LAYERS[module]}) imports {imported} (layer {LAYERS[imported]})"
        )


def test_nothing_imports_benchmarks_but_benchmarks():
    for path in [*REPO.glob("tests/*.py"), *REPO.glob("pipeline/*.py"), *REPO.glob("experiments/*.py")]:
        assert not [name for name in project_imports(path) if name.startswith("benchmarks")], path.name


def test_the_entry_points_that_only_start_others_import_no_torch():
    """`mlflow run .` starts pipeline.main, and `-e repeat` starts it once per seed: each is a process
    that only launches stages, so it does not pay torch's import (seconds on a 2-core CPU)."""
    orchestrators = ("pipeline.main", "experiments.repeat", "experiments.compare")
    check = f"import sys, {', '.join(orchestrators)}; print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def process_state() -> dict:
    """What only an entry point's ``main()`` may change: the environment, the handlers of the signals
    the stages handle, and matplotlib's backend (resolved, so pyplot's lazy default does not count)."""
    return {
        # Leading underscore: MLflow's private bookkeeping (its telemetry session), which it sets and unsets itself.
        "environ": {k: v for k, v in os.environ.items() if not k.startswith("_MLFLOW_")},
        "handlers": {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)},
        "backend": matplotlib.get_backend(),
    }


@pytest.fixture
def unusual_backend():
    """matplotlib's backend set to one no helper would pick, so one that sets Agg shows; then put back."""
    previous = matplotlib.get_backend()
    matplotlib.use("pdf")
    yield
    matplotlib.use(previous)


def test_a_stage_run_leaves_the_process_state_as_it_found_it(tracking, tmp_path, unusual_backend):
    """The train stage's work as the tuner calls it, in a run of its own: the loop with its signal
    handling and checkpoints, MLflow logging, the learning curves and the logged model."""
    tiny, folder = tiny_prepared(), tmp_path / "prepared"
    save_prepared(folder, {"train": tiny.train, "val": tiny.val, "test": tiny.test}, {"dataset": "mnist", "seed": 0})
    config = TrainConfig(hidden_size=8, num_layers=1, batch_size=128, epochs=2, device="cpu")
    before = process_state()
    with mlflow.start_run():
        train_and_log(config, load_prepared(folder), checkpoint_dir=tmp_path / "checkpoints", data_ref=str(folder))
    after = process_state()
    changed = {k: (before["environ"].get(k), after["environ"].get(k)) for k in before["environ"].keys() | after["environ"].keys()}
    assert {k: v for k, v in changed.items() if v[0] != v[1]} == {}, "environment variables changed"
    assert after == before
