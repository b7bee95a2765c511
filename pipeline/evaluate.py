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
from dataclasses import dataclass

import mlflow
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from pipeline import serving
from pipeline.config import EvaluateConfig, OneLineParser, add_config_arguments, build_configs, fail, run_entry_point, say
from pipeline.data import NUM_CLASSES, DataError, PreparedData, Split
from pipeline.numerics import resolve_device
from pipeline.tracking import device_params, load_prepared_run, log_data_inputs, log_params, model_uri, stage_run


@dataclass
class Evaluation:
    test_loss: float
    test_accuracy: float
    test_macro_f1: float
    per_class: pd.DataFrame  # one row per class: precision, recall, f1, support
    confusion: torch.Tensor  # (true class, predicted class) counts
    predictions: pd.DataFrame  # one row per image: image, true_class, class, probability


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
    columns = {"precision": precision, "recall": recall, "f1": f1, "support": confusion.sum(1)}
    per_class = pd.DataFrame({"class": class_names, **{name: column.numpy() for name, column in columns.items()}})
    return Evaluation(
        test_loss=F.nll_loss(probabilities.log(), labels).item(),  # cross-entropy, from float64 probabilities
        test_accuracy=(predictions == labels).double().mean().item(),
        test_macro_f1=f1.mean().item(),
        per_class=per_class,
        confusion=confusion,
        predictions=pd.DataFrame(
            {"image": range(len(labels)), "true_class": labels.numpy(), **answers[["class", "probability"]]}
        ),
    )


def plot_confusion(confusion: torch.Tensor, class_names: list[str]):
    figure = Figure(figsize=(8, 7))
    axis = figure.subplots()
    image = axis.imshow(confusion.log1p(), cmap="Blues")  # log scale: the off-diagonal errors stay visible
    for true, row in enumerate(confusion.tolist()):
        for predicted, count in enumerate(row):
            color = "white" if true == predicted else "black"
            axis.text(predicted, true, str(count), ha="center", va="center", fontsize=8, color=color)
    axis.set_xticks(range(NUM_CLASSES), class_names, rotation=45, ha="right")
    axis.set_yticks(range(NUM_CLASSES), class_names)
    axis.set(xlabel="predicted class", ylabel="true class", title="confusion matrix (test)")
    figure.colorbar(image, ax=axis, label="log(1 + count)")
    figure.tight_layout()
    return figure


def plot_confident_mistakes(split: Split, predictions: pd.DataFrame, class_names: list[str], count: int = 25):
    wrong = predictions[predictions["class"] != predictions["true_class"]]
    worst = wrong.sort_values("probability", ascending=False, kind="stable").head(count)
    columns = 5
    rows = max(1, -(-len(worst) // columns))
    figure = Figure(figsize=(2 * columns, 2.3 * rows))
    axes = figure.subplots(rows, columns, squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    mistakes = worst[["image", "class", "probability", "true_class"]].itertuples(index=False)
    for axis, (index, said, confidence, was) in zip(axes.flat, mistakes, strict=False):  # more axes than mistakes, at times
        axis.imshow(split.images[index].cpu(), cmap="gray")
        axis.set_title(f"said {class_names[said]} ({confidence:.2f})\nwas {class_names[was]}", fontsize=8)
    figure.suptitle(f"most confident mistakes ({len(wrong)} wrong of {len(predictions)})")
    figure.tight_layout()
    return figure


def evaluate_and_log(
    classifier, data: PreparedData, config: EvaluateConfig, device: torch.device, data_ref: str = "", model_uri: str = ""
) -> Evaluation:
    """Evaluate on ``data.test`` inside the active MLflow run and log its metrics, tables and plots. ``data_ref``
    (where ``data`` came from) makes the test split the run's dataset input; ``model_uri`` (what ``classifier``
    was loaded from) links the metrics to that logged model, whose page in MLflow 3 then shows them."""
    class_names = data.class_names
    result = evaluate(classifier, data.test, class_names, config.batch_size)
    log_params({**dataclasses.asdict(config), **device_params(device)})
    metrics = {"test_loss": result.test_loss, "test_accuracy": result.test_accuracy, "test_macro_f1": result.test_macro_f1}
    mlflow.log_metrics(metrics, model_id=mlflow.models.get_model_info(model_uri).model_id if model_uri else None)
    mlflow.log_text(result.per_class.to_csv(index=False), "per_class.csv")
    mlflow.log_text(result.per_class.to_html(index=False, float_format="{:.4f}".format), "per_class.html")
    mlflow.log_text(result.predictions.to_csv(index=False), "predictions.csv")
    mlflow.log_table(result.per_class, artifact_file="per_class.json")  # a sortable table in the UI's artifact view
    if data_ref:
        log_data_inputs(data, data_ref, {"test": "testing"})
    mlflow.log_figure(plot_confusion(result.confusion, class_names), "confusion_matrix.png")
    mlflow.log_figure(plot_confident_mistakes(data.test, result.predictions, class_names), "confident_mistakes.png")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(prog="evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="train run id or MLflow model URI (runs:/..., models:/...)")
    parser.add_argument(
        "--data", default="", help="prepare run id, artifact URI or folder (default: the data the model's train run used)"
    )
    add_config_arguments(parser, EvaluateConfig)
    args, (config,) = build_configs(parser, argv, EvaluateConfig)

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
    say(
        f"test_accuracy {result.test_accuracy:.4f}  test_macro_f1 {result.test_macro_f1:.4f}  "
        f"test_loss {result.test_loss:.4f}; run {run.info.run_id}"
    )


if __name__ == "__main__":
    run_entry_point(main)
