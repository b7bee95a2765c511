"""The compare leaderboard: filters, sort order, top-k, markdown and CSV output, and the experiment it reads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from experiments import compare
from tests.conftest import REPO
from tests.test_tables import table_rows


def make_runs(client: MlflowClient, experiment_id: str = "0", accuracies=(0.91, 0.97, 0.95)) -> str:
    parent = client.create_run(experiment_id, tags={"pipeline.stage": "tune", "optuna.study_name": "s"}).info.run_id
    for number, (hidden, accuracy) in enumerate(zip([32, 64, 128], accuracies, strict=True)):
        run = client.create_run(
            experiment_id,
            run_name=f"trial-{number}",
            tags={"pipeline.stage": "trial", "optuna.study_name": "s", "mlflow.parentRunId": parent},
        )
        client.log_param(run.info.run_id, "hidden_size", hidden)
        client.log_metric(run.info.run_id, "best_val_accuracy", accuracy)
        client.set_terminated(run.info.run_id)
    evaluation = client.create_run(experiment_id, tags={"pipeline.stage": "evaluate", "mlflow.parentRunId": parent})
    client.log_metric(evaluation.info.run_id, "best_val_accuracy", 0.5)  # not a trial: never listed with them
    other = client.create_run(experiment_id, tags={"pipeline.stage": "trial", "optuna.study_name": "another"})
    client.log_metric(other.info.run_id, "best_val_accuracy", 0.99)
    return parent


def test_a_study_leaderboard_is_sorted_cut_and_written_only_where_asked(tracking, tmp_path, capsys):
    parent = make_runs(MlflowClient())
    compare.main(["--study", "s", "--top-k", "2", "--output-dir", str(tmp_path / "out")])
    table = pd.read_csv(tmp_path / "out" / "leaderboard.csv")
    assert table["run"].tolist() == ["trial-1", "trial-2"]  # best first, the other study left out
    assert table["hidden_size"].tolist() == [64, 128] and table["rank"].tolist() == [1, 2]
    markdown = (tmp_path / "out" / "leaderboard.md").read_text()
    rows = [(row["rank"], row["run"], row["best_val_accuracy"]) for row in table_rows(markdown)]
    assert rows == [("1", "trial-1", "0.97"), ("2", "trial-2", "0.95")]
    captured = capsys.readouterr()
    assert markdown.strip() == captured.out.strip()

    before = set(os.listdir(tmp_path))
    compare.main(["--parent-run", parent, "--ascending", "true"])  # a study's parent: its trials, once each
    printed = capsys.readouterr().out
    assert [row["run"] for row in table_rows(printed)] == ["trial-0", "trial-2", "trial-1"]
    assert set(os.listdir(tmp_path)) == before  # no --output-dir: no file written
    assert len(MlflowClient().search_runs(["0"])) == 6  # and no run opened


def test_an_unknown_metric_names_the_ones_there(tracking, tmp_path, capsys):
    make_runs(MlflowClient())
    with pytest.raises(SystemExit):
        compare.main(["--sort-by", "accuracy"])
    captured = capsys.readouterr()
    assert "no run has the metric 'accuracy'; these do: best_val_accuracy" in captured.err


def test_mlflow_run_compare_reads_the_experiment_the_user_selected(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    make_runs(client, "0", accuracies=(0.1, 0.2, 0.3))  # Default: another project's runs
    make_runs(client, client.create_experiment("mine"), accuracies=(0.91, 0.97, 0.95))
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": venv_bin + os.pathsep + os.environ["PATH"]}
    env.pop("MLFLOW_RUN_ID", None)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlflow",
            "run",
            str(REPO),
            "-e",
            "compare",
            "--env-manager",
            "local",
            "--experiment-name",
            "mine",
            "-P",
            "study=s",
            "-P",
            "top_k=1",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    [row] = table_rows(done.stdout[done.stdout.index("| rank") :])
    assert (row["run"], row["best_val_accuracy"]) == ("trial-1", "0.97")  # "mine", not Default
    assert not (REPO / "leaderboard.md").exists() and not (tmp_path / "leaderboard.md").exists()
