"""What a study leaves behind once no trial runs: a leaderboard and plots on its parent run, its
champion candidate (the best mean val_accuracy over seeds, or with ``confirm_top=0`` the best trial's
own model) registered, and in a multi-objective study its Pareto front and compact pick (docs/tuning.md).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import optuna
import pandas as pd
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial

from experiments import attributes
from experiments.confirm import champion_run, confirmation_table, log_confirmation, seed_runs, test_seed_models
from experiments.job import WorkerJob
from experiments.pareto import COMPACT, compact_pick, cost_name, front_figure, front_table
from experiments.plots import log_study_plots
from experiments.registry import Pick, Registered, register_best, register_compact, test_once, trial_pick
from experiments.studies import OBJECTIVE_METRIC
from experiments.trials import complete, counted, most_accurate, n_counted
from pipeline.config import say
from pipeline.data import PreparedData
from pipeline.tables import markdown_table, plus_minus
from pipeline.tracking import set_tags, ui_link


def summarise(study: optuna.Study, queue: optuna.Study, job: WorkerJob, data: PreparedData) -> Registered | None:
    """Log the leaderboard and plots to the parent run, choose among the configurations confirmed
    from the ``queue`` and register the champion candidate (and the compact rule's pick), as the
    worker that took the queue's summary item."""
    client, config, parent_run_id = MlflowClient(), job.config, job.parent_run_id
    trials = counted(study.get_trials(deepcopy=False))
    compact = compact_pick(study, config, data, parent_run_id) if len(study.directions) > 1 and complete(study) else None
    log_tables_and_plots(study, parent_run_id, compact)
    states = pd.Series([trial.state.name for trial in trials]).value_counts()
    for state in ("COMPLETE", "PRUNED", "FAIL"):
        client.log_metric(parent_run_id, f"n_{state.lower()}_trials", int(states.get(state, 0)), step=len(trials))
    registered = None
    if states.get("COMPLETE", 0):
        best = most_accurate(complete(study))
        client.log_metric(parent_run_id, f"best_{OBJECTIVE_METRIC}", best.values[0], step=len(trials))
        set_tags(parent_run_id, {f"best.{name}": value for name, value in {"trial_number": best.number, **best.params}.items()})
        runs = seed_runs(queue, job) if config.confirm_top else []
        pick = confirmed_pick(study, runs, job, step=len(trials)) if len(runs) else trial_pick(best)
        registered = register_best(study, pick, job, data)
        if registered and pick.seed_models:  # the configuration's test accuracy, not one seed's
            say(test_seed_models(job, pick.seed_models, registered, lambda uri: test_once(uri, job, data)))
    if compact is not None:
        rule = f"smallest {cost_name(study)} within {config.compact_within} of the best {OBJECTIVE_METRIC}"
        set_tags(parent_run_id, {"compact.trial_number": compact.number, "compact.rule": rule})
        register_compact(study, compact, registered, job, data)
    client.set_terminated(parent_run_id, "FINISHED")
    attributes.SUMMARISED_AT.write(study, len(trials))  # last: a summary that failed halfway is redone
    return registered


def log_tables_and_plots(study: optuna.Study, parent_run_id: str, compact: FrozenTrial | None) -> None:
    """The leaderboard (CSV, HTML), Optuna's plots, and with ``compact`` the Pareto front."""
    client, board = MlflowClient(), trials_table(study)
    client.log_text(parent_run_id, board.to_csv(index=False), "leaderboard.csv")
    client.log_text(parent_run_id, board.to_html(index=False, float_format="{:.4f}".format, na_rep=""), "leaderboard.html")
    with tempfile.TemporaryDirectory() as tmp:
        log_study_plots(study, Path(tmp))
        client.log_artifacts(parent_run_id, tmp, "plots")
    if compact is not None:
        front = front_table(study)
        client.log_text(parent_run_id, front.to_csv(index=False), "pareto_front.csv")
        client.log_text(parent_run_id, markdown_table(front) + "\n", "pareto_front.md")
        client.log_figure(parent_run_id, front_figure(study, compact), "plots/pareto_front.png", save_kwargs={"dpi": 110})


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """Every trial, best first: number, val_accuracy, state, parameters, seconds, attributes."""
    trials = study.trials_dataframe(attrs=("number", "value", "state", "params", "duration", "user_attrs"))
    trials = trials.rename(columns={"value": OBJECTIVE_METRIC, "values_0": OBJECTIVE_METRIC, "values_1": cost_name(study)})
    trials["duration"] = trials["duration"].dt.total_seconds().round(1)
    return trials.sort_values(OBJECTIVE_METRIC, ascending=False, na_position="last")


def confirmed_pick(study: optuna.Study, runs: pd.DataFrame, job: WorkerJob, step: int) -> Pick:
    """The champion configuration's best seed run, with its configuration's mean and std over seeds."""
    config, table = job.config, confirmation_table(study, runs)
    markdown = log_confirmation(job.parent_run_id, table, config.confirm_seeds, step=step)
    chosen, best = champion_run(runs, table), table.iloc[0]
    seed_models = tuple((int(r.seed), r.model_uri) for r in runs[runs["trial"] == chosen.trial].sort_values("seed").itertuples())
    say(f"confirmed over seeds 1 to {config.confirm_seeds}, best mean {OBJECTIVE_METRIC} first:\n{markdown}")
    std = None if pd.isna(best["val_accuracy_std"]) else float(best["val_accuracy_std"])
    mean, n_seeds = float(best["val_accuracy_mean"]), int(best["n_seeds"])
    trial = study.trials[chosen.trial]
    return Pick(trial, chosen.run_id, chosen.model_uri, chosen.val_accuracy, chosen.seed, mean, std, n_seeds, seed_models)


def report(study: optuna.Study, registered: Registered | None, experiment_id: str, top: int = 5) -> str:
    """The lines a person reads at the end: the best trials as a table, the champion, and where to look."""
    board = trials_table(study)
    params = [c for c in board.columns if c.startswith("params_")]
    columns = ["number", OBJECTIVE_METRIC, cost_name(study), "state", *params, "duration"]
    table = board[[c for c in columns if c in board]].head(top).rename(columns=lambda c: c.removeprefix("params_"))
    lines = [
        f"study {study.study_name}: {n_counted(study)} trials counted; best {top}:",
        table.to_string(index=False, float_format=lambda v: f"{v:.4g}"),
    ]
    if registered:
        why_not = registered.why_not_champion or "a better one holds it"
        role = "the champion" if registered.champion else f"not the champion: {why_not}"
        origin = f"trial {registered.trial}"
        if registered.seed is not None:
            mean = plus_minus(registered.val_accuracy_mean, registered.val_accuracy_std)
            origin += f"'s configuration, seed {registered.seed} (mean {OBJECTIVE_METRIC} {mean} over {registered.n_seeds} seeds)"
        lines.append(
            f"registered {registered.name} version {registered.version} from {origin}: "
            f"{OBJECTIVE_METRIC} {registered.val_accuracy:.4f}, test_accuracy {registered.test_accuracy:.4f}; {role}"
        )
    if compact := attributes.COMPACT_PICK.read(study):
        lines.append(
            f"alias {COMPACT}: {compact['name']} version {compact['version']} from trial {compact['trial']}: "
            f"{OBJECTIVE_METRIC} {compact['val_accuracy']:.4f}, test_accuracy {compact['test_accuracy']:.4f}"
        )
    lines.append(f"see the trials: {ui_link(experiment_id)}")
    return "\n".join(lines)
