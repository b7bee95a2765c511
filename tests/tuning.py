"""What the study tests share: a prepare run of 1,000 real MNIST images (fixture ``prepared_run``),
the tiny ``smoke`` study's settings, and readers of its runs and its Optuna study.

Loaded as a plugin by tests/conftest.py (its ``pytest_plugins``)."""

from __future__ import annotations

import optuna
import pytest
from mlflow.tracking import MlflowClient

from experiments import coordination
from pipeline import prepare
from pipeline.config import TuneConfig


@pytest.fixture
def prepared_run(tracking, mnist_dir) -> str:
    prepare.main(["--data-dir", str(mnist_dir), "--train-limit", "1000", "--val-size", "500"])
    [run] = MlflowClient().search_runs(["0"])
    return run.info.run_id


def smoke(tmp_path, **overrides) -> TuneConfig:
    settings = {
        "study": "smoke",
        "study_name": "tiny",
        "storage": str(tmp_path / "studies.journal"),
        "n_trials": 3,
        "epochs": 1,
        "device": "cpu",
        "register_name": "tiny-lstm",
        "confirm_top": 0,  # the best trial's own model: confirming over seeds has tests of its own
    }
    return TuneConfig(**{**settings, **overrides})


def runs_of(stage: str):
    return MlflowClient().search_runs(["0"], filter_string=f"tags.`pipeline.stage` = '{stage}'")


def load(config: TuneConfig) -> optuna.Study:
    return optuna.load_study(study_name=config.study_name, storage=coordination.open_storage(config))
