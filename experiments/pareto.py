"""Multi-objective studies: val_accuracy maximised together with a cost minimised (the parameter
count, or the inference latency of one image), their Pareto front as a table and a plot, and the
rule that picks a compact model, on validation only (docs/tuning.md).

A trial measures its latency while other workers train on the same cores, so in a latency study
the summary measures it again, alone, for every trial the compact rule could pick.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping

import optuna
import pandas as pd
import torch
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial
from torch import nn

from experiments import attributes
from experiments.studies import OBJECTIVE_METRIC, trial_config
from experiments.trials import complete
from pipeline.config import TuneConfig, say
from pipeline.data import SEQUENCE_SHAPES, PreparedData
from pipeline.inference import inference_latency_ms
from pipeline.model import build_model, count_parameters
from pipeline.numerics import resolve_device
from pipeline.tables import markdown_table

COMPACT = "compact"  # the alias of the model the compact rule picks, beside champion


def measure_cost(name: str, model: nn.Module, data: PreparedData, reading_order: str) -> float:
    """A trained model's cost, the same way in every trial: its parameter count (exact), or (latency_ms)
    the milliseconds it takes to classify the first validation image where it trained (a median)."""
    if name == "parameter_count":
        return count_parameters(model)
    return inference_latency_ms(model, data.val.images[:1], SEQUENCE_SHAPES[reading_order])


def cost_name(study: optuna.Study) -> str:
    """The cost a multi-objective study minimises, as its settings recorded it."""
    return (attributes.SETTINGS.read(study) or {}).get("cost", "parameter_count")


def format_cost(name: str, value: float) -> str:
    return f"{value:,.0f}" if name == "parameter_count" else f"{value:.3f}"


def on_front(values: tuple[float, float], trials: list[FrozenTrial]) -> bool:
    """Whether a result with ``values`` (accuracy, cost) is dominated by none of ``trials``."""
    accuracy, cost = values
    return not any(a >= accuracy and c <= cost and (a > accuracy or c < cost) for a, c in (t.values for t in trials))


def within_reach(trials: list[FrozenTrial], within: float) -> list[FrozenTrial]:
    """The trials whose val_accuracy is within ``within`` of the best: those the compact rule weighs."""
    best = max(t.values[0] for t in trials)
    return [t for t in trials if t.values[0] >= best - within - 1e-12]


def compact_trial(trials: list[FrozenTrial], within: float, costs: Mapping[int, float] | None = None) -> FrozenTrial:
    """The compact rule: the smallest model whose val_accuracy is within ``within`` of the best
    (0.002 = 0.2 points); among equals the more accurate, then the earlier. Its cost is the trial's
    own, or ``costs[number]`` when given (latency measured alone). It is on the front."""
    costs = {t.number: t.values[1] for t in trials} if costs is None else costs
    return min(within_reach(trials, within), key=lambda t: (costs[t.number], -t.values[0], t.number))


def compact_pick(study: optuna.Study, config: TuneConfig, data: PreparedData, parent_run_id: str) -> FrozenTrial:
    """The compact rule's pick among the study's complete trials; in a latency study, by the
    latencies measured again alone, among the trials with a model to register."""
    if cost_name(study) != "latency_ms":
        return compact_trial(complete(study), config.compact_within)  # exact costs: the pick is on the front
    device = resolve_device(config.device)
    alone = latency_alone(study, config, data, device)
    say(log_latency_alone(parent_run_id, alone, device))
    costs = dict(zip(alone["number"], alone["latency_ms_alone"], strict=True))
    return compact_trial(with_model(complete(study)), config.compact_within, costs)


def with_model(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that logged a model: those on the front when they finished (the best among them)."""
    return [t for t in trials if attributes.MODEL_URI.read(t)]


def latency_alone(study: optuna.Study, config: TuneConfig, data: PreparedData, device: torch.device) -> pd.DataFrame:
    """Latency measured again alone, for every trial the compact rule could pick and every trial on the front: 5 medians
    of 100 calls each, on a fresh model of the trial's architecture (latency depends on the shapes, not on the weights).
    One row per trial, cheapest first."""
    reach = within_reach(with_model(complete(study)), config.compact_within)
    candidates = {t.number: t for t in [*reach, *study.best_trials]}
    rows = []
    for number, trial in sorted(candidates.items()):
        train_config = trial_config(config, optuna.trial.FixedTrial(trial.params))
        model = build_model(train_config).to(device)
        measured = [measure_cost("latency_ms", model, data, train_config.reading_order) for _ in range(5)]
        alone = statistics.median(measured)
        rows.append([number, *trial.values, alone, (max(measured) - min(measured)) / alone, trial.values[1] / alone])
    columns = ["number", OBJECTIVE_METRIC, "latency_ms", "latency_ms_alone", "alone_spread", "in_trial_ratio"]
    return pd.DataFrame(rows, columns=columns).sort_values(["latency_ms_alone", "number"]).reset_index(drop=True)


def log_latency_alone(parent_run_id: str, table: pd.DataFrame, device: torch.device) -> str:
    """Record ``latency_alone``'s table on the parent run with two noise metrics; the lines to print."""
    client = MlflowClient()
    client.log_text(parent_run_id, markdown_table(table) + "\n", "latency_alone.md")
    client.log_text(parent_run_id, table.to_csv(index=False), "latency_alone.csv")
    client.log_metric(parent_run_id, "latency_alone_spread_max", float(table["alone_spread"].max()))
    client.log_metric(parent_run_id, "latency_in_trial_ratio_max", float(table["in_trial_ratio"].max()))
    where = f"{torch.get_num_threads()} CPU threads" if device.type == "cpu" else str(device)  # where it was measured
    return (
        f"latency measured again alone ({where}) for the {len(table)} trial(s) the compact rule weighs: "
        f"rounds within {table['alone_spread'].max():.0%} of each other; the trials' own values were "
        f"{table['in_trial_ratio'].min():.2f}x to {table['in_trial_ratio'].max():.2f}x these:\n{markdown_table(table)}"
    )


def front_table(study: optuna.Study) -> pd.DataFrame:
    """The Pareto front, most accurate first: trial number, both objectives, parameters."""
    cost = cost_name(study)
    front = sorted(study.best_trials, key=lambda t: (-t.values[0], t.values[1]))
    table = pd.DataFrame([{"number": t.number, OBJECTIVE_METRIC: t.values[0], cost: t.values[1], **t.params} for t in front])
    return table.astype({cost: int}) if cost == "parameter_count" else table


def front_figure(study: optuna.Study, compact: FrozenTrial) -> Figure:
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
    axes.scatter(
        [compact.values[1]], [compact.values[0]], s=120, facecolors="none", edgecolors="black", linewidths=1.5, label=COMPACT
    )
    axes.set(xscale="log", xlabel=f"{cost_name(study)} (log scale)", ylabel=OBJECTIVE_METRIC)
    axes.set_title(f"study {study.study_name}: Pareto front of {len(front)} of {len(trials)} trials")
    axes.legend(loc="lower right")
    figure.tight_layout()
    return figure
