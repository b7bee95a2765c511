"""The logged model as a user loads it: device-independent, and logging leaves the caller's model alone.

torch.export turns every tensor the forward pass creates without a device into a constant of the
device it was traced on. The logged model is exported on the CPU, so such a constant would make
``mlflow.pytorch.load_model(uri).to("cuda")`` fail. The ``meta`` device has no data and no
kernels beyond shapes, so a model that runs there has no tensor pinned to the CPU: it stands in
for a GPU on a machine without one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import mlflow
import pytest
import torch

from pipeline import serving
from pipeline.config import TrainConfig
from pipeline.data import SEQUENCE_SHAPES
from pipeline.model import build_model
from pipeline.train import log_trained_model
from tests.conftest import tiny_prepared

CONFIGS = {
    "rows": TrainConfig(hidden_size=8, num_layers=2),
    "pixels": TrainConfig(hidden_size=8, num_layers=1, reading_order="pixels"),
    "bidirectional": TrainConfig(hidden_size=8, num_layers=2, bidirectional=True),
}


def log_like_the_train_stage(config: TrainConfig, model=None) -> str:
    data = tiny_prepared(n_train=8, n_val=4, n_test=4)
    model = model if model is not None else build_model(config, 0.2, 0.3)
    with mlflow.start_run():
        info = log_trained_model(model, data, config.reading_order)
    return info.model_uri


@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=pytest.mark.slow) if name == "pixels" else name for name in CONFIGS]
)  # torch.export of a 784-step LSTM takes 40 s
def test_the_logged_model_runs_on_another_device(name, tracking):
    config = CONFIGS[name]
    model = mlflow.pytorch.load_model(log_like_the_train_stage(config)).to("meta")
    seq_len, input_size = SEQUENCE_SHAPES[config.reading_order]
    for batch in (1, 3, 64):
        logits = model(torch.rand(batch, seq_len, input_size, device="meta"))
        assert logits.shape == (batch, 10) and logits.device.type == "meta"


def test_the_logged_model_still_gives_the_live_logits_on_the_cpu(tracking):
    config = CONFIGS["bidirectional"]
    torch.manual_seed(0)
    live = build_model(config, 0.2, 0.3).eval()
    loaded = mlflow.pytorch.load_model(log_like_the_train_stage(config, live))
    x = torch.rand(5, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), live(x))


def test_logging_does_not_move_or_change_the_callers_model(tracking):
    config = dataclasses.replace(CONFIGS["rows"], dropout=0.1)
    model = build_model(config, 0.2, 0.3).train()  # as a caller may still hold it: in training mode
    parameters = dict(model.named_parameters())
    before = {name: value.clone() for name, value in model.state_dict().items()}
    moved, real_to = [], torch.nn.Module.to

    def recording_to(self, *args, **kwargs):
        moved.append(self)
        return real_to(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:  # undone on leaving, unlike the tracking fixture's patches
        patch.setattr(torch.nn.Module, "to", recording_to)
        log_like_the_train_stage(config, model)
    assert not any(module is model for module in moved), "log_trained_model moved the caller's model"
    assert model.training, "log_trained_model switched the caller's model to eval mode"
    assert all(value is parameters[name] for name, value in model.named_parameters())  # the same Parameter objects
    assert all(p.device.type == "cpu" for p in model.parameters())
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)


def test_the_served_classifier_loads_the_model_whole_onto_its_device_and_brings_the_data_to_it(tracking):
    uri = log_like_the_train_stage(CONFIGS["rows"])
    loaded = serving.load(uri, "meta")  # as the evaluate stage loads it: mlflow.pyfunc, model_config={"device": ...}
    model = loaded.get_raw_model()
    assert {t.device.type for t in (*model.parameters(), *model.buffers())} == {"meta"}
    classifier = serving.Classifier(model, (28, 28), [str(k) for k in range(10)], "meta")
    images = tiny_prepared(n_train=8, n_val=4, n_test=7).test.images  # uint8 on the CPU
    probabilities = classifier.probabilities(serving.pixels(images), batch_size=3)  # batches of 3, 3 and 1
    assert probabilities.shape == (7, 10) and probabilities.device.type == "meta"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["rows", "bidirectional"])
def test_the_logged_model_predicts_on_the_gpu_what_it_predicts_on_the_cpu(name, tracking):
    config = CONFIGS[name]
    uri = log_like_the_train_stage(config)
    x = torch.rand(16, *SEQUENCE_SHAPES[config.reading_order])
    on_cpu = mlflow.pytorch.load_model(uri)(x)
    on_gpu = mlflow.pytorch.load_model(uri).to("cuda")(x.cuda())
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-3, atol=1e-3)  # TF32 and cuDNN against the CPU's kernels


def test_the_model_is_logged_pickle_free(tracking):
    # Said explicitly: MLflow's default is pickle on a Databricks tracking URI, and has changed between versions.
    folder = Path(mlflow.artifacts.download_artifacts(log_like_the_train_stage(CONFIGS["rows"])))
    files = {path.name for path in folder.rglob("*")}
    assert "model.pt2" in files and not files & {"model.pth", "pickle_module_info.txt"}, files
