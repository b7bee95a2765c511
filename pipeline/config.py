"""Every stage's parameters in one place: a frozen dataclass per stage, with defaults and ranges.

Command-line flags (``--hidden-size``) are generated from these dataclasses, the MLproject
defaults are tested against them, and the train stage logs them as MLflow params, so the three
cannot drift. Building a config validates it: a bad value raises ``ParameterError`` whose
message is one line naming the parameter and what it accepts.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

Config = TypeVar("Config")


class ParameterError(ValueError):
    """A parameter value outside what its stage accepts."""


def param(default: Any, help: str, *, ge=None, gt=None, le=None, lt=None, choices=None):
    """A dataclass field carrying its help text and allowed values."""
    bounds = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices}
    return field(default=default, metadata={"help": help, **bounds})


_SYMBOLS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def allowed(f: dataclasses.Field) -> str:
    """Human-readable allowed values of one field, e.g. 'an integer >= 1 and <= 4096'."""
    meta = f.metadata
    if meta.get("choices"):
        return "one of " + ", ".join(map(str, meta["choices"]))
    limits = [f"{_SYMBOLS[k]} {meta[k]}" for k in ("ge", "gt", "le", "lt") if meta.get(k) is not None]
    return " and ".join([_TYPE_WORDS[_field_type(f)] + (" " + limits[0] if limits else "")] + limits[1:])


def _field_type(f: dataclasses.Field) -> type:
    return type(f.default)


def check_fields(config) -> None:
    """Raise ParameterError for the first field whose value is outside its allowed values."""
    for f in dataclasses.fields(config):
        value, meta, kind = getattr(config, f.name), f.metadata, _field_type(f)
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if ok and meta.get("choices"):
            ok = value in meta["choices"]
        if ok and kind in (int, float):
            ok = (
                value == value  # rejects NaN
                and (meta.get("ge") is None or value >= meta["ge"])
                and (meta.get("gt") is None or value > meta["gt"])
                and (meta.get("le") is None or value <= meta["le"])
                and (meta.get("lt") is None or value < meta["lt"])
            )
        if not ok:
            raise ParameterError(f"{f.name}={value!r} is not allowed: must be {allowed(f)}")


@dataclass(frozen=True)
class PrepareConfig:
    """Parameters of the prepare stage: which images, and how the training set is split."""

    dataset: str = param("mnist", "dataset to prepare", choices=("mnist", "fashion-mnist"))
    # Raw IDX files are looked up in torchvision's layout, <data_dir>/MNIST/raw/, .gz or not.
    data_dir: str = param("data", "folder holding <data_dir>/MNIST/raw/ (downloaded there when online)")
    val_size: int = param(5000, "training images held out for validation", ge=1, le=59_000)
    train_limit: int = param(0, "keep this many training images after the split (0 = all)", ge=0)
    seed: int = param(42, "seed of the train/validation split", ge=0)

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one training run. The model ones are nn.LSTM's own names."""

    # The tutorial's model (256 hidden, 2 layers, batch 128) with a recipe chosen by measurement
    # (docs/results.md): Adam at 2e-3 under the cosine schedule for 3 epochs reaches 99.0% test
    # accuracy over seeds in under 2 epochs' time of the tutorial's own loop (0.001, 5 epochs before).
    hidden_size: int = param(256, "LSTM hidden units per direction", ge=1, le=4096)
    num_layers: int = param(2, "stacked LSTM layers", ge=1, le=16)
    learning_rate: float = param(2e-3, "Adam learning rate (the peak one under a schedule)", gt=0, le=1)
    batch_size: int = param(128, "training batch size", ge=1, le=65_536)
    epochs: int = param(3, "passes over the training split", ge=1, le=1000)
    # nn.LSTM applies dropout between stacked layers, so it needs num_layers >= 2.
    dropout: float = param(0.0, "dropout between stacked LSTM layers", ge=0, lt=1)
    bidirectional: bool = param(False, "also read each sequence backwards")
    # rows: 28 steps of 28 pixels (the tutorial's); pixels: 784 steps of 1 (sequential MNIST).
    reading_order: str = param("rows", "how an image becomes a sequence", choices=("rows", "pixels"))
    lr_schedule: str = param("cosine", "learning-rate schedule over all steps", choices=("cosine", "onecycle", "constant"))
    # LSTMs occasionally spike; clipping the global gradient norm keeps one bad batch harmless.
    max_grad_norm: float = param(1.0, "clip the gradient norm to this (0 = no clipping)", ge=0)
    patience: int = param(0, "stop after this many epochs without a better val_accuracy (0 = never)", ge=0)
    seed: int = param(42, "seed of weights, shuffling and dropout", ge=0)
    device: str = param("auto", "where to train; auto = cuda, then mps, then cpu", choices=("auto", "cuda", "mps", "cpu"))
    # bf16: forward pass and loss under bfloat16 autocast, weights and Adam in float32; needs a
    # CUDA GPU or a CPU with avx512_bf16. auto takes bf16 only where it was measured faster at
    # the same accuracy (such CPUs: docs/gpu.md), else fp32. Validation always runs in fp32.
    precision: str = param(
        "auto", "arithmetic of training; auto = bf16 where measured faster, else fp32", choices=("auto", "fp32", "bf16")
    )
    # Same seed, same metrics on the same GPU model, driver and libraries, at some cost in speed.
    deterministic: bool = param(False, "deterministic kernels only (torch.use_deterministic_algorithms)")

    def __post_init__(self):
        check_fields(self)
        if self.dropout > 0 and self.num_layers == 1:
            raise ParameterError(
                f"dropout={self.dropout} is not allowed with num_layers=1: nn.LSTM applies dropout "
                "between stacked layers, so use num_layers >= 2 or dropout=0"
            )


@dataclass(frozen=True)
class EvaluateConfig:
    """Parameters of the evaluate stage (inference only, so nothing here changes results)."""

    batch_size: int = param(1000, "images per inference batch", ge=1, le=65_536)
    device: str = param("auto", "where to run the model; auto = cuda, then mps, then cpu", choices=("auto", "cuda", "mps", "cpu"))

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class TuneConfig:
    """Parameters of an Optuna study (experiments/tune.py); trials share everything else."""

    # auto: the GPU-sized space (lstm) where CUDA is found, the CPU-sized one (lstm-cpu) elsewhere.
    study: str = param("auto", "study definition in experiments/studies.py", choices=("auto", "lstm", "lstm-cpu", "smoke"))
    study_name: str = param("lstm-rows", "name of the Optuna study and of its MLflow parent run")
    # A journal file is crash-safe and safe for several processes on one machine; pass an RDB
    # URL (postgresql://user@host/db) to share a study across machines.
    storage: str = param("optuna-studies.journal", "Optuna journal file, or an RDB URL such as postgresql://...")
    # Counted over the whole study: every worker on every machine stops when it has this many, so
    # a rerun with a larger number continues it. Trials whose worker died are retried, not counted.
    n_trials: int = param(20, "trials the study runs in all, whoever runs them", ge=1, le=100_000)
    timeout: int = param(0, "stop starting trials after this many seconds (0 = no limit)", ge=0)
    # The whole command, confirmation included: a trial starts only if it and the champion's
    # confirmation end in time even if it is the space's largest configuration and becomes the
    # champion; the next configurations are confirmed while they fit (experiments/studies.py).
    budget: int = param(0, "seconds for the whole command, search and confirmation (0 = no limit)", ge=0)
    # auto: one per visible GPU times workers_per_gpu (worker i on GPU i mod count); 1 without a GPU.
    n_workers: str = param("auto", "worker processes on this machine: auto, or a number from 1 to 64")
    workers_per_gpu: int = param(1, "workers sharing each GPU when n_workers=auto (small models leave a GPU idle)", ge=1, le=16)
    # RDB storage only: a running trial silent for 3 heartbeats is failed and retried once.
    heartbeat_interval: int = param(20, "seconds between a running trial's heartbeats (RDB storage)", ge=1, le=3600)
    epochs: int = param(3, "epochs per trial", ge=1, le=1000)
    sampler: str = param("tpe", "search algorithm (seeded)", choices=("tpe", "random", "gp", "cmaes", "nsga2"))
    # auto: hyperband for a new study (the epochs are the resource: judged first after a quarter of
    # them), the study's own pruner when it exists (experiments/studies.py).
    pruner: str = param(
        "auto", "stops weak trials early, by per-epoch val_accuracy", choices=("auto", "hyperband", "median", "none")
    )
    # Not the split's: that is prepare's (seed 42), or the -P data run's, the same for every trial.
    seed: int = param(42, "seed of the sampler and of every trial's training", ge=0)
    # Before the champion alias moves, the confirm_top best configurations by val_accuracy train
    # again with seeds 1..confirm_seeds, and the best mean val_accuracy wins (experiments/confirm.py).
    confirm_top: int = param(
        3, "configurations retrained over seeds before one is registered (0 = the best trial's own)", ge=0, le=50
    )
    confirm_seeds: int = param(3, "training seeds per confirmed configuration: seeds 1 to this", ge=1, le=50)
    # One registered model per dataset: versions compete for its champion only on the same data.
    register_name: str = param(
        "auto", "MLflow registered model for the study's champion (a confirmed run, or the best trial's): auto = lstm-<dataset>"
    )
    device: str = param("auto", "where trials train; auto = cuda, then mps, then cpu", choices=("auto", "cuda", "mps", "cpu"))
    # Read only when the study is created: its first trials after trial 0 are the earlier study's
    # best warm_start_k configurations, cut to this study's search space (experiments/warm_start.py).
    warm_start: str = param("", "earlier study in the same storage whose best configurations start this one ('' = none)")
    warm_start_k: int = param(5, "how many of the earlier study's best configurations to enqueue", ge=1, le=100)
    # A multi-objective study: val_accuracy up and the model's size (parameter_count) or its time to
    # classify one image (latency_ms) down; no pruning: Optuna's pruners judge one objective. Its
    # Pareto front is logged (experiments/pareto.py).
    cost: str = param(
        "none", "second objective, minimised beside val_accuracy", choices=("none", "parameter_count", "latency_ms")
    )
    # With a cost: the smallest model within this much val_accuracy of the best (0.002 = 0.2 points)
    # is registered too, under the alias compact.
    compact_within: float = param(0.002, "the compact model's allowed val_accuracy below the best", ge=0.0, le=1.0)

    def __post_init__(self):
        check_fields(self)
        for name in ("study_name", "storage", "register_name"):
            if not getattr(self, name).strip():
                raise ParameterError(f"{name}='' is not allowed: must be a non-empty string")
        if self.cost != "none" and self.sampler == "cmaes":
            raise ParameterError("sampler=cmaes is not allowed with a cost: CMA-ES optimises one objective (use tpe or nsga2)")
        if self.n_workers != "auto" and not (self.n_workers.isdigit() and 1 <= int(self.n_workers) <= 64):
            raise ParameterError(f"n_workers={self.n_workers!r} is not allowed: must be auto or an integer from 1 to 64")


# --- command line ----------------------------------------------------------------------------


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"must be true or false, got {text!r}")


def _parser_type(kind: type):
    if kind is bool:
        return parse_bool

    def convert(text: str):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {_TYPE_WORDS[kind]}, got {text!r}") from None

    return convert


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (no usage dump), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_config_arguments(parser: argparse.ArgumentParser, config_type: type, skip: tuple[str, ...] = ()) -> None:
    """Add one --kebab-case flag per field of ``config_type``, typed, with its default in the help."""
    group = parser.add_argument_group(config_type.__name__)
    for f in dataclasses.fields(config_type):
        if f.name in skip:
            continue
        help_text = f"{f.metadata['help']}; {allowed(f)} (default: {f.default})"
        group.add_argument(flag(f.name), dest=f.name, type=_parser_type(_field_type(f)), default=f.default, help=help_text)


def config_from_args(config_type: type[Config], args: argparse.Namespace) -> Config:
    names = {f.name for f in dataclasses.fields(config_type)}
    return config_type(**{k: v for k, v in vars(args).items() if k in names})


def build_configs(parser: argparse.ArgumentParser, argv, *config_types: type) -> tuple[argparse.Namespace, list]:
    """Parse ``argv`` and build each config; a bad value exits with one line and status 2."""
    args = parser.parse_args(argv)
    try:
        return args, [config_from_args(t, args) for t in config_types]
    except ParameterError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")


def run_entry_point(main: Callable[[], object]) -> None:
    """Run an entry point's ``main()``, then let the process end at once.

    A stage imports torch and MLflow; at exit the interpreter's last garbage collection then walks
    every object they made, about 1-3 s per process on a 2-core CPU, paid by every stage of every
    pipeline and study. ``gc.freeze()`` leaves those objects out of it. Exit handlers still run
    (MLflow's flushes, the system metrics thread), and Python never promised to collect cycles at
    exit anyway.
    """
    try:
        main()
    finally:
        gc.freeze()


def fail(message: str, status: int = 1):
    """Stop a stage with one line on stderr."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(status)


def add_launch_dir_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--launch-dir``: the folder relative paths are read from (see ``user_path``).

    `mlflow run <project>` starts an entry point in the project folder, not where the user typed
    the command. MLproject passes ``launch_dir``, a parameter of type ``path`` defaulting to ``.``,
    which MLflow makes absolute in the `mlflow run` process: that is, the user's folder.
    """
    parser.add_argument(
        "--launch-dir",
        default=".",
        help="folder relative paths are read from; `mlflow run` passes the one it was typed in (default: ., this folder)",
    )


def user_path(path: str, launch_dir: str) -> str:
    """``path`` as the user meant it: absolute, a relative one taken from ``launch_dir``."""
    return str((Path(launch_dir) / Path(path).expanduser()).resolve())


def user_data_ref(ref: str, launch_dir: str) -> str:
    """A ``--data`` reference as the user meant it: a folder (relative ones from ``launch_dir``)
    made absolute; a run id or an artifact URI as given."""
    folder = Path(launch_dir) / Path(ref).expanduser()
    return str(folder.resolve()) if ref and folder.is_dir() else ref
