"""The tutorial's LSTM and training loop, kept as the baseline the project's loop is measured against.

This is the classic PyTorch tutorial recipe (yunjey/pytorch-tutorial, recurrent_neural_network):
torchvision's MNIST through a DataLoader with ``transforms.ToTensor()`` per image, each batch
reshaped to (batch, 28, 28) and moved with ``.to(device)``, h_0 and c_0 built as zeros in every
forward, ``nn.LSTM(batch_first=True)`` and a Linear on ``output[:, -1, :]``, CrossEntropyLoss,
Adam at 1e-3. Only what it needs to run is changed: ``forward`` calls ``self.lstm``, the device
is an argument instead of a module global, and the loop is a function that reports timings.

``train_tutorial`` mirrors ``pipeline.training.train``: model and loaders are built first
(untimed), and each epoch, timed, is one pass over the training images plus one pass over the
validation images, so both loops' samples per second mean the same thing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision import transforms

from pipeline.data import DATASETS, DataError, check_raw_file, find_raw_file, read_raw_file, search_dirs


def write_raw_mnist(data_dir: str | Path, root: str | Path) -> Path:
    """Write the verified, decompressed MNIST IDX files under ``root/MNIST/raw/`` and return ``root``.

    torchvision's MNIST(download=False) reads only decompressed files; the project keeps the
    official ``.gz``. Each file is found and md5-checked the way the prepare stage does it.
    Nothing is downloaded: a missing file raises DataError.
    """
    spec = DATASETS["mnist"]
    raw_folder = Path(root) / spec.folder / "raw"
    raw_folder.mkdir(parents=True, exist_ok=True)
    for raw in spec.files:
        path = find_raw_file(raw, search_dirs(spec, data_dir))
        if path is None:
            raise DataError(f"{raw.name}(.gz) not found under {Path(data_dir) / spec.folder / 'raw'}; pass --data-dir")
        data = read_raw_file(path)
        check_raw_file(path, data, raw)
        (raw_folder / raw.name).write_bytes(data)
    return Path(root)


class TutorialLSTM(nn.Module):
    """The tutorial's many-to-one LSTM: zeros as the initial state, a Linear on the last output."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int, num_classes: int, device: torch.device):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.device = device
        self.lstm = nn.LSTM(input_size, hidden_size, num_layers, batch_first=True)
        self.fc = nn.Linear(hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, input_size); h0, c0: (num_layers, B, H), allocated on every call as the tutorial does
        h0 = torch.zeros(self.num_layers, x.size(0), self.hidden_size).to(self.device)
        c0 = torch.zeros(self.num_layers, x.size(0), self.hidden_size).to(self.device)
        out, _ = self.lstm(x, (h0, c0))  # out: (B, T, H)
        return self.fc(out[:, -1, :])  # (B, num_classes)


@dataclass
class TutorialEpoch:
    epoch: int
    train_loss: float  # of the last batch, as the tutorial prints it
    val_accuracy: float
    epoch_seconds: float
    samples_per_second: float


def mnist_loader(root: str | Path, indices: list[int], batch_size: int, shuffle: bool, num_workers: int) -> DataLoader:
    """The tutorial's DataLoader over the torchvision MNIST training set, restricted to ``indices``."""
    dataset = torchvision.datasets.MNIST(root=str(root), train=True, transform=transforms.ToTensor(), download=False)
    return DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=shuffle, num_workers=num_workers)


def train_epoch(model, loader, criterion, optimizer, device, seq_shape: tuple[int, int]) -> float:
    """The tutorial's inner loop; returns the last batch's loss."""
    loss = torch.zeros(())
    for i, (images, labels) in enumerate(loader):
        images = images.reshape(-1, *seq_shape).to(device)  # (B, 1, 28, 28) -> (B, T, F)
        labels = labels.to(device)
        outputs = model(images)  # (B, 10)
        loss = criterion(outputs, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (i + 1) % 100 == 0:
            loss.item()  # the tutorial prints the loss every 100 steps: a host sync we keep
    return loss.item()


def evaluate(model, loader, device, seq_shape: tuple[int, int]) -> float:
    """The tutorial's test loop (no model.eval(): it has no dropout); returns accuracy."""
    correct, total = 0, 0
    with torch.no_grad():
        for images, labels in loader:
            images = images.reshape(-1, *seq_shape).to(device)  # (B, T, F)
            labels = labels.to(device)
            outputs = model(images)  # (B, 10)
            _, predicted = torch.max(outputs.data, 1)
            total += labels.size(0)
            correct += (predicted == labels).sum().item()
    return correct / max(total, 1)


def train_tutorial(
    root: str | Path,
    train_indices: list[int],
    val_indices: list[int],
    *,
    hidden_size: int,
    num_layers: int,
    batch_size: int,
    epochs: int,
    device: torch.device,
    seq_shape: tuple[int, int] = (28, 28),
    learning_rate: float = 1e-3,
    seed: int = 42,
    num_workers: int = 0,
    on_epoch: Callable[[TutorialEpoch], None] | None = None,
) -> list[TutorialEpoch]:
    """Train the tutorial's model on MNIST training images ``train_indices`` (read from ``root``).

    ``seq_shape`` is (seq_len, input_size): (28, 28) reads rows, (784, 1) pixels. ``on_epoch`` runs
    after every epoch and may raise to stop, as in the project's ``train``.
    """
    torch.manual_seed(seed)
    train_loader = mnist_loader(root, train_indices, batch_size, shuffle=True, num_workers=num_workers)
    val_loader = mnist_loader(root, val_indices, batch_size, shuffle=False, num_workers=num_workers)
    model = TutorialLSTM(seq_shape[1], hidden_size, num_layers, 10, device).to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)

    history = []
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        train_loss = train_epoch(model, train_loader, criterion, optimizer, device, seq_shape)
        val_accuracy = evaluate(model, val_loader, device, seq_shape)  # ends with a host sync
        seconds = time.perf_counter() - started
        history.append(TutorialEpoch(epoch, train_loss, val_accuracy, seconds, len(train_indices) / seconds))
        if on_epoch:
            on_epoch(history[-1])
    return history
