"""A model's logits on images, in batches where the model is, and how long one image takes."""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn


def model_device(model) -> torch.device | None:
    """Where ``model``'s weights are; None for a callable without any (or with none)."""
    first = next(itertools.chain(model.parameters(), model.buffers()), None) if isinstance(model, nn.Module) else None
    return None if first is None else first.device


@torch.inference_mode()
def predict_logits(model: Callable, images: torch.Tensor, input_shape: tuple[int, int], batch_size: int = 1000) -> torch.Tensor:
    """Logits (N, num_classes) of ``images`` (N, 28, 28), uint8 pixels or floats in [0, 1], read as
    (seq_len, input_size) sequences, computed where the model is (each batch is moved there: a
    no-op when it is there already, and uint8 moves 4 times fewer bytes)."""
    device = model_device(model) or images.device
    batches = (batch.to(device).reshape(-1, *input_shape) for batch in images.split(batch_size))
    return torch.cat([model(x.float().div_(255) if x.dtype == torch.uint8 else x) for x in batches])  # x: (B, T, F)


def inference_latency_ms(model: nn.Module, image: torch.Tensor, input_shape: tuple[int, int], calls: int = 100) -> float:
    """Milliseconds to classify one uint8 ``image`` (1, 28, 28) where the model is, through ``predict_logits``:
    the median of ``calls`` timed calls after 10 untimed ones (thread pools, caches, kernels), each synchronised
    on CUDA. Latencies compare within a machine and its thread count, not across them."""
    model.eval()
    device = model_device(model)

    def call() -> float:
        started = time.perf_counter()
        predict_logits(model, image, input_shape)
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - started

    for _ in range(10):
        call()
    return statistics.median(call() for _ in range(calls)) * 1000
