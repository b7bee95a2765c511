"""What a study's workers say while it runs: each finished trial (how far it trained, how long
it took, the best so far, how many are done), the time left once the first trial is timed, and
when ``-P budget`` holds a worker or ends the search. One line each, to stderr, as it happens.
"""

from __future__ import annotations

import math
import sys
import time

import optuna
from optuna.trial import TrialState

from experiments.coordination import counted
from experiments.pareto import complete, cost_name, format_cost, most_accurate
from experiments.studies import OBJECTIVE_METRIC, time_left, worst_case_seconds
from pipeline.config import TuneConfig
from pipeline.training import duration


def best_value(study: optuna.Study) -> float:
    """The best val_accuracy of the study's complete trials (its first objective); -inf before any."""
    return max((trial.values[0] for trial in complete(study)), default=-math.inf)


def trials_left(study: optuna.Study, n_trials: int) -> int:
    """Trials still to start: ``n_trials`` less those counted and those running."""
    trials = study.get_trials(deepcopy=False)
    return max(0, n_trials - len(counted(trials)) - sum(t.state == TrialState.RUNNING for t in trials))


def say_time_left_once(study: optuna.Study, config: TuneConfig, worker: int, workers: int) -> None:
    """When the study's first trial has finished, say how long the rest takes, by its timing."""
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    if len(finished) == 1:
        print(f"[worker {worker}] {time_left(study, config, trials_left(study, config.n_trials), workers)}", file=sys.stderr)


def say_budget_wait(worker: int) -> bool:
    """Say, once a wait, that the budget holds this worker until the running trials end (their timing may
    leave room for another trial: one small trial alone tells little of a large one's time)."""
    print(
        f"[worker {worker}] by the trials timed so far, -P budget leaves no room for another trial; waiting for "
        "the running ones, then deciding again",
        file=sys.stderr,
        flush=True,
    )
    return True


def say_budget_end(study: optuna.Study, config: TuneConfig, worker: int, deadline: float, workers: int) -> None:
    """Say, before the confirmation, that the budget ended the search, and by how much."""
    worst, left = worst_case_seconds(study, config, workers) or 0.0, max(0.0, deadline - time.time())
    print(
        f"[worker {worker}] -P budget ends the search at {len(counted(study.trials))} trial(s): another, at worst the "
        f"space's largest configuration, then the champion's confirmation would take about {worst / 60:.0f} min, and "
        f"{left / 60:.0f} min are left",
        file=sys.stderr,
        flush=True,
    )


def say_done(study: optuna.Study, trial: optuna.trial.FrozenTrial, worker: int, n_trials: int) -> None:
    """One line per finished trial: how far it trained and how long it took, its result, the
    study's best so far, and how many of the ``n_trials`` are done."""
    epochs = len(trial.intermediate_values)
    trained = f" at epoch {epochs}" if trial.state == TrialState.PRUNED else f", {epochs} epoch{'s' * (epochs != 1)}"
    took = f" ({duration(trial.duration.total_seconds())})" if trial.duration else ""
    value = f": {OBJECTIVE_METRIC} {trial.values[0]:.4f}" if trial.values else ""
    if len(trial.values or ()) > 1:
        value += f" {cost_name(study)} {format_cost(cost_name(study), trial.values[1])}"
    best = best_value(study)
    best_text = "no complete trial yet"
    if best > -math.inf:
        best_text = f"best {best:.4f} (trial {most_accurate(complete(study)).number})"
    done = f"{len(counted(study.get_trials(deepcopy=False)))} of {n_trials} done"
    line = f"[worker {worker}] trial {trial.number} {trial.state.name}{trained}{took}{value} | {best_text} | {done}"
    print(line, file=sys.stderr, flush=True)
