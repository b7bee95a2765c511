"""Training time to a test accuracy: the shortest schedule of each candidate that reaches it, as a
mean over seeds, and (``--against-tutorial``) that time in epochs of the tutorial's own loop.

The cosine and one-cycle schedules depend on the number of epochs, so "time to 99%" is measured
per schedule: each ``--config`` candidate trains for each ``--epochs`` value from scratch, once per
seed on the split the prepare stage makes for that seed; the weights of the best validation epoch
are scored once on the official 10,000 test images, and the shortest schedule whose mean test
accuracy reaches ``--target`` is the candidate's answer. Its time is the sum of its epochs
(training plus the per-epoch validation pass), not data loading or process start, after a warm-up
of a few batches. The fastest candidate that reaches the target is the headline.

With ``--against-tutorial`` the tutorial's loop (``benchmarks/tutorial_baseline.py``: 256 hidden,
2 layers, batch 128, Adam 1e-3, float32, a DataLoader of torchvision's MNIST) trains one epoch of
55,000 images plus its pass over 5,000 validation images, in a fresh process, before and after the
candidates; their mean is the unit of the ``tutorial epochs`` column.

    python -m benchmarks.to_accuracy --device cuda --data-dir ../shared/data --epochs 4 6 8
    python -m benchmarks.to_accuracy --data-dir ../shared/data --seeds 1 2 3 --epochs 3 --against-tutorial \
        --config hidden_size=256,num_layers=2,batch_size=128,learning_rate=0.002
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks.bench import config_label, parse_config, run_job
from benchmarks.tutorial_baseline import write_raw_mnist
from pipeline.config import PrepareConfig, TrainConfig
from pipeline.data import PreparedData, Split, load_prepared
from pipeline.prepare import prepare
from pipeline.tables import markdown_table
from pipeline.training import evaluate_split, train

DEFAULT_CONFIG = "hidden_size=256,num_layers=2,batch_size=256,learning_rate=0.002"
TUTORIAL = {"hidden_size": 256, "num_layers": 2, "batch_size": 128, "learning_rate": 1e-3, "precision": "fp32"}
WARMUP_BATCHES = 4


def head(split: Split, n: int) -> Split:
    return Split(split.images[:n], split.labels[:n])


def warm_up(config: TrainConfig, data: PreparedData) -> None:
    """One epoch of a few batches, untimed: CUDA context, cuDNN handles and kernels, oneDNN, autocast caches."""
    small = PreparedData(
        head(data.train, WARMUP_BATCHES * config.batch_size), head(data.val, 256), head(data.test, 256), data.manifest
    )
    train(dataclasses.replace(config, epochs=1), small, progress=False)


def tutorial_epoch_seconds(raw_root: Path, device: str, seed: int) -> float:
    """One timed epoch of the tutorial's loop in a fresh process (``benchmarks/measure.py``)."""
    config = dataclasses.asdict(TrainConfig(**TUTORIAL, device=device, seed=seed))
    job = {"kind": "epoch", "loop": "baseline", "config": config, "raw_root": str(raw_root), "seed": seed}
    seconds = run_job({**job, "samples": 55_000, "val_samples": 5_000})["epoch_seconds"]
    print(f"tutorial loop: one epoch in {seconds:.1f} s", file=sys.stderr, flush=True)
    return seconds


def train_and_test(config: TrainConfig, data: PreparedData) -> dict:
    result = train(config, data, progress=False)
    _, test_accuracy = evaluate_split(result.model, data.test.to(result.device), config.reading_order)
    return {
        "seed": config.seed,
        "precision": result.precision,
        "device": result.device.type,
        "train_seconds": sum(m.epoch_seconds for m in result.history),
        "samples_per_second": statistics.median(m.samples_per_second for m in result.history),
        "test_accuracy": test_accuracy,
        "best_val_accuracy": result.best_val_accuracy,
    }


def schedule_row(label: str, epochs: int, runs: list[dict]) -> dict:
    """One candidate at one schedule, over its seeds: means, and the test accuracy's spread."""
    accuracies = [run["test_accuracy"] for run in runs]
    return {
        "config": label,
        "precision": runs[0]["precision"],
        "device": runs[0]["device"],
        "epochs": epochs,
        "train_seconds": round(statistics.mean(run["train_seconds"] for run in runs), 2),
        "samples_per_second": statistics.median(run["samples_per_second"] for run in runs),
        "test_accuracy": statistics.mean(accuracies),
        "test_accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
        "test_accuracy_min": min(accuracies),
        "best_val_accuracy": statistics.mean(run["best_val_accuracy"] for run in runs),
        "runs": runs,
    }


def markdown(report: dict) -> str:
    unit = report.get("tutorial_epoch_seconds")
    rows = [
        {
            "config": r["config"],
            "precision": r["precision"],
            "epochs": r["epochs"],
            "training s": f"{r['train_seconds']:.1f}",
            **({"tutorial epochs": f"{r['train_seconds'] / statistics.mean(unit):.2f}"} if unit else {}),
            "samples/s": f"{r['samples_per_second']:.0f}",
            "test_accuracy mean ± std": f"{r['test_accuracy']:.4f} ± {r['test_accuracy_std']:.4f}",
            "min": f"{r['test_accuracy_min']:.4f}",
            "best_val_accuracy": f"{r['best_val_accuracy']:.4f}",
        }
        for r in report["rows"]
    ]
    reached = report["reached"]
    headline = (
        f"mean test_accuracy {reached['test_accuracy']:.4f} >= {report['target']} after {reached['train_seconds']:.1f} s "
        f"of training ({reached['config']}, {reached['epochs']} epochs)"
        if reached
        else f"{report['target']} not reached in {max(r['epochs'] for r in report['rows'])} epochs by any candidate"
    )
    if reached and unit:
        headline += f": {reached['train_seconds'] / statistics.mean(unit):.2f} epochs of the tutorial's loop"
    unit_text = (
        f" One epoch of the tutorial's loop (256 hidden, 2 layers, batch 128, float32) took "
        f"{' and '.join(f'{s:.1f}' for s in unit)} s, before and after the candidates."
        if unit
        else ""
    )
    return (
        f"# time to {report['target']} test accuracy, {report['date']}, {report['rows'][0]['device']}\n\n"
        f"`{report['command']}`\n\n"
        f"{report['train_images']} training images; seeds {report['seeds']} (each its own split, as the prepare "
        f"stage makes it); each candidate warmed up on {WARMUP_BATCHES} batches first (not timed).{unit_text}\n\n"
        f"{markdown_table(rows)}\n\n**{headline}**\n"
    )


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
    parser.add_argument("--target", type=float, default=0.99, help="mean test accuracy to reach (default: 0.99)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42], help="one training per seed (default: 42)")
    parser.add_argument(
        "--against-tutorial", action="store_true", help="also time an epoch of the tutorial's loop (default: off)"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for the .json and .md results")
    args = parser.parse_args()

    data, unit = {}, []
    with tempfile.TemporaryDirectory(prefix="to-accuracy-") as tmp:
        for seed in args.seeds:
            folder = Path(tmp) / f"seed-{seed}"
            prepare(PrepareConfig(data_dir=args.data_dir, train_limit=args.train_limit, seed=seed), folder)
            data[seed] = load_prepared(folder)
        if args.against_tutorial:
            raw_root = write_raw_mnist(args.data_dir, Path(tmp) / "torchvision")
            unit.append(tutorial_epoch_seconds(raw_root, args.device, args.seeds[0]))
        rows, candidates = [], []
        for overrides in args.config:
            base = TrainConfig(**{**overrides, "device": args.device})
            label = config_label(base)
            warm_up(base, data[args.seeds[0]])
            mine = []
            for epochs in sorted(args.epochs):
                runs = [train_and_test(dataclasses.replace(base, epochs=epochs, seed=s), data[s]) for s in args.seeds]
                mine.append(schedule_row(label, epochs, runs))
                print(
                    f"{label}: {epochs} epochs, mean test_accuracy {mine[-1]['test_accuracy']:.4f} after "
                    f"{mine[-1]['train_seconds']:.1f} s of training",
                    file=sys.stderr,
                    flush=True,
                )
                if mine[-1]["test_accuracy"] >= args.target:
                    break
            rows += mine
            reached = next((row for row in mine if row["test_accuracy"] >= args.target), None)
            candidates.append({"config": label, "overrides": overrides, "reached": reached})
        if args.against_tutorial:
            unit.append(tutorial_epoch_seconds(raw_root, args.device, args.seeds[0]))
    now = datetime.datetime.now()
    report = {
        "date": now.isoformat(timespec="seconds"),
        "command": "python -m benchmarks.to_accuracy " + " ".join(sys.argv[1:]),
        "config": dataclasses.asdict(TrainConfig(**{**args.config[0], "device": args.device})),
        "target": args.target,
        "seeds": args.seeds,
        "train_images": len(data[args.seeds[0]].train.labels),
        "tutorial_epoch_seconds": unit or None,
        "rows": rows,
        "candidates": candidates,
        "reached": min((c["reached"] for c in candidates if c["reached"]), key=lambda row: row["train_seconds"], default=None),
    }
    text = markdown(report)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"to-accuracy-{now.strftime('%Y%m%d-%H%M%S')}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
