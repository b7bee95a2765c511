"""The compare leaderboard: filters, sort order, top-k, markdown and CSV output, and the experiment it reads."""

from __future__ import annotations

import os
import statistics

import mlflow
import pandas as pd
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from experiments import compare
from pipeline.tracking import current_experiment_id, selected_experiment
from tests.conftest import REPO, mlflow_run, user_environment
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


def test_mlflow_run_compare_reads_the_experiment_the_user_selected(tmp_path, store_uri):
    uri = store_uri
    client = MlflowClient(uri)
    make_runs(client, "0", accuracies=(0.1, 0.2, 0.3))  # Default: another project's runs
    make_runs(client, client.create_experiment("mine"), accuracies=(0.91, 0.97, 0.95))
    env = user_environment(uri)
    args = ("-e", "compare", "--experiment-name", "mine", "-P", "study=s", "-P", "top_k=1", "-P", "output_dir=boards")
    done = mlflow_run(*args, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    [row] = table_rows(done.stdout[done.stdout.index("| rank") :])
    assert (row["run"], row["best_val_accuracy"]) == ("trial-1", "0.97")  # "mine", not Default
    # A relative output_dir is the user's folder's, not the project's, where mlflow run starts compare.
    [written] = table_rows((tmp_path / "boards" / "leaderboard.md").read_text())
    assert written == row
    assert not (REPO / "boards").exists()


def logged_run(client: MlflowClient, stage: str, params: dict, test_accuracy: float, **tags: str) -> None:
    run = client.create_run("0", tags={"pipeline.stage": stage, **tags})
    client.log_batch(
        run.info.run_id,
        metrics=[Metric("test_accuracy", test_accuracy, 0, 0)],
        params=[Param(name, str(value)) for name, value in params.items()],
    )
    client.set_terminated(run.info.run_id)


def test_the_selected_experiment_is_the_one_mlflow_start_run_writes_to(tracking, monkeypatch):
    """compare reads, and a study's parent run is created in, the experiment MLflow's own runs go to."""
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "not-yet")
    experiment, named = selected_experiment()
    assert (experiment, named) == (None, "not-yet")  # compare: "no experiment 'not-yet'"
    created = current_experiment_id()  # a study's parent run: created, as mlflow.start_run creates it
    with mlflow.start_run() as run:
        assert run.info.experiment_id == created == selected_experiment()[0].experiment_id
    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)  # under `mlflow run`: the experiment of the run it opened
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "another")
    assert selected_experiment()[0].experiment_id == current_experiment_id() == created
    assert selected_experiment("Default")[0].experiment_id == "0"  # --experiment wins


def test_group_by_config_gives_mean_and_sample_std_over_seeds_once_per_result(tracking, tmp_path, capsys):
    client = MlflowClient()
    accuracies = {(32, 1): 0.90, (32, 2): 0.92, (32, 3): 0.97, (64, 1): 0.95, (64, 2): 0.96, (128, 1): 0.5}
    for (hidden, seed), accuracy in accuracies.items():
        params = {"hidden_size": hidden, "seed": seed, "dataset": "mnist", "device": "cpu"}
        logged_run(client, "main", params, accuracy, **{"pipeline.evaluate_run": f"eval-{hidden}-{seed}"})
    again = {"hidden_size": 64, "seed": 1, "dataset": "mnist", "device": "cpu"}  # a rerun that reused every stage
    logged_run(client, "main", again, 0.95, **{"pipeline.evaluate_run": "eval-64-1"})
    logged_run(client, "train", {"hidden_size": 64, "seed": 9}, 0.1)  # not a pipeline run: left out
    failed = client.create_run("0", tags={"pipeline.stage": "main"})  # no test metric: no result
    client.log_batch(failed.info.run_id, params=[Param("hidden_size", "32"), Param("seed", "4")])
    client.set_terminated(failed.info.run_id, "FAILED")

    compare.main(["--group-by-config", "--sort-by", "test_accuracy", "--top-k", "2", "--output-dir", str(tmp_path / "out")])
    table = pd.read_csv(tmp_path / "out" / "leaderboard.csv")
    assert table["hidden_size"].tolist() == [64, 32]  # by the mean; 128 cut by --top-k
    assert table["n_seeds"].tolist() == [2, 3] and table["seeds"].tolist() == ["1 2", "1 2 3"]
    assert table["test_accuracy_mean"].tolist() == pytest.approx([0.955, statistics.mean([0.90, 0.92, 0.97])])
    assert table["test_accuracy_std"].tolist() == pytest.approx(
        [statistics.stdev([0.95, 0.96]), statistics.stdev([0.90, 0.92, 0.97])]
    )
    rows = table_rows((tmp_path / "out" / "leaderboard.md").read_text())
    assert [(row["hidden_size"], row["n_seeds"], row["test_accuracy"]) for row in rows] == [
        ("64", "2", "0.9550 ± 0.0071"),
        ("32", "3", "0.9300 ± 0.0361"),
    ]
    assert "device" not in rows[0] and "seed" not in rows[0]
    capsys.readouterr()

    compare.main(["--group-by-config", "true", "--sort-by", "test_accuracy"])  # one seed: a mean and no spread
    printed = {row["hidden_size"]: row for row in table_rows(capsys.readouterr().out)}
    assert printed["128"]["test_accuracy"] == "0.5000" and printed["128"]["n_seeds"] == "1"


def test_group_by_config_keeps_apart_what_changes_the_result_precision_and_data(tracking, tmp_path, capsys):
    """precision=auto is bf16 on one machine and fp32 on another, and a trial's only record of its
    data is the train split's checksum: runs that differ there are other configurations."""
    client = MlflowClient()
    trained = {  # train run -> what training resolved
        "t1": ("bf16", "a" * 64),
        "t2": ("bf16", "a" * 64),
        "t3": ("fp32", "a" * 64),
        "t4": ("bf16", "b" * 64),  # another dataset
    }
    ids = {}
    for name, (precision, sha256) in trained.items():
        run = client.create_run("0", run_name=name, tags={"pipeline.stage": "train"})
        client.log_batch(run.info.run_id, params=[Param("resolved_precision", precision), Param("data_sha256", sha256)])
        ids[name] = run.info.run_id
    for seed, (name, accuracy) in enumerate([("t1", 0.99), ("t2", 0.97), ("t3", 0.90), ("t4", 0.80)], start=1):
        params = {"hidden_size": 64, "seed": seed, "precision": "auto"}  # what a pipeline run logs: as asked
        logged_run(client, "main", params, accuracy, **{"pipeline.train_run": ids[name]})

    compare.main(["--group-by-config", "--sort-by", "test_accuracy", "--output-dir", str(tmp_path / "out")])
    table = pd.read_csv(tmp_path / "out" / "leaderboard.csv")
    rows = [(r.resolved_precision, r.data_sha256, r.n_seeds, round(r.test_accuracy_mean, 4)) for r in table.itertuples()]
    assert rows == [("bf16", "a" * 12, 2, 0.98), ("fp32", "a" * 12, 1, 0.9), ("bf16", "b" * 12, 1, 0.8)]
