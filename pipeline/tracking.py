"""Small MLflow helpers shared by the stages: opening a stage run, resolving inputs, versions."""

from __future__ import annotations

import os
import platform
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

import mlflow

from pipeline.data import PreparedData, load_prepared

# MLflow's per-file download bars drown the stages' own progress lines.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

PREPARED_ARTIFACT = "prepared"
MODEL_NAME = "model"
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@contextmanager
def stage_run(stage: str, **tags: str):
    """Open this stage's MLflow run, or join the one `mlflow run` created for it.

    An exception ends the run FAILED and propagates; Ctrl-C ends it KILLED.
    """
    with mlflow.start_run(run_name=stage) as run:
        mlflow.set_tags({"pipeline.stage": stage, **tags})
        try:
            yield run
        except KeyboardInterrupt:
            mlflow.end_run(status="KILLED")
            raise


def log_params(params: dict) -> None:
    """Log params, skipping those the run already has.

    `mlflow run` logs the MLproject parameters as typed (``-P learning_rate=1e-3``) before the
    stage starts; logging the parsed value (0.001) again would be a conflicting change.
    """
    existing = mlflow.get_run(mlflow.active_run().info.run_id).data.params
    mlflow.log_params({k: format_param(v) for k, v in params.items() if k not in existing})


def format_param(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def artifact_location(ref: str, artifact_path: str) -> str:
    """An artifact URI from a run id (``runs:/<id>/<artifact_path>``) or an URI/path as given."""
    return f"runs:/{ref}/{artifact_path}" if _RUN_ID.match(ref) else ref


def download(ref: str, artifact_path: str, dst: str | Path | None = None) -> Path:
    """Local folder holding the artifact ``ref`` points at: a run id, artifact URI or local path."""
    if Path(ref).is_dir():
        return Path(ref)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_location(ref, artifact_path), dst_path=dst and str(dst)))


def load_prepared_run(ref: str) -> PreparedData:
    """The prepared split a prepare run (id, artifact URI or local folder) logged."""
    with tempfile.TemporaryDirectory(prefix="prepared-") as tmp:
        return load_prepared(download(ref, PREPARED_ARTIFACT, tmp))


def model_uri(ref: str) -> str:
    """A model URI from a train run id, or any MLflow model URI as given."""
    return f"runs:/{ref}/{MODEL_NAME}" if _RUN_ID.match(ref) else ref


def library_versions() -> dict[str, str]:
    import optuna
    import pandas
    import torch
    import torchvision

    versions = {
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "mlflow_version": mlflow.__version__,
        "optuna_version": optuna.__version__,
        "pandas_version": pandas.__version__,
    }
    if torch.cuda.is_available():
        versions["cuda_version"] = str(torch.version.cuda)
        versions["cudnn_version"] = str(torch.backends.cudnn.version())
    return versions
