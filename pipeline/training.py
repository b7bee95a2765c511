"""The one training loop, used by the train stage, the tuner and the benchmarks; callers hook in
through ``on_epoch`` (log to MLflow, report to Optuna, prune). The whole split sits on the device as
one uint8 tensor and a batch is an index slice of it, converted to float on the device: no DataLoader,
no per-sample transform, and no host sync inside the batch loop.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.checkpoints import Checkpoints
from pipeline.config import TrainConfig, say
from pipeline.data import SEQUENCE_SHAPES, PreparedData, Split, to_sequences
from pipeline.inference import predict_logits
from pipeline.model import LSTMClassifier, build_model
from pipeline.numerics import numeric_settings, numerics, resolve_device
from pipeline.signals import stop_requests


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: the batch in progress finished and a checkpoint was written."""

    def __init__(self, signal_number: int, checkpoint: Path | None):
        name = signal.Signals(signal_number).name
        where = f"; checkpoint {checkpoint}" if checkpoint else " (no checkpoint_dir: nothing saved)"
        super().__init__(f"stopped by {name} after the batch in progress{where}")
        self.signal_number = signal_number
        self.checkpoint = checkpoint


@dataclass
class EpochMetrics:
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    epoch_seconds: float
    samples_per_second: float
    learning_rate: float  # at the end of the epoch


@dataclass
class TrainResult:
    model: LSTMClassifier  # holding the best-validation weights
    history: list[EpochMetrics]
    best_epoch: int
    best_val_accuracy: float
    stopped_early: bool = False
    resumed_from_epoch: int = 0
    precision: str = "fp32"  # what training ran in: fp32 or bf16


def evaluate_split(model: nn.Module, split: Split, reading_order: str) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) of ``model`` on a split already on its device."""
    model.eval()
    logits = predict_logits(model, split.images, SEQUENCE_SHAPES[reading_order])
    loss = F.cross_entropy(logits, split.labels)
    correct = (logits.argmax(1) == split.labels).sum().item()
    return loss.item(), correct / len(split.labels)  # an exact ratio: 0.633, not float32's 0.63300001


def train(
    config: TrainConfig,
    data: PreparedData,
    *,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    checkpoint_dir: str | Path | None = None,
    keep_checkpoints: bool = False,
    progress: bool | None = None,
    label: str = "",
) -> TrainResult:
    """Train an LSTMClassifier on ``data.train``, choosing the epoch by ``data.val``. Each epoch prints one
    line to stderr, starting with ``label`` (a study's worker and trial) and ending with the estimated time left.

    ``on_epoch`` runs after every epoch and may raise to stop training (Optuna's TrialPruned). With
    ``checkpoint_dir``, a checkpoint is written after every epoch and training resumes from the newest valid
    one found there; one written with other settings (any TrainConfig field but ``device``) raises
    CheckpointMismatch instead. SIGINT or SIGTERM stops it after the batch in progress, writes a checkpoint
    of that position and raises TrainingInterrupted; resuming from it gives the same result as never
    stopping. Training that finishes removes its checkpoints unless ``keep_checkpoints``; one that stops
    by an exception keeps them.
    """
    device = resolve_device(config.device)
    settings = numeric_settings(config, device)
    checkpoints = Checkpoints(checkpoint_dir) if checkpoint_dir else None
    show_bar = sys.stderr.isatty() if progress is None else progress
    with numerics(settings):
        torch.manual_seed(config.seed)
        run = _Run.start(config, data, device, settings["resolved_precision"])
        train_split, val_split = data.train.to(device), data.val.to(device)
        start_epoch, partial = _resume(run, checkpoints)
        stopped_early, last_checkpoint = False, None
        with stop_requests() as stop:
            for epoch in range(start_epoch, config.epochs + 1):
                loss_sum, correct, started = _train_epoch(run, train_split, epoch, stop, checkpoints, show_bar, partial)
                partial = None
                metrics = _end_epoch(run, val_split, epoch, loss_sum, correct, started)
                _print_epoch(metrics, run.history, config.epochs, label)
                last_checkpoint = checkpoints.save(f"epoch-{epoch:04d}", run.checkpoint(epoch)) if checkpoints else None
                if on_epoch:
                    on_epoch(metrics)
                if config.patience and epoch - run.best_epoch >= config.patience:
                    stopped_early = True
                    say(f"early stop: no better val_accuracy for {config.patience} epochs")
                    break
            # Asked after the last batch (validation, on_epoch) of the last epoch: no batch is left to stop
            # after, and a caller must not go on as if nothing came.
            if stop.signal_number:
                raise TrainingInterrupted(stop.signal_number, last_checkpoint)

    if checkpoints and not keep_checkpoints:
        checkpoints.remove()  # finished: nothing is left to resume
    run.model.load_state_dict(run.best_state)  # set by the first epoch: config.epochs >= 1
    run.model.eval()
    return TrainResult(
        run.model, run.history, run.best_epoch, run.best_val_accuracy, stopped_early, start_epoch - 1, run.precision
    )


def _resume(run: _Run, checkpoints: Checkpoints | None) -> tuple[int, dict | None]:
    """Where training starts: after the newest valid checkpoint, restored into ``run`` (with the position
    inside its epoch, if it was interrupted there), else at epoch 1."""
    if not (checkpoints and (saved := checkpoints.latest())):
        return 1, None
    checkpoints.check_resumable(saved, dataclasses.asdict(run.config))
    start_epoch, partial = run.restore(saved)
    within = f", batch {partial['next_start'] // run.config.batch_size + 1} of epoch {start_epoch}" if partial else ""
    say(f"resuming after epoch {saved['epoch']}{within} from {checkpoints.folder}")
    return start_epoch, partial


def _train_epoch(run: _Run, split: Split, epoch: int, stop, checkpoints, show_bar: bool, partial=None):
    """One pass over ``split`` in a new shuffled order, or the rest of an interrupted one (``partial``): the summed
    loss and count of correct predictions (tensors on the device: no batch waits for the host), and when it started."""
    config, device, n_train = run.config, run.device, len(split.labels)
    run.model.train()
    if partial:  # resume inside this epoch, where the interrupted run stopped
        order, first = partial["order"].to(device), partial["next_start"]
        loss_sum, correct = partial["loss_sum"].to(device), partial["correct"].to(device)
        started = time.perf_counter() - partial["seconds"]
    else:
        order, first = torch.randperm(n_train, generator=run.shuffle).to(device), 0
        loss_sum, correct = torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long)
        started = time.perf_counter()
    batches = range(first, n_train, config.batch_size)
    if show_bar:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"epoch {epoch}/{config.epochs}", unit="batch", leave=False)
    for start in batches:
        index = order[start : start + config.batch_size]
        x = to_sequences(split.images[index], config.reading_order)  # (B, T, F)
        y = split.labels[index]  # (B,)
        # bf16: the LSTM and the head compute in bfloat16, the loss in float32; gradients
        # reach the float32 weights through autocast's casts, so no loss scaling is needed.
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.precision == "bf16"):
            logits = run.model(x)  # (B, 10)
            loss = F.cross_entropy(logits, y)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.max_grad_norm > 0:
            nn.utils.clip_grad_norm_(run.model.parameters(), config.max_grad_norm)
        run.optimizer.step()
        run.scheduler.step()
        loss_sum += loss.detach() * len(index)
        correct += (logits.argmax(1) == y).sum()
        if stop.signal_number:  # a plain Python int: checking it costs no host sync
            path = None
            if checkpoints:
                position = {
                    "order": order.cpu(),
                    "next_start": start + config.batch_size,
                    "loss_sum": loss_sum.cpu(),
                    "correct": correct.cpu(),
                    "seconds": time.perf_counter() - started,
                }
                path = checkpoints.save(f"epoch-{epoch:04d}-partial", run.checkpoint(epoch - 1, partial=position))
            raise TrainingInterrupted(stop.signal_number, path)
    return loss_sum, correct, started


def _end_epoch(run: _Run, val_split: Split, epoch: int, loss_sum, correct, started: float) -> EpochMetrics:
    """The epoch's metrics, added to the history; the weights kept if validation is the best yet."""
    config, n_train = run.config, run.n_train
    train_loss = loss_sum.item() / n_train  # the epoch's one host sync
    if not math.isfinite(train_loss):
        raise TrainingDiverged(
            f"train_loss is {train_loss} in epoch {epoch}; lower learning_rate (now {config.learning_rate}) or set max_grad_norm"
        )
    val_loss, val_accuracy = evaluate_split(run.model, val_split, config.reading_order)  # fp32, as the model is logged
    seconds = time.perf_counter() - started
    metrics = EpochMetrics(
        epoch=epoch,
        train_loss=train_loss,
        train_accuracy=correct.item() / n_train,
        val_loss=val_loss,
        val_accuracy=val_accuracy,
        epoch_seconds=seconds,
        samples_per_second=n_train / seconds,
        learning_rate=run.optimizer.param_groups[0]["lr"],
    )
    run.history.append(metrics)
    if val_accuracy > run.best_val_accuracy:
        run.best_val_accuracy, run.best_epoch = val_accuracy, epoch
        run.best_state = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    return metrics


def _print_epoch(metrics: EpochMetrics, history: list[EpochMetrics], epochs: int, label: str) -> None:
    left = (epochs - metrics.epoch) * sum(m.epoch_seconds for m in history) / len(history)
    say(
        f"{label + ' ' if label else ''}epoch {metrics.epoch}/{epochs}  train_loss {metrics.train_loss:.4f}  "
        f"train_accuracy {metrics.train_accuracy:.4f}  val_loss {metrics.val_loss:.4f}  "
        f"val_accuracy {metrics.val_accuracy:.4f}  {metrics.epoch_seconds:.1f}s  {metrics.samples_per_second:.0f} samples/s"
        + (f"  ETA {duration(left)}" if left else "")
    )


@dataclass
class _Run:
    """What training carries from batch to batch and epoch to epoch: all a checkpoint holds."""

    config: TrainConfig
    device: torch.device
    precision: str  # fp32 or bf16, as resolved
    n_train: int
    model: LSTMClassifier
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    shuffle: torch.Generator  # the order of each epoch's training images
    history: list[EpochMetrics] = field(default_factory=list)
    best_state: dict | None = None  # the weights of the best epoch so far
    best_epoch: int = 0
    best_val_accuracy: float = -1.0

    @classmethod
    def start(cls, config: TrainConfig, data: PreparedData, device: torch.device, precision: str) -> _Run:
        """A new model and optimizer (after ``torch.manual_seed``: the model's initial weights use it)."""
        shuffle = torch.Generator().manual_seed(config.seed)
        model = build_model(config, data.manifest["pixel_mean"], data.manifest["pixel_std"]).to(device)
        # The fused kernel updates all parameters in one pass: 5% more samples/s at hidden 128 on a CPU.
        optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, fused=device.type in ("cpu", "cuda"))
        n_train = len(data.train.labels)
        total_steps = config.epochs * math.ceil(n_train / config.batch_size)
        if config.lr_schedule == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
        elif config.lr_schedule == "onecycle":  # warm up to learning_rate over the first 30% of steps, then anneal
            scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.learning_rate, total_steps=total_steps)
        else:
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        return cls(config, device, precision, n_train, model, optimizer, scheduler, shuffle)

    def checkpoint(self, epoch: int, **extra) -> dict:
        """Everything needed to continue after ``epoch`` bit for bit (``partial``: inside the next one)."""
        state = {
            "epoch": epoch,
            "config": dataclasses.asdict(self.config),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "shuffle_rng": self.shuffle.get_state(),
            "torch_rng": torch.get_rng_state(),
            "history": [dataclasses.asdict(m) for m in self.history],
            "best_model": self.best_state,
            "best_epoch": self.best_epoch,
            "best_val_accuracy": self.best_val_accuracy,
            **extra,
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def restore(self, saved: dict) -> tuple[int, dict | None]:
        """Continue from a ``checkpoint``: returns the epoch to start and the position inside it, if any."""
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.shuffle.set_state(saved["shuffle_rng"])
        torch.set_rng_state(saved["torch_rng"])
        if self.device.type == "cuda" and "cuda_rng" in saved:
            torch.cuda.set_rng_state(saved["cuda_rng"], self.device)
        self.history = [EpochMetrics(**m) for m in saved["history"]]
        self.best_state, self.best_epoch = saved["best_model"], saved["best_epoch"]
        self.best_val_accuracy = saved["best_val_accuracy"]
        return saved["epoch"] + 1, saved.get("partial")


def duration(seconds: float) -> str:
    """``seconds`` for people: 42s, 3m05s, 1h02m."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
