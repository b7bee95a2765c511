"""The compare leaderboard: filters, sort order, top-k, markdown and CSV output."""

from __future__ import annotations

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from experiments import compare


def make_runs(client: MlflowClient):
    parent = client.create_run("0", tags={"pipeline.stage": "tune", "optuna.study_name": "s"}).info.run_id
    for number, (hidden, accuracy) in enumerate([(32, 0.91), (64, 0.97), (128, 0.95)]):
        run = client.create_run("0", run_name=f"trial-{number}", tags={
            "pipeline.stage": "trial", "optuna.study_name": "s", "mlflow.parentRunId": parent})
        client.log_param(run.info.run_id, "hidden_size", hidden)
        client.log_metric(run.info.run_id, "best_val_accuracy", accuracy)
        client.set_terminated(run.info.run_id)
    other = client.create_run("0", tags={"pipeline.stage": "trial", "optuna.study_name": "another"})
    client.log_metric(other.info.run_id, "best_val_accuracy", 0.99)
    return parent


def test_a_study_leaderboard_is_sorted_cut_and_written(tracking, tmp_path, capsys):
    parent = make_runs(MlflowClient())
    compare.main(["--study", "s", "--top-k", "2", "--output-dir", str(tmp_path / "out")])
    table = pd.read_csv(tmp_path / "out" / "leaderboard.csv")
    assert table["run"].tolist() == ["trial-1", "trial-2"]  # best first, the other study left out
    assert table["hidden_size"].tolist() == [64, 128] and table["rank"].tolist() == [1, 2]
    markdown = (tmp_path / "out" / "leaderboard.md").read_text()
    assert markdown.splitlines()[1].startswith("| --- |") and "| 0.97 |" in markdown
    assert markdown.strip() == capsys.readouterr().out.strip()

    compare.main(["--parent-run", parent, "--ascending", "--output-dir", str(tmp_path / "asc")])
    assert pd.read_csv(tmp_path / "asc" / "leaderboard.csv")["run"].tolist() == ["trial-0", "trial-2", "trial-1"]


def test_an_unknown_metric_names_the_ones_there(tracking, tmp_path, capsys):
    make_runs(MlflowClient())
    with pytest.raises(SystemExit):
        compare.main(["--sort-by", "accuracy", "--output-dir", str(tmp_path)])
    assert "no run has the metric 'accuracy'; these do: best_val_accuracy" in capsys.readouterr().err
