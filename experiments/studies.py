"""Study definitions: what a tuning study searches, where it starts, and how it searches.

A ``StudyDefinition``'s search space is declared once, as Optuna distributions over TrainConfig fields:
``suggest`` samples it, ``describe`` writes it as people read it. Samplers and pruners are chosen by name
on the command line. To add a study, add it to ``STUDIES``; how long its trainings take: experiments/budget.py.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from pipeline.config import TrainConfig, TuneConfig

# The metric a study maximises. Never test accuracy: the test set is looked at once, at the end.
OBJECTIVE_METRIC = "val_accuracy"


@dataclass(frozen=True, eq=False)  # equal only to itself: hashable, so what is derived from it is computed once
class StudyDefinition:
    description: str  # one line, printed when a study starts
    space: dict[str, BaseDistribution]  # what each trial samples, in this order (TrainConfig fields)
    baseline: dict  # enqueued as trial 0, so every study is measured against a known point: a value for each name of the space
    fixed: dict = field(default_factory=dict)  # TrainConfig overrides every trial shares


def suggest(definition: StudyDefinition, trial: optuna.Trial | optuna.trial.FixedTrial) -> dict:
    """One trial's TrainConfig overrides, sampled from the space. nn.LSTM's dropout acts between
    layers: with one layer there is nothing to sample, and it is 0."""
    params = {}
    for name, distribution in definition.space.items():
        if name == "dropout" and params.get("num_layers") == 1:
            params[name] = 0.0
        elif isinstance(distribution, CategoricalDistribution):
            params[name] = trial.suggest_categorical(name, distribution.choices)
        else:
            number = trial.suggest_int if isinstance(distribution, IntDistribution) else trial.suggest_float
            params[name] = number(name, distribution.low, distribution.high, step=distribution.step, log=distribution.log)
    return params


def describe(space: dict[str, BaseDistribution]) -> dict[str, str]:
    """The space as people read it: ``{"hidden_size": "int 32..512, log", ...}``. Logged to the parent
    run, and stored with the study: a rerun with another space is refused (experiments/tune.py)."""

    def number(value: float) -> str:
        return f"{value:.0e}".replace("e-0", "e-") if 0 < value < 0.1 else f"{value:g}"

    described = {}
    for name, distribution in space.items():
        if isinstance(distribution, CategoricalDistribution):
            text = ", ".join(str(choice).lower() for choice in distribution.choices)
        else:
            kind = "int" if isinstance(distribution, IntDistribution) else "float"
            text = f"{kind} {number(distribution.low)}..{number(distribution.high)}" + (", log" if distribution.log else "")
        if name == "dropout" and (layers := space.get("num_layers")):  # sampled only with two layers or more
            text += f" when num_layers = {layers.high}" if layers.high == 2 else " when num_layers > 1"
        described[name] = text
    return described


def largest_configuration(definition: StudyDefinition) -> dict:
    """The space's largest model: every number at its upper bound, every choice at its largest (``True`` over ``False``)."""
    return {name: max(d.choices) if isinstance(d, CategoricalDistribution) else d.high for name, d in definition.space.items()}


# The tutorial's model: hidden 256, 2 layers, Adam 1e-3 (batch 128, one direction, no dropout).
TUTORIAL = {"hidden_size": 256, "num_layers": 2, "learning_rate": 1e-3, "batch_size": 128, "bidirectional": False, "dropout": 0.0}

STUDIES = {
    "lstm": StudyDefinition(
        description="the GPU-sized space: size, depth, learning rate, batch, direction, dropout",
        space={
            "num_layers": IntDistribution(1, 3),
            "hidden_size": IntDistribution(32, 512, log=True),
            "learning_rate": FloatDistribution(1e-4, 1e-2, log=True),
            "batch_size": CategoricalDistribution([64, 128, 256]),
            "bidirectional": CategoricalDistribution([False, True]),
            "dropout": FloatDistribution(0.0, 0.5),
        },
        baseline=TUTORIAL,
    ),
    # Smaller than the GPU's space (256 hidden at most, the tutorial's): a typical trial costs about a quarter
    # of the tutorial's per image; small models take larger learning rates, a CPU is faster at larger batches.
    # Both directions and dropout stay: on Fashion-MNIST a bidirectional, regularised model beat the rest.
    "lstm-cpu": StudyDefinition(
        description="the CPU-sized space: smaller models, no 3rd layer",
        space={
            "num_layers": IntDistribution(1, 2),
            "hidden_size": IntDistribution(32, 256, log=True),
            "learning_rate": FloatDistribution(3e-4, 3e-2, log=True),
            "batch_size": CategoricalDistribution([128, 256]),
            "bidirectional": CategoricalDistribution([False, True]),
            "dropout": FloatDistribution(0.0, 0.5),
        },
        baseline=TUTORIAL,
    ),
    "smoke": StudyDefinition(
        description="tiny one-layer LSTMs: seconds per trial, for tests and a first try of the tooling",
        space={"hidden_size": IntDistribution(4, 16, log=True), "learning_rate": FloatDistribution(1e-3, 3e-2, log=True)},
        baseline={"hidden_size": 8, "learning_rate": 1e-2},
        fixed={"num_layers": 1},
    ),
}


def trial_config(config: TuneConfig, trial: optuna.Trial | optuna.trial.FixedTrial) -> TrainConfig:
    """One trial's TrainConfig: what it samples (or a FixedTrial's parameters) over the study's fixed settings."""
    definition = STUDIES[config.study]
    overrides = {**definition.fixed, **suggest(definition, trial)}
    return TrainConfig(**overrides, epochs=config.epochs, seed=config.seed, device=config.device)


def study_for(name: str, on_cuda: bool) -> str:
    """The study definition ``name`` stands for: ``auto`` is the GPU-sized space on CUDA, else the CPU-sized one."""
    return name if name != "auto" else ("lstm" if on_cuda else "lstm-cpu")


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    if name == "tpe":  # multivariate TPE is 'experimental' but the recommended kind
        with warnings.catch_warnings(action="ignore", category=optuna.exceptions.ExperimentalWarning):
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


DEFAULT_PRUNER = "hyperband"
REDUCTION_FACTOR = 3  # successive halving keeps the best third of the trials at each rung


def resolve_pruner(asked: str, stored: dict | None, multi_objective: bool) -> str:
    """The pruner ``-P pruner=asked`` means for a study with ``stored`` settings (None: a new one): ``auto`` is its
    own pruner, or ``DEFAULT_PRUNER`` for a new one; a multi-objective study is never pruned (pruners judge one objective)."""
    if multi_objective:
        return "none"
    if asked != "auto":
        return asked
    return stored["pruner"] if stored else DEFAULT_PRUNER


def min_epochs(epochs: int) -> int:
    """Hyperband's smallest budget: a quarter of the epochs (at least one), so that a small model,
    slower to start, is not judged after one epoch against large ones."""
    return max(1, round(epochs / 4))


def rungs(epochs: int) -> list[int]:
    """The epochs at which hyperband judges a trial (each bracket starts at another one of them)."""
    found, epoch = [], min_epochs(epochs)
    while epoch < epochs:
        found.append(epoch)
        epoch *= REDUCTION_FACTOR
    return found


def make_pruner(name: str, epochs: int) -> optuna.pruners.BasePruner:
    if name == "median":
        # From the first epoch on, against the median of earlier trials there, once three give it a meaning.
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
    if name == "hyperband":
        # Multi-fidelity over epochs (``rungs``): brackets of successive halving, so long training goes to the promising.
        return optuna.pruners.HyperbandPruner(
            min_resource=min_epochs(epochs), max_resource=epochs, reduction_factor=REDUCTION_FACTOR
        )
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"unknown pruner {name!r}")


def describe_pruner(name: str, epochs: int) -> str:
    if name == "hyperband":
        if not (judged := rungs(epochs)):
            return f"pruner hyperband (nothing to judge in {epochs} epoch(s): every trial completes)"
        at = ", ".join(map(str, judged))
        return f"pruner hyperband (judged at epochs {at} of {epochs}: the best third of its bracket goes on)"
    if name == "median":
        return "pruner median (from epoch 1, against the median of earlier trials)"
    return "no pruner"
