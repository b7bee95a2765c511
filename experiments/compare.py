"""The ``compare`` entry point: a leaderboard of runs, read with ``mlflow.search_runs``.

Reads:  runs of one experiment, optionally only one study's trials or one parent run's children.
        With ``--group-by-config``, runs of one configuration (every parameter but the seeds and
        the device, the precision training resolved to, and the data) make one row: each metric's
        mean ± sample std and the number of seeds.
Writes: the leaderboard as markdown to stdout; with ``--output-dir``, also ``leaderboard.md`` and
        ``leaderboard.csv`` there. It opens no run (under `mlflow run`, the run that command opens
        is left out of the table).

    python -m experiments.compare --study lstm-rows --sort-by best_val_accuracy --top-k 10
    python -m experiments.compare --group-by-config --sort-by test_accuracy
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import mlflow
import pandas as pd

from pipeline.config import SWITCH, OneLineParser, TrainConfig, add_launch_dir_argument, fail, run_entry_point, user_path
from pipeline.tables import markdown_table, over_seeds, with_spread
from pipeline.tracking import selected_experiment

PARAM_COLUMNS = [name for name in TrainConfig.__dataclass_fields__ if name not in ("seed", "device")]
METRIC_COLUMNS = ["best_val_accuracy", "val_accuracy", "test_accuracy", "test_macro_f1", "epoch_seconds"]
# A configuration, for --group-by-config: what changes a result. The training's parameters, the arithmetic
# it resolved to (precision=auto is bf16 on one machine, fp32 on another), and which data, not where it lives
# (the train split's checksum is a trial's or train run's only record of its data).
TRAINED_COLUMNS = ["resolved_precision", "data_sha256"]
CONFIG_COLUMNS = [*PARAM_COLUMNS, "dataset", "val_size", "train_limit", *TRAINED_COLUMNS]


def filter_string(study: str = "", parent_run: str = "", stage: str = "") -> str:
    tags = {"optuna.study_name": study, "mlflow.parentRunId": parent_run, "pipeline.stage": stage}
    return " and ".join(f"tags.`{tag}` = '{value}'" for tag, value in tags.items() if value)


def ranked_metrics(runs: pd.DataFrame, sort_by: str) -> list[str]:
    """``sort_by``, then the other ``METRIC_COLUMNS``; a KeyError naming the metrics there if no run has ``sort_by``."""
    if f"metrics.{sort_by}" not in runs:
        metrics = sorted(c.removeprefix("metrics.") for c in runs if c.startswith("metrics."))
        raise KeyError(f"no run has the metric {sort_by!r}; these do: {', '.join(metrics) or 'none'}")
    return list(dict.fromkeys([sort_by, *METRIC_COLUMNS]))


def leaderboard(runs: pd.DataFrame, sort_by: str, top_k: int, ascending: bool = False) -> pd.DataFrame:
    """One row per run: name, state, hyperparameters and metrics, best first by ``sort_by``."""
    metrics = ranked_metrics(runs, sort_by)
    table = runs.sort_values(f"metrics.{sort_by}", ascending=ascending, na_position="last").head(top_k)
    columns = {"tags.mlflow.runName": "run", "run_id": "run_id", "status": "status"}
    columns |= {f"params.{name}": name for name in PARAM_COLUMNS} | {f"metrics.{name}": name for name in metrics}
    table = table.reindex(columns=list(columns)).dropna(axis=1, how="all").rename(columns=columns)
    return ranked(table, PARAM_COLUMNS)


def grouped_leaderboard(runs: pd.DataFrame, sort_by: str, top_k: int, ascending: bool = False) -> pd.DataFrame:
    """One row per configuration: its parameters, ``n_seeds``, ``seeds``, and each metric's
    ``<metric>_mean`` and ``<metric>_std`` (sample std; empty for one seed), best mean first."""
    if "tags.pipeline.evaluate_run" in runs:  # pipeline runs that reused one evaluate run are one result
        evaluated = runs["tags.pipeline.evaluate_run"]
        runs = runs[evaluated.isna() | ~evaluated.duplicated()]
    metrics = ranked_metrics(runs, sort_by)
    runs = with_trained_params(runs[runs[f"metrics.{sort_by}"].notna()])  # a failed or unfinished run is no result
    config = [f"params.{name}" for name in CONFIG_COLUMNS if f"params.{name}" in runs and runs[f"params.{name}"].notna().any()]
    if not config:
        raise KeyError(f"no run has a parameter to group by (one of: {', '.join(CONFIG_COLUMNS)})")
    metrics = [name for name in metrics if runs.get(f"metrics.{name}", pd.Series()).notna().any()]
    seeds = runs["params.seed"] if "params.seed" in runs else pd.Series(None, index=runs.index, dtype=object)
    keys = [column.removeprefix("params.") for column in config]
    runs = runs.rename(columns={f"params.{key}": key for key in keys} | {f"metrics.{name}": name for name in metrics})
    runs = runs.assign(**{key: runs[key].fillna("") for key in keys}, seed=seeds.fillna(""))
    table = over_seeds(runs, keys, metrics)
    table.insert(len(keys), "n_seeds", table.pop("n_seeds"))
    listed = runs.groupby(keys, sort=False)["seed"].agg(lambda seeds: " ".join(sorted(seeds, key=seed_order)))
    table.insert(len(keys) + 1, "seeds", listed.to_numpy())
    table = table.sort_values(f"{sort_by}_mean", ascending=ascending, na_position="last").head(top_k)
    return ranked(table, keys)


def seed_order(seed: str) -> tuple[bool, int]:
    """Seeds as numbers, in order; anything else after them."""
    return (not seed.isdigit(), int(seed) if seed.isdigit() else 0)


def with_trained_params(runs: pd.DataFrame) -> pd.DataFrame:
    """``TRAINED_COLUMNS`` for every run: a pipeline run (stage main) logs the parameters it was
    given, and its train run what training resolved; a checksum is cut to 12 characters."""
    if ids := runs.get("tags.pipeline.train_run", pd.Series()).dropna().unique().tolist():
        trains = mlflow.search_runs(
            runs["experiment_id"].unique().tolist(), filter_string=f"attributes.run_id IN ({', '.join(map(repr, ids))})"
        ).set_index("run_id")
        for name in TRAINED_COLUMNS:
            if f"params.{name}" in trains:
                found = runs["tags.pipeline.train_run"].map(trains[f"params.{name}"])
                runs = runs.assign(**{f"params.{name}": runs.get(f"params.{name}", found).fillna(found)})
    if "params.data_sha256" in runs:
        runs = runs.assign(**{"params.data_sha256": runs["params.data_sha256"].str[:12]})
    return runs


def ranked(table: pd.DataFrame, params) -> pd.DataFrame:
    """``table`` numbered from 1, its ``params`` as numbers where they are: MLflow keeps params as strings."""
    for name in table.columns.intersection(params):
        with contextlib.suppress(ValueError, TypeError):
            table[name] = pd.to_numeric(table[name])
    table.insert(0, "rank", range(1, len(table) + 1))
    return table.reset_index(drop=True)


def default_stage(study: str, parent_run: str, group_by_config: bool = False) -> str:
    """A study's leaderboard lists its trials once: not its prepare, evaluate or worker runs. A
    repeat's, and a grouping by configuration, its pipeline runs (one per seed, with test metrics)."""
    if study:
        return "trial"
    if parent_run:
        return {"tune": "trial", "repeat": "main"}.get(mlflow.get_run(parent_run).data.tags.get("pipeline.stage"), "")
    return "main" if group_by_config else ""


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
        help="only runs of this stage tag: train, trial, main, ... (default: trial for a study, main for a repeat "
        "or with --group-by-config, else any)",
    )
    parser.add_argument("--sort-by", default="best_val_accuracy", help="metric to rank by (default: best_val_accuracy)")
    parser.add_argument("--ascending", **SWITCH, help="lower is better, for losses (default: false)")
    parser.add_argument("--top-k", type=int, default=10, help="rows to keep (default: 10)")
    parser.add_argument(
        "--group-by-config",
        **SWITCH,
        help="one row per configuration (all parameters but seed and device, the resolved precision, the data): "
        "mean ± sample std of each metric over its runs, and their number n_seeds; sorted by the mean (default: false)",
    )
    parser.add_argument(
        "--output-dir", default="", help="also write leaderboard.md and leaderboard.csv there (default: print only)"
    )
    add_launch_dir_argument(parser)
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error(f"top_k={args.top_k} is not allowed: must be an integer >= 1")

    experiment, described = selected_experiment(args.experiment)
    if experiment is None:
        fail(f"no experiment {described!r} in {mlflow.get_tracking_uri()}")
    stage = args.stage or default_stage(args.study, args.parent_run, args.group_by_config)
    runs = mlflow.search_runs([experiment.experiment_id], filter_string=filter_string(args.study, args.parent_run, stage))
    if launched := os.environ.get("MLFLOW_RUN_ID"):  # the run `mlflow run` opened for this command: not a result
        runs = runs[runs["run_id"] != launched] if not runs.empty else runs
    if runs.empty:
        fail(f"no runs match in experiment {experiment.name!r}")
    try:
        board = grouped_leaderboard if args.group_by_config else leaderboard
        table = board(runs, args.sort_by, args.top_k, args.ascending)
    except KeyError as error:
        fail(str(error.args[0]))
    markdown = markdown_table(with_spread(table) if args.group_by_config else table)
    if args.output_dir:
        output = Path(user_path(args.output_dir, args.launch_dir))
        output.mkdir(parents=True, exist_ok=True)
        (output / "leaderboard.md").write_text(markdown + "\n")
        table.to_csv(output / "leaderboard.csv", index=False)
    print(markdown)


if __name__ == "__main__":
    run_entry_point(main)
