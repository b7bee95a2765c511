"""Precision, TF32 and determinism: chosen from the hardware, in force while training, logged as used.

What only a GPU can show (TF32 tensor cores, cuDNN's deterministic kernels) is checked here by
what the code sets for a ``cuda`` device, which needs no GPU.
"""

from __future__ import annotations

import dataclasses
import os

import mlflow
import pytest
import torch

from pipeline import numerics as numerics_module
from pipeline import train as train_stage
from pipeline.config import ParameterError, TrainConfig
from pipeline.numerics import bf16_supported, cpu_flags, numeric_settings, numerics, resolve_precision
from pipeline.train import train_and_log
from pipeline.training import train
from tests.conftest import nothing_tracked, tiny_prepared

TINY = TrainConfig(hidden_size=16, num_layers=1, batch_size=64, epochs=2, learning_rate=0.01, device="cpu")
CPU, CUDA = torch.device("cpu"), torch.device("cuda")
AVX2_ONLY = {"fpu", "sse4_2", "avx", "avx2", "fma"}
SAPPHIRE_RAPIDS = AVX2_ONLY | {"avx512f", "avx512bw", "avx512_bf16", "amx_bf16"}
needs_bf16_cpu = pytest.mark.skipif(
    "avx512_bf16" not in cpu_flags(), reason="this CPU has no avx512_bf16 flag, so bf16 training is refused here"
)


def test_precision_and_deterministic_are_validated():
    assert TrainConfig(precision="bf16", deterministic=True).precision == "bf16"
    with pytest.raises(ParameterError, match="precision='fp16' is not allowed: must be one of auto, fp32, bf16"):
        TrainConfig(precision="fp16")
    with pytest.raises(ParameterError, match="deterministic='yes' is not allowed: must be true or false"):
        TrainConfig(deterministic="yes")


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx512_bf16\n\n"
        "processor\t: 1\nflags\t\t: fpu avx2 avx512_bf16\n"
    )
    assert cpu_flags(cpuinfo) == {"fpu", "avx2", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == set()  # macOS: no /proc, so no bf16 claimed


def test_bf16_needs_avx512_bf16_on_a_cpu():
    assert bf16_supported(CPU, SAPPHIRE_RAPIDS) and not bf16_supported(CPU, AVX2_ONLY)
    assert resolve_precision("auto", CPU, SAPPHIRE_RAPIDS) == "bf16"
    assert resolve_precision("auto", CPU, AVX2_ONLY) == "fp32"
    assert resolve_precision("fp32", CPU, SAPPHIRE_RAPIDS) == "fp32"
    assert resolve_precision("bf16", CPU, SAPPHIRE_RAPIDS) == "bf16"
    with pytest.raises(
        RuntimeError, match="precision=bf16 was asked for, but this CPU has no avx512_bf16; use precision=fp32 or auto"
    ):
        resolve_precision("bf16", CPU, AVX2_ONLY)


def test_auto_keeps_fp32_on_cuda_until_bf16_is_measured_there(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert resolve_precision("auto", CUDA) == "fp32"
    assert resolve_precision("bf16", CUDA) == "bf16"
    # A pre-Ampere GPU: torch emulates bf16 there (slowly) and by default says it is supported.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    with pytest.raises(RuntimeError, match="cuda device has no bfloat16 support"):
        resolve_precision("bf16", CUDA)


def test_bf16_asked_for_on_a_cpu_without_it_stops_the_stage_in_one_line(tracking, monkeypatch, capsys):
    monkeypatch.setattr(numerics_module, "cpu_flags", lambda: AVX2_ONLY)
    with pytest.raises(SystemExit) as exit_info:
        train_stage.main(["--data", "unused", "--device", "cpu", "--precision", "bf16"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "train: error: precision=bf16 was asked for, but this CPU has no avx512_bf16; use precision=fp32 or auto"
    assert nothing_tracked(tracking), "a run was started before the check"


def lstm_dtypes_while(run) -> list[torch.dtype]:
    """The dtypes nn.LSTM's output had in every forward pass while ``run()`` trained."""
    seen = []

    def record(module, inputs, output):
        if isinstance(module, torch.nn.LSTM) and torch.is_grad_enabled():  # training, not validation
            seen.append(output[0].dtype)

    with torch.nn.modules.module.register_module_forward_hook(record):
        run()
    return seen


@needs_bf16_cpu
def test_bf16_runs_the_lstm_in_bfloat16_and_keeps_weights_and_adam_in_float32(tmp_path):
    config = dataclasses.replace(TINY, precision="bf16")
    result = None

    def run():
        nonlocal result
        result = train(config, tiny_prepared(), checkpoint_dir=tmp_path, keep_checkpoints=True, progress=False)

    assert set(lstm_dtypes_while(run)) == {torch.bfloat16}
    assert result.precision == "bf16" and result.best_val_accuracy > 0.5  # chance is 0.1
    assert {p.dtype for p in result.model.parameters()} == {torch.float32}
    optimizer = torch.load(tmp_path / "epoch-0002.pt", weights_only=True)["optimizer"]
    assert {t.dtype for state in optimizer["state"].values() for k, t in state.items() if k != "step"} == {torch.float32}


def test_fp32_runs_the_lstm_in_float32():
    config = dataclasses.replace(TINY, precision="fp32")
    assert set(lstm_dtypes_while(lambda: train(config, tiny_prepared(), progress=False))) == {torch.float32}


def test_deterministic_is_in_force_while_training_and_undone_after():
    flags = lambda: (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic)  # noqa: E731
    before, seen = flags(), []
    train(dataclasses.replace(TINY, deterministic=True), tiny_prepared(), progress=False, on_epoch=lambda m: seen.append(flags()))
    assert seen == [(True, True)] * TINY.epochs
    assert flags() == before == (False, False)
    train(TINY, tiny_prepared(), progress=False, on_epoch=lambda m: seen.append(torch.are_deterministic_algorithms_enabled()))
    assert seen[-1] is False


@pytest.mark.parametrize("user_value", [None, ":16:8"])
def test_deterministic_on_cuda_fixes_the_cublas_workspace_and_turns_tf32_on(monkeypatch, user_value):
    if user_value is None:
        monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)  # restored after the test
    else:
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", user_value)
    settings = numeric_settings(dataclasses.replace(TINY, device="cuda", deterministic=True), CUDA)
    assert settings == {
        "resolved_precision": "fp32",
        "tf32": True,
        "cudnn_benchmark": False,
        "deterministic": True,
        "cublas_workspace_config": user_value or ":4096:8",
    }

    def flags():
        return (
            torch.are_deterministic_algorithms_enabled(),
            torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark,
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
        )

    before = flags()
    with numerics(settings):
        assert flags() == (True, True, False, True, True)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == (user_value or ":4096:8")  # a value the user set is kept
    assert flags() == before


def test_without_deterministic_no_cublas_setting_is_made(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    settings = numeric_settings(dataclasses.replace(TINY, device="cuda"), CUDA)
    assert "cublas_workspace_config" not in settings
    with numerics(settings):
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ and not torch.are_deterministic_algorithms_enabled()


@pytest.mark.skipif(torch.cuda.is_available(), reason="fakes a GPU run that stops where training starts")
def test_the_train_stage_sets_the_cublas_workspace_before_it_first_asks_cuda(tracking, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seen = []

    def gpu_params(device):  # the first call that starts CUDA
        seen.append(os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
        return {"resolved_device": "cuda"}

    monkeypatch.setattr(train_stage, "resolve_device", lambda name: CUDA)
    monkeypatch.setattr(train_stage, "device_params", gpu_params)
    config = dataclasses.replace(TINY, device="cuda", deterministic=True)
    with mlflow.start_run(), pytest.raises(RuntimeError, match="sees no CUDA GPU"):  # train() itself finds none
        train_and_log(config, tiny_prepared(), log_model=False)
    assert seen == [":4096:8"]


@pytest.mark.parametrize("precision, deterministic", [("auto", True), ("fp32", False)])
def test_the_train_run_logs_the_numerics_that_were_in_force(tracking, precision, deterministic):
    config = dataclasses.replace(TINY, precision=precision, deterministic=deterministic)
    in_force = []

    def record(metrics):
        in_force.append(
            {"deterministic": torch.are_deterministic_algorithms_enabled(), "cudnn_benchmark": torch.backends.cudnn.benchmark}
        )

    with mlflow.start_run() as run:
        dtypes = lstm_dtypes_while(lambda: train_and_log(config, tiny_prepared(), on_epoch=record, log_model=False))
    params = mlflow.get_run(run.info.run_id).data.params
    assert params["precision"] == precision  # as asked
    assert params["resolved_precision"] == {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtypes[0]]  # as used
    assert params["deterministic"] == str(in_force[0]["deterministic"]).lower() == str(deterministic).lower()
    assert params["cudnn_benchmark"] == str(in_force[0]["cudnn_benchmark"]).lower() == "false"
    assert params["tf32"] == "false"  # a CPU has no TF32
    assert params["resolved_device"] == "cpu" and "gpu_name" not in params


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_deterministic_fp32_gives_the_same_metrics_twice_on_the_gpu():
    config = dataclasses.replace(TINY, device="cuda", precision="fp32", deterministic=True, num_layers=2, dropout=0.1)
    first, second = (
        train(config, tiny_prepared(), progress=False) for _ in range(2)
    )  # raises if an op has no deterministic kernel
    assert [dataclasses.astuple(m)[:5] for m in first.history] == [dataclasses.astuple(m)[:5] for m in second.history]
    for name, value in first.model.state_dict().items():
        torch.testing.assert_close(second.model.state_dict()[name], value, rtol=0, atol=0)


def test_workers_share_the_cores_this_process_may_run_on_not_the_machines(monkeypatch):
    """A Slurm task or a container given 2 of a node's 64 cores: two workers get one thread each."""
    monkeypatch.setattr(numerics_module.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(numerics_module.os, "sched_getaffinity", lambda pid: {4, 5})
    before = torch.get_num_threads()
    try:
        numerics_module.share_cpu(2)
        assert torch.get_num_threads() == 1
        numerics_module.share_cpu(1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
