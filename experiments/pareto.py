"""Multi-objective studies: val_accuracy maximised together with a cost minimised (the parameter
count, or the inference latency of one image), their Pareto front as a table and a plot, and the
rule that picks a compact model.

A trial is on the front when no other complete trial is at least as accurate and at most as
costly, and strictly better in one of the two. Selection reads validation only.
"""

from __future__ import annotations

import optuna
import pandas as pd
from matplotlib.figure import Figure
from optuna.trial import FrozenTrial, TrialState
from torch import nn

from experiments import attributes
from experiments.studies import OBJECTIVE_METRIC
from pipeline.data import SEQUENCE_SHAPES, PreparedData
from pipeline.inference import inference_latency_ms
from pipeline.model import count_parameters

COSTS = ("parameter_count", "latency_ms")  # the second objectives a study can minimise (-P cost)
COMPACT = "compact"  # the alias of the model the compact rule picks, beside champion


def measure_cost(name: str, model: nn.Module, data: PreparedData, reading_order: str) -> float:
    """A trained model's cost, the same way in every trial: its parameter count (exact), or the
    milliseconds it takes to classify the first validation image where it trained (a median)."""
    if name == "parameter_count":
        return count_parameters(model)
    if name == "latency_ms":
        return inference_latency_ms(model, data.val.images[:1], SEQUENCE_SHAPES[reading_order])
    raise ValueError(f"unknown cost {name!r}; one of {', '.join(COSTS)}")


def cost_name(study: optuna.Study) -> str:
    """The cost a multi-objective study minimises, as its settings recorded it."""
    return (attributes.settings(study) or {}).get("cost", "parameter_count")


def format_cost(name: str, value: float) -> str:
    return f"{value:,.0f}" if name == "parameter_count" else f"{value:.3f}"


def complete(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def dominates(a: FrozenTrial, b: FrozenTrial) -> bool:
    """``a`` is at least as accurate and as cheap as ``b``, and better in one."""
    (accuracy_a, cost_a), (accuracy_b, cost_b) = a.values, b.values
    return accuracy_a >= accuracy_b and cost_a <= cost_b and (accuracy_a > accuracy_b or cost_a < cost_b)


def on_front(values: tuple[float, float], trials: list[FrozenTrial]) -> bool:
    """Whether a result with ``values`` (accuracy, cost) is dominated by none of ``trials``."""
    candidate = optuna.trial.create_trial(values=list(values))
    return not any(dominates(trial, candidate) for trial in trials)


def most_accurate(trials: list[FrozenTrial]) -> FrozenTrial:
    """The champion's rule: the best val_accuracy; among equals the cheaper, then the earlier."""
    return min(trials, key=lambda t: (-t.values[0], t.values[-1] if len(t.values) > 1 else 0, t.number))


def compact_trial(trials: list[FrozenTrial], within: float) -> FrozenTrial:
    """The compact rule: the smallest model whose val_accuracy is within ``within`` of the best
    (0.002 = 0.2 points); among equals the more accurate, then the earlier. It is on the front."""
    best = max(t.values[0] for t in trials)
    eligible = [t for t in trials if t.values[0] >= best - within - 1e-12]
    return min(eligible, key=lambda t: (t.values[1], -t.values[0], t.number))


def front_table(study: optuna.Study) -> pd.DataFrame:
    """The Pareto front, most accurate first: trial number, both objectives, parameters."""
    cost = cost_name(study)
    rows = [
        {
            "number": t.number,
            OBJECTIVE_METRIC: t.values[0],
            cost: int(t.values[1]) if cost == "parameter_count" else t.values[1],
            **t.params,
        }
        for t in sorted(study.best_trials, key=lambda t: (-t.values[0], t.values[1]))
    ]
    return pd.DataFrame(rows)


def front_figure(study: optuna.Study, compact: FrozenTrial | None = None) -> Figure:
    """Every complete trial as a point (cost, val_accuracy); the front as a staircase."""
    figure = Figure(figsize=(6.4, 4.2))
    axes = figure.add_subplot()
    trials = complete(study)
    axes.scatter([t.values[1] for t in trials], [t.values[0] for t in trials], s=18, color="0.6", label="trial")
    front = sorted(study.best_trials, key=lambda t: t.values[1])
    axes.step([t.values[1] for t in front], [t.values[0] for t in front], where="post", color="C0")
    axes.scatter([t.values[1] for t in front], [t.values[0] for t in front], s=30, color="C0", label="Pareto front")
    for t in front:
        axes.annotate(str(t.number), (t.values[1], t.values[0]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if compact is not None:
        axes.scatter(
            [compact.values[1]], [compact.values[0]], s=120, facecolors="none", edgecolors="black", linewidths=1.5, label=COMPACT
        )
    axes.set_xscale("log")
    axes.set_xlabel(f"{cost_name(study)} (log scale)")
    axes.set_ylabel(OBJECTIVE_METRIC)
    axes.set_title(f"study {study.study_name}: Pareto front of {len(front)} of {len(trials)} trials")
    axes.legend(loc="lower right")
    figure.tight_layout()
    return figure
