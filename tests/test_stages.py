"""Stage smoke tests: prepare -> train -> evaluate in-process on a slice of real MNIST.

One small pipeline per module (train_limit=1000, a 1-layer 16-unit LSTM, 2 epochs) in its own
MLflow store; the tests then read what it logged through MlflowClient, as the UI would.
"""

from __future__ import annotations

import json
import os

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline import evaluate, prepare, serving, train
from pipeline.config import TrainConfig
from pipeline.data import Split, load_prepared, to_sequences
from pipeline.model import build_model
from pipeline.tracking import download
from tests.conftest import corrupt_file

EPOCHS = 2


def only_run(client, stage):
    runs = client.search_runs(["0"], filter_string=f"tags.`pipeline.stage` = '{stage}'")
    assert len(runs) == 1, f"{len(runs)} {stage} runs"
    return runs[0]


@pytest.fixture(scope="module")
def pipeline_runs(tmp_path_factory, mnist_dir):
    root = tmp_path_factory.mktemp("stages")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        for name in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"):  # what the tester exported
            patch.delenv(name, raising=False)
        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
        prepare.main(["--data-dir", str(mnist_dir), "--train-limit", "1000", "--val-size", "500", "--seed", "3"])
        client = MlflowClient()
        prepare_run = only_run(client, "prepare")
        train.main(
            [
                "--data",
                prepare_run.info.run_id,
                "--hidden-size",
                "16",
                "--num-layers",
                "1",
                "--epochs",
                str(EPOCHS),
                "--device",
                "cpu",
                "--keep-checkpoints",  # test_logged_model_reloads_with_the_live_model_logits reads the last one
            ]
        )
        train_run = only_run(client, "train")
        evaluate.main(["--model", train_run.info.run_id, "--device", "cpu"])
        yield {
            "root": root,
            "client": client,
            "prepare": prepare_run,
            "train": train_run,
            "evaluate": only_run(client, "evaluate"),
        }
        mlflow.set_tracking_uri(None)


def artifact_names(client, run_id, path=None):
    return {os.path.basename(f.path) for f in client.list_artifacts(run_id, path)}


def test_prepare_logs_the_split_its_manifest_and_dataset_input(pipeline_runs):
    client, run = pipeline_runs["client"], pipeline_runs["prepare"]
    assert run.info.status == "FINISHED"
    assert run.data.params["train_limit"] == "1000" and run.data.params["dataset"] == "mnist"
    assert run.data.metrics == {"train_count": 1000, "val_count": 500, "test_count": 10_000}
    assert artifact_names(client, run.info.run_id, "prepared") == {"train.pt", "val.pt", "test.pt", "manifest.json"}
    manifest = json.loads((download(run.info.run_id, "prepared", pipeline_runs["root"] / "dl") / "manifest.json").read_text())
    assert manifest["seed"] == 3 and manifest["source_md5"]["t10k-labels-idx1-ubyte"] == "27ae3e4e09519cfbb04c329615203637"
    assert sum(manifest["splits"]["val"]["class_counts"]) == 500
    [dataset_input] = client.get_run(run.info.run_id).inputs.dataset_inputs
    assert dataset_input.dataset.name == "mnist-train"


def test_train_logs_every_hyperparameter_and_per_epoch_metrics(pipeline_runs):
    client, run = pipeline_runs["client"], pipeline_runs["train"]
    params = run.data.params
    for field in TrainConfig.__dataclass_fields__:
        assert field in params
    assert params["hidden_size"] == "16" and params["resolved_device"] == "cpu"
    assert run.info.run_name == "train h16x1 lr0.002 b128 seed42"  # readable in the UI's chart legends
    assert params["resolved_precision"] in ("fp32", "bf16") and params["tf32"] == "false" and params["deterministic"] == "false"
    assert int(params["parameter_count"]) > 0 and params["torch_version"] == torch.__version__
    for name in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "epoch_seconds", "samples_per_second"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == list(range(1, EPOCHS + 1)), name
    val = [m.value for m in client.get_metric_history(run.info.run_id, "val_accuracy")]
    assert run.data.metrics["best_val_accuracy"] == max(val)
    assert all(abs(v * 500 - round(v * 500)) < 1e-9 for v in val)  # ratios of 500 images, not float32 noise
    assert {"learning_curves.png"} <= artifact_names(client, run.info.run_id)
    # MLflow's system metrics are not asserted here: this stage can end before its first sample on an
    # idle machine. test_device_records samples a run of known length.
    # The data it saw, for the runs table's Dataset column: the prepare run's train and val splits
    inputs = {i.tags[0].value: i.dataset for i in client.get_run(run.info.run_id).inputs.dataset_inputs}
    assert {context: dataset.name for context, dataset in inputs.items()} == {
        "training": "mnist-train",
        "validation": "mnist-val",
    }
    [prepared] = client.get_run(pipeline_runs["prepare"].info.run_id).inputs.dataset_inputs
    assert inputs["training"].digest == prepared.dataset.digest  # the very split prepare recorded
    assert pipeline_runs["prepare"].info.run_id in inputs["validation"].source  # from the prepare run's artifacts


def test_logged_model_reloads_with_the_live_model_logits(pipeline_runs):
    run_id = pipeline_runs["train"].info.run_id
    checkpoint = torch.load(sorted((pipeline_runs["root"] / "checkpoints" / run_id).glob("*.pt"))[-1], weights_only=True)
    data = load_prepared(download(pipeline_runs["prepare"].info.run_id, "prepared", pipeline_runs["root"] / "dl2"))
    live = build_model(TrainConfig(**checkpoint["config"]), data.manifest["pixel_mean"], data.manifest["pixel_std"])
    live.load_state_dict(checkpoint["best_model"])
    live.eval()
    classifier = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")  # what `mlflow models serve` serves
    torch_model = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    for batch in (1, 64):
        images = data.test.images[:batch]  # uint8, as users have them
        x = to_sequences(images, "rows")
        with torch.no_grad():
            expected = live(x)
            torch.testing.assert_close(torch_model(x), expected)
        answers = classifier.predict(images.numpy())
        probabilities = expected.double().softmax(1).numpy()
        np.testing.assert_allclose(answers[serving.PROBABILITY_COLUMNS], probabilities, rtol=1e-4, atol=1e-6)
        assert answers["class"].tolist() == expected.argmax(1).tolist()
    info = mlflow.models.get_model_info(f"runs:/{run_id}/model")
    assert info.signature.inputs is None and "0-255" in info.metadata["input"]  # no one-dtype schema: see serving.py
    assert list(info.signature.outputs.input_names()) == ["class", "label", "probability", *serving.PROBABILITY_COLUMNS]


def test_evaluate_logs_metrics_table_and_plots(pipeline_runs):
    client, run = pipeline_runs["client"], pipeline_runs["evaluate"]
    assert run.data.tags["pipeline.data"] == pipeline_runs["prepare"].info.run_id  # found through the train run
    metrics = {name: value for name, value in run.data.metrics.items() if not name.startswith("system/")}
    assert set(metrics) == {"test_loss", "test_accuracy", "test_macro_f1"}
    assert run.data.params["resolved_device"] == "cpu"
    assert 0 <= metrics["test_macro_f1"] <= 1 and metrics["test_loss"] > 0
    assert {
        "per_class.csv",
        "per_class.html",
        "predictions.csv",
        "per_class.json",
        "confusion_matrix.png",
        "confident_mistakes.png",
    } <= artifact_names(client, run.info.run_id)
    shown = mlflow.load_table("per_class.json", run_ids=[run.info.run_id])  # what the UI's table view reads
    assert len(shown) == 10 and list(shown.columns)[:5] == ["class", "precision", "recall", "f1", "support"]
    [dataset_input] = client.get_run(run.info.run_id).inputs.dataset_inputs
    assert dataset_input.dataset.name == "mnist-test" and dataset_input.tags[0].value == "testing"
    table = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="per_class.csv"))
    assert list(table.columns) == ["class", "precision", "recall", "f1", "support"]
    assert table["support"].sum() == 10_000
    assert table["f1"].mean() == pytest.approx(metrics["test_macro_f1"])  # the logged table and metric agree
    predictions = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="predictions.csv"))
    assert list(predictions.columns) == ["image", "true_class", "class", "probability"] and len(predictions) == 10_000
    assert (predictions["class"] == predictions["true_class"]).mean() == pytest.approx(metrics["test_accuracy"])
    # MLflow 3's page of the logged model shows what describes it, not only system metrics.
    model_id = mlflow.models.get_model_info(f"runs:/{pipeline_runs['train'].info.run_id}/model").model_id
    on_model_page = {metric.key: metric.value for metric in client.get_logged_model(model_id).metrics}
    assert {"best_val_accuracy", "test_accuracy", "test_macro_f1"} <= on_model_page.keys()
    assert on_model_page["test_accuracy"] == metrics["test_accuracy"]


def test_evaluate_matches_a_hand_computed_confusion_matrix():
    # true 0 0 0 1 1 2 | 3 4 5 6 7 8 9 ; predicted 0 0 1 1 2 2 | 3 4 5 6 7 8 9
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    predicted = torch.tensor([0, 0, 1, 1, 2, 2, 3, 4, 5, 6, 7, 8, 9])
    images = torch.zeros(len(labels), 28, 28, dtype=torch.uint8)
    images[:, 0, 0] = predicted * 10  # the "model" reads its answer from the first pixel

    class FirstPixel(torch.nn.Module):
        def forward(self, x):  # (B, 28, 28) in [0, 1] -> one-hot logits
            return torch.nn.functional.one_hot((x[:, 0, 0] * 255 / 10).round().long(), 10).float() * 20

    classifier = serving.Classifier(FirstPixel(), (28, 28), [str(k) for k in range(10)])
    result = evaluate.evaluate(classifier, Split(images, labels), [str(k) for k in range(10)])
    # class 0: TP 2, FP 0, FN 1; class 1: TP 1, FP 1, FN 1; class 2: TP 1, FP 1, FN 0; classes 3-9: perfect
    expected = {0: (1.0, 2 / 3, 0.8), 1: (0.5, 0.5, 0.5), 2: (0.5, 1.0, 2 / 3)}
    for k, (precision, recall, f1) in expected.items():
        row = result.per_class.iloc[k]
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx((precision, recall, f1))
    assert result.per_class["f1"].iloc[3:].tolist() == [1.0] * 7
    assert result.test_macro_f1 == pytest.approx((0.8 + 0.5 + 2 / 3 + 7) / 10)
    assert result.test_accuracy == pytest.approx(11 / 13)
    assert result.confusion[0].tolist()[:3] == [2, 1, 0] and result.confusion[1].tolist()[:3] == [0, 1, 1]


def test_prepare_with_a_bad_file_exits_and_leaves_no_run(tracking, synthetic_mnist, capsys):
    path = corrupt_file(synthetic_mnist)
    with pytest.raises(SystemExit) as exit_info:
        prepare.main(["--data-dir", str(synthetic_mnist), "--val-size", "100"])
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert str(path) in captured.err
    assert MlflowClient().search_runs(["0"]) == []
    prepare.main(["--data-dir", str(write_good(synthetic_mnist)), "--val-size", "100"])  # good files: it succeeds
    [run] = MlflowClient().search_runs(["0"])
    assert run.info.status == "FINISHED"


def write_good(root):
    from pipeline import data as data_module
    from tests.conftest import write_synthetic_mnist

    assert write_synthetic_mnist(root) == data_module.DATASETS["mnist"]  # same seeds: same files again
    return root
