"""Test accuracy over seeds, as a benchmark report: the ``repeat`` entry point in a throwaway store.

Runs ``python -m experiments.repeat`` (the pipeline once per training seed, on one split made
with ``--seed``; see docs/repeats.md) against a new MLflow store, with any further flags passed
through, and writes its table with the date, the command and the CPU count to
``benchmarks/results/accuracy-<date>.json`` and ``.md``.

    python -m benchmarks.accuracy --seeds 1 2 3 --data-dir ../shared/data                 # the defaults
    python -m benchmarks.accuracy --seeds 1 2 3 --data-dir ../shared/data -- --epochs 8    # another configuration
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from benchmarks.report import add_common_flags, write_report

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[1, 2, 3], help="training seeds, one pipeline each (default: 1 2 3)"
    )
    add_common_flags(parser, device=False)
    parser.add_argument("--tracking-uri", default="", help="MLflow store for the runs (default: a new one in a temp folder)")
    parser.add_argument("extra", nargs="*", help="flags passed on to experiments.repeat, after --")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="accuracy-") as tmp:
        tracking_uri = args.tracking_uri or f"sqlite:///{tmp}/mlflow.db"
        command = [sys.executable, "-m", "experiments.repeat", "--seeds", " ".join(map(str, args.seeds))]
        command += ["--data-dir", str(Path(args.data_dir).resolve()), "--checkpoint-dir", f"{tmp}/checkpoints", *args.extra]
        started = time.perf_counter()
        subprocess.run(command, check=True, cwd=REPO, env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri})
        seconds = time.perf_counter() - started
        client = MlflowClient(tracking_uri)
        [run] = client.search_runs(
            ["0"], "tags.`pipeline.stage` = 'repeat'", order_by=["attributes.start_time DESC"], max_results=1
        )
        table = Path(client.download_artifacts(run.info.run_id, "repeat.md", tmp)).read_text()

    metrics = run.data.metrics
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python -m benchmarks.accuracy " + " ".join(sys.argv[1:]),
        "cpus": os.cpu_count(),
        "wall_seconds": round(seconds, 1),
        "summary": {
            name: metrics[f"test_accuracy_{name}"] for name in ("mean", "std", "min", "max") if f"test_accuracy_{name}" in metrics
        },
        "metrics": metrics,
        "params": run.data.params,
    }
    summary = report["summary"]
    spread = f" ± {summary['std']:.4f}" if "std" in summary else ""
    text = (
        f"# test accuracy over {len(args.seeds)} seeds, {report['date']}\n\n`{report['command']}`, "
        f"{report['cpus']} CPUs, {seconds / 60:.0f} min\n\n{table}\n"
        f"**mean {summary['mean']:.4f}{spread}** (sample std), min {summary['min']:.4f}, max {summary['max']:.4f}\n"
    )
    stem = write_report(args.out, "accuracy", report, text)
    print("\n" + text + f"\nwritten: {stem}.json, {stem}.md")


if __name__ == "__main__":
    main()
