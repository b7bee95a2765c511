"""What a study's workers say while it runs, one line each to stderr: every finished trial, and the time
left once the first is timed. What ``-P budget`` makes them say: experiments/budget.py."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from experiments.budget import time_left
from experiments.pareto import cost_name, format_cost
from experiments.studies import OBJECTIVE_METRIC
from experiments.trials import complete, most_accurate, n_counted, trials_left
from pipeline.config import TuneConfig, say
from pipeline.training import duration


def say_time_left_once(study: optuna.Study, config: TuneConfig, worker: int, workers: int) -> None:
    """When the study's first trial has finished, say how long the rest takes, by its timing."""
    if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))) == 1:
        say(f"[worker {worker}] {time_left(study, config, trials_left(study, config.n_trials), workers)}")


def say_done(study: optuna.Study, trial: optuna.trial.FrozenTrial, worker: int, n_trials: int) -> None:
    """One line per finished trial: how far it trained, how long it took, the best so far, and how many of
    the ``n_trials`` are done."""
    epochs = len(trial.intermediate_values)
    trained = f" at epoch {epochs}" if trial.state == TrialState.PRUNED else f", {epochs} epoch{'s' * (epochs != 1)}"
    took = f" ({duration(trial.duration.total_seconds())})" if trial.duration else ""
    value = f": {OBJECTIVE_METRIC} {trial.values[0]:.4f}" if trial.values else ""
    if len(trial.values or ()) > 1:
        value += f" {cost_name(study)} {format_cost(cost_name(study), trial.values[1])}"
    best = most_accurate(finished) if (finished := complete(study)) else None
    best_text = f"best {best.values[0]:.4f} (trial {best.number})" if best else "no complete trial yet"
    done = f"{n_counted(study)} of {n_trials} done"
    say(f"[worker {worker}] trial {trial.number} {trial.state.name}{trained}{took}{value} | {best_text} | {done}")
