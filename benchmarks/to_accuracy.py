"""Training time to a test accuracy: the shortest schedule of one configuration that reaches it.

The cosine schedule depends on the number of epochs, so "time to 99%" is measured per schedule:
the project's loop trains the configuration for each ``--epochs`` value from scratch, the model
with the best validation accuracy is scored once on the official test set, and the shortest
schedule whose test accuracy reaches ``--target`` is the answer; its time is the sum of its
epochs (training plus the per-epoch validation), not data loading or process start.

    python -m benchmarks.to_accuracy --device cuda --data-dir ../shared/data --epochs 4 6 8
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import tempfile
from pathlib import Path

from benchmarks.bench import parse_config
from pipeline.config import PrepareConfig, TrainConfig
from pipeline.data import load_prepared
from pipeline.prepare import prepare
from pipeline.training import evaluate_split, train

DEFAULT_CONFIG = "hidden_size=256,num_layers=2,batch_size=256,learning_rate=0.002"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="(default: auto)")
    parser.add_argument("--data-dir", default="data", help="folder holding MNIST/raw (default: data)")
    parser.add_argument("--train-limit", type=int, default=0, help="training images, 0 = all 55,000 (default: 0)")
    parser.add_argument("--config", type=parse_config, default=parse_config(DEFAULT_CONFIG),
                        help=f"TrainConfig overrides, FIELD=VALUE,... (default: {DEFAULT_CONFIG})")
    parser.add_argument("--epochs", type=int, nargs="+", default=[4, 6, 8], help="schedules to try, shortest first (default: 4 6 8)")
    parser.add_argument("--target", type=float, default=0.99, help="test accuracy to reach (default: 0.99)")
    parser.add_argument("--seed", type=int, default=42, help="(default: 42)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for the .json and .md results")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="to-accuracy-") as tmp:
        prepare(PrepareConfig(data_dir=args.data_dir, train_limit=args.train_limit, seed=args.seed), tmp)
        data = load_prepared(tmp)
    rows = []
    for epochs in sorted(args.epochs):
        config = TrainConfig(**{**args.config, "epochs": epochs, "seed": args.seed, "device": args.device})
        result = train(config, data, progress=False)
        _, test_accuracy = evaluate_split(result.model, data.test.to(result.device), config.reading_order)
        seconds = sum(m.epoch_seconds for m in result.history)
        rows.append({"epochs": epochs, "train_seconds": round(seconds, 2), "test_accuracy": test_accuracy,
                     "best_val_accuracy": result.best_val_accuracy, "device": result.device.type})
        print(f"{epochs} epochs: test_accuracy {test_accuracy:.4f} after {seconds:.1f} s of training", file=sys.stderr, flush=True)
        if test_accuracy >= args.target:
            break
    reached = next((row for row in rows if row["test_accuracy"] >= args.target), None)
    now = datetime.datetime.now()
    report = {"date": now.isoformat(timespec="seconds"), "command": "python -m benchmarks.to_accuracy " + " ".join(sys.argv[1:]),
              "config": dataclasses.asdict(TrainConfig(**{**args.config, "device": args.device})), "target": args.target,
              "rows": rows, "reached": reached}
    headline = (f"test_accuracy {reached['test_accuracy']:.4f} >= {args.target} after {reached['train_seconds']:.1f} s of "
                f"training ({reached['epochs']} epochs)" if reached else f"{args.target} not reached in {max(args.epochs)} epochs")
    table = "\n".join(f"| {r['epochs']} | {r['train_seconds']:.1f} | {r['test_accuracy']:.4f} | {r['best_val_accuracy']:.4f} |" for r in rows)
    text = (f"# time to {args.target} test accuracy, {report['date']}, {rows[0]['device']}\n\n`{report['command']}`\n\n"
            f"| epochs | training s | test_accuracy | best_val_accuracy |\n|---|---|---|---|\n{table}\n\n**{headline}**\n")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"to-accuracy-{now.strftime('%Y%m%d-%H%M%S')}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
