"""Which trials of a study count toward ``n_trials``, and which are best. A re-queued copy
(experiments/coordination.py) replaces its failed original in the count, and repeats its
parameters, so a ranking of configurations keeps each one once.
"""

from __future__ import annotations

import math

import optuna
from optuna.trial import FrozenTrial, TrialState

from experiments import attributes


def requeued_numbers(trials: list[FrozenTrial]) -> set[int]:
    """The failed trials that a re-queued copy replaces: they do not count."""
    return set(map(attributes.RETRY_OF.read, trials)) - {None}


def counted(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The finished trials (COMPLETE, PRUNED, and FAIL from the objective) that count toward ``n_trials``."""
    replaced = requeued_numbers(trials)
    return [trial for trial in trials if trial.state.is_finished() and trial.number not in replaced]


def n_counted(study: optuna.Study) -> int:
    """How many trials count now: the round that a summary and the champion's confirmation are for."""
    return len(counted(study.get_trials(deepcopy=False)))


def trials_left(study: optuna.Study, n_trials: int) -> int:
    """Trials still to start: ``n_trials`` less those counted and those running."""
    trials = study.get_trials(deepcopy=False)
    return max(0, n_trials - len(counted(trials)) - sum(t.state == TrialState.RUNNING for t in trials))


def needs_summary(study: optuna.Study) -> bool:
    """Whether the counted trials changed since the last successful summary."""
    return attributes.SUMMARISED_AT.read(study) != n_counted(study)


def complete(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def best_first(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """Complete ``trials`` by the champion's rule: the best val_accuracy (every study's first objective);
    among equals the cheaper (a multi-objective study's cost), then the earlier."""
    return sorted(trials, key=lambda t: (-t.values[0], t.values[-1] if len(t.values) > 1 else 0, t.number))


def most_accurate(trials: list[FrozenTrial]) -> FrozenTrial:
    return best_first(trials)[0]


def best_value(study: optuna.Study) -> float:
    """The best val_accuracy of the study's complete trials; -inf before any."""
    return max((trial.values[0] for trial in complete(study)), default=-math.inf)


def best_configurations(study: optuna.Study, top: int) -> list[FrozenTrial]:
    """The ``top`` best complete trials, one per configuration."""
    picked: list[FrozenTrial] = []
    for trial in best_first(complete(study)):
        if all(trial.params != other.params for other in picked):
            picked.append(trial)
    return picked[:top]
