"""Where and in what arithmetic training runs: the device, fp32 or bf16, TF32, cuDNN and determinism,
as ``numeric_settings`` decides from the config and the hardware and ``numerics`` puts in force."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch

from pipeline.config import TrainConfig


def resolve_device(name: str) -> torch.device:
    gpus = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}  # auto tries them in this order
    if name == "auto":
        return torch.device(next((kind for kind, available in gpus.items() if available()), "cpu"))
    if name in gpus and not gpus[name]():
        raise RuntimeError(f"device={name} was asked for, but torch sees no {'CUDA' if name == 'cuda' else 'Apple'} GPU")
    return torch.device(name)


def share_cpu(processes: int) -> None:
    """Give this process its share of the cores it may run on (a Slurm task's or a container's), one of
    ``processes`` training at once: two one-thread trials on 2 cores train more images per second
    than one two-thread trial (benchmarks/results/cpu-workers-20261203.md)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // processes))


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())


def bf16_supported(device: torch.device, flags: set[str] | None = None) -> bool:
    """Whether ``device`` has bfloat16 arithmetic; ``flags``: the CPU's (default: this one's)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)  # emulated on pre-Ampere GPUs: slow
    if device.type == "cpu":
        # Without avx512_bf16 (AVX2-only CPUs) oneDNN emulates bf16: slower than fp32.
        return "avx512_bf16" in (cpu_flags() if flags is None else flags)
    return False


def resolve_precision(name: str, device: torch.device, flags: set[str] | None = None) -> str:
    """``fp32`` or ``bf16``: what ``precision=name`` means on ``device``."""
    if name == "auto":
        # bf16 only where it was measured: 2x faster at the same accuracy on an avx512_bf16 CPU
        # (README, GPU). On CUDA it has not been measured yet, so fp32 (with TF32) stays.
        return "bf16" if device.type == "cpu" and bf16_supported(device, flags) else "fp32"
    if name == "bf16" and not bf16_supported(device, flags):
        what = "CPU has no avx512_bf16" if device.type == "cpu" else f"{device.type} device has no bfloat16 support"
        raise RuntimeError(f"precision=bf16 was asked for, but this {what}; use precision=fp32 or auto")
    return name


def numeric_settings(config: TrainConfig, device: torch.device) -> dict[str, str | bool]:
    """What training puts in force on ``device``, as run params; ``numerics`` applies it."""
    settings = {
        "resolved_precision": resolve_precision(config.precision, device),
        # TF32 tensor cores (Ampere and later) for fp32 matmuls and cuDNN's LSTM: 10 mantissa
        # bits, deterministic. Only CUDA has them.
        "tf32": device.type == "cuda",
        # Autotuning picks kernels by timing them, which may differ between runs.
        "cudnn_benchmark": False,
        "deterministic": config.deterministic,
    }
    if device.type == "cuda" and config.deterministic:
        # cuBLAS is deterministic only with a fixed workspace; a value set by the user is kept.
        settings["cublas_workspace_config"] = os.environ.get("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return settings


def set_cublas_workspace(settings: dict) -> None:
    """Deterministic cuBLAS needs CUBLAS_WORKSPACE_CONFIG before CUDA starts: set it (unless the
    user did) as soon as the settings are known, ahead of any query that initialises CUDA."""
    if "cublas_workspace_config" in settings:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", settings["cublas_workspace_config"])


@contextmanager
def numerics(settings: dict):
    """Put ``numeric_settings`` in force inside the block and restore the previous global flags on
    leaving: the tuner and the tests train many models in one process."""
    set_cublas_workspace(settings)
    cudnn = torch.backends.cudnn
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        cudnn.benchmark,
        cudnn.deterministic,
    )
    torch.use_deterministic_algorithms(settings["deterministic"])
    cudnn.benchmark, cudnn.deterministic = settings["cudnn_benchmark"], settings["deterministic"]
    if settings["tf32"]:
        # The allow_tf32 switches, not torch 2.9's fp32_precision: torch.export reads the old ones
        # and raises when the new API has set them differently (torch 2.14.1).
        tf32_before = (torch.backends.cuda.matmul.allow_tf32, cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        cudnn.benchmark, cudnn.deterministic = previous[2:]
        if settings["tf32"]:
            torch.backends.cuda.matmul.allow_tf32, cudnn.allow_tf32 = tf32_before
