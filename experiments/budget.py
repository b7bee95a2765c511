"""How long a training takes here, and what ``-P budget`` lets a study still start.

One model of time (docs/tuning.md, "How long"): an epoch takes a fixed overhead plus a rate times
the configuration's per-image cost relative to the study's baseline, the line fitted to the study's
own trials (``epoch_time``). The confirmation's runs each take as long as their trial took.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from dataclasses import dataclass
from datetime import datetime

import optuna
from optuna.trial import FrozenTrial, TrialState

from experiments import attributes
from experiments.studies import STUDIES, StudyDefinition, largest_configuration, suggest
from experiments.trials import best_configurations, n_counted
from pipeline.config import TuneConfig, say
from pipeline.cost import forward_flops


def relative_cost(definition: StudyDefinition, params: dict) -> float:
    """A configuration's per-image training cost, relative to the study's baseline (trial 0), by
    ``pipeline.cost.forward_flops``. A parameter ``params`` leaves out (a warm start cut to the
    space) counts at the baseline's value."""

    def cost(params: dict) -> float:
        size = (params.get("hidden_size", 256), params.get("num_layers", 2), bool(params.get("bidirectional")))
        return forward_flops(*size, reading_order=params.get("reading_order", "rows"))

    baseline = {**definition.fixed, **definition.baseline}
    return cost({**baseline, **params}) / cost(baseline)


@functools.cache
def typical_cost(definition: StudyDefinition, draws: int = 200) -> float:
    """The mean per-image cost of random draws of the study's space, relative to its baseline."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    return statistics.mean(relative_cost(definition, suggest(definition, study.ask())) for _ in range(draws))


def largest_cost(definition: StudyDefinition) -> float:
    """The per-image cost of the space's largest configuration (or of the baseline, if larger), relative to the baseline."""
    return max(1.0, relative_cost(definition, largest_configuration(definition)))


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
    # A multi-objective trial reports no epochs, and completes all of them.
    ran = len(trial.intermediate_values) or (epochs if trial.state == TrialState.COMPLETE else 0)
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED) and trial.duration and ran:
        return trial.duration.total_seconds() / ran
    if trial.state == TrialState.RUNNING and trial.datetime_start and trial.intermediate_values:
        return (now - trial.datetime_start).total_seconds() / len(trial.intermediate_values)
    return None


def epoch_time(definition: StudyDefinition, trials: list[FrozenTrial], epochs: int) -> EpochTime | None:
    """How long an epoch takes here: the trials' seconds per epoch (running ones' too) against their
    relative cost, by least squares; where that line has no positive overhead and slope, the line
    through zero. None before any epoch is timed."""
    now = datetime.now()  # Optuna stamps trials with naive local time
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
    """Seconds one full run (``config.epochs``) of ``params`` (None: the space's largest configuration) takes here."""
    definition = STUDIES[config.study]
    if (timing := epoch_time(definition, study.get_trials(deepcopy=False), config.epochs)) is None:
        return None
    return config.epochs * timing.of(largest_cost(definition) if params is None else relative_cost(definition, params))


def worst_case_seconds(study: optuna.Study, config: TuneConfig, workers: int = 1) -> float | None:
    """Seconds a new trial, then the champion's confirmation, take at worst: the trial is the space's
    largest configuration and becomes the champion, its seeds confirmed ``workers`` at a time (experiments/confirm.py)."""
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
    if (timing := epoch_time(definition, trials, config.epochs)) is None:
        return "time: estimated when the first epoch is timed"
    waiting = [attributes.enqueued_params(t) for t in trials if t.state == TrialState.WAITING][:to_run]
    search = sum(timing.of(relative_cost(definition, params)) for params in waiting)
    search += (to_run - len(waiting)) * timing.of(typical_cost(definition))
    minutes = math.ceil(search * config.epochs / workers / 60)
    line = f"time: about {minutes} min here for the {to_run} trial(s) left if none is pruned"
    if config.confirm_top:  # `workers` runs at a time, at the size of the best configurations so far
        best = best_configurations(study, config.confirm_top)
        size = statistics.mean([relative_cost(definition, t.params) for t in best] or [1.0])
        rounds = math.ceil(config.confirm_top * config.confirm_seeds / workers)
        minutes = math.ceil(rounds * timing.of(size) * config.epochs / 60)
        line += f", then about {minutes} min to confirm"
    return line + f" (the baseline takes {timing.of(1.0):.0f} s an epoch here, by the trials' timing so far)"


def fitting(trials: list[FrozenTrial], config: TuneConfig, deadline: float, processes: int = 1) -> list[FrozenTrial]:
    """The configurations to confirm: the best always, each next one if all the chosen runs (each
    as long as its trial took), ``processes`` at a time, end before ``deadline`` (``time.time()``);
    one left out is said."""
    chosen, runs = [], []
    for rank, trial in enumerate(trials):
        mine = [trial.duration.total_seconds() if trial.duration else 0.0] * config.confirm_seeds
        ends = time.time() + makespan(runs + mine, processes)
        if rank and ends > deadline:
            left = max(0.0, deadline - time.time())
            say(
                f"[confirm] trial {trial.number}'s configuration left out: with its {config.confirm_seeds} runs the "
                f"confirmation takes about {(ends - time.time()) / 60:.0f} min, and {left / 60:.0f} min of -P budget are left"
            )
            continue
        chosen.append(trial)
        runs += mine
    return chosen


def makespan(seconds: list[float], processes: int) -> float:
    """How long runs of these lengths take, ``processes`` at a time, the longest first, each to
    the first process free."""
    loads = [0.0] * max(1, processes)
    for length in sorted(seconds, reverse=True):
        loads[loads.index(min(loads))] += length
    return max(loads)


def say_budget_wait(worker: int) -> bool:
    """Say, once a wait, that the budget holds this worker until the running trials end (their timing may
    leave room for another trial: one small trial alone tells little of a large one's time)."""
    say(
        f"[worker {worker}] by the trials timed so far, -P budget leaves no room for another trial; waiting for "
        "the running ones, then deciding again"
    )
    return True


def say_budget_end(study: optuna.Study, config: TuneConfig, worker: int, deadline: float, workers: int) -> None:
    """Say, before the confirmation, that the budget ended the search, and by how much."""
    worst, left = worst_case_seconds(study, config, workers) or 0.0, max(0.0, deadline - time.time())
    say(
        f"[worker {worker}] -P budget ends the search at {n_counted(study)} trial(s): another, at worst the "
        f"space's largest configuration, then the champion's confirmation would take about {worst / 60:.0f} min, and "
        f"{left / 60:.0f} min are left"
    )
