"""What the GPU shows: versions, cuDNN, and which LSTM kernels the training step runs, in fp32 and bf16.

    python -m benchmarks.gpu_probe --device cuda --out probe.json

For each configuration and precision it builds the project's model, runs a few training steps
(forward, loss, backward, clipping, fused Adam: the loop's own step, under the numerics the loop
puts in force), then profiles three steps and times twenty. It records whether nn.LSTM went
through cuDNN (the ``aten::_cudnn_rnn`` op; ``aten::_thnn_fused_lstm_cell`` is PyTorch's own
CUDA cell, ``aten::mkldnn_rnn_layer`` oneDNN's on a CPU), the GPU kernels that took the most time,
milliseconds per step and samples/s. Prints one line per measurement; ``--out`` gets the JSON.
Any failure inside a measurement is recorded as its ``error`` rather than stopping the probe.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import TrainConfig
from pipeline.model import build_model
from pipeline.training import numeric_settings, numerics, resolve_device

# (hidden_size, num_layers, batch_size): the tutorial's size and a small one.
DEFAULT_SHAPES = ["256,2,128", "32,1,128"]
RNN_OPS = {"aten::_cudnn_rnn": "cudnn", "aten::_thnn_fused_lstm_cell": "aten fused cell", "aten::mkldnn_rnn_layer": "onednn"}


def environment(device: torch.device) -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device.type,
        "cuda": torch.version.cuda,
        "cudnn_available": torch.backends.cudnn.is_available(),
        "cudnn_enabled": torch.backends.cudnn.enabled,
        "cudnn_version": torch.backends.cudnn.version(),
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        env.update(
            gpu_name=properties.name,
            gpu_capability=f"{properties.major}.{properties.minor}",
            gpu_memory_gb=round(properties.total_memory / 1e9, 1),
            gpu_count=torch.cuda.device_count(),
            bf16_supported=torch.cuda.is_bf16_supported(),
            multiprocessors=properties.multi_processor_count,
        )
        try:
            import pynvml

            pynvml.nvmlInit()
            env["driver"] = pynvml.nvmlSystemGetDriverVersion()
            env["driver"] = env["driver"].decode() if isinstance(env["driver"], bytes) else env["driver"]
        except Exception as error:  # no nvidia-ml-py, or NVML refuses: the rest still counts
            env["driver"] = f"unknown ({type(error).__name__})"
    return env


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    hidden_size: int,
    num_layers: int,
    batch_size: int,
    precision: str,
    device: torch.device,
    profile_steps: int = 3,
    timed_steps: int = 20,
) -> dict:
    """Train steps of random rows-MNIST-shaped batches; see the module docstring."""
    config = TrainConfig(
        hidden_size=hidden_size, num_layers=num_layers, batch_size=batch_size, device=device.type, precision=precision
    )
    row = {"hidden_size": hidden_size, "num_layers": num_layers, "batch_size": batch_size, "precision": precision}
    try:
        settings = numeric_settings(config, device)
    except RuntimeError as error:  # e.g. bf16 on a CPU without avx512_bf16
        return {**row, "error": str(error)}
    try:
        with numerics(settings):
            torch.manual_seed(0)
            model = build_model(config, 0.13, 0.31).to(device)
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=device.type in ("cpu", "cuda"))
            x = torch.rand(batch_size, 28, 28, device=device)  # (B, T, F)
            y = torch.randint(0, 10, (batch_size,), device=device)

            def step():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings["resolved_precision"] == "bf16"):
                    loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()

            for _ in range(5):
                step()
            synchronize(device)
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            with torch.profiler.profile(activities=activities) as profiler:
                for _ in range(profile_steps):
                    step()
                synchronize(device)
            row.update(rnn_path(profiler))
            times = []
            for _ in range(timed_steps):
                started = time.perf_counter()
                step()
                synchronize(device)
                times.append(time.perf_counter() - started)
            ms = 1000 * statistics.median(times)
            row.update(ms_per_step=round(ms, 3), samples_per_second=round(batch_size / ms * 1000))
            if device.type == "cuda":
                row["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    except Exception as error:
        row["error"] = f"{type(error).__name__}: {error}"[:500]
    return row


def rnn_path(profiler) -> dict:
    """Which LSTM implementation the profiled steps ran, and the GPU kernels that took longest."""
    events = profiler.events()
    ops = {event.name for event in events}
    paths = sorted({path for op, path in RNN_OPS.items() if op in ops})
    kernels: dict[str, float] = {}
    for event in events:
        if str(getattr(event, "device_type", "")).endswith("CUDA"):
            duration = getattr(event, "device_time", None)
            if duration is None:
                duration = getattr(event, "cuda_time", 0.0)
            kernels[event.name] = kernels.get(event.name, 0.0) + float(duration or 0.0)
    top = sorted(kernels.items(), key=lambda item: -item[1])[:6]
    rnn_kernels = sorted(name for name in kernels if any(word in name.lower() for word in ("rnn", "lstm", "persist", "cudnn")))
    return {
        "lstm_path": "+".join(paths) or "unknown",
        "top_kernels": [f"{name[:90]} ({us:.0f} us)" for name, us in top],
        "rnn_kernels": [name[:120] for name in rnn_kernels[:8]],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="(default: auto)")
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=DEFAULT_SHAPES,
        metavar="HIDDEN,LAYERS,BATCH",
        help=f"configurations to measure (default: {' '.join(DEFAULT_SHAPES)})",
    )
    parser.add_argument(
        "--precisions", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16"), help="(default: fp32 bf16)"
    )
    parser.add_argument("--out", type=Path, help="write the JSON here")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    report = {"environment": environment(device), "measurements": []}
    print(json.dumps(report["environment"]), flush=True)
    for shape in args.shapes:
        hidden_size, num_layers, batch_size = (int(v) for v in shape.split(","))
        for precision in args.precisions:
            row = measure(hidden_size, num_layers, batch_size, precision, device)
            report["measurements"].append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
