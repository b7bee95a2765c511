"""Test accuracy over several seeds: the whole pipeline (prepare -> train -> evaluate) once per seed.

Each seed runs ``python -m pipeline.main --seed <s>`` (a new validation split and a new
initialisation) with any further flags passed through, against one MLflow store; the script then
reads each run's test_accuracy and reports mean, spread (sample standard deviation), min and max.

    python -m benchmarks.accuracy --seeds 1 2 3 --data-dir ../shared/data                 # the defaults
    python -m benchmarks.accuracy --seeds 1 2 3 --data-dir ../shared/data -- --epochs 8    # another configuration
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from benchmarks.report import add_common_flags, write_report
from pipeline.tables import markdown_table


def run_seed(seed: int, data_dir: str, extra: list[str], tracking_uri: str, workdir: str) -> dict:
    """One pipeline run in ``workdir`` (its artifacts and checkpoints land there); its numbers."""
    command = [sys.executable, "-m", "pipeline.main", "--data-dir", str(Path(data_dir).resolve()), "--seed", str(seed), *extra]
    started = time.perf_counter()
    subprocess.run(
        command,
        check=True,
        cwd=workdir,
        env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    seconds = time.perf_counter() - started
    client = MlflowClient(tracking_uri)
    [run] = client.search_runs(
        ["0"],
        f"tags.`pipeline.stage` = 'main' and params.seed = '{seed}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    train = client.get_run(run.data.tags["pipeline.train_run"])
    return {
        "seed": seed,
        "test_accuracy": run.data.metrics["test_accuracy"],
        "test_macro_f1": run.data.metrics["test_macro_f1"],
        "best_val_accuracy": train.data.metrics["best_val_accuracy"],
        "wall_seconds": round(seconds, 1),
        "run_id": run.info.run_id,
        "config": {k: v for k, v in train.data.params.items() if k in CONFIG_PARAMS},
    }


CONFIG_PARAMS = (
    "hidden_size",
    "num_layers",
    "learning_rate",
    "batch_size",
    "epochs",
    "dropout",
    "bidirectional",
    "reading_order",
    "lr_schedule",
    "resolved_device",
    "torch_version",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="one pipeline run each (default: 1 2 3)")
    add_common_flags(parser, device=False)
    parser.add_argument("--tracking-uri", default="", help="MLflow store for the runs (default: a new one in a temp folder)")
    parser.add_argument("extra", nargs="*", help="flags passed on to pipeline.main, after --")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="accuracy-") as tmp:
        tracking_uri = args.tracking_uri or f"sqlite:///{tmp}/mlflow.db"
        runs = []
        for seed in args.seeds:
            runs.append(run_seed(seed, args.data_dir, args.extra, tracking_uri, tmp))
            print(f"seed {seed}: test_accuracy {runs[-1]['test_accuracy']:.4f} ({runs[-1]['wall_seconds']:.0f} s)", flush=True)

    accuracies = [run["test_accuracy"] for run in runs]
    summary = {
        "mean": statistics.mean(accuracies),
        "std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
        "min": min(accuracies),
        "max": max(accuracies),
    }
    now = datetime.datetime.now()
    report = {
        "date": now.isoformat(timespec="seconds"),
        "command": "python -m benchmarks.accuracy " + " ".join(sys.argv[1:]),
        "cpus": os.cpu_count(),
        "summary": summary,
        "runs": runs,
    }
    rows = [
        {
            "seed": r["seed"],
            "test_accuracy": f"{r['test_accuracy']:.4f}",
            "test_macro_f1": f"{r['test_macro_f1']:.4f}",
            "best_val_accuracy": f"{r['best_val_accuracy']:.4f}",
            "wall s": f"{r['wall_seconds']:.0f}",
        }
        for r in runs
    ]
    text = (
        f"# test accuracy over {len(runs)} seeds, {report['date']}\n\n`{report['command']}`\n\n"
        f"configuration: {runs[0]['config']}\n\n"
        + markdown_table(rows)
        + f"\n\n**mean {summary['mean']:.4f} ± {summary['std']:.4f}** (sample std), min {summary['min']:.4f}, "
        f"max {summary['max']:.4f}\n"
    )
    stem = write_report(args.out, "accuracy", report, text)
    print("\n" + text + f"\nwritten: {stem}.json, {stem}.md")


if __name__ == "__main__":
    main()
