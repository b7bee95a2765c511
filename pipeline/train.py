"""Stage 2, train: the prepared split -> a trained LSTMClassifier logged to MLflow.

Reads:  ``prepared/`` of the prepare run given by ``--data`` (run id, artifact URI or folder).
Writes: params (every TrainConfig field, ``parameter_count``, ``resolved_device`` and on a GPU
        ``gpu_name``, ``gpu_index``, ``gpu_capability``, ``gpu_memory_gb``; the numerics in force:
        ``resolved_precision``, ``tf32``, ``cudnn_benchmark``, ``cublas_workspace_config``;
        library versions, the data's run and checksum); per-epoch metrics (step = epoch)
        ``train_loss``, ``train_accuracy``, ``val_loss``, ``val_accuracy``, ``epoch_seconds``,
        ``samples_per_second``, ``learning_rate``; ``best_val_accuracy`` and ``best_epoch``;
        MLflow's ``system/*`` metrics (CPU, memory, GPU) every second;
        artifact ``model`` (the best-validation weights, pickle-free pt2, served as a classifier
        of pixels: pipeline/serving.py) and ``learning_curves.png``; a checkpoint per epoch under
        ``--checkpoint-dir/<run id>/``, removed when the run finishes (``--keep-checkpoints``: kept).
Resumes: rerunning an interrupted command (Ctrl-C, SIGTERM, kill -9) continues the same run
        from its last checkpoint; a Ctrl-C or SIGTERM checkpoints the batch in progress first.

    python -m pipeline.train --data <prepare run id> --hidden-size 64 --num-layers 1
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable
from pathlib import Path

import mlflow
import torch
from matplotlib.figure import Figure
from mlflow.models.model import ModelInfo

from pipeline import serving
from pipeline.checkpoints import CheckpointMismatch, Checkpoints
from pipeline.config import SWITCH, OneLineParser, TrainConfig, add_config_arguments, build_configs, fail, run_entry_point, say
from pipeline.data import DataError, PreparedData, to_sequences
from pipeline.model import count_parameters
from pipeline.numerics import numeric_settings, resolve_device, set_cublas_workspace
from pipeline.tracking import (
    CPU_THREADS_TAG,
    MODEL_NAME,
    device_params,
    digest,
    library_versions,
    load_prepared_run,
    log_data_inputs,
    log_params,
    stage_run,
    unreachable,
    when_reachable,
)
from pipeline.training import EpochMetrics, TrainingDiverged, TrainResult, train


def train_and_log(
    config: TrainConfig,
    data: PreparedData,
    *,
    checkpoint_dir: str | Path | None = None,
    keep_checkpoints: bool = False,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    log_model: bool = True,
    data_ref: str = "",
    label: str = "",
) -> tuple[TrainResult, ModelInfo | None]:
    """Run ``training.train`` inside the active MLflow run; log params, metrics and the model, whose info
    it returns (None without ``log_model``). ``data_ref`` (where ``data`` came from) makes the train and val
    splits the run's dataset inputs; ``label`` starts each epoch's progress line. The checkpoints in
    ``checkpoint_dir`` are removed once everything is logged, unless ``keep_checkpoints``."""
    device = resolve_device(config.device)
    settings = numeric_settings(config, device)  # what precision=auto chose, TF32, cuDNN autotuning, determinism
    set_cublas_workspace(settings)  # before device_params starts CUDA
    params = {**dataclasses.asdict(config), **library_versions(), **device_params(device), **settings}
    log_params({**params, "data_sha256": data.manifest["splits"]["train"]["sha256"]})
    if device.type == "cpu":  # a tag, not a param: a run resumed by another worker count may train with other threads
        mlflow.set_tag(CPU_THREADS_TAG, torch.get_num_threads())
    if data_ref:
        log_data_inputs(data, data_ref, {"train": "training", "val": "validation"})

    def log_epoch(metrics: EpochMetrics) -> None:
        try:
            log_epoch_metrics(metrics)
        except mlflow.exceptions.MlflowException as error:  # training goes on; the epoch is logged at the end
            if not unreachable(error):
                raise
            say(f"epoch {metrics.epoch}'s metrics wait: the tracking server does not answer")
        if on_epoch:
            on_epoch(metrics)

    # Kept until the run is logged: a stage killed while logging resumes instead of training again.
    result = train(config, data, on_epoch=log_epoch, checkpoint_dir=checkpoint_dir, keep_checkpoints=True, label=label)

    def log_result() -> ModelInfo | None:
        # The epochs the run lacks: a resumed run's restored ones, and any logged while the server did not answer.
        logged = {m.step for m in mlflow.MlflowClient().get_metric_history(mlflow.active_run().info.run_id, "val_accuracy")}
        for metrics in result.history:
            if metrics.epoch not in logged:
                log_epoch_metrics(metrics)
        log_params({"parameter_count": count_parameters(result.model)})
        mlflow.log_figure(plot_learning_curves(result.history), "learning_curves.png")
        model_info = log_trained_model(result.model, data, config.reading_order) if log_model else None
        # With the model's id, MLflow 3's model page shows them (else only its system metrics).
        mlflow.log_metrics(
            {"best_val_accuracy": result.best_val_accuracy, "best_epoch": result.best_epoch},
            model_id=model_info and model_info.model_id,
        )
        return model_info

    model_info = when_reachable(log_result, "the trained model")
    if checkpoint_dir and not keep_checkpoints:
        Checkpoints(checkpoint_dir).remove()
    return result, model_info


def log_epoch_metrics(metrics: EpochMetrics) -> None:
    """Every field of ``metrics`` but the epoch, which is the step."""
    mlflow.log_metrics({k: v for k, v in dataclasses.asdict(metrics).items() if k != "epoch"}, step=metrics.epoch)


def log_trained_model(model: torch.nn.Module, data: PreparedData, reading_order: str):
    """Log a CPU copy of ``model`` pickle-free (pt2) as a classifier of pixels (pipeline/serving.py), two
    validation images as its example. The caller's model is untouched: a tuner or benchmark may go on using it."""
    model = copy.deepcopy(model).to("cpu").eval()
    example = to_sequences(data.val.images[:2], reading_order)  # (2, T, F)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*were assigned during export.*")  # nn.LSTM's flat weights
        return serving.log_model(MODEL_NAME, model, example, reading_order, data.class_names)


def plot_learning_curves(history: list[EpochMetrics]):
    epochs = [m.epoch for m in history]
    figure = Figure(figsize=(10, 4))  # no pyplot: no global backend or figure registry
    loss_axis, accuracy_axis = figure.subplots(1, 2)
    for split in ("train", "val"):
        loss_axis.plot(epochs, [getattr(m, f"{split}_loss") for m in history], marker="o", label=f"{split}_loss")
        accuracy_axis.plot(epochs, [getattr(m, f"{split}_accuracy") for m in history], marker="o", label=f"{split}_accuracy")
    for axis, title in ((loss_axis, "cross-entropy loss"), (accuracy_axis, "accuracy")):
        axis.set(xlabel="epoch", title=title)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    return figure


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(prog="train", description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="prepare run id, artifact URI of its prepared/ folder, or a local folder")
    parser.add_argument(
        "--checkpoint-dir", default="checkpoints", help="per-epoch checkpoints go to <this>/<run id>/ (default: checkpoints)"
    )
    parser.add_argument(
        "--keep-checkpoints",
        **SWITCH,
        help="keep <checkpoint-dir>/<run id>/ once the run finishes; an interrupted or failed run keeps it (default: false)",
    )
    add_config_arguments(parser, TrainConfig)
    args, (config,) = build_configs(parser, argv, TrainConfig)
    try:  # a device or precision this machine lacks stops the stage before anything starts
        numeric_settings(config, resolve_device(config.device))
    except RuntimeError as error:
        parser.error(str(error))

    try:
        data = load_prepared_run(args.data)
    except (DataError, mlflow.exceptions.MlflowException, OSError) as error:
        fail(f"--data {args.data}: {error}")
    # What makes two train commands the same: a rerun of an interrupted one continues its run.
    resume_key = digest({"config": dataclasses.asdict(config), "data": args.data, "checkpoint_dir": args.checkpoint_dir})
    # ``train h256x2 lr0.002 b128 seed42``: what differs between trainings, readable in the UI's chart legends
    name = f"train h{config.hidden_size}x{config.num_layers} lr{config.learning_rate:g} b{config.batch_size} seed{config.seed}"
    try:
        with stage_run("train", resume_key, **{"pipeline.data": args.data}) as run:
            mlflow.set_tag("mlflow.runName", name)
            folder, keep = Path(args.checkpoint_dir) / run.info.run_id, args.keep_checkpoints
            result, _ = train_and_log(config, data, checkpoint_dir=folder, keep_checkpoints=keep, data_ref=args.data)
    except (TrainingDiverged, CheckpointMismatch) as error:  # the run ended FAILED; its checkpoints stay
        fail(str(error))
    say(f"best val_accuracy {result.best_val_accuracy:.4f} at epoch {result.best_epoch}; run {run.info.run_id}")


if __name__ == "__main__":
    run_entry_point(main)
