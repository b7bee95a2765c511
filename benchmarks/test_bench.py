"""The benchmarks' own unit tests (tests/ never imports benchmarks/): cheap, no benchmark runs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from benchmarks.bench import achieved_flops, header, peak_fraction, throughput_row
from benchmarks.measure import run_loop
from pipeline.config import TrainConfig
from pipeline.data import Split

CONFIG = TrainConfig(hidden_size=16, num_layers=1, batch_size=8, seed=1, device="cpu")
PEAKS = {2: {"fp32": 100e9, "bf16": 400e9}}  # threads -> precision -> FLOP/s


def measurement(loop: str, precision: str, epoch_seconds: float) -> dict:
    return {
        "config": "c",
        "loop": loop,
        "variant": {"threads": 2, "mkldnn": True},
        "precision": precision,
        "samples": 1000,
        "val_samples": 100,
        "epoch_seconds": epoch_seconds,
        "samples_per_second": 1000 / epoch_seconds,
        "peak_rss_mib": 100.0,
        "train_rss_growth_mib": None,
        "cuda_peak_mib": None,
    }


def test_each_rows_peak_fraction_uses_the_peak_of_the_precision_it_trained_in(monkeypatch):
    monkeypatch.setattr("benchmarks.bench.config_label", lambda config: "c")
    measurements = [measurement("baseline", "fp32", 2.0), measurement("project", "bf16", 0.5)]
    rows = {
        loop: throughput_row(CONFIG, loop, {"threads": 2, "mkldnn": True}, measurements, PEAKS, "cpu")
        for loop in ("baseline", "project")
    }
    for loop, m in zip(("baseline", "project"), measurements, strict=True):
        flops = achieved_flops(CONFIG, m)
        assert rows[loop]["precision"] == m["precision"]
        assert rows[loop]["peak_fraction"] == pytest.approx(flops / PEAKS[2][m["precision"]])
    # No bf16 peak measured (a device without bf16): no fraction, rather than one against fp32's.
    assert peak_fraction(1e9, "bf16", {2: {"fp32": 100e9}}, threads=2) is None
    env = {"device": "cpu", "device_name": "x", "date": "d", "torch": "t", "default_threads": 2, "command": "c"}
    assert "fp32 100 GFLOP/s, bf16 400 GFLOP/s" in header("throughput", env, "", PEAKS)


def test_the_epoch_measurement_reports_the_precision_it_trained_in():
    images = torch.randint(0, 256, (64, 28, 28), dtype=torch.uint8)
    mnist = Split(images, torch.arange(64) % 10)
    config = dataclasses.replace(CONFIG, epochs=1, precision="fp32")
    history, precision = run_loop("project", config, None, mnist, list(range(16, 64)), list(range(16)))
    assert precision == "fp32" and len(history) == 1
