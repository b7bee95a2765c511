"""Study definitions: what a tuning study searches, where it starts, and how it searches.

A study is a ``StudyDefinition``: a ``suggest(trial)`` function that samples TrainConfig fields,
the baseline configuration enqueued as trial 0 (so every study is measured against a known
point), and the fixed settings every trial shares. Samplers and pruners are chosen by name on
the command line. To add a study, add a definition to ``STUDIES``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import optuna

# The metric a study maximises. Never test accuracy: the test set is looked at once, at the end.
OBJECTIVE_METRIC = "val_accuracy"
SETTINGS_ATTR = "settings"  # study user attribute: what its trials must share (experiments/tune.py)


@dataclass(frozen=True)
class StudyDefinition:
    description: str  # one line, printed when a study starts
    suggest: Callable[[optuna.Trial], dict]  # TrainConfig overrides for one trial
    baseline: dict  # enqueued as trial 0: the same keys suggest() samples
    fixed: dict = field(default_factory=dict)  # TrainConfig overrides every trial shares
    search_space: dict = field(default_factory=dict)  # human-readable, logged to the parent run


def suggest_lstm(trial: optuna.Trial) -> dict:
    num_layers = trial.suggest_int("num_layers", 1, 3)
    params = {
        "hidden_size": trial.suggest_int("hidden_size", 32, 512, log=True),
        "num_layers": num_layers,
        "learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True),
        "batch_size": trial.suggest_categorical("batch_size", [64, 128, 256]),
        "bidirectional": trial.suggest_categorical("bidirectional", [False, True]),
    }
    # nn.LSTM's dropout acts between layers; with one layer there is nothing to sample.
    params["dropout"] = trial.suggest_float("dropout", 0.0, 0.5) if num_layers > 1 else 0.0
    return params


def suggest_lstm_cpu(trial: optuna.Trial) -> dict:
    # A trial costs about num_layers * hidden_size * (28 + hidden_size) per image: this space's
    # typical trial is a fifth of the tutorial's, and small models take larger learning rates.
    num_layers = trial.suggest_int("num_layers", 1, 2)
    params = {
        "hidden_size": trial.suggest_int("hidden_size", 32, 256, log=True),  # 256: trial 0, the tutorial's
        "num_layers": num_layers,
        "learning_rate": trial.suggest_float("learning_rate", 3e-4, 3e-2, log=True),
        "batch_size": trial.suggest_categorical("batch_size", [128, 256]),  # a CPU is faster per image at larger batches
    }
    params["dropout"] = trial.suggest_float("dropout", 0.0, 0.3) if num_layers > 1 else 0.0
    return params


def suggest_smoke(trial: optuna.Trial) -> dict:
    return {
        "hidden_size": trial.suggest_int("hidden_size", 4, 16, log=True),
        "num_layers": 1,
        "learning_rate": trial.suggest_float("learning_rate", 1e-3, 3e-2, log=True),
    }


# The tutorial's model: hidden 256, 2 layers, Adam 1e-3 (batch 128, one direction, no dropout).
TUTORIAL = {"hidden_size": 256, "num_layers": 2, "learning_rate": 1e-3, "batch_size": 128, "bidirectional": False, "dropout": 0.0}

STUDIES = {
    "lstm": StudyDefinition(
        description="the GPU-sized space: size, depth, learning rate, batch, direction, dropout",
        suggest=suggest_lstm,
        baseline=TUTORIAL,
        search_space={
            "hidden_size": "int 32..512, log",
            "num_layers": "int 1..3",
            "learning_rate": "float 1e-4..1e-2, log",
            "batch_size": "64, 128, 256",
            "bidirectional": "false, true",
            "dropout": "float 0..0.5 when num_layers > 1",
        },
    ),
    "lstm-cpu": StudyDefinition(
        description="the CPU-sized space: smaller models, no 3rd layer, no backward direction",
        suggest=suggest_lstm_cpu,
        baseline={k: v for k, v in TUTORIAL.items() if k != "bidirectional"},  # not searched here
        search_space={
            "hidden_size": "int 32..256, log",
            "num_layers": "int 1..2",
            "learning_rate": "float 3e-4..3e-2, log",
            "batch_size": "128, 256",
            "dropout": "float 0..0.3 when num_layers = 2",
        },
    ),
    "smoke": StudyDefinition(
        description="tiny one-layer LSTMs: seconds per trial, for tests and a first try of the tooling",
        suggest=suggest_smoke,
        baseline={"hidden_size": 8, "num_layers": 1, "learning_rate": 1e-2},
        search_space={"hidden_size": "int 4..16, log", "learning_rate": "float 1e-3..3e-2, log"},
    ),
}


def study_for(name: str, on_cuda: bool) -> str:
    """The study definition ``name`` stands for: ``auto`` is the GPU-sized space on CUDA, else the CPU-sized one."""
    if name != "auto":
        return name
    return "lstm" if on_cuda else "lstm-cpu"


def relative_cost(definition: StudyDefinition, params: dict) -> float:
    """A configuration's per-image training cost, relative to the study's baseline (trial 0); an
    LSTM's cost grows as num_layers * directions * hidden_size * (input + hidden_size). A parameter
    ``params`` leaves out (a warm start cut to the space) counts at the baseline's value."""

    def cost(params: dict) -> float:
        hidden, layers = params.get("hidden_size", 256), params.get("num_layers", 2)
        return layers * (2 if params.get("bidirectional") else 1) * hidden * (28 + hidden)

    baseline = {**definition.fixed, **definition.baseline}
    return cost({**baseline, **params}) / cost(baseline)


def typical_cost(definition: StudyDefinition, draws: int = 200) -> float:
    """The mean per-image cost of the study's sampled trials, relative to its baseline, from random draws of its space."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    return sum(relative_cost(definition, definition.suggest(study.ask())) for _ in range(draws)) / draws


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        with warnings.catch_warnings():  # multivariate TPE is 'experimental' but the recommended kind
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "nsga2":  # genetic, made for several objectives (cost=...); one generation is 50 trials
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "cmaes":
        # CMA-ES samples numbers only; categorical choices fall back to random sampling.
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    raise ValueError(f"unknown sampler {name!r}")


def make_pruner(name: str, epochs: int) -> optuna.pruners.BasePruner:
    if name == "median":
        # Judge a trial from its first epoch on, against the median of the trials before it at the
        # same epoch, once three trials have given that median a meaning.
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"unknown pruner {name!r}")
