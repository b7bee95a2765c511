"""The one training loop: it learns, reports every epoch, keeps the best weights, and resumes."""

from __future__ import annotations

import dataclasses
import os
import re
import signal

import pytest
import torch

from pipeline.checkpoints import CheckpointMismatch, Checkpoints
from pipeline.config import TrainConfig
from pipeline.inference import inference_latency_ms
from pipeline.model import LSTMClassifier
from pipeline.training import TrainingDiverged, TrainingInterrupted, duration, evaluate_split, train
from tests.conftest import tiny_prepared

TINY = TrainConfig(hidden_size=16, num_layers=1, batch_size=64, epochs=3, learning_rate=0.01, device="cpu")


def losses(result):
    return [(m.train_loss, m.val_loss, m.val_accuracy) for m in result.history]


def test_it_learns_and_reports_each_epoch():
    seen = []
    result = train(TINY, tiny_prepared(), on_epoch=seen.append, progress=False)
    assert [m.epoch for m in seen] == [1, 2, 3] and seen == result.history
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert result.best_val_accuracy > 0.5  # chance is 0.1
    assert all(m.samples_per_second > 0 and m.epoch_seconds > 0 for m in seen)


def test_each_epoch_prints_one_line_with_its_label_and_the_time_left(capsys):
    train(TINY, tiny_prepared(), progress=False, label="[worker 1] trial 7")
    lines = [line for line in capsys.readouterr().err.splitlines() if "epoch " in line]
    assert [line.split(" epoch ")[0] for line in lines] == ["[worker 1] trial 7"] * 3
    assert [re.search(r"ETA (\d+m)?\d+s$", line) is not None for line in lines] == [True, True, False]  # none after the last
    assert duration(42.4) == "42s" and duration(185) == "3m05s" and duration(3720) == "1h02m"


def test_the_returned_model_holds_the_best_epoch_weights():
    data = tiny_prepared()
    result = train(dataclasses.replace(TINY, epochs=4), data, progress=False)
    best = max(result.history, key=lambda m: m.val_accuracy)
    assert (result.best_epoch, result.best_val_accuracy) == (best.epoch, best.val_accuracy)
    _, accuracy = evaluate_split(result.model, data.val, "rows")
    assert accuracy == pytest.approx(result.best_val_accuracy)


def test_same_seed_same_metrics_other_seed_other_metrics():
    data = tiny_prepared()
    first, second = (train(TINY, data, progress=False) for _ in range(2))
    assert losses(first) == losses(second)
    assert losses(train(dataclasses.replace(TINY, seed=7), data, progress=False)) != losses(first)


def test_pixels_and_bidirectional_train_too():
    config = dataclasses.replace(TINY, epochs=1, reading_order="pixels", bidirectional=True, num_layers=2, dropout=0.1)
    result = train(config, tiny_prepared(n_train=128, n_val=32), progress=False)
    assert len(result.history) == 1 and result.model.lstm.input_size == 1


def test_patience_stops_early():
    config = dataclasses.replace(TINY, epochs=30, patience=1, learning_rate=0.05)
    result = train(config, tiny_prepared(n_train=256), progress=False)
    assert result.stopped_early and len(result.history) < 30
    assert len(result.history) - result.best_epoch == 1


class Crash(Exception):
    pass


def crash_after(epoch):
    def on_epoch(metrics):
        if metrics.epoch == epoch:
            raise Crash

    return on_epoch


def test_a_crashed_run_resumes_to_the_same_result(tmp_path):
    data = tiny_prepared()
    config = dataclasses.replace(TINY, dropout=0.2, num_layers=2)  # dropout: the RNG state matters too
    uninterrupted = train(config, data, progress=False)
    with pytest.raises(Crash):
        train(config, data, checkpoint_dir=tmp_path, on_epoch=crash_after(2), progress=False)
    resumed = train(config, data, checkpoint_dir=tmp_path, progress=False)
    assert resumed.resumed_from_epoch == 2
    assert losses(resumed) == losses(uninterrupted)
    for name, value in uninterrupted.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=0, atol=0)


def test_resuming_with_other_settings_is_refused_in_one_line(tmp_path):
    with pytest.raises(Crash):  # a crashed run keeps its checkpoints
        train(TINY, tiny_prepared(), checkpoint_dir=tmp_path, on_epoch=crash_after(1), progress=False)
    changed = dataclasses.replace(TINY, learning_rate=0.02, epochs=4)
    with pytest.raises(CheckpointMismatch) as refused:
        train(changed, tiny_prepared(), checkpoint_dir=tmp_path, progress=False)
    message = str(refused.value)
    assert "\n" not in message and "(learning_rate 0.01 -> 0.02, epochs 3 -> 4)" in message and str(tmp_path) in message
    assert [p.name for p in Checkpoints(tmp_path).paths()] == ["epoch-0001.pt"]  # refused, and left as it was
    # Where it runs is not what it computes: device=auto (the CPU here, or a GPU) goes on from it.
    elsewhere = train(dataclasses.replace(TINY, device="auto"), tiny_prepared(), checkpoint_dir=tmp_path, progress=False)
    assert elsewhere.resumed_from_epoch == 1


def signal_after(epoch, signal_number):
    """Send ourselves a signal at the end of ``epoch``: the next batch is the one in progress."""

    def on_epoch(metrics):
        if metrics.epoch == epoch:
            os.kill(os.getpid(), signal_number)

    return on_epoch


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_after_the_batch_and_the_rerun_resumes_there(tmp_path, signal_number, capsys):
    data = tiny_prepared()
    config = dataclasses.replace(TINY, dropout=0.2, num_layers=2)
    uninterrupted = train(config, data, progress=False)
    handler_before = signal.getsignal(signal_number)
    with pytest.raises(TrainingInterrupted) as stopped:
        train(config, data, checkpoint_dir=tmp_path, on_epoch=signal_after(1, signal_number), progress=False)
    assert signal.getsignal(signal_number) is handler_before  # the loop put the old handler back
    assert stopped.value.signal_number == signal_number
    assert stopped.value.checkpoint == tmp_path / "epoch-0002-partial.pt"
    assert [p.name for p in Checkpoints(tmp_path).paths()] == ["epoch-0001.pt", "epoch-0002-partial.pt"]  # kept to resume
    position = torch.load(stopped.value.checkpoint, weights_only=True)
    assert position["epoch"] == 1 and position["partial"]["next_start"] == config.batch_size  # one batch of epoch 2 done
    captured = capsys.readouterr()
    assert "stopping after this batch" in captured.err

    resumed = train(config, data, checkpoint_dir=tmp_path, progress=False)
    assert resumed.resumed_from_epoch == 1
    assert losses(resumed) == losses(uninterrupted)
    assert not tmp_path.exists()  # finished: its checkpoints, and the folder they emptied, are gone
    for name, value in uninterrupted.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=0, atol=0)


def test_a_finished_run_removes_its_checkpoints_and_nothing_else(tmp_path):
    train(TINY, tiny_prepared(), checkpoint_dir=tmp_path / "alone", progress=False)
    assert not (tmp_path / "alone").exists()
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "notes.txt").write_text("not the loop's")
    (tmp_path / "shared" / ".epoch-0002.pt.tmp-99").write_bytes(b"")  # a write that kill -9 cut short, earlier
    train(TINY, tiny_prepared(), checkpoint_dir=tmp_path / "shared", progress=False)
    assert [p.name for p in (tmp_path / "shared").iterdir()] == ["notes.txt"]


def test_checkpoints_hold_the_config_and_only_two_are_kept_on_request(tmp_path):
    train(TINY, tiny_prepared(), checkpoint_dir=tmp_path, keep_checkpoints=True, progress=False)
    assert [p.name for p in Checkpoints(tmp_path).paths()] == ["epoch-0002.pt", "epoch-0003.pt"]
    state = torch.load(tmp_path / "epoch-0003.pt", weights_only=True)
    assert state["epoch"] == 3 and state["config"] == dataclasses.asdict(TINY)
    assert {"model", "optimizer", "scheduler", "shuffle_rng", "torch_rng"} <= set(state)


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, capsys):
    train(TINY, tiny_prepared(), checkpoint_dir=tmp_path, keep_checkpoints=True, progress=False)
    newest = tmp_path / "epoch-0003.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    assert Checkpoints(tmp_path).latest()["epoch"] == 2
    captured = capsys.readouterr()
    assert "skipping unreadable checkpoint" in captured.err


class PlantMarker:
    """Unpickling this object would create a file: what a malicious checkpoint could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_planted_checkpoint_is_refused_and_runs_nothing(tmp_path, capsys):
    train(TINY, tiny_prepared(), checkpoint_dir=tmp_path / "ckpt", keep_checkpoints=True, progress=False)
    marker = tmp_path / "pwned"
    torch.save({"epoch": 99, "payload": PlantMarker(marker)}, tmp_path / "ckpt" / "epoch-0099.pt")
    assert Checkpoints(tmp_path / "ckpt").latest()["epoch"] == 3  # the planted newest one is skipped
    assert not marker.exists()
    captured = capsys.readouterr()
    assert "skipping unreadable checkpoint" in captured.err


def test_a_nan_loss_stops_training_with_a_clear_message(tmp_path):
    data = tiny_prepared()
    exploding = dataclasses.replace(data, manifest={**data.manifest, "pixel_std": 0.0})  # inputs become inf and nan
    with pytest.raises(TrainingDiverged, match="train_loss is nan in epoch 1; lower learning_rate"):
        train(TINY, exploding, checkpoint_dir=tmp_path, progress=False)
    assert Checkpoints(tmp_path).paths() == []  # nothing written from the diverged epoch


def test_divergence_in_a_later_epoch_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from pipeline import training as training_module

    real, calls = training_module.F.cross_entropy, []
    batches_per_epoch = -(-len(tiny_prepared().train.labels) // TINY.batch_size)

    def nan_from_epoch_2(logits, labels, *args, **kwargs):
        loss = real(logits, labels, *args, **kwargs)
        if logits.requires_grad:  # training batches only, not validation
            calls.append(1)
            if len(calls) > batches_per_epoch:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(training_module.F, "cross_entropy", nan_from_epoch_2)
    with pytest.raises(TrainingDiverged, match="train_loss is nan in epoch 2"):
        train(TINY, tiny_prepared(), checkpoint_dir=tmp_path, progress=False)
    [kept] = Checkpoints(tmp_path).paths()
    assert kept.name == "epoch-0001.pt"  # the last good one stays, and nothing of epoch 2 was written
    saved = Checkpoints(tmp_path).latest()
    assert saved["epoch"] == 1 and all(torch.isfinite(v).all() for v in saved["model"].values())


def test_onecycle_warms_up_to_the_learning_rate_then_anneals_and_resumes_exactly(tmp_path):
    config = dataclasses.replace(TINY, epochs=4, lr_schedule="onecycle", learning_rate=0.01)
    uninterrupted = train(config, tiny_prepared(), progress=False)
    rates = [m.learning_rate for m in uninterrupted.history]
    assert rates[0] > 0.01 / 25 and max(rates) <= 0.01  # rising from learning_rate/25 towards the peak ...
    assert rates[1] > rates[2] > rates[3] and rates[3] < 0.01 / 100  # ... then annealed to almost nothing
    with pytest.raises(Crash):
        train(config, tiny_prepared(), checkpoint_dir=tmp_path, on_epoch=crash_after(2), progress=False)
    resumed = train(config, tiny_prepared(), checkpoint_dir=tmp_path, progress=False)
    assert [m.learning_rate for m in resumed.history] == rates and losses(resumed) == losses(uninterrupted)


def test_inference_latency_grows_with_the_model_which_it_leaves_in_eval_mode_with_its_weights():
    image = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    small, large = LSTMClassifier(hidden_size=8, num_layers=1), LSTMClassifier(hidden_size=512, num_layers=3)
    large.train()
    before = [p.clone() for p in large.parameters()]
    small_ms, large_ms = (inference_latency_ms(m, image, (28, 28), calls=20) for m in (small, large))
    assert 0 < small_ms < large_ms  # 3 x 512 x (512 + 28) against 8 x 36 multiply-adds a gate and step
    assert not large.training and all(torch.equal(a, b) for a, b in zip(before, large.parameters(), strict=True))


def test_a_signal_after_the_last_batch_still_stops_training(tmp_path):
    # Sent during the last epoch's on_epoch (validation is done, no batch is left to stop after).
    config = dataclasses.replace(TINY, epochs=2)
    with pytest.raises(TrainingInterrupted) as stopped:
        train(config, tiny_prepared(), checkpoint_dir=tmp_path, on_epoch=signal_after(2, signal.SIGTERM), progress=False)
    assert stopped.value.signal_number == signal.SIGTERM
    assert stopped.value.checkpoint == tmp_path / "epoch-0002.pt"  # the whole last epoch: a rerun has nothing left to do
    resumed = train(config, tiny_prepared(), checkpoint_dir=tmp_path, progress=False)
    assert resumed.resumed_from_epoch == 2


def test_a_sigterm_lost_in_a_finalizer_is_raised_again_before_training(monkeypatch):
    """Python drops an exception raised while a weakref callback runs; the next safe point raises it again."""
    import gc
    import weakref

    from pipeline.signals import Terminated, raise_terminated

    monkeypatch.setattr(Terminated, "received", False)
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:

        class Thing:
            pass

        def on_collected(_):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # Python runs the handler between these steps, inside the callback
                pass

        thing = Thing()
        reference = weakref.ref(thing, on_collected)
        del thing
        gc.collect()
        assert reference() is None and Terminated.received  # it arrived, and its exception went nowhere
        with pytest.raises(Terminated):
            train(TINY, tiny_prepared(), progress=False)
    finally:
        signal.signal(signal.SIGTERM, previous)
