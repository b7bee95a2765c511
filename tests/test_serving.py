"""The logged model as a classifier (pipeline/serving.py), through each door users open:
``mlflow.pyfunc.load_model(...).predict`` in Python, ``mlflow models predict`` on a file, and
``mlflow models serve`` over HTTP. The champion served from the registry, on real MNIST, is in
tests/test_tune_mlflow_run.py."""

from __future__ import annotations

import json
import subprocess
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
import torch
from mlflow.exceptions import MlflowException

from pipeline import serving
from pipeline.config import TrainConfig
from pipeline.model import build_model
from pipeline.train import log_trained_model
from tests.conftest import tiny_prepared, user_environment
from tests.servers import model_server

MNIST_CLASSES = [f"{k} - {name}" for k, name in enumerate("zero one two three four five six seven eight nine".split())]


@pytest.fixture
def logged(tracking) -> str:
    """A small model logged as the train stage logs it; its URI."""
    torch.manual_seed(0)
    data = tiny_prepared(n_train=8, n_val=4, n_test=4)
    with mlflow.start_run():
        return log_trained_model(build_model(TrainConfig(hidden_size=8, num_layers=1), 0.2, 0.3), data, "rows").model_uri


@pytest.fixture
def images() -> np.ndarray:
    return tiny_prepared(n_train=8, n_val=4, n_test=6).test.images.numpy()  # (6, 28, 28) uint8, as users have them


def test_pixels_and_fractions_in_any_layout_get_the_same_answers(logged, images):
    classifier = mlflow.pyfunc.load_model(logged)
    answers = classifier.predict(images)
    assert list(answers.columns) == ["class", "label", "probability", *serving.PROBABILITY_COLUMNS]
    probabilities = answers[serving.PROBABILITY_COLUMNS].to_numpy()
    np.testing.assert_allclose(probabilities.sum(1), 1, rtol=1e-9)
    assert answers["class"].tolist() == probabilities.argmax(1).tolist()
    assert answers["probability"].tolist() == probabilities.max(1).tolist()
    assert answers["label"].tolist() == [MNIST_CLASSES[k] for k in answers["class"]]
    same = [
        images.astype(np.int64),  # what JSON integers become
        images.reshape(6, 784),  # one row per image, as in a CSV
        pd.DataFrame(images.reshape(6, 784)),
        images.tolist(),
        torch.from_numpy(images),
        images.astype(np.float32) / 255,  # fractions
        images / 255.0,
    ]
    for variant in same:
        pd.testing.assert_frame_equal(classifier.predict(variant), answers, rtol=1e-6)
    pd.testing.assert_frame_equal(classifier.predict(images, params={"batch_size": 4}), answers, rtol=1e-6)
    for bad in (0, -1):
        with pytest.raises(MlflowException, match=f"batch_size must be at least 1, got {bad}"):
            classifier.predict(images, params={"batch_size": bad})


@pytest.mark.parametrize(
    "bad, says",
    [
        (np.zeros((28, 28), np.uint8), r"got shape \(28, 28\); for one image, send a batch of one"),
        (np.zeros((2, 27, 28), np.uint8), r"\(N, 28, 28\) or flattened \(N, 784\).*got shape \(2, 27, 28\)"),
        (np.zeros((0, 784), np.uint8), "the batch is empty"),
        (np.full((1, 784), 256), "integer pixels must be within 0-255; got values from 256 to 256"),
        (np.full((1, 784), -3), "got values from -3 to -3"),
        (np.full((1, 784), 255.0), "look like 0-255 pixels, send them as integers"),
        (np.full((1, 784), 1.5), r"float pixels must be within \[0, 1\]; got values from 1.5 to 1.5$"),
        (np.full((1, 784), np.nan), "finite"),
        (np.full((1, 784), "7"), "got dtype <U1"),
        (np.zeros((1, 784), bool), "got dtype bool"),
    ],
)
def test_what_is_not_a_batch_of_pixels_is_refused_with_what_is_wrong(bad, says):
    with pytest.raises(MlflowException, match=says):  # the check predict() runs first (through MLflow's doors below)
        serving.pixels(bad)


@pytest.mark.slow  # two `mlflow models predict` processes, about 12 s each; a bad batch is refused over HTTP below
def test_mlflow_models_predict_reads_raw_pixels_from_json_and_csv(logged, images, tmp_path):
    expected = mlflow.pyfunc.load_model(logged).predict(images)
    (tmp_path / "pixels.json").write_text(json.dumps({"inputs": images.tolist()}))
    pd.DataFrame(images.reshape(6, 784)).to_csv(tmp_path / "pixels.csv", index=False)
    env = user_environment(mlflow.get_tracking_uri())

    def predict(name: str, content_type: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "mlflow", "models", "predict", "-m", logged, "-i", name, "-t", content_type]
        command += ["-o", f"{name}.out", "--env-manager", "local"]
        return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    for name, content_type in (("pixels.json", "json"), ("pixels.csv", "csv")):
        done = predict(name, content_type)
        assert done.returncode == 0, done.stderr[-3000:]
        answers = pd.DataFrame(json.loads((tmp_path / f"{name}.out").read_text())["predictions"])
        pd.testing.assert_frame_equal(answers, expected, rtol=1e-6)


def test_mlflow_models_serve_answers_pixels_and_refuses_a_bad_request_with_http_400(logged, images, tmp_path):
    expected = mlflow.pyfunc.load_model(logged).predict(images)
    with model_server(logged, user_environment(mlflow.get_tracking_uri()), tmp_path) as url:
        answered = requests.post(f"{url}/invocations", json={"inputs": images.tolist()}, timeout=60)
        assert answered.status_code == 200, answered.text
        pd.testing.assert_frame_equal(pd.DataFrame(answered.json()["predictions"]), expected, rtol=1e-6)
        refused = requests.post(f"{url}/invocations", json={"inputs": images[0].tolist()}, timeout=60)  # one image, unbatched
        assert refused.status_code == 400
        assert "for one image, send a batch of one: (1, 28, 28)" in refused.json()["message"]
        assert requests.get(f"{url}/ping", timeout=5).status_code == 200  # a bad request does not take the server down
