"""fp32 against bf16 autocast, side by side in one process: training samples/s and accuracy.

Both parts use the one training loop on the real MNIST split the prepare stage makes, and
alternate the precisions (fp32, bf16, fp32, bf16, ...) so that a change in machine load hits
both. **Throughput**: after one warm-up each, ``--throughput-repeats`` one-epoch trainings per
precision on the first ``--throughput-samples`` training images (256 validation images);
samples/s as the loop reports it, median and best (the best is the least disturbed by other
work on a shared machine). **Accuracy**: one full training per seed and precision; the
best-validation model is scored once on the 10,000 test images, in fp32 as the logged model runs.

    python -m benchmarks.precision --device cpu --data-dir ../shared/data --seeds 1 2 3
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.bench import parse_config
from benchmarks.report import add_common_flags, write_report
from pipeline.config import PrepareConfig, TrainConfig
from pipeline.data import PreparedData, Split, load_prepared
from pipeline.prepare import prepare
from pipeline.tables import markdown_table
from pipeline.training import cpu_flags, evaluate_split, resolve_device, train

DEFAULT_CONFIG = "hidden_size=256,num_layers=2"  # the pipeline's defaults


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_flags(parser)
    parser.add_argument("--train-limit", type=int, default=0, help="training images, 0 = all 55,000 (default: 0)")
    parser.add_argument(
        "--config",
        type=parse_config,
        default=parse_config(DEFAULT_CONFIG),
        help=f"TrainConfig overrides, FIELD=VALUE,... (default: {DEFAULT_CONFIG})",
    )
    parser.add_argument(
        "--epochs", type=int, default=TrainConfig.epochs, help=f"epochs of an accuracy run (default: {TrainConfig.epochs})"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="*",
        default=[42],
        help="one accuracy run per seed and precision; none: throughput only (default: 42)",
    )
    parser.add_argument(
        "--throughput-repeats", type=int, default=5, help="timed one-epoch trainings per precision; 0: none (default: 5)"
    )
    parser.add_argument("--throughput-samples", type=int, default=4096, help="training images of a timed epoch (default: 4096)")
    parser.add_argument(
        "--precisions", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16"), help="(default: fp32 bf16)"
    )
    args = parser.parse_args()

    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory(prefix="precision-") as tmp:
        prepare(PrepareConfig(data_dir=args.data_dir, train_limit=args.train_limit), tmp)  # the split seed stays 42
        data = load_prepared(tmp)
    base = {**args.config, "device": device.type}
    load_before = os.getloadavg()
    speeds = throughput(base, data, args.precisions, args.throughput_repeats, args.throughput_samples)
    rows = [
        accuracy_run(TrainConfig(**{**base, "epochs": args.epochs, "seed": seed, "precision": precision}), data)
        for seed in args.seeds
        for precision in args.precisions
    ]
    now = datetime.datetime.now()
    report = {
        "date": now.isoformat(timespec="seconds"),
        "command": "python -m benchmarks.precision " + " ".join(sys.argv[1:]),
        "machine": machine(device),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "config": dataclasses.asdict(TrainConfig(**{**base, "epochs": args.epochs})),
        "train_images": len(data.train.labels),
        "throughput_samples": args.throughput_samples,
        "throughput": speeds,
        "rows": rows,
    }
    text = markdown(report)
    write_report(args.out, f"precision-{device.type}", report, text)
    print(text)


def throughput(base: dict, data: PreparedData, precisions: list[str], repeats: int, samples: int) -> dict[str, list[float]]:
    """samples/s of ``repeats`` one-epoch trainings per precision, alternating, after a warm-up each."""
    subset = dataclasses.replace(
        data,
        train=Split(data.train.images[:samples], data.train.labels[:samples]),
        val=Split(data.val.images[:256], data.val.labels[:256]),
    )
    speeds = {precision: [] for precision in precisions}
    for repeat in range(repeats + 1):  # the first is a warm-up: oneDNN builds its kernels for each shape
        for precision in precisions:
            result = train(TrainConfig(**{**base, "epochs": 1, "precision": precision}), subset, progress=False)
            if repeat:
                speeds[precision].append(result.history[0].samples_per_second)
        print(f"throughput repeat {repeat}: { ({p: round(s[-1]) for p, s in speeds.items() if s}) }", file=sys.stderr, flush=True)
    return speeds


def accuracy_run(config: TrainConfig, data: PreparedData) -> dict:
    result = train(config, data, progress=False)
    _, test_accuracy = evaluate_split(result.model, data.test.to(result.device), config.reading_order)
    row = {
        "precision": result.precision,
        "seed": config.seed,
        "test_accuracy": test_accuracy,
        "best_val_accuracy": result.best_val_accuracy,
        "samples_per_second": statistics.median(m.samples_per_second for m in result.history),
        "train_seconds": sum(m.epoch_seconds for m in result.history),
    }
    print(f"{config.precision} seed {config.seed}: {row}", file=sys.stderr, flush=True)
    return row


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    try:
        names = [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
    except OSError:
        names = []
    bf16 = "avx512_bf16" if "avx512_bf16" in cpu_flags() else "no avx512_bf16"
    return (
        f"{names[0] if names else platform.machine()}, {os.cpu_count()} cores, {bf16}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )


def markdown(report: dict) -> str:
    c, speeds, rows = report["config"], report["throughput"], report["rows"]
    lines = [
        f"# fp32 against bf16 autocast, {report['date']}",
        "",
        f"{report['machine']}; load average {report['load_average_before'][0]:.1f} before, "
        f"{report['load_average_after'][0]:.1f} after (1 min).",
        f"hidden_size {c['hidden_size']}, num_layers {c['num_layers']}, batch_size {c['batch_size']}, {c['reading_order']}, "
        f"learning_rate {c['learning_rate']} ({c['lr_schedule']}).",
        "",
        f"`{report['command']}`",
    ]
    if any(speeds.values()):
        lines += [
            "",
            f"Throughput, one epoch of {report['throughput_samples']} images, {len(next(iter(speeds.values())))} repeats:",
            "",
            markdown_table(
                [[p, f"{statistics.median(s):.0f}", f"{max(s):.0f}", " ".join(f"{v:.0f}" for v in s)] for p, s in speeds.items()],
                columns=["precision", "samples/s median", "samples/s best", "every repeat"],
            ),
        ]
        if {"fp32", "bf16"} <= set(speeds):
            lines += [
                "",
                f"**bf16 / fp32: {statistics.median(speeds['bf16']) / statistics.median(speeds['fp32']):.2f}x by the "
                f"medians, {max(speeds['bf16']) / max(speeds['fp32']):.2f}x by the best.**",
            ]
    if rows:
        lines += [
            "",
            f"Accuracy, {c['epochs']} epochs on {report['train_images']} training images:",
            "",
            markdown_table(
                {
                    "precision": r["precision"],
                    "seed": r["seed"],
                    "samples/s (median epoch)": f"{r['samples_per_second']:.0f}",
                    "training s": f"{r['train_seconds']:.0f}",
                    "best_val_accuracy": f"{r['best_val_accuracy']:.4f}",
                    "test_accuracy": f"{r['test_accuracy']:.4f}",
                }
                for r in rows
            ),
        ]
        means = {
            p: statistics.fmean(r["test_accuracy"] for r in rows if r["precision"] == p) for p in {r["precision"] for r in rows}
        }
        if {"fp32", "bf16"} <= set(means):
            lines += [
                "",
                f"**test_accuracy, mean over seeds: fp32 {means['fp32']:.4f}, bf16 {means['bf16']:.4f} "
                f"(bf16 - fp32: {means['bf16'] - means['fp32']:+.4f}).**",
            ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
