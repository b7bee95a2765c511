"""The ``main`` entry point: prepare -> train -> evaluate under one parent MLflow run.

Each stage runs as its own MLproject entry point through ``mlflow.run``, a child run of the parent;
stages hand over only run ids. A FINISHED stage run with the same content key (a hash of the stage,
its parameters, its input run ids and the source of ``pipeline/``, ``MLproject`` and the requirements)
is reused instead of running the stage again; the key is tagged on finished runs only, so failed,
killed or running ones never are. An interrupted train run is resumed by the train stage itself.

    mlflow run . --env-manager local -P data_dir=../shared/data -P epochs=2
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import sys
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from pipeline.config import (
    OneLineParser,
    PrepareConfig,
    TrainConfig,
    add_config_arguments,
    add_env_manager_argument,
    build_configs,
    fail,
    run_entry_point,
    say,
)
from pipeline.tables import markdown_table
from pipeline.tracking import ERROR_TAG, INTERRUPTED_TAG, RESUMED_RUN_TAG, digest, finished_run, format_param, log_params, ui_link

PROJECT_DIR = Path(__file__).resolve().parents[1]
CONTENT_KEY_TAG = "pipeline.content_key"
# Where a stage writes, not what it computes: changing it does not make a finished run stale.
OUTPUT_PARAMETERS = {"checkpoint_dir"}


def code_version() -> str:
    sha = hashlib.sha256()
    # What a stage's behaviour depends on besides its parameters and inputs.
    for path in sorted(PROJECT_DIR.glob("pipeline/*.py")) + [PROJECT_DIR / "MLproject", PROJECT_DIR / "requirements.txt"]:
        sha.update(path.relative_to(PROJECT_DIR).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return sha.hexdigest()


def content_key(stage: str, parameters: dict[str, str], code: str) -> str:
    return digest({"stage": stage, "parameters": parameters, "code": code})


class StageFailed(RuntimeError):
    """A stage run by ``run_stage`` exited with an error (which it printed itself)."""


def run_stage(stage: str, parameters: dict, parent, env_manager: str, code: str) -> str:
    """Run one entry point as a child of ``parent`` (a run), or reuse its finished twin; return its run id."""
    client = MlflowClient()
    parameters = {name: format_param(value) for name, value in parameters.items()}
    key = content_key(stage, {k: v for k, v in parameters.items() if k not in OUTPUT_PARAMETERS}, code)
    experiment_id = parent.info.experiment_id
    if reused := finished_run(experiment_id, {CONTENT_KEY_TAG: key}):
        say(f"[main] {stage}: reusing finished run {reused.info.run_id} (same parameters, inputs and code)")
        client.set_tag(parent.info.run_id, f"pipeline.{stage}_reused", "true")
        return reused.info.run_id
    say(f"[main] {stage}: starting with {parameters}")
    try:
        submitted = mlflow.run(
            str(PROJECT_DIR),
            entry_point=stage,
            parameters=parameters,
            experiment_id=experiment_id,
            env_manager=env_manager,
            run_name=stage,
            synchronous=True,
        )
    except mlflow.projects.ExecutionException as error:  # "Run (ID '<id>') failed"; MLflow ended it FAILED
        if failed := re.search(r"[0-9a-f]{32}", str(error)):
            client.set_tag(failed.group(), "mlflow.parentRunId", parent.info.run_id)
            if INTERRUPTED_TAG in client.get_run(failed.group()).data.tags:  # MLflow ended it FAILED over the stage's KILLED
                client.set_terminated(failed.group(), "KILLED")
        where = f" (run {failed.group()})" if failed else ""
        raise StageFailed(f"the {stage} stage failed{where}; its error is above") from None
    run_id = submitted.run_id
    if resumed := client.get_run(run_id).data.tags.get(RESUMED_RUN_TAG):
        client.delete_run(run_id)  # an empty shell: the stage continued its interrupted run instead
        run_id = resumed
    client.set_tag(run_id, "mlflow.parentRunId", parent.info.run_id)  # nests it under the pipeline run in the UI
    client.set_tag(run_id, CONTENT_KEY_TAG, key)  # only now that it finished
    return run_id


def stages_note(parent, stages: dict[str, str]) -> str:
    """A markdown description linking the pipeline run to its stage runs, the reused ones too:
    a reused stage stays nested under the pipeline run that made it, so this one would look empty."""
    reused = MlflowClient().get_run(parent.info.run_id).data.tags
    rows = [
        [stage, run_link(parent, run_id), "reused" if reused.get(f"pipeline.{stage}_reused") else "run here"]
        for stage, run_id in stages.items()
    ]
    return "Stages of this pipeline:\n\n" + markdown_table(rows, columns=["stage", "run", ""])


def run_link(run, run_id: str) -> str:
    """A markdown link to ``run_id`` (of ``run``'s experiment) that works in a run's description in the UI."""
    return f"[{run_id}](#/experiments/{run.info.experiment_id}/runs/{run_id})"


# What a pipeline run reports: the evaluate run's test metrics and the train run's best validation accuracy.
TEST_METRICS = ("test_accuracy", "test_macro_f1", "test_loss")
REPORTED_METRICS = (*TEST_METRICS, "best_val_accuracy")


def pipeline_parser(prog: str, description: str) -> OneLineParser:
    """The flags of ``main``, which ``repeat`` shares: every prepare and train parameter, one ``--seed``."""
    parser = OneLineParser(prog=prog, description=description)
    add_env_manager_argument(parser, "environment each stage runs in; local = this one, which `mlflow run .` already built")
    parser.add_argument(
        "--checkpoint-dir",
        default="checkpoints",
        help="the train stage's checkpoints go to <this>/<run id>/ (default: checkpoints)",
    )
    add_config_arguments(parser, PrepareConfig, TrainConfig)  # one seed for the split and the training
    return parser


def run_pipeline(
    prepare_config: PrepareConfig,
    train_config: TrainConfig,
    *,
    env_manager: str,
    checkpoint_dir: str,
    code: str,
    prepare_id: str | None = None,
    run_name: str = "pipeline",
):
    """One pipeline run (stage tag ``main``, nested under any active run): prepare -> train -> evaluate as its
    child runs; with ``prepare_id``, the data of that finished prepare run (one a caller shares) and no prepare.
    Returns the run, its stage run ids and its ``REPORTED_METRICS``; a failing stage raises ``StageFailed``
    and the pipeline run ends FAILED."""
    with mlflow.start_run(run_name=run_name, nested=mlflow.active_run() is not None) as run:
        mlflow.set_tag("pipeline.stage", "main")
        log_params({**dataclasses.asdict(prepare_config), **dataclasses.asdict(train_config)})
        try:
            if prepare_id is None:
                prepare_id = run_stage("prepare", dataclasses.asdict(prepare_config), run, env_manager, code)
            else:
                mlflow.set_tag("pipeline.prepare_reused", "true")  # made elsewhere, as a reused stage is
            train = {"data": prepare_id, "checkpoint_dir": checkpoint_dir, **dataclasses.asdict(train_config)}
            train_id = run_stage("train", train, run, env_manager, code)
            evaluate = {"model": train_id, "data": prepare_id, "device": train_config.device}
            evaluate_id = run_stage("evaluate", evaluate, run, env_manager, code)
        except StageFailed as error:
            mlflow.set_tag(ERROR_TAG, str(error))
            raise
        stages = {"prepare": prepare_id, "train": train_id, "evaluate": evaluate_id}
        mlflow.set_tags({f"pipeline.{stage}_run": run_id for stage, run_id in stages.items()})
        mlflow.set_tag("mlflow.note.content", stages_note(run, stages))  # the run's description in the UI
        client = MlflowClient()
        metrics = {name: client.get_run(evaluate_id).data.metrics[name] for name in TEST_METRICS}
        metrics["best_val_accuracy"] = client.get_run(train_id).data.metrics["best_val_accuracy"]
        mlflow.log_metrics(metrics)
    return run, stages, metrics


def python_first_on_path(env_manager: str) -> None:
    """With env_manager=local MLflow starts each stage with the shell's ``python``: make that this
    interpreter, even when its virtual environment was never activated. For entry points' main()."""
    if env_manager == "local" and os.environ.get("PATH", "").split(os.pathsep)[0] != str(Path(sys.executable).parent):
        os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")


def main(argv: list[str] | None = None) -> None:
    parser = pipeline_parser("main", __doc__.split("\n")[0])
    args, (prepare_config, train_config) = build_configs(parser, argv, PrepareConfig, TrainConfig)
    python_first_on_path(args.env_manager)
    try:
        run, stages, metrics = run_pipeline(
            prepare_config, train_config, env_manager=args.env_manager, checkpoint_dir=args.checkpoint_dir, code=code_version()
        )
    except StageFailed as error:
        fail(str(error))  # one line under the stage's own: no traceback (the run ended FAILED)
    print(
        f"\ntest_accuracy {metrics['test_accuracy']:.4f}  (test_macro_f1 {metrics['test_macro_f1']:.4f})\n"
        f"runs: pipeline {run.info.run_id}, "
        + ", ".join(f"{stage} {run_id}" for stage, run_id in stages.items())
        + f"\nsee them: {ui_link(run.info.experiment_id)}"
    )


if __name__ == "__main__":
    run_entry_point(main)
