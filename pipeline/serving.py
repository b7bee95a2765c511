"""The logged model as a classifier: pixels in, the class and its probabilities out (docs/serving.md).

Every logged model has two faces: ``mlflow.pytorch.load_model`` gives the ``LSTMClassifier`` ((B, T, F)
floats -> (B, 10) logits); ``mlflow.pyfunc``, ``mlflow models serve``, ``predict`` and the evaluate stage
give this module's ``Classifier`` (``SIGNATURE``'s table out). An MLflow tensor signature holds one dtype and
is enforced before the model sees its input, so the input contract is the metadata's ``INPUT``, checked by
``pixels``, and the signature declares only the output and ``batch_size``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

from pipeline.data import NUM_CLASSES, SEQUENCE_SHAPES
from pipeline.inference import predict_logits
from pipeline.numerics import resolve_device

IMAGE_SHAPE = SEQUENCE_SHAPES["rows"]  # (28, 28)
PIXELS = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
BATCH_SIZE = 1000  # images per forward pass; a request may set params.batch_size
INPUT = (
    "a batch of 28x28 images, (N, 28, 28) or flattened (N, 784): 0-255 pixels as integers "
    "(uint8 or any integer type), or floats in [0, 1]"
)
PROBABILITY_COLUMNS = [f"probability_{k}" for k in range(NUM_CLASSES)]
SIGNATURE = ModelSignature(
    inputs=None,  # see the module docstring: INPUT, in the model's metadata, and checked by pixels()
    outputs=Schema(
        [ColSpec("long", "class"), ColSpec("string", "label"), ColSpec("double", "probability")]
        + [ColSpec("double", name) for name in PROBABILITY_COLUMNS]
    ),
    params=ParamSchema([ParamSpec("batch_size", "long", BATCH_SIZE)]),
)


class Classifier:
    """An LSTMClassifier behind the pyfunc ``predict`` contract of the module docstring."""

    def __init__(self, model: torch.nn.Module, sequence_shape: tuple[int, int], class_names: list[str], device="cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device)  # (B, T, F) floats in [0, 1] -> (B, 10) logits; exported in eval mode
        self.sequence_shape = tuple(sequence_shape)  # (T, F): (28, 28) read by rows, (784, 1) by pixels
        self.class_names = list(class_names)

    def predict(self, model_input, params: dict | None = None) -> pd.DataFrame:
        batch_size = int((params or {}).get("batch_size", BATCH_SIZE))
        if batch_size < 1:
            raise refuse(f"batch_size must be at least 1, got {batch_size}")
        probabilities = self.probabilities(pixels(model_input), batch_size).cpu()  # (N, 10)
        confidence, classes = probabilities.max(1)
        labels = [self.class_names[k] for k in classes.tolist()]
        answer = pd.DataFrame({"class": classes.numpy(), "label": labels, "probability": confidence.numpy()})
        answer[PROBABILITY_COLUMNS] = probabilities.numpy()
        return answer

    def probabilities(self, images: torch.Tensor, batch_size: int = BATCH_SIZE) -> torch.Tensor:
        """(N, 10) float64 class probabilities of (N, 28, 28) floats in [0, 1], on the model's device."""
        # float64 softmax: a confident model's small probabilities stay > 0, so log(p) is finite
        return predict_logits(self.model, images, self.sequence_shape, batch_size).double().softmax(1)

    def get_raw_model(self) -> torch.nn.Module:  # PyFuncModel.get_raw_model() returns this
        return self.model


def pixels(model_input) -> torch.Tensor:
    """(N, 28, 28) float32 in [0, 1] from what a user sends (INPUT), or an MlflowException
    (HTTP 400 when served) saying what is wrong with it."""
    if isinstance(model_input, pd.DataFrame):  # `mlflow models predict --content-type csv`, dataframe_split JSON
        model_input = model_input.to_numpy()
    array = model_input.numpy(force=True) if isinstance(model_input, torch.Tensor) else np.asarray(model_input)
    # (PIXELS, 1): the sequences a pixel-by-pixel model reads, which is its logged input example
    if array.shape[1:] not in (IMAGE_SHAPE, (PIXELS,), (PIXELS, 1)):
        hint = "; for one image, send a batch of one: (1, 28, 28)" if array.shape == IMAGE_SHAPE else ""
        raise refuse(f"expected {INPUT}; got shape {array.shape}{hint}")
    if len(array) == 0:
        raise refuse("no images: the batch is empty")
    if array.dtype.kind not in ("i", "u", "f"):
        raise refuse(f"pixels must be integers (0-255) or floats (0-1); got dtype {array.dtype}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise refuse("pixels must be finite numbers; got NaN or infinity")
    low, high, integers = array.min(), array.max(), array.dtype.kind in "iu"
    if integers and (low < 0 or high > 255):  # integers: 0-255 pixels
        raise refuse(f"integer pixels must be within 0-255; got values from {low} to {high}")
    if not integers and (low < 0 or high > 1):  # floats: fractions of full brightness
        whole = high <= 255 and low >= 0 and (array == np.round(array)).all()
        hint = ": these look like 0-255 pixels, send them as integers (uint8) or divide by 255" if whole else ""
        raise refuse(f"float pixels must be within [0, 1]; got values from {low:g} to {high:g}{hint}")
    return torch.from_numpy(array.reshape(-1, *IMAGE_SHAPE).astype(np.float32) / (255 if integers else 1))


def refuse(message: str) -> MlflowException:
    return MlflowException.invalid_parameter_value(message)  # INVALID_PARAMETER_VALUE: HTTP 400 from a server


# --- the flavor: how MLflow saves and loads it ---------------------------------------------------


def log_model(name: str, model: torch.nn.Module, example: torch.Tensor, reading_order: str, class_names: list[str]):
    """Log ``model`` (on the CPU) pickle-free with both faces under ``name``; ``example`` (2, T, F)
    is the sequence torch.export traces it with. Returns MLflow's ModelInfo."""
    return Model.log(
        artifact_path=None,  # MLflow 3 still requires the deprecated argument; name replaces it
        name=name,
        flavor=sys.modules[__name__],  # MLflow calls save_model below
        flavor_name="pytorch",
        pytorch_model=model,
        example=example,
        reading_order=reading_order,
        class_names=class_names,
        serialization_format="pt2",  # pickle-free everywhere: MLflow's default differs by version and platform
    )


def save_model(path, mlflow_model: Model, pytorch_model, example, reading_order, class_names, serialization_format, **kwargs):
    """Save MLflow's pytorch flavor, then make this module the python_function flavor."""
    mlflow.pytorch.save_model(
        pytorch_model,
        path,
        mlflow_model=mlflow_model,
        input_example=example.numpy(),  # (2, T, F): the trace for torch.export, and a valid predict() input
        # torch.export reads the batch dimension from a tensor signature; the saved one is SIGNATURE
        signature=ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *example.shape[1:]))])),
        serialization_format=serialization_format,
        # No code_paths: MLflow would put the copy first on sys.path of every process that loads the model
        # (and of the workers it spawns later). The model serves where this project is installed.
        # Pinning torch avoids MLflow's slow requirement inference (a model reload).
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"pandas=={pd.__version__}"],
        **kwargs,
    )
    mlflow.pyfunc.add_to_model(
        mlflow_model,
        loader_module=__name__,
        conda_env="conda.yaml",
        python_env="python_env.yaml",
        model_config={"device": "auto"},  # mlflow.pyfunc.load_model(uri, model_config={"device": "cuda:1"})
    )
    mlflow_model.signature = SIGNATURE
    mlflow_model.metadata = {
        **(mlflow_model.metadata or {}),
        "input": INPUT,
        "reading_order": reading_order,
        "sequence_shape": list(example.shape[1:]),
        "classes": list(class_names),
    }
    mlflow_model.save(Path(path, "MLmodel"))


def _load_pyfunc(path, model_config: dict | None = None) -> Classifier:
    """The python_function flavor's loader (MLflow's name); ``model_config["device"]`` picks the device ("auto": a GPU if any)."""
    metadata = Model.load(Path(path, "MLmodel")).metadata
    device = resolve_device((model_config or {}).get("device", "auto"))
    return Classifier(mlflow.pytorch.load_model(str(path)), metadata["sequence_shape"], metadata["classes"], device)


def load(uri: str, device: str | torch.device = "auto"):
    """The classifier behind ``uri``, as ``mlflow.pyfunc.load_model`` gives it to users."""
    classifier = mlflow.pyfunc.load_model(uri, model_config={"device": str(device)})
    if classifier.metadata.flavors["python_function"].get("loader_module") != __name__:
        raise MlflowException(f"{uri} was logged before models classified pixels (it answers logits): train it again")
    return classifier
