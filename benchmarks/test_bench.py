"""The benchmarks' own unit tests (tests/ never imports benchmarks/): cheap, no benchmark runs."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest
import torch

from benchmarks import to_accuracy
from benchmarks.bench import summarise
from benchmarks.gpu_summary import registered_line
from benchmarks.measure import run_loop
from pipeline.config import TrainConfig
from pipeline.data import PreparedData, Split
from pipeline.model import LSTMClassifier
from pipeline.numerics import cpu_flags
from pipeline.training import EpochMetrics, TrainResult

CONFIG = TrainConfig(hidden_size=16, num_layers=1, batch_size=8, seed=1, device="cpu")


def test_each_rows_peak_fraction_uses_the_peak_of_the_precision_it_trained_in():
    measured = {"threads": 2, "flops": 50e9, "peak_rss_mib": 1.0, "samples_per_second": 1.0, "cuda_peak_mib": 0}
    rows = [{"loop": "baseline", "precision": "fp32", **measured}, {"loop": "project", "precision": "bf16", **measured}]
    table = summarise(rows, ["loop"], {2: {"fp32": 100e9, "bf16": 400e9}}).set_index("loop")
    assert table.peak_percent.to_dict() == {"baseline": 50.0, "project": 12.5}
    # No bf16 peak measured (a device without bf16): no fraction, rather than one against fp32's.
    assert pd.isna(summarise(rows, ["loop"], {2: {"fp32": 100e9}}).peak_percent[1])


@pytest.mark.parametrize("flags, expected", [({"avx2", "avx512_bf16"}, "bf16"), ({"avx2"}, "fp32")])
def test_precision_auto_resolves_from_the_cpus_flags(monkeypatch, flags, expected):
    if expected == "bf16" and "avx512_bf16" not in cpu_flags():  # the loop really trains: oneDNN needs the CPU's bf16
        pytest.skip("this CPU has no avx512_bf16 flag: oneDNN has no bf16 LSTM here to train with")
    monkeypatch.setattr("pipeline.numerics.cpu_flags", lambda *args: flags)  # what /proc/cpuinfo would say
    images = torch.randint(0, 256, (64, 28, 28), dtype=torch.uint8)
    mnist = Split(images, torch.arange(64) % 10)
    config = dataclasses.replace(CONFIG, epochs=1, precision="auto")
    history, precision = run_loop("project", config, None, mnist, list(range(16, 64)), list(range(16)))
    assert precision == expected and len(history) == 1


def test_to_accuracy_chooses_on_validation_and_tests_the_chosen_schedule_only(monkeypatch):
    val_accuracy = {1: 0.5, 2: 0.8, 3: 0.9}  # by epochs: 2 epochs is the shortest schedule reaching 0.75
    models = {epochs: LSTMClassifier(hidden_size=4, num_layers=1) for epochs in val_accuracy}
    tested = []

    def train(config, data, progress):  # the loop's own result: its schedule's model, at that schedule's accuracy
        epoch = EpochMetrics(1, 0.0, 0.0, 0.0, 0.0, epoch_seconds=1.0, samples_per_second=100.0, learning_rate=0.0)
        return TrainResult(models[config.epochs], [epoch] * config.epochs, config.epochs, val_accuracy[config.epochs])

    monkeypatch.setattr(to_accuracy, "train", train)
    monkeypatch.setattr(to_accuracy, "evaluate_split", lambda model, split, reading_order: (tested.append(model), 0.7))
    split = Split(torch.zeros(40, 28, 28, dtype=torch.uint8), torch.zeros(40, dtype=torch.int64))
    data = {seed: PreparedData(split, split, split, {}) for seed in (1, 2)}  # one split per seed
    rows = to_accuracy.candidate(CONFIG, [3, 1, 2], 0.75, data, [1, 2])
    assert [row["epochs"] for row in rows] == [1, 2]  # stops at the first schedule that reaches the target
    assert tested == [models[2], models[2]]  # the chosen schedule's model of each seed, once; the others never see the test set
    assert rows[1]["chosen"] and rows[1]["test_accuracy"] == 0.7 and "test_accuracy" not in rows[0]


def test_the_gpu_checks_study_meets_its_target_only_with_a_champion_at_99_percent():
    registered = {"name": "gpu-check", "version": "1", "trial": 7, "val_accuracy": 0.991, "test_accuracy": 0.992}
    crowned = registered_line({**registered, "champion": True})
    assert "the champion: " in crowned and ": met (" in crowned
    not_crowned = registered_line({**registered, "champion": False, "why_not_champion": "version 3 has more"})
    assert "not the champion (version 3 has more)" in not_crowned and ": MISSED (" in not_crowned
    assert ": MISSED (" in registered_line({**registered, "champion": True, "test_accuracy": 0.989})
