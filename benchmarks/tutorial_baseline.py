"""The PyTorch tutorial's LSTM and loop (yunjey/pytorch-tutorial, recurrent_neural_network), the baseline.

As written: torchvision's MNIST through a DataLoader with ``ToTensor()`` per image, each batch
reshaped and moved with ``.to(device)``, h_0 and c_0 built as zeros in every forward, a Linear on
``output[:, -1, :]``, CrossEntropyLoss, Adam. Changed only to run here: the device is an argument,
and the loop is a function timing each epoch (training, then validation) as ``pipeline.training.train`` does.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision import transforms

from pipeline.config import TrainConfig
from pipeline.data import DATASETS, SEQUENCE_SHAPES, DataError, check_raw_file, find_raw_file, read_raw_file, search_dirs
from pipeline.numerics import resolve_device


def write_raw_mnist(data_dir: str | Path, root: str | Path) -> Path:
    """The MNIST IDX files, found and md5-checked as the prepare stage does, decompressed under
    ``root/MNIST/raw/`` for torchvision's MNIST(download=False); returns ``root``. Nothing is downloaded."""
    spec = DATASETS["mnist"]
    (raw_folder := Path(root) / spec.folder / "raw").mkdir(parents=True, exist_ok=True)
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


def train_tutorial(root, train_indices: list[int], val_indices: list[int], config: TrainConfig) -> list[SimpleNamespace]:
    """Train on MNIST training images ``train_indices`` (read from ``root``); one record per epoch. From
    ``config`` it takes hidden_size, num_layers, batch_size, epochs, reading_order, learning_rate and seed:
    the project's other options (dropout, direction, schedule, clipping, precision) are not the tutorial's."""
    torch.manual_seed(config.seed)
    device, seq_shape = resolve_device(config.device), SEQUENCE_SHAPES[config.reading_order]
    dataset = torchvision.datasets.MNIST(root=str(root), train=True, transform=transforms.ToTensor(), download=False)
    train_loader = DataLoader(Subset(dataset, train_indices), batch_size=config.batch_size, shuffle=True)
    val_loader = DataLoader(Subset(dataset, val_indices), batch_size=config.batch_size)
    model = TutorialLSTM(seq_shape[1], config.hidden_size, config.num_layers, 10, device).to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    history = []
    for _ in range(config.epochs):
        started = time.perf_counter()
        for i, (images, labels) in enumerate(train_loader):  # the tutorial's training loop
            images = images.reshape(-1, *seq_shape).to(device)  # (B, 1, 28, 28) -> (B, T, F)
            labels = labels.to(device)
            outputs = model(images)  # (B, 10)
            loss = criterion(outputs, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if (i + 1) % 100 == 0:
                loss.item()  # the tutorial prints the loss every 100 steps: a host sync we keep
        correct = total = 0
        with torch.no_grad():  # its test loop, on the validation images (no model.eval(): nothing in it differs)
            for images, labels in val_loader:
                images = images.reshape(-1, *seq_shape).to(device)  # (B, T, F)
                labels = labels.to(device)
                _, predicted = torch.max(model(images).data, 1)
                total += labels.size(0)
                correct += (predicted == labels).sum().item()
        seconds = time.perf_counter() - started
        history.append(SimpleNamespace(val_accuracy=correct / max(total, 1), epoch_seconds=seconds))
        history[-1].samples_per_second = len(train_indices) / seconds
    return history
