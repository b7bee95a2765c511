"""Dependencies point one way: stages -> tracking/training -> model/data/config/signals/tables; tests never import benchmarks."""

from __future__ import annotations

import ast

import pytest

from tests.conftest import REPO

LAYERS = {  # a module may import modules of lower layers only
    "pipeline.config": 0,
    "pipeline.signals": 0,
    "pipeline.tables": 0,
    "pipeline.data": 1,
    "pipeline.model": 2,
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
        if isinstance(node, ast.ImportFrom) and node.module:
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
