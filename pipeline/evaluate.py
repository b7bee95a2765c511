"""Stage 3, evaluate: a logged model on the official test images -> test metrics and plots.

Reads:  the model given by ``--model`` (a train run id or any MLflow model URI), loaded as users
        load and serve it (``mlflow.pyfunc``: pixels in, classes and probabilities out; see
        pipeline/serving.py), and the ``prepared/`` test split of ``--data`` (by default, the data
        its train run used), given to it as raw 0-255 pixels.
Writes: params ``batch_size``, ``device``, ``resolved_device`` (on a GPU also its name, index
        and memory); metrics ``test_loss``, ``test_accuracy``, ``test_macro_f1`` and MLflow's
        ``system/*`` metrics; artifacts
        ``per_class.csv`` and ``per_class.html`` (precision, recall, F1 per class),
        ``predictions.csv`` (per test image: true class, predicted class, its probability),
        ``confusion_matrix.png`` and ``confident_mistakes.png``.

    python -m pipeline.evaluate --model <train run id>
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from dataclasses import dataclass

import mlflow
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from pipeline import serving
from pipeline.config import (
    EvaluateConfig,
    OneLineParser,
    add_config_arguments,
    add_launch_dir_argument,
    build_configs,
    fail,
    run_entry_point,
    user_data_ref,
)
from pipeline.data import DATASETS, NUM_CLASSES, DataError, PreparedData, Split
from pipeline.numerics import resolve_device
from pipeline.tracking import device_params, load_prepared_run, log_data_inputs, log_params, model_uri, stage_run


@dataclass
class Evaluation:
    test_loss: float
    test_accuracy: float
    test_macro_f1: float
    per_class: pd.DataFrame  # one row per class: precision, recall, f1, support
    confusion: torch.Tensor  # (true class, predicted class) counts
    probabilities: torch.Tensor  # (N, num_classes) float64, as the classifier answered them
    predictions: pd.DataFrame  # one row per image: image, true_class, class, probability

    def metrics(self) -> dict[str, float]:
        return {"test_loss": self.test_loss, "test_accuracy": self.test_accuracy, "test_macro_f1": self.test_macro_f1}


def evaluate(classifier, split: Split, class_names: list[str], batch_size: int = 1000) -> Evaluation:
    """Score ``classifier`` on a split: anything with the ``predict`` of pipeline/serving.py (the
    logged model as ``mlflow.pyfunc`` loads and ``mlflow models serve`` serves it), given the
    split's uint8 images as they are."""
    answers = classifier.predict(split.images.cpu().numpy(), params={"batch_size": batch_size})
    probabilities = torch.from_numpy(answers[serving.PROBABILITY_COLUMNS].to_numpy())  # (N, 10)
    labels, predictions = split.labels.cpu(), torch.from_numpy(answers["class"].to_numpy(copy=True))
    confusion = torch.bincount(labels * NUM_CLASSES + predictions, minlength=NUM_CLASSES**2).reshape(NUM_CLASSES, NUM_CLASSES)
    true_positives = confusion.diag().double()
    precision = true_positives / confusion.sum(0).clamp(min=1)
    recall = true_positives / confusion.sum(1).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    per_class = pd.DataFrame(
        {
            "class": class_names,
            "precision": precision.numpy(),
            "recall": recall.numpy(),
            "f1": f1.numpy(),
            "support": confusion.sum(1).numpy(),
        }
    )
    return Evaluation(
        test_loss=F.nll_loss(probabilities.log(), labels).item(),  # cross-entropy, from float64 probabilities
        test_accuracy=(predictions == labels).double().mean().item(),
        test_macro_f1=f1.mean().item(),
        per_class=per_class,
        confusion=confusion,
        probabilities=probabilities,
        predictions=pd.DataFrame(
            {"image": range(len(labels)), "true_class": labels.numpy(), **answers[["class", "probability"]]}
        ),
    )


def plot_confusion(confusion: torch.Tensor, class_names: list[str]):
    figure = Figure(figsize=(8, 7))
    axis = figure.subplots()
    image = axis.imshow(confusion.log1p(), cmap="Blues")  # log scale: the off-diagonal errors stay visible
    for (true, predicted), count in zip(
        torch.cartesian_prod(torch.arange(NUM_CLASSES), torch.arange(NUM_CLASSES)).tolist(),
        confusion.flatten().tolist(),
        strict=True,
    ):
        color = "white" if true == predicted else "black"
        axis.text(predicted, true, str(count), ha="center", va="center", fontsize=8, color=color)
    axis.set(
        xticks=range(NUM_CLASSES),
        yticks=range(NUM_CLASSES),
        xlabel="predicted class",
        ylabel="true class",
        title="confusion matrix (test)",
    )
    axis.set_xticklabels(class_names, rotation=45, ha="right")
    axis.set_yticklabels(class_names)
    figure.colorbar(image, ax=axis, label="log(1 + count)")
    figure.tight_layout()
    return figure


def plot_confident_mistakes(split: Split, evaluation: Evaluation, class_names: list[str], count: int = 25):
    confidence, predictions = evaluation.probabilities.max(1)
    labels = split.labels.cpu()
    wrong = (predictions != labels).nonzero().flatten()
    worst = wrong[confidence[wrong].argsort(descending=True)][:count]
    columns = 5
    rows = max(1, -(-len(worst) // columns))
    figure = Figure(figsize=(2 * columns, 2.3 * rows))
    axes = figure.subplots(rows, columns, squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, index in zip(axes.flat, worst.tolist(), strict=False):  # more axes than mistakes, at times
        axis.imshow(split.images[index].cpu(), cmap="gray")
        axis.set_title(
            f"said {class_names[predictions[index]]} ({confidence[index]:.2f})\nwas {class_names[labels[index]]}", fontsize=8
        )
    figure.suptitle(f"most confident mistakes ({len(wrong)} wrong of {len(labels)})")
    figure.tight_layout()
    return figure


def evaluate_and_log(
    classifier, data: PreparedData, config: EvaluateConfig, device: torch.device, data_ref: str = "", model_uri: str = ""
) -> Evaluation:
    """Evaluate on ``data.test`` inside the active MLflow run and log its metrics, tables and plots;
    ``data_ref`` (where ``data`` came from) makes the test split the run's dataset input, and
    ``model_uri`` (what ``classifier`` was loaded from) links the metrics to that logged model, whose
    page in MLflow 3 then shows them."""
    dataset, data_split = data.manifest["dataset"], data.test
    class_names = [str(name) for name in DATASETS[dataset].torchvision_class.classes]
    result = evaluate(classifier, data_split, class_names, config.batch_size)
    log_params({**dataclasses.asdict(config), **device_params(device)})
    mlflow.log_metrics(result.metrics(), model_id=mlflow.models.get_model_info(model_uri).model_id if model_uri else None)
    with tempfile.TemporaryDirectory() as tmp:
        result.per_class.to_csv(f"{tmp}/per_class.csv", index=False)
        result.per_class.to_html(f"{tmp}/per_class.html", index=False, float_format="{:.4f}".format)
        result.predictions.to_csv(f"{tmp}/predictions.csv", index=False)
        mlflow.log_artifacts(tmp)
    mlflow.log_table(result.per_class, artifact_file="per_class.json")  # a sortable table in the UI's artifact view
    if data_ref:
        log_data_inputs(data, data_ref, {"test": "testing"})
    mlflow.log_figure(plot_confusion(result.confusion, class_names), "confusion_matrix.png")
    mlflow.log_figure(plot_confident_mistakes(data_split, result, class_names), "confident_mistakes.png")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(prog="evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="train run id or MLflow model URI (runs:/..., models:/...)")
    parser.add_argument(
        "--data", default="", help="prepare run id, artifact URI or folder (default: the data the model's train run used)"
    )
    add_config_arguments(parser, EvaluateConfig)
    add_launch_dir_argument(parser)
    args, (config,) = build_configs(parser, argv, EvaluateConfig)
    args.data = user_data_ref(args.data, args.launch_dir)

    device = resolve_device(config.device)
    uri = model_uri(args.model)
    try:
        classifier = serving.load(uri, device)
        data_ref = args.data or mlflow.get_run(mlflow.models.get_model_info(uri).run_id).data.tags["pipeline.data"]
        data = load_prepared_run(data_ref)
    except (DataError, mlflow.exceptions.MlflowException, OSError, KeyError) as error:
        fail(f"cannot load the model {args.model} or its data: {error}")
    with stage_run("evaluate", **{"pipeline.model": uri, "pipeline.data": data_ref}) as run:
        result = evaluate_and_log(classifier, data, config, device, data_ref, uri)
    print(
        f"test_accuracy {result.test_accuracy:.4f}  test_macro_f1 {result.test_macro_f1:.4f}  "
        f"test_loss {result.test_loss:.4f}; run {run.info.run_id}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    run_entry_point(main)
