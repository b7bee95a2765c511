"""Study definitions: what a tuning study searches, where it starts, and how it searches.

A study is a ``StudyDefinition``: a ``suggest(trial)`` function that samples TrainConfig fields,
the baseline configuration enqueued as trial 0 (so every study is measured against a known
point), and the fixed settings every trial shares. Samplers and pruners are chosen by name on
the command line. To add a study, add a definition to ``STUDIES``. The cost model here
(``relative_cost``, ``time_left``) estimates how long a study takes from its own trials' timing.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import optuna
from optuna.trial import FrozenTrial, TrialState

from experiments import attributes
from pipeline.config import TrainConfig, TuneConfig

# The metric a study maximises. Never test accuracy: the test set is looked at once, at the end.
OBJECTIVE_METRIC = "val_accuracy"


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
    # Smaller than the GPU's space (no 3rd layer, 256 hidden at most): its typical trial costs about
    # a quarter of the tutorial's per image (relative_cost), and small models take larger learning
    # rates. Both directions and dropout to 0.5 are searched: on Fashion-MNIST a bidirectional,
    # regularised model beat every one-directional one (docs/results.md).
    num_layers = trial.suggest_int("num_layers", 1, 2)
    params = {
        "hidden_size": trial.suggest_int("hidden_size", 32, 256, log=True),  # 256: trial 0, the tutorial's
        "num_layers": num_layers,
        "learning_rate": trial.suggest_float("learning_rate", 3e-4, 3e-2, log=True),
        "batch_size": trial.suggest_categorical("batch_size", [128, 256]),  # a CPU is faster per image at larger batches
        "bidirectional": trial.suggest_categorical("bidirectional", [False, True]),
    }
    params["dropout"] = trial.suggest_float("dropout", 0.0, 0.5) if num_layers > 1 else 0.0
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
        description="the CPU-sized space: smaller models, no 3rd layer",
        suggest=suggest_lstm_cpu,
        baseline=TUTORIAL,
        search_space={
            "hidden_size": "int 32..256, log",
            "num_layers": "int 1..2",
            "learning_rate": "float 3e-4..3e-2, log",
            "batch_size": "128, 256",
            "bidirectional": "false, true",
            "dropout": "float 0..0.5 when num_layers = 2",
        },
    ),
    "smoke": StudyDefinition(
        description="tiny one-layer LSTMs: seconds per trial, for tests and a first try of the tooling",
        suggest=suggest_smoke,
        baseline={"hidden_size": 8, "num_layers": 1, "learning_rate": 1e-2},
        search_space={"hidden_size": "int 4..16, log", "learning_rate": "float 1e-3..3e-2, log"},
    ),
}


def trial_config(config: TuneConfig, trial: optuna.Trial | optuna.trial.FixedTrial) -> TrainConfig:
    """The TrainConfig of one trial: what it samples (or a FixedTrial's parameters), the study's fixed
    settings, and the study's epochs, seed and device."""
    definition = STUDIES[config.study]
    overrides = {**definition.fixed, **definition.suggest(trial)}
    return TrainConfig(**overrides, epochs=config.epochs, seed=config.seed, device=config.device)


def study_for(name: str, on_cuda: bool) -> str:
    """The study definition ``name`` stands for: ``auto`` is the GPU-sized space on CUDA, else the CPU-sized one."""
    if name != "auto":
        return name
    return "lstm" if on_cuda else "lstm-cpu"


def relative_cost(definition: StudyDefinition, params: dict) -> float:
    """A configuration's per-image training cost, relative to the study's baseline (trial 0), by
    ``pipeline.cost.forward_flops``. A parameter ``params`` leaves out (a warm start cut to the
    space) counts at the baseline's value."""
    from pipeline.cost import forward_flops

    def cost(params: dict) -> float:
        size = (params.get("hidden_size", 256), params.get("num_layers", 2), bool(params.get("bidirectional")))
        return forward_flops(*size, reading_order=params.get("reading_order", "rows"))

    baseline = {**definition.fixed, **definition.baseline}
    return cost({**baseline, **params}) / cost(baseline)


def sampled_costs(definition: StudyDefinition, draws: int = 200) -> list[float]:
    """Per-image costs of random draws of the study's space, relative to its baseline."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    return [relative_cost(definition, definition.suggest(study.ask())) for _ in range(draws)]


def typical_cost(definition: StudyDefinition) -> float:
    """The mean per-image cost of the study's sampled trials, relative to its baseline."""
    return statistics.mean(sampled_costs(definition))


def largest_cost(definition: StudyDefinition) -> float:
    """The per-image cost of the largest configuration the space holds, relative to its baseline
    (the largest of the draws, and the baseline itself)."""
    return max(1.0, *sampled_costs(definition))


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


# pruner=auto: a new single-objective study is pruned by hyperband; an existing study keeps its own.
DEFAULT_PRUNER = "hyperband"
REDUCTION_FACTOR = 3  # successive halving keeps the best third of the trials at each rung


def resolve_pruner(asked: str, stored: dict | None, multi_objective: bool) -> str:
    """The pruner ``-P pruner=asked`` means for a study whose stored settings are ``stored`` (None:
    a new study): ``auto`` is the study's own pruner, or ``DEFAULT_PRUNER`` for a new one; a
    multi-objective study is never pruned (Optuna's pruners judge one objective)."""
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
        # Judge a trial from its first epoch on, against the median of the trials before it at the
        # same epoch, once three trials have given that median a meaning.
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
    if name == "hyperband":
        # Multi-fidelity: the epoch budget is the resource. Trials are spread over brackets, each
        # a successive halving that judges them first after min_epochs, 3x that, ... epochs (the
        # later brackets start higher); at each rung a trial goes on only if it is in the best
        # third of its bracket there, so long training goes to the promising configurations.
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


# --- how long it takes here -----------------------------------------------------------------------


def epochs_run(trial: FrozenTrial, epochs: int) -> int:
    """Epochs a finished trial trained: its reports (a pruned one stopped early); a multi-objective
    trial reports none, and completes all of them."""
    return len(trial.intermediate_values) or (epochs if trial.state == TrialState.COMPLETE else 0)


@dataclass(frozen=True)
class EpochTime:
    """Seconds one epoch takes here: a fixed ``overhead`` (validation, Python, a small model's
    unfilled cores) plus ``per_cost`` times the configuration's relative cost."""

    overhead: float
    per_cost: float

    def of(self, cost: float) -> float:
        return self.overhead + self.per_cost * cost


def seconds_per_epoch(trial: FrozenTrial, epochs: int, now: datetime) -> float | None:
    """A trial's seconds per epoch so far: a finished one's whole duration over the epochs it ran;
    a running one's time since it started over the epochs it reported (an over-estimate by at most
    the epoch under way). None for a trial with no epoch behind it."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED) and trial.duration and epochs_run(trial, epochs):
        return trial.duration.total_seconds() / epochs_run(trial, epochs)
    if trial.state == TrialState.RUNNING and trial.datetime_start and trial.intermediate_values:
        return (now - trial.datetime_start).total_seconds() / len(trial.intermediate_values)
    return None


def epoch_time(
    definition: StudyDefinition, trials: list[FrozenTrial], epochs: int, now: datetime | None = None
) -> EpochTime | None:
    """How long an epoch takes here, fitted to the study's trials' own timing (seconds per epoch
    against relative cost, least squares; the running trials' reported epochs count too, or one
    small trial finished beside a large one still running makes every configuration look as slow
    per cost as the small one's fixed cost); None before any epoch is timed. Where the points do not
    give a line with a positive overhead and slope, the line through zero: mostly the largest
    trials' rate. (Each trial's seconds over its cost, the earlier estimate, made a small trial's
    overhead look like a baseline epoch of minutes, and a budget stopped a study after 2 trials.)"""
    now = now or datetime.now()  # Optuna stamps trials with naive local time
    points = [
        (relative_cost(definition, trial.params), seconds)
        for trial in trials
        if (seconds := seconds_per_epoch(trial, epochs, now)) is not None
    ]
    if not points:
        return None
    costs, seconds = zip(*points, strict=True)
    if len(set(costs)) > 1:
        slope, intercept = statistics.linear_regression(costs, seconds)
        if slope > 0 and intercept >= 0:
            return EpochTime(intercept, slope)
    return EpochTime(0.0, sum(c * s for c, s in points) / sum(c * c for c in costs))


def run_seconds(study: optuna.Study, config: TuneConfig, params: dict | None = None) -> float | None:
    """Seconds one full run (``config.epochs``) of ``params`` takes here, by the trials' timing;
    ``params`` None: the space's largest configuration. None before any epoch is timed."""
    definition = STUDIES[config.study]
    timing = epoch_time(definition, study.get_trials(deepcopy=False), config.epochs)
    if timing is None:
        return None
    cost = largest_cost(definition) if params is None else relative_cost(definition, params)
    return config.epochs * timing.of(cost)


def worst_case_seconds(study: optuna.Study, config: TuneConfig, workers: int = 1) -> float | None:
    """Seconds a new trial, then the champion's confirmation, take at worst: the trial is the
    space's largest configuration and becomes the champion, its seeds confirmed ``workers`` at a
    time (experiments/confirm.py). None before any epoch is timed."""
    if (seconds := run_seconds(study, config)) is None:
        return None
    return (1 + (math.ceil(config.confirm_seeds / workers) if config.confirm_top else 0)) * seconds


def another_trial_fits(study: optuna.Study, config: TuneConfig, deadline: float, workers: int = 1) -> bool:
    """Whether a new trial, then the champion's confirmation, end before ``deadline`` (``time.time()``)
    at worst (``worst_case_seconds``). Before any epoch is timed nothing is known, and the trial starts."""
    if deadline == math.inf or (worst := worst_case_seconds(study, config, workers)) is None:
        return True
    return time.time() + worst <= deadline


def time_left(study: optuna.Study, config: TuneConfig, to_run: int, workers: int) -> str:
    """How long the rest of the study takes here, if none is pruned, and its confirmation (one
    line), from its trials' own timing; or when that will be known."""
    definition = STUDIES[config.study]
    trials = study.get_trials(deepcopy=False)
    timing = epoch_time(definition, trials, config.epochs)
    if timing is None:
        return "time: estimated when the first epoch is timed"
    waiting = [attributes.enqueued_params(t) for t in trials if t.state == TrialState.WAITING][:to_run]
    search = sum(timing.of(relative_cost(definition, params)) for params in waiting)
    search += (to_run - len(waiting)) * timing.of(typical_cost(definition))
    minutes = math.ceil(search * config.epochs / workers / 60)
    line = f"time: about {minutes} min here for the {to_run} trial(s) left if none is pruned"
    if config.confirm_top:  # `workers` runs at a time, at the size of the best configurations so far
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        best = sorted(complete, key=lambda t: -t.values[0])[: config.confirm_top]
        size = statistics.mean([relative_cost(definition, t.params) for t in best] or [1.0])
        rounds = math.ceil(config.confirm_top * config.confirm_seeds / workers)
        minutes = math.ceil(rounds * timing.of(size) * config.epochs / 60)
        line += f", then about {minutes} min to confirm"
    return line + f" (the baseline takes {timing.of(1.0):.0f} s an epoch here, by the trials' timing so far)"
