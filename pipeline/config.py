"""Every stage's parameters in one place: a frozen dataclass per stage, with defaults and ranges.

Flags (``--hidden-size``), MLproject defaults (tested) and the train stage's MLflow params all come from
these, so they cannot drift. Building a config validates it: a bad value raises ``ParameterError``, one
line naming the parameter and what it accepts. The entry points' command line comes from here too: their
flags, their one-line errors (``fail``) and the lines they say to people on stderr (``say``).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import operator
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ParameterError(ValueError):
    """A parameter value outside what its stage accepts."""


def param(default: Any, help: str, *, ge=None, gt=None, le=None, lt=None, choices=None):
    """A dataclass field carrying its help text and allowed values."""
    return field(default=default, metadata={"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices})


_BOUNDS = {"ge": (">=", operator.ge), "gt": (">", operator.gt), "le": ("<=", operator.le), "lt": ("<", operator.lt)}
_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def allowed(f: dataclasses.Field) -> str:
    """Human-readable allowed values of one field, e.g. 'an integer >= 1 and <= 4096'."""
    meta = f.metadata
    if meta.get("choices"):
        return "one of " + ", ".join(map(str, meta["choices"]))
    limits = [f"{symbol} {meta[k]}" for k, (symbol, _) in _BOUNDS.items() if meta.get(k) is not None]
    return " and ".join([_TYPE_WORDS[type(f.default)] + (" " + limits[0] if limits else "")] + limits[1:])


class Checked:
    """A config dataclass whose building raises ParameterError for the first field outside its allowed values."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value, meta, kind = getattr(self, f.name), f.metadata, type(f.default)
            # an int is a float too; a bool is an int only to Python
            ok = isinstance(value, (int, float) if kind is float else kind) and (kind is bool or not isinstance(value, bool))
            if ok and meta.get("choices"):
                ok = value in meta["choices"]
            if ok and kind in (int, float):
                ok = value == value and all(  # value == value rejects NaN
                    meta.get(k) is None or compare(value, meta[k]) for k, (_, compare) in _BOUNDS.items()
                )
            if not ok:
                raise ParameterError(f"{f.name}={value!r} is not allowed: must be {allowed(f)}")


@dataclass(frozen=True)
class PrepareConfig(Checked):
    """Parameters of the prepare stage: which images, and how the training set is split."""

    dataset: str = param("mnist", "dataset to prepare", choices=("mnist", "fashion-mnist"))
    # Raw IDX files are looked up in torchvision's layout, <data_dir>/MNIST/raw/, .gz or not.
    data_dir: str = param("data", "folder holding <data_dir>/MNIST/raw/ (downloaded there when online)")
    val_size: int = param(5000, "training images held out for validation", ge=1, le=59_000)
    train_limit: int = param(0, "keep this many training images after the split (0 = all)", ge=0)
    seed: int = param(42, "seed of the train/validation split", ge=0)


@dataclass(frozen=True)
class TrainConfig(Checked):
    """Hyperparameters of one training run. The model ones are nn.LSTM's own names."""

    # The tutorial's model (256 hidden, 2 layers, batch 128) with the recipe measured in docs/results.md:
    # Adam at 2e-3, cosine schedule, 3 epochs: 99.0% test accuracy over seeds.
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
        super().__post_init__()
        if self.dropout > 0 and self.num_layers == 1:
            raise ParameterError(
                f"dropout={self.dropout} is not allowed with num_layers=1: nn.LSTM applies dropout "
                "between stacked layers, so use num_layers >= 2 or dropout=0"
            )


@dataclass(frozen=True)
class EvaluateConfig(Checked):
    """Parameters of the evaluate stage (inference only, so nothing here changes results)."""

    batch_size: int = param(1000, "images per inference batch", ge=1, le=65_536)
    device: str = param("auto", "where to run the model; auto = cuda, then mps, then cpu", choices=("auto", "cuda", "mps", "cpu"))


@dataclass(frozen=True)
class TuneConfig(Checked):
    """Parameters of an Optuna study (experiments/tune.py); trials share everything else."""

    # auto: the GPU-sized space (lstm) where CUDA is found, the CPU-sized one (lstm-cpu) elsewhere.
    study: str = param("auto", "study definition in experiments/studies.py", choices=("auto", "lstm", "lstm-cpu", "smoke"))
    study_name: str = param("lstm-rows", "name of the Optuna study and of its MLflow parent run")
    # A journal file serves the processes of one machine; an RDB URL (postgresql://user@host/db) several machines.
    storage: str = param("optuna-studies.journal", "Optuna journal file, or an RDB URL such as postgresql://...")
    # Counted over the whole study, so a rerun with more continues it; a dead worker's trials are retried, not counted.
    n_trials: int = param(20, "trials the study runs in all, whoever runs them", ge=1, le=100_000)
    timeout: int = param(0, "stop starting trials after this many seconds (0 = no limit)", ge=0)
    # A trial starts only if it and the champion's confirmation would end in time even at the space's
    # largest configuration; more configurations are confirmed while they fit (experiments/budget.py).
    budget: int = param(0, "seconds for the whole command, search and confirmation (0 = no limit)", ge=0)
    # auto: one per visible GPU times workers_per_gpu (worker i on GPU i mod count); 1 without a GPU.
    n_workers: str = param("auto", "worker processes on this machine: auto, or a number from 1 to 64")
    workers_per_gpu: int = param(1, "workers sharing each GPU when n_workers=auto (small models leave a GPU idle)", ge=1, le=16)
    # RDB storage only: a running trial silent for 3 heartbeats is failed and retried once.
    heartbeat_interval: int = param(20, "seconds between a running trial's heartbeats (RDB storage)", ge=1, le=3600)
    epochs: int = param(3, "epochs per trial", ge=1, le=1000)
    sampler: str = param("tpe", "search algorithm (seeded)", choices=("tpe", "random", "gp", "cmaes", "nsga2"))
    # auto: hyperband (over epochs) for a new study, the study's own pruner when it exists (experiments/studies.py).
    pruner: str = param(
        "auto", "stops weak trials early, by per-epoch val_accuracy", choices=("auto", "hyperband", "median", "none")
    )
    # Not the split's: that is prepare's (seed 42), or the -P data run's, the same for every trial.
    seed: int = param(42, "seed of the sampler and of every trial's training", ge=0)
    # Of the confirm_top best configurations, the best mean val_accuracy on seeds 1..confirm_seeds wins (experiments/confirm.py).
    confirm_top: int = param(
        3, "configurations retrained over seeds before one is registered (0 = the best trial's own)", ge=0, le=50
    )
    confirm_seeds: int = param(3, "training seeds per confirmed configuration: seeds 1 to this", ge=1, le=50)
    # One registered model per dataset: versions compete for its champion only on the same data.
    register_name: str = param(
        "auto", "MLflow registered model for the study's champion (a confirmed run, or the best trial's): auto = lstm-<dataset>"
    )
    device: str = param("auto", "where trials train; auto = cuda, then mps, then cpu", choices=("auto", "cuda", "mps", "cpu"))
    # Read only when the study is created; configurations are cut to this study's space (experiments/warm_start.py).
    warm_start: str = param("", "earlier study in the same storage whose best configurations start this one ('' = none)")
    warm_start_k: int = param(5, "how many of the earlier study's best configurations to enqueue", ge=1, le=100)
    # Two objectives, so no pruning (Optuna's pruners judge one); the Pareto front is logged (experiments/pareto.py).
    cost: str = param(
        "none", "second objective, minimised beside val_accuracy", choices=("none", "parameter_count", "latency_ms")
    )
    # With a cost, the smallest model this close to the best (0.002 = 0.2 points) is registered as compact.
    compact_within: float = param(0.002, "the compact model's allowed val_accuracy below the best", ge=0.0, le=1.0)

    def __post_init__(self):
        super().__post_init__()
        for name in ("study_name", "storage", "register_name"):
            if not getattr(self, name).strip():
                raise ParameterError(f"{name}='' is not allowed: must be a non-empty string")
        if self.cost != "none" and self.sampler == "cmaes":
            raise ParameterError("sampler=cmaes is not allowed with a cost: CMA-ES optimises one objective (use tpe or nsga2)")
        if self.n_workers != "auto" and not (self.n_workers.isdigit() and 1 <= int(self.n_workers) <= 64):
            raise ParameterError(f"n_workers={self.n_workers!r} is not allowed: must be auto or an integer from 1 to 64")


# --- command line ----------------------------------------------------------------------------


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered not in ("true", "1", "yes", "false", "0", "no"):
        raise argparse.ArgumentTypeError(f"must be true or false, got {text!r}")
    return lowered in ("true", "1", "yes")


SWITCH = {"type": parse_bool, "nargs": "?", "const": True, "default": False}  # --flag alone means true, as --flag true


def _parser_type(kind: type):
    def convert(text: str):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {_TYPE_WORDS[kind]}, got {text!r}") from None

    return parse_bool if kind is bool else convert


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (no usage dump), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_config_arguments(parser: argparse.ArgumentParser, *config_types: type) -> None:
    """Add one --kebab-case flag per field of ``config_types``, typed, with its default in the help, then
    ``--launch-dir``. A field of several configs (``seed``) gets the first one's flag, which sets them all."""
    added = set()
    for config_type in config_types:
        group = parser.add_argument_group(config_type.__name__)
        for f in dataclasses.fields(config_type):
            if f.name not in added:
                added.add(f.name)
                help_text = f"{f.metadata['help']}; {allowed(f)} (default: {f.default})"
                kind = _parser_type(type(f.default))
                group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=f.default, help=help_text)
    add_launch_dir_argument(parser)


def build_configs(parser: OneLineParser, argv, *config_types: type) -> tuple[argparse.Namespace, list]:
    """Parse ``argv`` and build each config; a bad value exits with one line and status 2. A ``data_dir``,
    ``--checkpoint-dir`` and a ``--data`` folder come out absolute, read from ``--launch-dir`` (``user_path``)."""
    args = parser.parse_args(argv)
    given = vars(args)
    for name, resolve in (("data_dir", user_path), ("checkpoint_dir", user_path), ("data", user_data_ref)):
        if name in given:
            given[name] = resolve(given[name], args.launch_dir)
    try:
        return args, [t(**{f.name: given[f.name] for f in dataclasses.fields(t)}) for t in config_types]
    except ParameterError as error:
        parser.error(str(error))


def run_entry_point(main: Callable[[], object]) -> None:
    """Run an entry point's ``main()``, then let the process end at once: ``gc.freeze()`` spares
    the interpreter's last collection a walk over every object torch and MLflow made (1-3 s per
    process on 2 cores). Exit handlers (MLflow's flushes, the system metrics thread) still run."""
    try:
        main()
    finally:
        gc.freeze()


def say(line: str) -> None:
    """Progress, warnings and results for people: one line (or a few) on stderr, as it happens
    (stderr is line-buffered), leaving stdout to what a command outputs."""
    print(line, file=sys.stderr)


def fail(message: str, status: int = 1):
    """Stop a stage with one line on stderr."""
    say(f"error: {message}")
    raise SystemExit(status)


def add_launch_dir_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--launch-dir``, the folder relative paths are read from: `mlflow run` starts an entry point in the
    project folder, so MLproject passes ``launch_dir``, a ``path`` parameter MLflow makes absolute."""
    parser.add_argument(
        "--launch-dir",
        default=".",
        help="folder relative paths are read from; `mlflow run` passes the one it was typed in (default: ., this folder)",
    )


def add_env_manager_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """Add ``--env-manager``, the environment the stages this command launches with `mlflow run` start in."""
    choices = ("local", "virtualenv", "uv", "conda")
    parser.add_argument("--env-manager", default="local", choices=choices, help=f"{what} (default: local)")


def user_path(path: str, launch_dir: str) -> str:
    """``path`` as the user meant it: absolute, a relative one taken from ``launch_dir``."""
    return str((Path(launch_dir) / Path(path).expanduser()).resolve())


def user_data_ref(ref: str, launch_dir: str) -> str:
    """A ``--data`` reference as the user meant it: a folder (relative ones from ``launch_dir``)
    made absolute; a run id or an artifact URI as given."""
    folder = Path(launch_dir) / Path(ref).expanduser()
    return str(folder.resolve()) if ref and folder.is_dir() else ref
