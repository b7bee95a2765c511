"""The ``repeat`` entry point: the whole pipeline once per training seed, under one parent run.

A seed varies the training alone (weights, shuffling, dropout): the split is prepared once, with
``--seed``, and shared, so every seed trains and is evaluated on the same images. Each seed is a
pipeline run (``pipeline.main``'s, stage tag ``main``, run name ``seed-<s>``) nested under the
repeat run, beside the shared prepare run. Finished stages are reused as ``main`` reuses them,
so a rerun after a failure, or with one more seed, runs only what is new.

Reads:  the prepare and train parameters of ``main``, and ``--seeds``.
Writes: the repeat run (stage tag ``repeat``): the configuration's params, ``seeds``, and per test
        metric ``<metric>_mean``, ``_std`` (sample standard deviation, from 2 seeds), ``_min`` and
        ``_max``; ``repeat.md`` and ``repeat.html`` (one row per seed, then the summary), which
        is also the run's description in the UI.

    mlflow run . -e repeat --env-manager local -P seeds="1 2 3" -P data_dir=../shared/data
"""

from __future__ import annotations

import dataclasses
import re

import mlflow
import pandas as pd

from pipeline.config import ParameterError, PrepareConfig, TrainConfig, build_configs, fail, run_entry_point
from pipeline.main import (
    REPORTED_METRICS,
    StageFailed,
    code_version,
    pipeline_parser,
    python_first_on_path,
    run_link,
    run_pipeline,
    run_stage,
)
from pipeline.tables import markdown_table, plus_minus
from pipeline.tracking import ERROR_TAG, log_params, ui_link

DEFAULT_SEEDS = "1 2 3"


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"1 2 3"`` or ``"1,2,3"`` as (1, 2, 3); anything else raises ParameterError naming what is wrong."""
    words = [word for word in re.split(r"[\s,]+", text.strip()) if word]
    accepts = "integers >= 0 separated by spaces or commas, e.g. '1 2 3'"
    if not words:
        raise ParameterError(f"seeds={text!r} is not allowed: must be {accepts}")
    if bad := [word for word in words if not word.isdigit()]:
        raise ParameterError(f"seeds={text!r} is not allowed: {bad[0]!r} is not an integer >= 0; must be {accepts}")
    seeds = tuple(int(word) for word in words)
    if repeated := sorted({seed for seed in seeds if seeds.count(seed) > 1}):
        raise ParameterError(f"seeds={text!r} is not allowed: {', '.join(map(str, repeated))} given twice; each seed once")
    return seeds


def seed_statistics(per_seed: dict[int, dict[str, float]]) -> dict[str, float]:
    """Mean, sample std (needs two seeds), min and max of each metric, as ``<metric>_mean`` and so on."""
    table = pd.DataFrame.from_dict(per_seed, orient="index")[list(REPORTED_METRICS)]
    statistics = table.agg(["mean", "std", "min", "max"]).unstack()  # (metric, statistic); std is NaN for one seed
    return {f"{name}_{row}": float(value) for (name, row), value in statistics.items() if pd.notna(value)}


def repeat_table(per_seed: dict[int, dict[str, float]], runs: dict[int, str], summary: dict[str, float]) -> pd.DataFrame:
    """One row per seed (with its pipeline run), then mean, std, min and max."""
    rows = [{"seed": seed, **metrics, "run": runs[seed]} for seed, metrics in per_seed.items()]
    for statistic in ("mean", "std", "min", "max"):
        rows.append({"seed": statistic, **{name: summary.get(f"{name}_{statistic}") for name in REPORTED_METRICS}})
    return pd.DataFrame(rows, columns=["seed", *REPORTED_METRICS, "run"])


def one_line(summary: dict[str, float], seeds: tuple[int, ...]) -> str:
    accuracy = plus_minus(summary["test_accuracy_mean"], summary.get("test_accuracy_std"))
    return (
        f"test_accuracy {accuracy} (mean ± sample std over {len(seeds)} seeds; "
        f"min {summary['test_accuracy_min']:.4f}, max {summary['test_accuracy_max']:.4f})"
    )


def run_repeat(
    prepare_config: PrepareConfig, train_config: TrainConfig, seeds: tuple[int, ...], *, env_manager: str, checkpoint_dir: str
):
    """The repeat run: prepare once, then one pipeline run per seed. Returns the run, the summary
    and the table of ``repeat_table``; a failing stage raises ``StageFailed``."""
    configs = {seed: dataclasses.replace(train_config, seed=seed) for seed in seeds}  # each one validated
    code = code_version()
    with mlflow.start_run(run_name="repeat") as parent:
        mlflow.set_tag("pipeline.stage", "repeat")
        config = {**dataclasses.asdict(train_config), **dataclasses.asdict(prepare_config)}  # seed: the split's
        log_params({**config, "seeds": " ".join(map(str, seeds))})
        per_seed, runs = {}, {}
        try:
            prepare_id = run_stage("prepare", dataclasses.asdict(prepare_config), parent, env_manager, code)
            mlflow.set_tag("pipeline.prepare_run", prepare_id)
            shared = {"env_manager": env_manager, "checkpoint_dir": checkpoint_dir, "code": code, "prepare_id": prepare_id}
            for seed, seed_config in configs.items():
                run, _, metrics = run_pipeline(prepare_config, seed_config, run_name=f"seed-{seed}", **shared)
                per_seed[seed], runs[seed] = metrics, run.info.run_id
                print(f"[repeat] seed {seed}: test_accuracy {metrics['test_accuracy']:.4f} (run {runs[seed]})", flush=True)
        except StageFailed as error:
            mlflow.set_tag(ERROR_TAG, str(error))
            raise
        summary = seed_statistics(per_seed)
        mlflow.log_metrics(summary)
        table = repeat_table(per_seed, runs, summary)
        mlflow.log_text(markdown_table(table) + "\n", "repeat.md")
        mlflow.log_text(table.to_html(index=False, na_rep="", float_format="{:.4f}".format), "repeat.html")
        linked = table.assign(run=[run_link(parent, r) if r else r for r in table["run"].fillna("")])
        mlflow.set_tag("mlflow.note.content", f"{one_line(summary, seeds)}\n\n{markdown_table(linked)}")
    return parent, summary, table


def main(argv: list[str] | None = None) -> None:
    parser = pipeline_parser("repeat", __doc__.split("\n")[0])
    parser.add_argument(
        "--seeds",
        default=DEFAULT_SEEDS,
        help=f"training seeds, one pipeline run each, separated by spaces or commas (default: {DEFAULT_SEEDS})",
    )
    args, (prepare_config, train_config) = build_configs(parser, argv, PrepareConfig, TrainConfig)
    try:
        seeds = parse_seeds(args.seeds)
    except ParameterError as error:
        parser.error(str(error))
    python_first_on_path(args.env_manager)  # its stages start with the shell's `python`, as main's do
    try:
        parent, summary, table = run_repeat(
            prepare_config, train_config, seeds, env_manager=args.env_manager, checkpoint_dir=args.checkpoint_dir
        )
    except StageFailed as error:
        fail(f"{error}; rerun the same command: finished seeds are reused")
    print(
        f"\n{one_line(summary, seeds)}\n\n{markdown_table(table)}\n\n"
        f"repeat run {parent.info.run_id}; see it: {ui_link(parent.info.experiment_id)}"
    )


if __name__ == "__main__":
    run_entry_point(main)
