"""Warm starts (docs/tuning.md): a new study begins from the ``k`` best configurations of an earlier
study in the same storage, cut to its search space so that none leaves the space it is compared in.
"""

from __future__ import annotations

from dataclasses import dataclass

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution

from experiments import attributes
from experiments.studies import StudyDefinition
from experiments.trials import best_first, complete
from pipeline.config import ParameterError


@dataclass(frozen=True)
class WarmStart:
    """What a new study carries from an earlier one."""

    study: str  # the earlier study's name
    trials: list[int]  # its trial numbers, best first, one per enqueued configuration
    configurations: list[dict]  # the parameters enqueued, cut to the new search space
    left_out: list[str]  # 'trial N: name=value' for each parameter not carried


def contains(distribution: BaseDistribution, value) -> bool:
    if isinstance(distribution, CategoricalDistribution):
        return value in distribution.choices
    return distribution.low <= value <= distribution.high  # IntDistribution, FloatDistribution


def warm_start(storage: optuna.storages.BaseStorage, source: str, k: int, definition: StudyDefinition) -> WarmStart:
    """The best ``k`` configurations of study ``source``, cut to ``definition``'s space; a missing
    study, or one without complete trials, is refused in one line."""
    if source not in optuna.study.get_all_study_names(storage):
        raise ParameterError(f"warm_start={source!r}: no study of that name in this storage")
    earlier = optuna.load_study(study_name=source, storage=storage)
    if not (finished := complete(earlier)):
        raise ParameterError(f"warm_start={source!r}: that study has no complete trial to start from")
    space = definition.space
    baseline = {name: value for name, value in definition.baseline.items() if name in space}
    trials, configurations, left_out = [], [], []
    for trial in best_first(finished):
        carried = {name: value for name, value in trial.params.items() if name in space and contains(space[name], value)}
        if carried and carried != baseline and carried not in configurations:  # trial 0 runs the baseline anyway
            trials.append(trial.number)
            configurations.append(carried)
            left_out += [f"trial {trial.number}: {name}={value}" for name, value in trial.params.items() if name not in carried]
        if len(configurations) == k:
            break
    return WarmStart(source, trials, configurations, left_out)


def enqueue(study: optuna.Study, start: WarmStart) -> None:
    """Enqueue the carried configurations and record where they came from (call once, at creation)."""
    for params in start.configurations:
        study.enqueue_trial(params)
    attributes.WARM_START.write(study, {"study": start.study, "trials": start.trials})
