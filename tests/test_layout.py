"""Dependencies point one way: stages -> tracking/training -> the pieces below them; experiments/ ->
pipeline/; tests never import benchmarks. Only an entry point's ``main()`` changes process state: a
stage's work leaves it as it was."""

from __future__ import annotations

import ast
import importlib
import importlib.util
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

# pipeline/ is one run's stages; experiments/ is work over many runs (a study's trials, seeds,
# leaderboards), built on the stages. So experiments/ may import any of pipeline/, and pipeline/
# imports nothing of experiments/. Inside each, a module may import modules of lower layers only.
LAYERS = {
    "pipeline.config": 0,
    "pipeline.signals": 0,
    "pipeline.tables": 0,
    "pipeline.inference": 0,
    "pipeline.tracking_store": 0,
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
EXPERIMENT_LAYERS = {
    # records and names: attribute keys, storage URLs, a worker's job
    "experiments.attributes": 0,
    "experiments.storage": 0,
    "experiments.job": 0,
    "experiments.trials": 1,
    "experiments.studies": 1,
    "experiments.coordination": 2,
    "experiments.runs": 2,
    "experiments.budget": 2,
    "experiments.pareto": 2,
    "experiments.warm_start": 2,
    "experiments.parent_run": 2,
    "experiments.plots": 3,
    "experiments.progress": 3,
    "experiments.confirm": 3,
    "experiments.registry": 3,
    "experiments.objective": 3,
    "experiments.summary": 4,
    "experiments.worker": 5,
    "experiments.gpus": 6,
    # the commands: nothing imports them. compare and repeat use pipeline/ alone (runs over seeds).
    "experiments.tune": 7,
    "experiments.compare": 7,
    "experiments.repeat": 7,
}


def project_imports(path) -> set[str]:
    """Every import in the file: ast.walk also enters functions and ``if TYPE_CHECKING:`` blocks,
    where an import that closes a cycle would otherwise hide."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level and node.module:  # from .x import y
            names.add(f"{path.parent.name}.{node.module}")
        elif isinstance(node, ast.ImportFrom) and node.level:  # from . import x
            names.update(f"{path.parent.name}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module in ("pipeline", "experiments"):  # from pipeline import serving
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
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


@pytest.mark.parametrize("module", EXPERIMENT_LAYERS)
def test_experiment_modules_import_pipeline_and_lower_layers_only(module):
    path = REPO / (module.replace(".", "/") + ".py")
    for imported in project_imports(path):
        if imported.startswith("pipeline."):
            continue
        assert imported in EXPERIMENT_LAYERS, f"{module} imports {imported}, outside experiments/ and pipeline/"
        assert EXPERIMENT_LAYERS[imported] < EXPERIMENT_LAYERS[module], (
            f"{module} (layer {EXPERIMENT_LAYERS[module]}) imports {imported} (layer {EXPERIMENT_LAYERS[imported]})"
        )


def test_every_module_has_a_layer_and_docs_layout_md_says_which():
    for package, layers in (("pipeline", LAYERS), ("experiments", EXPERIMENT_LAYERS)):
        modules = {f"{package}.{path.stem}" for path in REPO.glob(f"{package}/*.py") if path.stem != "__init__"}
        assert modules == set(layers)
    documented, package = {}, None
    for line in (REPO / "docs" / "layout.md").read_text().splitlines():
        if line.startswith("## "):
            package = line.split()[1].rstrip("/")
        elif package in ("pipeline", "experiments") and line.startswith("| ") and line.split("|")[1].strip().isdigit():
            layer, names = int(line.split("|")[1]), line.split("|")[2]
            documented |= {f"{package}.{name.strip('` ')[:-3]}": layer for name in names.split(",")}
    assert documented == LAYERS | EXPERIMENT_LAYERS


def test_imports_in_functions_type_checking_blocks_and_relative_ones_count(tmp_path):
    path = tmp_path / "experiments" / "example.py"
    path.parent.mkdir()
    path.write_text(
        "from typing import TYPE_CHECKING\n"
        "from experiments import attributes\n"
        "if TYPE_CHECKING:\n    from experiments.tune import main\n"
        "def f():\n    import experiments.worker\n    from . import summary\n    from .gpus import run\n"
    )
    assert project_imports(path) == {
        "experiments.attributes",
        "experiments.tune",
        "experiments.worker",
        "experiments.summary",
        "experiments.gpus",
    }


def test_nothing_imports_benchmarks_but_benchmarks():
    for path in [*REPO.glob("tests/*.py"), *REPO.glob("pipeline/*.py"), *REPO.glob("experiments/*.py")]:
        assert not [name for name in project_imports(path) if name.startswith("benchmarks")], path.name


def test_every_name_imported_from_the_project_exists():
    """Scripts run by hand (benchmarks/, deploy/) are imported by no test: a renamed name would
    break them unseen."""
    folders = ("pipeline", "experiments", "tests", "benchmarks", "deploy")
    for path in [path for folder in folders for path in REPO.glob(f"{folder}/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or node.level or node.module.split(".")[0] not in folders[:2]:
                continue
            module = importlib.import_module(node.module)
            missing = [alias.name for alias in node.names if not hasattr(module, alias.name)]
            if missing and not all(importlib.util.find_spec(f"{node.module}.{name}") for name in missing):
                pytest.fail(f"{path.relative_to(REPO)}: {node.module} has no {missing}")


def loaded_by_importing(modules: tuple[str, ...], heavy: tuple[str, ...]) -> list[str]:
    """Which of the ``heavy`` packages a fresh process has loaded once it has imported ``modules``."""
    check = f"import sys, {', '.join(modules)}; print(' '.join(m for m in {heavy!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()


def test_the_entry_points_that_only_start_others_import_no_torch():
    """`mlflow run .` starts pipeline.main, and `-e repeat` starts it once per seed: each is a process
    that only launches stages, so it does not pay torch's import (seconds on a 2-core CPU)."""
    orchestrators = ("pipeline.main", "experiments.repeat", "experiments.compare")
    assert loaded_by_importing(orchestrators, ("torch", "torchvision")) == []


def test_a_tune_worker_imports_scikit_learn_only_for_the_summary():
    """Every tune command and spawned worker imports experiments.tune or experiments.worker; Optuna's
    fANOVA importances (scikit-learn, most of a second on a 2-core CPU) serve only the summary's plots."""
    assert loaded_by_importing(("experiments.tune", "experiments.worker"), ("sklearn",)) == []


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
