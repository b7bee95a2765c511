"""Repeats over seeds: the seeds parameter, the summary, and `mlflow run . -e repeat` as users run it."""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from experiments import repeat
from experiments.repeat import parse_seeds, seed_statistics
from pipeline.config import ParameterError
from pipeline.main import StageFailed
from tests.conftest import mlflow_run, nothing_tracked, user_environment
from tests.test_tables import table_rows


@pytest.mark.parametrize("text, seeds", [("1 2 3", (1, 2, 3)), ("1,2,3", (1, 2, 3)), (" 7, 0  3 ", (7, 0, 3)), ("5", (5,))])
def test_seeds_are_integers_by_spaces_or_commas(text, seeds):
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize(
    "text, reason",
    [("", "must be integers"), (" , ", "must be integers"), ("1 x", "'x' is not an integer"), ("1.5", "'1.5' is not"),
     ("-1 2", "'-1' is not an integer >= 0"), ("1 2 1", "1 given twice")],
)  # fmt: skip
def test_bad_seeds_stop_repeat_with_one_line_before_any_run(text, reason, tracking, capsys):
    with pytest.raises(ParameterError, match=reason):
        parse_seeds(text)
    with pytest.raises(SystemExit) as exit_info:
        repeat.main(["--seeds", text])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("repeat: error: seeds=") and reason in err, err
    assert nothing_tracked(tracking), "a run was started before validation"


def test_summary_is_mean_sample_std_min_max_and_one_seed_has_no_std():
    per_seed = {
        s: {"test_accuracy": a, "test_macro_f1": a - 0.01, "test_loss": 1 - a, "best_val_accuracy": a}
        for s, a in ((1, 0.9), (2, 0.95), (3, 0.97))
    }
    summary = seed_statistics(per_seed)
    assert summary["test_accuracy_mean"] == pytest.approx(0.94)
    assert summary["test_accuracy_std"] == pytest.approx(statistics.stdev([0.9, 0.95, 0.97]))  # n - 1
    assert (summary["test_loss_min"], summary["test_loss_max"]) == pytest.approx((0.03, 0.1))
    assert (
        "test_accuracy_std" not in seed_statistics({1: per_seed[1]})
        and seed_statistics({1: per_seed[1]})["test_accuracy_mean"] == 0.9
    )


@pytest.mark.slow(seconds=165)
def test_mlflow_run_repeat_shares_the_prepare_run_and_summarizes_its_seeds(tmp_path, store_uri, mnist_dir):
    uri = store_uri
    env = user_environment(uri)
    (tmp_path / "mnist").symlink_to(mnist_dir)  # relative paths: from the user's folder, not the project's
    settings = {"data_dir": "mnist", "checkpoint_dir": "checkpoints", "train_limit": 500, "val_size": 200,
                "hidden_size": 8, "num_layers": 1, "epochs": 1, "batch_size": 100, "device": "cpu", "seeds": "3,4"}  # fmt: skip
    params = [arg for name, value in settings.items() for arg in ("-P", f"{name}={value}")]
    done = mlflow_run("-e", "repeat", *params, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]

    client = MlflowClient(uri)
    [parent] = client.search_runs(["0"], "tags.`pipeline.stage` = 'repeat'")
    children = client.search_runs(["0"], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    [prepare] = client.search_runs(["0"], "tags.`pipeline.stage` = 'prepare'")  # once, for both seeds
    assert prepare.info.run_id == parent.data.tags["pipeline.prepare_run"]
    assert prepare.data.params["seed"] == "42" and parent.data.params["seed"] == "42"  # the split's seed
    seeds = {run.data.params["seed"]: run for run in children if run.data.tags["pipeline.stage"] == "main"}
    assert sorted(seeds) == ["3", "4"] and len(children) == 3 and parse_seeds(parent.data.params["seeds"]) == (3, 4)  # as typed
    for seed, run in seeds.items():
        assert run.info.run_name == f"seed-{seed}" and run.data.tags["pipeline.prepare_run"] == prepare.info.run_id
        evaluate = client.get_run(run.data.tags["pipeline.evaluate_run"])
        train = client.get_run(run.data.tags["pipeline.train_run"])
        assert train.data.params["seed"] == seed and train.data.tags["mlflow.parentRunId"] == run.info.run_id
        assert (tmp_path / "checkpoints").is_dir() and not (tmp_path / "checkpoints" / train.info.run_id).exists()
        assert run.data.metrics["test_accuracy"] == evaluate.data.metrics["test_accuracy"]

    for metric in ("test_accuracy", "test_macro_f1", "test_loss"):
        values = [run.data.metrics[metric] for run in seeds.values()]  # from the children
        assert parent.data.metrics[f"{metric}_mean"] == pytest.approx(statistics.mean(values))
        assert parent.data.metrics[f"{metric}_std"] == pytest.approx(statistics.stdev(values))
        assert (parent.data.metrics[f"{metric}_min"], parent.data.metrics[f"{metric}_max"]) == (min(values), max(values))

    table = client.download_artifacts(parent.info.run_id, "repeat.md", str(tmp_path))
    rows = {row["seed"]: row for row in table_rows(Path(table).read_text())}
    assert set(rows) == {"3", "4", "mean", "std", "min", "max"} and rows["3"]["run"] == seeds["3"].info.run_id
    mean = parent.data.metrics["test_accuracy_mean"]
    assert f"test_accuracy {mean:.4f} ± " in done.stdout and "over 2 seeds" in done.stdout
    assert "| seed" in done.stdout and "workflowType=machine_learning" in done.stdout  # the table, the UI link

    grouped = mlflow_run("-e", "compare", "-P", "group_by_config=true", cwd=tmp_path, env=env)  # as docs/repeats.md runs it
    assert grouped.returncode == 0, grouped.stderr[-3000:]
    [row] = table_rows(grouped.stdout[grouped.stdout.index("| rank") :])
    std = parent.data.metrics["test_accuracy_std"]
    assert (row["n_seeds"], row["seeds"], row["test_accuracy"]) == ("2", "3 4", f"{mean:.4f} ± {std:.4f}")


def test_a_failing_stage_ends_repeat_failed_with_one_line(tracking, monkeypatch, capsys):
    def failing_stage(stage, *args):
        raise StageFailed(f"the {stage} stage failed (run 0123); its error is above")

    monkeypatch.setattr(repeat, "run_stage", failing_stage)
    monkeypatch.setenv("PATH", os.environ["PATH"])  # main() may put this interpreter first: undone after the test
    with pytest.raises(SystemExit) as exit_info:
        repeat.main(["--seeds", "1 2"])
    assert exit_info.value.code == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after MLflow's own log lines
    assert (
        last
        == "error: the prepare stage failed (run 0123); its error is above; rerun the same command: finished seeds are reused"
    )
    [run] = MlflowClient().search_runs(["0"])
    assert run.info.status == "FAILED" and run.data.tags["pipeline.error"].startswith("the prepare stage failed")
    assert run.data.params["seeds"] == "1 2" and run.data.tags["pipeline.stage"] == "repeat"


def test_repeat_starts_its_stages_with_this_interpreter_even_without_an_activated_venv(tracking, monkeypatch):
    seen = []

    def recording_stage(stage, *args):  # what MLflow's `python` would be for the stage
        seen.append(os.environ["PATH"].split(os.pathsep)[0])
        raise StageFailed(f"the {stage} stage failed (run 0123); its error is above")

    monkeypatch.setattr(repeat, "run_stage", recording_stage)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # a shell where the virtual environment was never activated
    with pytest.raises(SystemExit):
        repeat.main(["--seeds", "1"])
    assert seen == [str(Path(sys.executable).parent)]
