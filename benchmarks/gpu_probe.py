"""What the GPU shows: versions, cuDNN, and which LSTM implementation the training step runs, in fp32 and bf16.

    python -m benchmarks.gpu_probe --device cuda --out probe.json

Per configuration and precision, the loop's own step (model, loss, backward, clipping, fused Adam, under
the loop's numerics) runs 5 times, then 3 profiled and 20 timed; a failure is recorded as its ``error``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import timeit
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.report import environment, flag
from pipeline.config import TrainConfig
from pipeline.model import build_model
from pipeline.numerics import numeric_settings, numerics, resolve_device

RNN_OPS = {"aten::_cudnn_rnn": "cudnn", "aten::_thnn_fused_lstm_cell": "aten fused cell", "aten::mkldnn_rnn_layer": "onednn"}


def training_step(config: TrainConfig, device: torch.device, bf16: bool):
    """The loop's training step on one random batch of rows-shaped images, ready to call."""
    torch.manual_seed(0)
    model = build_model(config, 0.13, 0.31).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=device.type in ("cpu", "cuda"))
    x = torch.rand(config.batch_size, 28, 28, device=device)  # (B, T, F)
    y = torch.randint(0, 10, (config.batch_size,), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step


def measure(hidden_size: int, num_layers: int, batch_size: int, precision: str, device: torch.device) -> dict:
    row = {"hidden_size": hidden_size, "num_layers": num_layers, "batch_size": batch_size, "precision": precision}
    config = TrainConfig(**row, device=device.type)
    try:
        settings = numeric_settings(config, device)  # bf16 where there is none: an error
        with numerics(settings):
            step = training_step(config, device, settings["resolved_precision"] == "bf16")
            for _ in range(5):
                step()
            cuda = [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else []
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, *cuda]) as profiler:
                for _ in range(3):
                    step()
            ms = 1000 * statistics.median(timeit.repeat(step, number=1, repeat=20))
        ops = {event.name for event in profiler.events()}
        row["lstm_path"] = "+".join(path for op, path in RNN_OPS.items() if op in ops) or "unknown"
        row |= {"ms_per_step": round(ms, 3), "samples_per_second": round(batch_size / ms * 1000)}
        if device.type == "cuda":
            row["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    except Exception as error:  # recorded, and the next measurement still runs
        row["error"] = f"{type(error).__name__}: {error}"[:500]
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    flag(parser, "--device", "auto", "where to measure", choices=("auto", "cpu", "cuda"))
    shapes = ["256,2,128", "32,1,128"]  # the tutorial's size and a small one
    flag(parser, "--shapes", shapes, "configurations to measure", nargs="+", metavar="HIDDEN,LAYERS,BATCH")
    flag(parser, "--precisions", ["fp32", "bf16"], "precisions to measure", nargs="+", choices=("fp32", "bf16"))
    parser.add_argument("--out", type=Path, help="write the JSON here")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    env = environment(device) | {"cudnn_enabled": torch.backends.cudnn.enabled, "cudnn_version": torch.backends.cudnn.version()}
    report = {"environment": env, "measurements": []}
    print(json.dumps(env), flush=True)
    for shape, precision in itertools.product(args.shapes, args.precisions):
        report["measurements"].append(measure(*(int(v) for v in shape.split(",")), precision, device))
        print(json.dumps(report["measurements"][-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
