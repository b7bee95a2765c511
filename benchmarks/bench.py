"""Training-loop benchmarks: the tutorial's loop against the project's, and how cost grows (benchmarks/README.md).

python -m benchmarks.bench throughput --data-dir ../shared/data   # both loops side by side, same images
python -m benchmarks.bench scaling --data-dir ../shared/data      # the project loop, one factor at a time
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch

from benchmarks.measure import MNIST_TRAIN_IMAGES
from benchmarks.report import add_common_flags, config_label, describe, environment, flag, log, parse_config, render, write_report
from benchmarks.tutorial_baseline import write_raw_mnist
from pipeline.config import OneLineParser, ParameterError, TrainConfig, fail
from pipeline.cost import forward_flops
from pipeline.data import DataError, load_raw, save_prepared, split_train_val
from pipeline.numerics import bf16_supported, resolve_device

REPO = Path(__file__).resolve().parents[1]
CPU_TARGETS = {(128, 1, 128): 1.5, (256, 2, 128): 1.2}  # (hidden, layers, batch) -> project/baseline ratio asked for on CPU
CONFIGS = ["hidden_size=128,num_layers=1,batch_size=128", "hidden_size=256,num_layers=2,batch_size=128"]
BASE = "hidden_size=128,num_layers=1,batch_size=128"
MATMUL_SIZE = {"cpu": 4096, "cuda": 8192}  # one fp32 matmul of 4096 takes about a second on 2 CPU cores
COLUMNS = {  # header: the row's fields as a format string; a column with nothing in it is left out
    "config": "{config}",
    "loop": "{loop}",
    "variant": "{variant}",
    "precision": "{precision}",
    "samples/s": "{samples_per_second:.0f} ({min:.0f}-{max:.0f})",
    "x baseline": "{ratio_to_baseline:.2f}",
    "target": ">= {target:.1f} {verdict}",
    "x first": "{relative_to_first:.2f}",
    "peak RSS MiB": "{peak_rss_mib:.0f}",
    "GFLOP/s": "{gflops:.1f}",
    "% of peak": "{peak_percent:.1f}",
    "CUDA peak MiB": "{cuda_peak_mib:.0f}",
}


def run_job(job: dict) -> dict:
    """Run one measurement in a fresh Python process and return its result."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.measure", json.dumps(job)], cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"measurement {job} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(loop: str, config: TrainConfig, args, mnist_root: Path, **fields) -> dict:
    """One timed epoch of ``loop``, and its FLOP/s: training forward and backward (3x forward), validation forward."""
    job = {"kind": "epoch", "loop": loop, "config": dataclasses.asdict(config), "raw_root": str(mnist_root), "seed": args.seed}
    result = run_job({**job, "val_samples": args.val_samples, **fields})
    fwd = forward_flops(config.hidden_size, config.num_layers, config.bidirectional, config.reading_order)
    log(f"{config_label(config)} {loop} threads={result['threads']}: {result['samples_per_second']:.0f} samples/s")
    variant = f"threads={result['threads']} mkldnn={'on' if result['mkldnn'] else 'off'}"
    flops = fwd * (3 * result["samples"] + result["val_samples"]) / result["epoch_seconds"]
    return {"config": config_label(config), "loop": loop, "variant": variant, **result, "flops": flops}


def matmul_peaks(device: str, thread_counts: set[int]) -> dict[int, dict[str, float]]:
    """Matmul FLOP/s per thread count (one count on CUDA) and precision: fp32, and bf16 where the device has it."""
    precisions = ["fp32", "bf16"] if bf16_supported(torch.device(device)) else ["fp32"]
    counts = sorted(thread_counts) if device == "cpu" else [min(thread_counts)]
    job = {"kind": "matmul_peak", "device": device, "size": MATMUL_SIZE.get(device, 4096)}
    return {t: {p: run_job({**job, "precision": p, "threads": t})["best_flops"] for p in precisions} for t in counts}


def summarise(measurements: list[dict], keys: list[str], peaks: dict) -> pd.DataFrame:
    """Median (min-max) samples/s per ``keys`` and the rest of a row; '% of peak' divides by the matmul
    peak of the row's own precision at its thread count (none where that precision was not measured)."""
    grouped = pd.DataFrame(measurements).groupby(keys, sort=False)
    table = grouped.samples_per_second.agg(samples_per_second="median", min="min", max="max")
    table = table.join(grouped[["precision", "threads"]].first()).join(grouped.flops.median())
    table = table.join(grouped[["peak_rss_mib", "cuda_peak_mib"]].max()).reset_index()
    peak = [(peaks.get(t) or next(iter(peaks.values()))).get(p) for t, p in zip(table.threads, table.precision, strict=True)]
    table["peak_percent"] = 100 * table.flops / pd.Series(peak, dtype=float)
    table["gflops"] = table.flops / 1e9
    return table


def compare(args, configs: list[TrainConfig], runs: list[tuple], mnist_root: Path, **fields) -> dict:
    """Each configuration with each (loop, threads, mkldnn) run, ``--repeats`` times, interleaved so that
    a change in the machine's load hits them alike; ratios to the baseline loop and to the first configuration."""
    peaks = matmul_peaks(configs[0].device, {threads for _, threads, _ in runs})
    measurements = [
        measure(loop, config, args, mnist_root, threads=threads, mkldnn=mkldnn, **fields)
        for _, config, (loop, threads, mkldnn) in itertools.product(range(args.repeats), configs, runs)
    ]
    table = summarise(measurements, ["config", "loop", "variant"], peaks)
    baseline = table[table.loop == "baseline"].set_index("config").samples_per_second
    table["ratio_to_baseline"] = table.samples_per_second / table.config.map(baseline)
    first = table.groupby(["loop", "variant"]).samples_per_second.transform("first")  # the rows are in --configs order
    table["relative_to_first"] = table.samples_per_second / first
    on_cpu_rows = [c for c in configs if c.device == "cpu" and c.reading_order == "rows"]
    targets = {config_label(c): CPU_TARGETS.get((c.hidden_size, c.num_layers, c.batch_size)) for c in on_cpu_rows}
    table["target"] = pd.to_numeric(table.config.map(targets)).where((table.loop == "project") & table.ratio_to_baseline.notna())
    table["verdict"] = (table.ratio_to_baseline >= table.target).map({True: "met", False: "MISSED"})
    return {"rows": table.to_dict("records"), "matmul_peak_flops": peaks, "measurements": measurements}


def plan(args, device: str) -> tuple[list[TrainConfig], list[tuple], dict]:
    """The configurations (``--configs``, or ``--base`` and each sweep's values, one factor at a time),
    the (loop, threads, mkldnn) runs of each, and the timed epoch's size."""
    base = TrainConfig(**{"seed": args.seed, **getattr(args, "base", {})}, device=device)
    if args.mode == "throughput":
        configs = [dataclasses.replace(base, **overrides) for overrides in args.configs]
    else:
        sweeps = {"hidden_size": args.hidden_sizes, "num_layers": args.num_layers, "batch_size": args.batch_sizes}
        sweeps["reading_order"] = args.reading_orders
        points = [dataclasses.replace(base, **{factor: v}) for factor, values in sweeps.items() for v in values]
        configs = list({config_label(c): c for c in [base, *points]}.values())  # the base, in every sweep, once
    default = torch.get_num_threads()
    variants = itertools.product(args.threads or [default], [mkldnn == "on" for mkldnn in args.mkldnn])
    runs = [("baseline", default, True)] * ("baseline" in args.loops)
    runs += [("project", threads, mkldnn) for threads, mkldnn in variants if "project" in args.loops]
    return configs, runs, {"samples": args.samples} if args.mode == "throughput" else {"samples": 0, "seconds": args.seconds}


def markdown(report: dict, args) -> str:
    env, peaks = report["environment"], report["matmul_peak_flops"]
    size = MATMUL_SIZE.get(env["resolved_device"], 4096)
    text = "; ".join(
        f"{n} thread(s): " + ", ".join(f"{p} {f / 1e9:.0f} GFLOP/s" for p, f in at.items()) for n, at in peaks.items()
    )
    epoch = f"{args.samples} training" if args.mode == "throughput" else f"about {args.seconds} s of training"
    parts = [
        f"# {args.mode}: {describe(env)}\n\nEach row: median (min-max) of {args.repeats} fresh processes, each timing one "
        f"epoch of {epoch} + {args.val_samples} validation images after a warm-up. Matmul peak, best of 5 at {size}x{size}: "
        f"{text}. '% of peak' divides a row's GFLOP/s by the peak of the precision it trained in, at its thread count."
        f"\n\n`{env['command']}`",
        render(report["rows"], COLUMNS),
    ]
    if m := report.get("data_memory"):
        parts.append(
            f"Prepared MNIST split in memory ({'/'.join(map(str, m['images']))} images): uint8 images {m['images_mib']:.1f} MiB, "
            f"labels {m['labels_mib']:.1f} MiB as int64; RSS held after loading {m['rss_held_mib'] or 0:.0f} MiB. As float32 the "
            f"images would take {4 * m['images_mib']:.0f} MiB."
        )
    return "\n\n".join(parts) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m benchmarks.bench", description=__doc__.split("\n\n")[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    tp = modes.add_parser("throughput", help="tutorial loop vs project loop, side by side")
    sc = modes.add_parser("scaling", help="project-loop samples/s against one factor at a time")
    for sub, loops in ((tp, ["baseline", "project"]), (sc, ["project"])):
        add_common_flags(sub)
        flag(sub, "--loops", loops, "loops to measure", nargs="+", choices=("baseline", "project"))
        flag(sub, "--repeats", 3, "fresh processes per measurement; tables show the median", type=int)
        flag(sub, "--val-samples", 256, "validation images of each timed epoch", type=int)
        flag(sub, "--seed", 42, "seed of the image choice and of training", type=int)
        flag(sub, "--threads", None, "torch thread counts of the project loop", "torch's", nargs="+", type=int)
        flag(sub, "--mkldnn", ["on"], "oneDNN's kernels on and/or off in the project loop", nargs="+", choices=("on", "off"))
    flag(tp, "--samples", 12_800, "training images per timed epoch, the same for both loops", type=int)
    configs = [parse_config(c) for c in CONFIGS]
    flag(tp, "--configs", configs, "TrainConfig overrides, one each", " ".join(CONFIGS), nargs="+", type=parse_config)
    flag(sc, "--base", parse_config(BASE), "the configuration each sweep changes one factor of", BASE, type=parse_config)
    flag(sc, "--hidden-sizes", [32, 64, 128, 256, 512], "hidden_size sweep", nargs="+", type=int)
    flag(sc, "--num-layers", [1, 2, 3, 4], "num_layers sweep", nargs="+", type=int)
    flag(sc, "--batch-sizes", [32, 64, 128, 256, 512], "batch_size sweep", nargs="+", type=int)
    flag(sc, "--reading-orders", ["rows", "pixels"], "rows: 28 steps of 28 pixels; pixels: 784 of 1", nargs="+")
    flag(sc, "--seconds", 5.0, "each timed epoch is sized to last about this long", type=float)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.repeats < 1 or not 1 <= args.val_samples + getattr(args, "samples", 0) <= MNIST_TRAIN_IMAGES:
        parser.error(f"--repeats must be at least 1, and an epoch's images between 1 and {MNIST_TRAIN_IMAGES}")
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory(prefix="lstm-mnist-bench-") as workdir:
        try:
            mnist_root = write_raw_mnist(args.data_dir, Path(workdir) / "torchvision")  # decompressed, for torchvision
            configs, runs, epoch = plan(args, device.type)
            report = compare(args, configs, runs, mnist_root, **epoch)
            if args.mode == "throughput":
                train, test, _ = load_raw("mnist", mnist_root)  # the default prepared split: what holding it costs
                splits = dict(zip(("train", "val"), split_train_val(train, val_size=5000, train_limit=0, seed=42), strict=True))
                save_prepared(Path(workdir) / "prepared", {**splits, "test": test}, {})
                report["data_memory"] = run_job({"kind": "data_memory", "prepared_dir": f"{workdir}/prepared"})
        except (DataError, ParameterError) as error:  # no MNIST files; a sweep value its base cannot take
            fail(str(error))
    report = {"environment": environment(device), "settings": {k: v for k, v in vars(args).items() if k != "out"}, **report}
    text = markdown(report, args)
    stem = write_report(args.out, f"{args.mode}-{device.type}", report, text)
    print(text + f"\nwritten: {stem}.json, {stem}.md")


if __name__ == "__main__":
    main()
