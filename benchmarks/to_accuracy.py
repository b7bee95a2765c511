"""Training time to a test accuracy: the shortest schedule of one configuration that reaches it.

The cosine schedule depends on the number of epochs, so "time to 99%" is measured per schedule:
the project's loop trains the configuration for each ``--epochs`` value from scratch, the model
with the best validation accuracy is scored once on the official test set, and the shortest
schedule whose test accuracy reaches ``--target`` is the answer; its time is the sum of its
epochs (training plus the per-epoch validation), not data loading or process start. Several
``--config`` candidates (e.g. fp32 and bf16, two batch sizes) are measured in one process on the
same prepared data, each after a warm-up of a few batches that pays CUDA's and cuDNN's start-up;
the fastest candidate that reaches the target is the headline.

    python -m benchmarks.to_accuracy --device cuda --data-dir ../shared/data --epochs 4 6 8
    python -m benchmarks.to_accuracy --device cuda --data-dir ../shared/data --epochs 4 6 8 \
        --config batch_size=256,learning_rate=0.002,precision=fp32 batch_size=256,learning_rate=0.002,precision=bf16
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench import config_label, parse_config
from pipeline.config import PrepareConfig, TrainConfig
from pipeline.data import PreparedData, Split, load_prepared
from pipeline.prepare import prepare
from pipeline.training import evaluate_split, train

DEFAULT_CONFIG = "hidden_size=256,num_layers=2,batch_size=256,learning_rate=0.002"
WARMUP_BATCHES = 4


def head(split: Split, n: int) -> Split:
    return Split(split.images[:n], split.labels[:n])


def warm_up(config: TrainConfig, data: PreparedData) -> float:
    """One epoch of a few batches, untimed: CUDA context, cuDNN handles and kernels, autocast caches."""
    started = time.perf_counter()
    small = PreparedData(
        head(data.train, WARMUP_BATCHES * config.batch_size), head(data.val, 256), head(data.test, 256), data.manifest
    )
    train(dataclasses.replace(config, epochs=1), small, progress=False)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="(default: auto)")
    parser.add_argument("--data-dir", default="data", help="folder holding MNIST/raw (default: data)")
    parser.add_argument("--train-limit", type=int, default=0, help="training images, 0 = all 55,000 (default: 0)")
    parser.add_argument(
        "--config",
        type=parse_config,
        nargs="+",
        default=[parse_config(DEFAULT_CONFIG)],
        help=f"TrainConfig overrides FIELD=VALUE,...; several are candidates, each measured (default: {DEFAULT_CONFIG})",
    )
    parser.add_argument(
        "--epochs", type=int, nargs="+", default=[4, 6, 8], help="schedules to try, shortest first (default: 4 6 8)"
    )
    parser.add_argument("--target", type=float, default=0.99, help="test accuracy to reach (default: 0.99)")
    parser.add_argument("--seed", type=int, default=42, help="(default: 42)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for the .json and .md results")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="to-accuracy-") as tmp:
        prepare(PrepareConfig(data_dir=args.data_dir, train_limit=args.train_limit, seed=args.seed), tmp)
        data = load_prepared(tmp)
    rows, candidates = [], []
    for overrides in args.config:
        base = TrainConfig(**{**overrides, "seed": args.seed, "device": args.device})
        label = config_label(base)
        warmup_seconds = warm_up(base, data)
        mine = []
        for epochs in sorted(args.epochs):
            config = dataclasses.replace(base, epochs=epochs)
            result = train(config, data, progress=False)
            _, test_accuracy = evaluate_split(result.model, data.test.to(result.device), config.reading_order)
            seconds = sum(m.epoch_seconds for m in result.history)
            mine.append(
                {
                    "config": label,
                    "precision": result.precision,
                    "epochs": epochs,
                    "train_seconds": round(seconds, 2),
                    "test_accuracy": test_accuracy,
                    "best_val_accuracy": result.best_val_accuracy,
                    "samples_per_second": statistics.median(m.samples_per_second for m in result.history),
                    "device": result.device.type,
                }
            )
            print(
                f"{label}: {epochs} epochs, test_accuracy {test_accuracy:.4f} after {seconds:.1f} s of training",
                file=sys.stderr,
                flush=True,
            )
            if test_accuracy >= args.target:
                break
        rows += mine
        candidates.append(
            {
                "config": label,
                "overrides": overrides,
                "warmup_seconds": round(warmup_seconds, 2),
                "reached": next((row for row in mine if row["test_accuracy"] >= args.target), None),
            }
        )
    reached = min((c["reached"] for c in candidates if c["reached"]), key=lambda row: row["train_seconds"], default=None)
    now = datetime.datetime.now()
    report = {
        "date": now.isoformat(timespec="seconds"),
        "command": "python -m benchmarks.to_accuracy " + " ".join(sys.argv[1:]),
        "config": dataclasses.asdict(TrainConfig(**{**args.config[0], "device": args.device})),
        "target": args.target,
        "train_images": len(data.train.labels),
        "rows": rows,
        "candidates": candidates,
        "reached": reached,
    }
    headline = (
        f"test_accuracy {reached['test_accuracy']:.4f} >= {args.target} after {reached['train_seconds']:.1f} s of "
        f"training ({reached['config']}, {reached['epochs']} epochs)"
        if reached
        else f"{args.target} not reached in {max(args.epochs)} epochs by any candidate"
    )
    table = "\n".join(
        f"| {r['config']} | {r['precision']} | {r['epochs']} | {r['train_seconds']:.1f} | {r['samples_per_second']:.0f} | "
        f"{r['test_accuracy']:.4f} | {r['best_val_accuracy']:.4f} |"
        for r in rows
    )
    text = (
        f"# time to {args.target} test accuracy, {report['date']}, {rows[0]['device']}\n\n`{report['command']}`\n\n"
        f"{report['train_images']} training images; each candidate warmed up on {WARMUP_BATCHES} batches first (not timed).\n\n"
        f"| config | precision | epochs | training s | samples/s | test_accuracy | best_val_accuracy |\n"
        f"|---|---|---|---|---|---|---|\n{table}\n\n**{headline}**\n"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"to-accuracy-{now.strftime('%Y%m%d-%H%M%S')}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
