"""MLflow helpers shared by the stages: stage runs, inputs, finished runs by tags, a server that does not answer."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import signal
import socket
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import mlflow
import psutil
from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient

from pipeline.config import fail, say
from pipeline.signals import raise_terminated, signal_handler

if TYPE_CHECKING:  # torch is imported by the functions that need it: `pipeline.main` and `-e repeat` start without it
    import torch

    from pipeline.data import PreparedData, Split

PREPARED_ARTIFACT = "prepared"
MODEL_NAME = "model"
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


# Tags every stage run carries, so that a rerun can tell an interrupted run from a live one.
HOST_TAG, PID_TAG = "pipeline.host", "pipeline.pid"
RESUME_KEY_TAG = "pipeline.resume_key"  # what the run computes: a rerun with the same key may resume it
ERROR_TAG = "pipeline.error"  # set when the stage failed by itself (bad input, divergence): never resumed
RESUMED_RUN_TAG = "pipeline.resumed_run"  # on the run `mlflow run` opened, when the stage resumed another
CPU_THREADS_TAG = "pipeline.cpu_threads"  # torch's CPU threads while the run trained: runs at once share the cores
INTERRUPTED_TAG = "pipeline.interrupted"  # the signal that stopped a stage: its run ended KILLED
DATA_SOURCE_TAG = "pipeline.data_source"  # why a run's dataset inputs have no source, when they have none


@contextmanager
def stage_run(stage: str, resume_key: str | None = None, **tags: str):
    """Open this stage's MLflow run, or join the one `mlflow run` created for it; with ``resume_key``, resume an
    interrupted run with that key instead (same run id: same checkpoint folder and metric history). An exception
    ends the run FAILED, its message in ``pipeline.error``; Ctrl-C or SIGTERM ends it KILLED, exit 128 + signal."""
    interrupted = find_interrupted(resume_key) if resume_key else None
    run_id = interrupted and interrupted.info.run_id
    if interrupted:
        say(f"resuming the interrupted {stage} run {run_id} ({interrupted.info.status})")
        if launched := os.environ.get("MLFLOW_RUN_ID"):  # `mlflow run` opened a run for us: point it at the resumed one
            MlflowClient().set_tag(launched, RESUMED_RUN_TAG, run_id)
    with (
        start_run_with_system_metrics(run_id=run_id, run_name=None if run_id else stage) as run,
        signal_handler(raise_terminated, signal.SIGTERM),
    ):
        resumable = {RESUME_KEY_TAG: resume_key} if resume_key else {}
        mlflow.set_tags({"pipeline.stage": stage, HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()), **tags, **resumable})
        try:
            yield run
        except KeyboardInterrupt as stopped:
            number = getattr(stopped, "signal_number", signal.SIGINT)
            # `mlflow run` overwrites a stage's KILLED with FAILED once it exits: say what happened in a tag too.
            mlflow.set_tag(INTERRUPTED_TAG, signal.Signals(number).name)
            mlflow.end_run(status="KILLED")
            then = "rerun the same command to resume it" if resume_key else "rerun the same command to start it again"
            fail(f"{str(stopped) or signal.Signals(number).name}; run {run.info.run_id} ended KILLED: {then}", 128 + number)
        except Exception as error:
            mlflow.set_tag(ERROR_TAG, f"{type(error).__name__}: {error}"[:5000])
            raise


# Epochs last seconds on a GPU: sample every second (MLflow's default is 10 s). A shorter run logs no sample.
SYSTEM_METRICS_INTERVAL_SECONDS = 1.0


def start_run_with_system_metrics(**start_run_args) -> mlflow.ActiveRun:
    """``mlflow.start_run`` that also logs MLflow's ``system/...`` metrics (CPU, memory, disk, network, a GPU
    where nvidia-ml-py finds one); MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL, when set, overrides the interval."""
    if not os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"):
        mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_SECONDS)
    return mlflow.start_run(log_system_metrics=True, **start_run_args)


def find_interrupted(resume_key: str):
    """The newest run of ``resume_key`` that stopped before finishing and may be continued."""
    runs = MlflowClient().search_runs(
        [current_experiment_id()],
        filter_string=f"tags.`{RESUME_KEY_TAG}` = '{resume_key}' and attributes.status != 'FINISHED'",
        order_by=["attributes.start_time DESC"],
    )
    # Not one that failed by itself (a rerun starts afresh), nor one that someone is still running.
    return next((run for run in runs if ERROR_TAG not in run.data.tags and not still_running(run)), None)


def set_tags(run_id: str, tags: dict) -> None:
    """Tag a run other than the active one, in one request (MlflowClient sets one tag a call)."""
    MlflowClient().log_batch(run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])


def finished_run(experiment_id: str, tags: dict[str, str]):
    """The newest finished run of the experiment that carries these tags, if there is one."""
    conditions = [f"tags.`{name}` = '{value}'" for name, value in tags.items()]
    runs = MlflowClient().search_runs(
        [experiment_id],
        filter_string=" and ".join([*conditions, "attributes.status = 'FINISHED'"]),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def still_running(run) -> bool:
    """Whether ``run`` is RUNNING and its process still runs; on another host we cannot tell, so yes."""
    host, pid = run.data.tags.get(HOST_TAG, ""), run.data.tags.get(PID_TAG, "")
    if run.info.status != "RUNNING":
        return False
    return host != socket.gethostname() or not pid.isdigit() or psutil.pid_exists(int(pid))


def selected_experiment(name: str = ""):
    """The experiment named ``name``, else the one selected for this command by the environment `mlflow run`
    and users set (the run `mlflow run` opened, MLFLOW_EXPERIMENT_ID, MLFLOW_EXPERIMENT_NAME), else Default;
    with how it was selected, for messages. None where no experiment has the name."""
    if not name and (run_id := os.environ.get("MLFLOW_RUN_ID")):
        return mlflow.get_experiment(MlflowClient().get_run(run_id).info.experiment_id), f"run {run_id}'s"
    if not name and (experiment_id := os.environ.get("MLFLOW_EXPERIMENT_ID")):
        return mlflow.get_experiment(experiment_id), f"id {experiment_id}"
    name = name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "Default"
    return mlflow.get_experiment_by_name(name), name


def current_experiment_id() -> str:
    """The experiment a new run goes to: the selected one, created if none has its name (as ``mlflow.start_run`` does)."""
    experiment, name = selected_experiment()
    return experiment.experiment_id if experiment else MlflowClient().create_experiment(name)


def ui_link(experiment_id: str) -> str:
    """Where to see an experiment's runs table in the MLflow UI ("Model training", not the GenAI view)."""
    page = f"#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{page}"
    return f"mlflow ui --backend-store-uri {uri}, then open http://127.0.0.1:5000/{page}"


def digest(payload: dict) -> str:
    """A stable hash of JSON-able ``payload``: the same content gives the same key in any process."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def log_params(params: dict) -> None:
    """Log params, skipping those the run already has: `mlflow run` logs the MLproject parameters as
    typed (``-P learning_rate=1e-3``) first, and the parsed value (0.001) would be a conflicting change."""
    existing = mlflow.get_run(mlflow.active_run().info.run_id).data.params
    mlflow.log_params({k: format_param(v) for k, v in params.items() if k not in existing})


def format_param(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def artifact_location(ref: str, artifact_path: str) -> str:
    """An artifact URI from a run id (``runs:/<id>/<artifact_path>``), or any URI or path as given."""
    return f"runs:/{ref}/{artifact_path}" if _RUN_ID.match(ref) else ref


def download(ref: str, artifact_path: str, dst: str | Path | None = None) -> Path:
    """Local folder holding the artifact ``ref`` points at: a run id, artifact URI or local path."""
    if Path(ref).is_dir():
        return Path(ref)
    uri = artifact_location(ref, artifact_path)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst and str(dst)))


def load_prepared_run(ref: str) -> PreparedData:
    """The prepared split a prepare run (id, artifact URI or local folder) logged."""
    from pipeline.data import load_prepared

    with tempfile.TemporaryDirectory(prefix="prepared-") as tmp:
        return load_prepared(download(ref, PREPARED_ARTIFACT, tmp))


def log_split_input(split: Split, name: str, sha256: str, source: str | None, context: str) -> None:
    """Record ``split`` as a dataset input of the active run: the runs table's Dataset column.
    ``source`` None: MLflow records the code that logged it instead."""
    with warnings.catch_warnings():  # a local path matches MLflow's local source twice; either is right
        warnings.filterwarnings("ignore", message=".*can be interpreted in multiple ways.*")
        dataset = mlflow.data.from_numpy(
            split.images.cpu().numpy(), targets=split.labels.cpu().numpy(), source=source, name=name, digest=sha256[:16]
        )
    try:
        mlflow.log_input(dataset, context=context)
    except mlflow.exceptions.MlflowException as error:
        # Runs that log a dataset new to their experiment at once each look it up, miss it and insert it:
        # one insert meets the other's (a unique constraint, BAD_REQUEST), and a second try finds it there.
        if error.error_code != "BAD_REQUEST":
            raise
        mlflow.log_input(dataset, context=context)


def log_data_inputs(data: PreparedData, data_ref: str, contexts: dict[str, str]) -> None:
    """Record the prepared splits a run read (``contexts``: split name -> MLflow context, such as
    ``{"train": "training"}``), each with its file in the prepare run's ``prepared/`` as its source
    where MLflow can read that URI; else without one, and the tag ``pipeline.data_source`` says why."""
    folder = str(Path(data_ref).resolve()) if Path(data_ref).is_dir() else artifact_location(data_ref, PREPARED_ARTIFACT)
    for split, context in contexts.items():
        entry = data.manifest["splits"][split]
        source, why_not = split_source(f"{folder.rstrip('/')}/{entry['file']}")
        if why_not:
            mlflow.set_tag(DATA_SOURCE_TAG, why_not)
        log_split_input(getattr(data, split), f"{data.manifest['dataset']}-{split}", entry["sha256"], source, context)


def split_source(uri: str) -> tuple[str | None, str]:
    """A source for a split's file at artifact ``uri`` that MLflow's dataset sources read (``runs:`` as the
    run's artifact URI, ``mlflow-artifacts:`` as the proxying server's download address), or None and why not."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    scheme = urlparse(uri).scheme
    if scheme == "runs":
        run_id, _, path = uri.removeprefix("runs:/").partition("/")
        return split_source(f"{mlflow.get_run(run_id).info.artifact_uri}/{path}")
    if scheme == "mlflow-artifacts":
        if not (url := proxied_artifact_url(uri)):
            tracking = mlflow.get_tracking_uri()
            return None, f"dataset source left out: {uri} is served by a tracking server, and {tracking} is not one"
        uri = url
    try:
        with warnings.catch_warnings():  # a local path matches MLflow's local source twice; either is right
            warnings.filterwarnings("ignore", message=".*can be interpreted in multiple ways.*")
            resolve_dataset_source(uri)
    except mlflow.exceptions.MlflowException:
        return None, f"dataset source left out: MLflow has no dataset source for {scheme}: URIs ({uri})"
    return uri, ""


def proxied_artifact_url(uri: str) -> str | None:
    """The HTTP address at which the tracking server serves ``mlflow-artifacts:`` ``uri``: its own
    host when the URI names one, else the tracking server's (None when tracking is not a server)."""
    parsed = urlparse(uri)
    if parsed.netloc:
        server = f"http://{parsed.netloc}"
    elif (tracking := mlflow.get_tracking_uri()).startswith(("http://", "https://")):
        server = tracking.rstrip("/")
    else:
        return None
    return f"{server}/api/2.0/mlflow-artifacts/artifacts/{parsed.path.lstrip('/')}"


def model_uri(ref: str) -> str:
    """A model URI from a train run id, or any MLflow model URI as given."""
    return artifact_location(ref, MODEL_NAME)


def device_params(device: torch.device) -> dict[str, str | int | float]:
    """Run params naming the device a stage ran on: its type; for a GPU its name, index, capability, memory."""
    import torch

    params = {"resolved_device": device.type}  # what device=auto chose
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        properties = torch.cuda.get_device_properties(index)
        params.update(
            gpu_name=torch.cuda.get_device_name(index),
            gpu_index=index,
            gpu_capability=f"{properties.major}.{properties.minor}",  # 8.0 and later: bf16 and TF32 tensor cores
            gpu_memory_gb=round(properties.total_memory / 1e9, 1),
        )
    return params


def library_versions() -> dict[str, str]:
    import optuna
    import pandas
    import torch
    import torchvision

    versions = {"python_version": platform.python_version()}
    versions.update({f"{module.__name__}_version": module.__version__ for module in (torch, torchvision, mlflow, optuna, pandas)})
    if torch.cuda.is_available():
        versions["cuda_version"] = str(torch.version.cuda)
        versions["cudnn_version"] = str(torch.backends.cudnn.version())
    return versions


# --- a tracking server that does not answer ---------------------------------------------------------


def unreachable(error: BaseException) -> bool:
    """Whether ``error`` says the tracking server did not answer, after MLflow's client retried."""
    return isinstance(error, mlflow.exceptions.MlflowException) and "failed with exception" in str(error)


def when_reachable(call, what: str, limit: float = 600):
    """``call()``, tried again every 2 s while the tracking server does not answer, for up to
    ``limit`` seconds past MLflow's own retries of each request (MLFLOW_HTTP_REQUEST_MAX_RETRIES):
    what a finished training logs outlives a server restart, as workers wait for their database."""
    deadline, said = time.monotonic() + limit, False
    while True:
        try:
            return call()
        except mlflow.exceptions.MlflowException as error:
            if not unreachable(error) or time.monotonic() > deadline:
                raise
            if not said:
                say(f"the tracking server does not answer; {what} waits for it up to {limit:.0f} s")
                said = True
            time.sleep(2)
