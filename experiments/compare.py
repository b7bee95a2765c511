"""The ``compare`` entry point: a leaderboard of runs, read with ``mlflow.search_runs``.

Reads:  runs of one experiment, optionally only one study's trials or one parent run's children.
Writes: the leaderboard as markdown to stdout; with ``--output-dir``, also ``leaderboard.md`` and
        ``leaderboard.csv`` there. It opens no run (under `mlflow run`, the run that command opens
        is left out of the table).

    python -m experiments.compare --study lstm-rows --sort-by best_val_accuracy --top-k 10
"""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pandas as pd

from pipeline.config import OneLineParser, TrainConfig, fail, parse_bool
from pipeline.tables import markdown_table

PARAM_COLUMNS = [name for name in TrainConfig.__dataclass_fields__ if name not in ("seed", "device")]
METRIC_COLUMNS = ["best_val_accuracy", "val_accuracy", "test_accuracy", "test_macro_f1", "epoch_seconds"]


def filter_string(study: str = "", parent_run: str = "", stage: str = "") -> str:
    clauses = []
    if study:
        clauses.append(f"tags.`optuna.study_name` = '{study}'")
    if parent_run:
        clauses.append(f"tags.`mlflow.parentRunId` = '{parent_run}'")
    if stage:
        clauses.append(f"tags.`pipeline.stage` = '{stage}'")
    return " and ".join(clauses)


def leaderboard(runs: pd.DataFrame, sort_by: str, top_k: int, ascending: bool = False) -> pd.DataFrame:
    """One row per run: name, state, hyperparameters and metrics, best first by ``sort_by``."""
    key = f"metrics.{sort_by}"
    if key not in runs:
        metrics = sorted(c.removeprefix("metrics.") for c in runs if c.startswith("metrics."))
        raise KeyError(f"no run has the metric {sort_by!r}; these do: {', '.join(metrics) or 'none'}")
    table = runs.sort_values(key, ascending=ascending, na_position="last").head(top_k)
    columns = {"tags.mlflow.runName": "run", "run_id": "run_id", "status": "status"}
    columns |= {f"params.{name}": name for name in PARAM_COLUMNS}
    columns |= {f"metrics.{name}": name for name in dict.fromkeys([sort_by, *METRIC_COLUMNS])}
    present = {source: name for source, name in columns.items() if source in table and table[source].notna().any()}
    table = table[list(present)].rename(columns=present)
    for name in PARAM_COLUMNS:  # MLflow keeps params as strings; numbers sort and print better as numbers
        if name in table:
            try:
                table[name] = pd.to_numeric(table[name])
            except (ValueError, TypeError):
                pass
    table.insert(0, "rank", range(1, len(table) + 1))
    return table.reset_index(drop=True)


def selected_experiment(name: str):
    """The experiment to report on: ``--experiment``, else the one the user selected for the command
    (`mlflow run --experiment-name/--experiment-id` sets MLFLOW_EXPERIMENT_ID, users set
    MLFLOW_EXPERIMENT_NAME), else Default."""
    if name:
        return mlflow.get_experiment_by_name(name), name
    if experiment_id := os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return mlflow.get_experiment(experiment_id), f"id {experiment_id}"
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "Default"
    return mlflow.get_experiment_by_name(name), name


def default_stage(study: str, parent_run: str) -> str:
    """A study's leaderboard lists its trials once: not its prepare, evaluate or worker runs."""
    if study:
        return "trial"
    if parent_run and mlflow.get_run(parent_run).data.tags.get("pipeline.stage") == "tune":
        return "trial"
    return ""


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(prog="compare", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--experiment",
        default="",
        help="experiment name (default: the one selected with --experiment-name, $MLFLOW_EXPERIMENT_NAME, or Default)",
    )
    parser.add_argument("--study", default="", help="only the trials of this Optuna study")
    parser.add_argument("--parent-run", default="", help="only the child runs of this parent run id")
    parser.add_argument(
        "--stage",
        default="",
        help="only runs of this stage tag: train, trial, evaluate, ... (default: trial for a study, else any)",
    )
    parser.add_argument("--sort-by", default="best_val_accuracy", help="metric to rank by (default: best_val_accuracy)")
    parser.add_argument(
        "--ascending", type=parse_bool, nargs="?", const=True, default=False, help="lower is better, for losses (default: false)"
    )
    parser.add_argument("--top-k", type=int, default=10, help="rows to keep (default: 10)")
    parser.add_argument(
        "--output-dir", default="", help="also write leaderboard.md and leaderboard.csv there (default: print only)"
    )
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error(f"top_k={args.top_k} is not allowed: must be an integer >= 1")

    experiment, described = selected_experiment(args.experiment)
    if experiment is None:
        fail(f"no experiment {described!r} in {mlflow.get_tracking_uri()}")
    stage = args.stage or default_stage(args.study, args.parent_run)
    runs = mlflow.search_runs([experiment.experiment_id], filter_string=filter_string(args.study, args.parent_run, stage))
    if launched := os.environ.get("MLFLOW_RUN_ID"):  # the run `mlflow run` opened for this command: not a result
        runs = runs[runs["run_id"] != launched] if not runs.empty else runs
    if runs.empty:
        fail(f"no runs match in experiment {experiment.name!r}")
    try:
        table = leaderboard(runs, args.sort_by, args.top_k, args.ascending)
    except KeyError as error:
        fail(str(error.args[0]))
    markdown = markdown_table(table)
    if args.output_dir:
        output = Path(args.output_dir)
        output.mkdir(parents=True, exist_ok=True)
        (output / "leaderboard.md").write_text(markdown + "\n")
        table.to_csv(output / "leaderboard.csv", index=False)
    print(markdown)


if __name__ == "__main__":
    main()
