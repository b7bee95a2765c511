"""The training loop's checkpoint folder: per-epoch files written atomically, the newest two kept,
read back safely, compared with the settings of the training that wants to resume from them, and
removed once that training has finished."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from pipeline.config import say
from pipeline.data import atomic_write


class CheckpointMismatch(ValueError):
    """The checkpoint folder holds a training with other settings than the one asked for."""


class Checkpoints:
    """Per-epoch checkpoints in one folder, each written atomically, the newest ``keep`` kept; loaded with
    ``weights_only=True``: a checkpoint holds tensors and plain values only, so a planted file cannot run code."""

    keep = 2

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def paths(self) -> list[Path]:
        return sorted(self.folder.glob("epoch-*.pt"))

    def save(self, name: str, state: dict) -> Path:
        """Write ``<name>.pt``; names sort in training order (``epoch-0003-partial`` before ``epoch-0003``)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{name}.pt"
        atomic_write(path, lambda tmp: torch.save(state, tmp))
        for old in self.paths()[: -self.keep]:
            old.unlink()
        return path

    def latest(self) -> dict | None:
        """The newest checkpoint that loads; a truncated or corrupt one is skipped with a warning."""
        for path in reversed(self.paths()):
            try:
                return torch.load(path, weights_only=True, map_location="cpu")
            except Exception as error:  # truncated zip, bad pickle, refused global, ...
                say(f"warning: skipping unreadable checkpoint {path}: {type(error).__name__}: {error}")
        return None

    def check_resumable(self, saved: dict, config: dict) -> None:
        """Raise CheckpointMismatch, in one line naming the fields, where ``saved`` was written by a
        training whose ``config`` (a TrainConfig as a dict) differs in a field that changes the result."""
        before = saved["config"]
        # device says where training runs, not what it computes: a run preempted on one machine may go
        # on on another (where precision=auto may resolve differently too).
        changed = [
            f"{name} {before.get(name, '(not saved)')!r} -> {value!r}"
            for name, value in config.items()
            if name != "device" and before.get(name, object()) != value
        ]
        if changed:
            raise CheckpointMismatch(
                f"{self.folder} holds a checkpoint of a training with other settings ({', '.join(changed)}): "
                "resuming it would not give this training; use another checkpoint_dir, or delete that one to start over"
            )

    def remove(self) -> None:
        """Delete the checkpoints (and what a write cut short by kill -9 left), then the folder if
        that empties it: files of anything else stay."""
        for path in [*self.paths(), *self.folder.glob(".epoch-*.pt.tmp-*")]:
            path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # not there, or holding something of someone else's
            self.folder.rmdir()
