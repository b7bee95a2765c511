"""Training-loop benchmarks: the tutorial's loop against the project's, and how cost grows.

    python -m benchmarks.bench throughput --data-dir ../shared/data   # side by side, same images
    python -m benchmarks.bench scaling --data-dir ../shared/data      # samples/s against one factor at a time

``throughput`` trains each configuration with both loops (``benchmarks/tutorial_baseline.py`` and
``pipeline.training.train``) on the same images, device and batch size, and reports samples per
second, their ratio, epoch time, peak memory, achieved FLOP/s against the matmul peak of the
precision each row trained in (fp32, or bf16 where ``precision=auto`` picks it) and, optionally,
the time to reach a validation accuracy. ``--threads`` and ``--mkldnn`` add variants of the
project loop. ``scaling`` measures the project loop (or both) while hidden_size,
num_layers, batch_size and reading_order change one at a time around a base configuration.

Every measurement is a fresh process (``benchmarks/measure.py``): one warm-up epoch of a few
batches, then one timed epoch. Repetitions interleave the loops, and tables show the median
(min-max). Results go to ``<out>/<mode>-<device>-<date>.json`` and ``.md``; the table is printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.measure import MNIST_TRAIN_IMAGES
from benchmarks.report import add_common_flags, write_report
from benchmarks.tutorial_baseline import write_raw_mnist
from pipeline.config import OneLineParser, ParameterError, TrainConfig, fail, parse_bool
from pipeline.data import NUM_CLASSES, SEQUENCE_SHAPES, DataError, load_raw, save_prepared, split_train_val
from pipeline.tables import markdown_table
from pipeline.training import bf16_supported, resolve_device

REPO = Path(__file__).resolve().parents[1]
# The configurations: (hidden_size, num_layers, batch_size) -> the project/baseline
# samples-per-second ratio it asks for on CPU.
CPU_TARGETS = {(128, 1, 128): 1.5, (256, 2, 128): 1.2}
DEFAULT_CONFIGS = ["hidden_size=128,num_layers=1,batch_size=128", "hidden_size=256,num_layers=2,batch_size=128"]
# The peak that "% of peak" divides by: the best of MATMUL_REPEATS matmuls of this size, in each
# precision a row may train in (bf16 reads about 4x fp32 on an avx512_bf16 CPU; dividing bf16 rows
# by the fp32 peak gave 102-116%). One fp32 matmul of 4096 takes about a second on 2 CPU cores.
MATMUL_SIZE = {"cpu": 4096, "cuda": 8192}
MATMUL_REPEATS = 5


# --- configurations ----------------------------------------------------------------------------


def parse_config(spec: str) -> dict:
    """``"hidden_size=256,num_layers=2"`` -> TrainConfig overrides, checked by building a TrainConfig."""
    kinds = {f.name: type(f.default) for f in dataclasses.fields(TrainConfig)}
    overrides = {}
    for item in filter(None, spec.split(",")):
        name, _, text = item.partition("=")
        if name not in kinds or name in ("device", "epochs"):
            raise argparse.ArgumentTypeError(f"{name!r} in {spec!r} is not a TrainConfig field the benchmark sets")
        try:
            overrides[name] = parse_bool(text) if kinds[name] is bool else kinds[name](text)
        except (ValueError, argparse.ArgumentTypeError) as error:
            raise argparse.ArgumentTypeError(f"{name}: {error}") from None
    try:
        TrainConfig(**overrides)
    except ParameterError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return overrides


def on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"must be on or off, got {text!r}")
    return text == "on"


def config_label(config: TrainConfig) -> str:
    """``h256-l2-b128-rows``, then any other field that differs from TrainConfig's default."""
    label = f"h{config.hidden_size}-l{config.num_layers}-b{config.batch_size}-{config.reading_order}"
    shown = ("hidden_size", "num_layers", "batch_size", "reading_order", "device", "seed", "epochs")
    defaults = TrainConfig()
    changed = [
        f"{f.name}={getattr(config, f.name)}"
        for f in dataclasses.fields(TrainConfig)
        if f.name not in shown and getattr(config, f.name) != getattr(defaults, f.name)
    ]
    return " ".join([label, *changed])


def forward_flops_per_sample(config: TrainConfig) -> int:
    """FLOPs (2 per multiply-add) of one sequence through the LSTM and the head, forward only.

    Per step, layer and direction the four gates cost 4*H*(I + H) multiply-adds, I being the
    layer's input size; the elementwise gate math is O(H) and left out. The backward pass costs
    about twice the forward, so a training sample costs about 3x this.
    """
    seq_len, input_size = SEQUENCE_SHAPES[config.reading_order]
    directions, hidden = (2 if config.bidirectional else 1), config.hidden_size
    multiply_adds = directions * hidden * NUM_CLASSES  # the head
    for layer in range(config.num_layers):
        layer_input = input_size if layer == 0 else directions * hidden
        multiply_adds += directions * seq_len * 4 * hidden * (layer_input + hidden)
    return 2 * multiply_adds


def achieved_flops(config: TrainConfig, measured: dict) -> float:
    """FLOP/s of a timed epoch: training samples forward and backward, validation forward only."""
    forward = forward_flops_per_sample(config)
    return (3 * forward * measured["samples"] + forward * measured["val_samples"]) / measured["epoch_seconds"]


# --- running measurements ----------------------------------------------------------------------


def run_job(job: dict) -> dict:
    """Run one measurement in a fresh Python process and return its result."""
    command = [sys.executable, "-m", "benchmarks.measure", json.dumps(job)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"measurement {job} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def training_job(kind: str, loop: str, config: TrainConfig, args, mnist_root: Path, **fields) -> dict:
    """A measurement of one loop training ``config``; ``fields`` are the kind's own arguments."""
    return {
        "kind": kind,
        "loop": loop,
        "config": dataclasses.asdict(config),
        "raw_root": str(mnist_root),
        "num_workers": args.num_workers,
        "seed": args.seed,
        **fields,
    }


def select(measurements: list[dict], **match) -> list[dict]:
    return [m for m in measurements if all(m[key] == value for key, value in match.items())]


def median_range(values) -> dict:
    values = list(values)
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def max_or_none(values) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def variant_label(variant: dict) -> str:
    return f"threads={variant['threads']} mkldnn={'on' if variant['mkldnn'] else 'off'}"


def matmul_peaks(device: str, thread_counts: set[int]) -> dict[int, dict[str, float]]:
    """Matmul FLOP/s per thread count (one count on CUDA, where threads don't matter) and precision:
    fp32, and bf16 where the device has it (``precision=auto`` trains in bf16 on avx512_bf16 CPUs)."""
    precisions = ["fp32", "bf16"] if bf16_supported(torch.device(device)) else ["fp32"]
    size = MATMUL_SIZE.get(device, 4096)
    peaks = {}
    for threads in sorted(thread_counts) if device == "cpu" else [min(thread_counts)]:
        peaks[threads] = {}
        for precision in precisions:
            job = {"kind": "matmul_peak", "device": device, "size": size, "precision": precision, "repeats": MATMUL_REPEATS}
            peaks[threads][precision] = run_job({**job, "threads": threads})["best_flops"]
            log(f"{precision} matmul peak at {threads} thread(s): {peaks[threads][precision] / 1e9:.1f} GFLOP/s")
    return peaks


def peak_fraction(flops: float, precision: str, peaks: dict[int, dict[str, float]], threads: int) -> float | None:
    """``flops`` over the matmul peak of the precision the row trained in, at its thread count
    (on CUDA, the one count measured); None where that precision's peak was not measured."""
    at_threads = peaks.get(threads) or next(iter(peaks.values()))
    peak = at_threads.get(precision)
    return flops / peak if peak else None


def data_memory(mnist_root: Path, workdir: Path) -> dict:
    """Write the default prepared split (55,000/5,000/10,000) and measure what holding it costs."""
    train, test, _ = load_raw("mnist", mnist_root)
    train, val = split_train_val(train, val_size=5000, train_limit=0, seed=42)
    save_prepared(workdir / "prepared", {"train": train, "val": val, "test": test}, {})
    return run_job({"kind": "data_memory", "prepared_dir": str(workdir / "prepared")})


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- the two modes -----------------------------------------------------------------------------


def throughput(args, device: str, mnist_root: Path, workdir: Path) -> dict:
    configs = [TrainConfig(**{"seed": args.seed, **overrides}, device=device) for overrides in args.configs]
    default = {"threads": torch.get_num_threads(), "mkldnn": True}
    variants = [{"threads": t, "mkldnn": m} for t, m in itertools.product(args.threads or [default["threads"]], args.mkldnn)]
    runs = [("baseline", default)] + [("project", variant) for variant in variants]
    peaks = matmul_peaks(device, {variant["threads"] for _, variant in runs})
    memory = data_memory(mnist_root, workdir)

    measurements = []  # one per (repeat, config, run): the loops interleave, so drift hits both alike
    for repeat, config, (loop, variant) in itertools.product(range(args.repeats), configs, runs):
        job = training_job("epoch", loop, config, args, mnist_root, samples=args.samples, val_samples=args.val_samples)
        result = run_job({**job, **variant})
        log(
            f"[{repeat + 1}/{args.repeats}] {config_label(config)} {loop} {variant_label(variant)}: "
            f"{result['samples_per_second']:.0f} samples/s, peak RSS {result['peak_rss_mib']:.0f} MiB"
        )
        measurements.append({"config": config_label(config), "loop": loop, "variant": variant, **result})

    rows = [throughput_row(config, loop, variant, measurements, peaks, device) for config in configs for loop, variant in runs]
    time_to_accuracy = []
    if args.target_accuracy > 0:  # the baseline and the first project variant
        time_to_accuracy = [
            time_to_accuracy_row(config, loop, variant, args, mnist_root) for config in configs for loop, variant in runs[:2]
        ]
    return {
        "rows": rows,
        "time_to_accuracy": time_to_accuracy,
        "data_memory": memory,
        "matmul_peak_flops": peaks,
        "measurements": measurements,
    }


def throughput_row(config: TrainConfig, loop: str, variant: dict, measurements: list[dict], peaks: dict, device: str) -> dict:
    label = config_label(config)
    mine = select(measurements, config=label, loop=loop, variant=variant)
    speed = median_range(m["samples_per_second"] for m in mine)
    baseline = select(measurements, config=label, loop="baseline")
    ratio = speed["median"] / statistics.median(m["samples_per_second"] for m in baseline)
    target = None
    if device == "cpu" and loop == "project" and config.reading_order == "rows":
        target = CPU_TARGETS.get((config.hidden_size, config.num_layers, config.batch_size))
    flops = statistics.median(achieved_flops(config, m) for m in mine)
    precision = mine[0]["precision"]
    return {
        "config": label,
        "loop": loop,
        "variant": variant,
        "precision": precision,
        "samples": mine[0]["samples"],
        "samples_per_second": speed,
        "ratio_to_baseline": ratio,
        "target_ratio": target,
        "meets_target": None if target is None else ratio >= target,
        "epoch_seconds": statistics.median(m["epoch_seconds"] for m in mine),
        "peak_rss_mib": max(m["peak_rss_mib"] for m in mine),
        "train_rss_growth_mib": max_or_none(m["train_rss_growth_mib"] for m in mine),
        "cuda_peak_mib": max_or_none(m["cuda_peak_mib"] for m in mine),
        "achieved_flops": flops,
        "peak_fraction": peak_fraction(flops, precision, peaks, variant["threads"]),
    }


def time_to_accuracy_row(config: TrainConfig, loop: str, variant: dict, args, mnist_root: Path) -> dict:
    """One loop trained from cold until val_accuracy >= target (or a cap), with ``repeats`` training seeds."""
    runs = []
    for repeat in range(args.repeats):
        seeded = dataclasses.replace(config, seed=config.seed + repeat)  # same images, another initialisation
        job = training_job(
            "time_to_accuracy",
            loop,
            seeded,
            args,
            mnist_root,
            samples=args.accuracy_train_samples,
            val_samples=args.accuracy_val_samples,
            target_accuracy=args.target_accuracy,
            max_epochs=args.accuracy_max_epochs,
            max_seconds=args.accuracy_max_seconds,
        )
        runs.append(run_job({**job, **variant}))
        log(
            f"time to val_accuracy {args.target_accuracy}: {config_label(config)} {loop} seed {seeded.seed}: "
            f"{runs[-1]['seconds_to_target']} s (best {runs[-1]['best_val_accuracy']})"
        )
    reached = [run["seconds_to_target"] for run in runs if run["seconds_to_target"] is not None]
    return {
        "config": config_label(config),
        "loop": loop,
        "variant": variant,
        "target_accuracy": args.target_accuracy,
        "reached": f"{len(reached)}/{len(runs)}",
        "seconds_to_target": median_range(reached) if reached else None,
        "best_val_accuracy": max(run["best_val_accuracy"] for run in runs),
        "runs": runs,
    }


def scaling_sweeps(args) -> dict[str, list]:
    return {
        "hidden_size": args.hidden_sizes,
        "num_layers": args.num_layers,
        "batch_size": args.batch_sizes,
        "reading_order": args.reading_orders,
    }


def scaling(args, device: str, mnist_root: Path, workdir: Path) -> dict:
    base = TrainConfig(**{"seed": args.seed, **args.base}, device=device)
    sweeps = scaling_sweeps(args)
    points = {}  # label -> config; the base configuration, in every sweep, is measured once
    for factor, values in sweeps.items():
        for value in values:
            config = dataclasses.replace(base, **{factor: value})
            points[config_label(config)] = config
    threads = torch.get_num_threads()
    peaks = matmul_peaks(device, {threads})

    measurements = []
    for repeat, (label, config), loop in itertools.product(range(args.repeats), points.items(), args.loops):
        job = training_job("epoch", loop, config, args, mnist_root, samples=0, seconds=args.seconds, val_samples=args.val_samples)
        result = run_job(job)
        log(
            f"[{repeat + 1}/{args.repeats}] {label} {loop}: {result['samples_per_second']:.0f} samples/s "
            f"over {result['samples']} images"
        )
        measurements.append({"config": label, "loop": loop, **result, "achieved_flops": achieved_flops(config, result)})

    rows = []
    for factor, values in sweeps.items():
        for value, loop in itertools.product(values, args.loops):
            config = dataclasses.replace(base, **{factor: value})
            mine = select(measurements, config=config_label(config), loop=loop)
            at_base = select(measurements, config=config_label(base), loop=loop)
            speed = median_range(m["samples_per_second"] for m in mine)
            flops = statistics.median(m["achieved_flops"] for m in mine)
            precision = mine[0]["precision"]
            rows.append(
                {
                    "factor": factor,
                    "value": value,
                    "config": config_label(config),
                    "loop": loop,
                    "precision": precision,
                    "samples": statistics.median(m["samples"] for m in mine),
                    "samples_per_second": speed,
                    "relative_to_base": speed["median"] / statistics.median(m["samples_per_second"] for m in at_base),
                    "forward_flops_per_sample": forward_flops_per_sample(config),
                    "achieved_flops": flops,
                    "peak_fraction": peak_fraction(flops, precision, peaks, threads),
                    "peak_rss_mib": max(m["peak_rss_mib"] for m in mine),
                    "cuda_peak_mib": max_or_none(m["cuda_peak_mib"] for m in mine),
                }
            )
    return {"base": config_label(base), "rows": rows, "matmul_peak_flops": peaks, "measurements": measurements}


# --- reports -----------------------------------------------------------------------------------


def environment(device: str) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), platform.processor())
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else cpu,
        "cpu": cpu,
        "torch": torch.__version__,
        "default_threads": torch.get_num_threads(),
        "mkldnn_available": torch.backends.mkldnn.is_available(),
        "python": platform.python_version(),
        "command": " ".join(["python -m benchmarks.bench", *sys.argv[1:]]),
    }


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def _speed(speed: dict) -> str:
    return f"{speed['median']:.0f} ({speed['min']:.0f}-{speed['max']:.0f})"


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.1f}"


def header(mode: str, env: dict, settings: str, peaks: dict) -> str:
    peak_text = "; ".join(
        f"{threads} thread(s): " + ", ".join(f"{precision} {peak / 1e9:.0f} GFLOP/s" for precision, peak in by_precision.items())
        for threads, by_precision in peaks.items()
    )
    size = MATMUL_SIZE.get(env["device"], 4096)
    tf32 = " (fp32 on TF32 tensor cores, as training)" if env["device"] == "cuda" else ""
    return (
        f"# {mode}: {env['device']} ({env['device_name']}), {env['date']}\n\n"
        f"torch {env['torch']}, {env['default_threads']} thread(s) by default. {settings} "
        f"Matmul peak, best of {MATMUL_REPEATS} at {size}x{size}{tf32}: {peak_text}. "
        f"'% of peak' divides a row's GFLOP/s by the peak of the precision it trained in (its precision column) "
        f"at its thread count.\n\n`{env['command']}`"
    )


def throughput_markdown(report: dict, env: dict, args) -> str:
    settings = (
        f"Each row: median (min-max) of {args.repeats} fresh processes, each timing one epoch of "
        f"{args.samples} training + {args.val_samples} validation images after a warm-up."
    )
    headers = [
        "config",
        "loop",
        "variant",
        "precision",
        "samples/s",
        "x baseline",
        "target",
        "epoch s",
        "peak RSS MiB",
        "train +RSS MiB",
        "GFLOP/s",
        "% of peak (own precision)",
    ]
    if env["device"] == "cuda":
        headers.append("CUDA peak MiB")
    rows = []
    for row in report["rows"]:
        target = "" if row["target_ratio"] is None else f">= {row['target_ratio']} {'met' if row['meets_target'] else 'MISSED'}"
        cells = [
            row["config"],
            row["loop"],
            variant_label(row["variant"]),
            row["precision"],
            _speed(row["samples_per_second"]),
            f"{row['ratio_to_baseline']:.2f}",
            target,
            f"{row['epoch_seconds']:.2f}",
            _mib(row["peak_rss_mib"]),
            _mib(row["train_rss_growth_mib"]),
            f"{row['achieved_flops'] / 1e9:.1f}",
            _percent(row["peak_fraction"]),
        ]
        if env["device"] == "cuda":
            cells.append(_mib(row["cuda_peak_mib"]))
        rows.append(cells)
    parts = [header("throughput", env, settings, report["matmul_peak_flops"]), markdown_table(rows, columns=headers)]

    fastest = []
    for config in dict.fromkeys(row["config"] for row in report["rows"]):
        project = [row for row in report["rows"] if row["config"] == config and row["loop"] == "project"]
        if len(project) > 1:
            best = max(project, key=lambda row: row["samples_per_second"]["median"])
            fastest.append(
                f"- {config}: fastest project variant is {variant_label(best['variant'])} "
                f"({best['samples_per_second']['median']:.0f} samples/s)"
            )
    if fastest:
        parts.append("Fastest variant of the project loop:\n\n" + "\n".join(fastest))

    if report["time_to_accuracy"]:
        tta_rows = [
            [
                t["config"],
                t["loop"],
                t["target_accuracy"],
                t["reached"],
                "-" if t["seconds_to_target"] is None else _speed(t["seconds_to_target"]),
                f"{t['best_val_accuracy']:.4f}",
            ]
            for t in report["time_to_accuracy"]
        ]
        parts.append(
            f"Time to validation accuracy (cold start, {args.accuracy_train_samples} training and {args.accuracy_val_samples} "
            f"validation images, at most {args.accuracy_max_epochs} epochs or {args.accuracy_max_seconds} s; "
            f"one training seed per repeat):\n\n"
            + markdown_table(tta_rows, columns=["config", "loop", "target", "reached", "seconds", "best val_accuracy"])
        )

    m = report["data_memory"]
    parts.append(
        f"Prepared MNIST split in memory ({m['images']['train']}/{m['images']['val']}/{m['images']['test']} images): "
        f"uint8 images {m['uint8_image_mib']:.1f} MiB, labels {m['label_mib']:.1f} MiB as int64 "
        f"({m['uint8_label_mib']:.2f} MiB as uint8); RSS held after loading {_mib(m['rss_held_mib'])} MiB, "
        f"peak while loading +{_mib(m['rss_peak_while_loading_mib'])} MiB. As float32 the images would take "
        f"{m['float32_image_mib']:.0f} MiB."
    )
    return "\n\n".join(parts) + "\n"


def scaling_markdown(report: dict, env: dict, args) -> str:
    settings = (
        f"Base {report['base']}; one factor changes at a time. Each row: median (min-max) of {args.repeats} "
        f"fresh processes, each timing one epoch sized to about {args.seconds} s after a warm-up."
    )
    headers = [
        "factor",
        "value",
        "loop",
        "precision",
        "samples/s",
        "x base",
        "MFLOP/sample (fwd)",
        "GFLOP/s",
        "% of peak (own precision)",
        "peak RSS MiB",
    ]
    rows = [
        [
            row["factor"],
            row["value"],
            row["loop"],
            row["precision"],
            _speed(row["samples_per_second"]),
            f"{row['relative_to_base']:.2f}",
            f"{row['forward_flops_per_sample'] / 1e6:.1f}",
            f"{row['achieved_flops'] / 1e9:.1f}",
            _percent(row["peak_fraction"]),
            _mib(row["peak_rss_mib"]),
        ]
        for row in report["rows"]
    ]
    return header("scaling", env, settings, report["matmul_peak_flops"]) + "\n\n" + markdown_table(rows, columns=headers) + "\n"


# --- command line ------------------------------------------------------------------------------


def add_flag(parser: argparse.ArgumentParser, flag: str, help: str, *, shown=None, **options) -> None:
    """A flag whose help ends with its default, as the project's stages write it."""
    default = options.get("default") if shown is None else shown
    parser.add_argument(flag, help=f"{help} (default: {default})", **options)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m benchmarks.bench", description=__doc__.split("\n\n")[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    tp = modes.add_parser("throughput", help="tutorial loop vs project loop, side by side")
    sc = modes.add_parser("scaling", help="project-loop samples/s against one factor at a time")
    for sub in (tp, sc):
        add_common_flags(sub)
        add_flag(sub, "--repeats", "fresh processes per measurement; tables show the median", type=int, default=3)
        add_flag(sub, "--val-samples", "validation images evaluated in each timed epoch", type=int, default=256)
        add_flag(sub, "--num-workers", "DataLoader workers of the tutorial loop", type=int, default=0)
        add_flag(sub, "--seed", "seed of the image choice and of training", type=int, default=42)

    add_flag(tp, "--samples", "training images per timed epoch, the same for both loops", type=int, default=12_800)
    add_flag(
        tp,
        "--configs",
        "TrainConfig overrides, one configuration each",
        nargs="+",
        type=parse_config,
        default=[parse_config(c) for c in DEFAULT_CONFIGS],
        metavar="FIELD=VALUE,...",
        shown=" ".join(DEFAULT_CONFIGS),
    )
    add_flag(
        tp,
        "--threads",
        "also measure the project loop at these torch thread counts",
        nargs="+",
        type=int,
        shown=f"torch's, here {torch.get_num_threads()}",
    )
    add_flag(
        tp,
        "--mkldnn",
        "measure the project loop with oneDNN (mkldnn) kernels on and/or off",
        nargs="+",
        type=on_off,
        default=[True],
        metavar="on|off",
        shown="on",
    )
    add_flag(tp, "--target-accuracy", "also time each loop to this val_accuracy (0 = skip)", type=float, default=0.0)
    add_flag(tp, "--accuracy-train-samples", "training images of a time-to-accuracy run", type=int, default=10_000)
    add_flag(tp, "--accuracy-val-samples", "validation images of a time-to-accuracy run", type=int, default=2000)
    add_flag(tp, "--accuracy-max-epochs", "a time-to-accuracy run stops after this many epochs", type=int, default=10)
    add_flag(tp, "--accuracy-max-seconds", "... or after the epoch that passes this many seconds", type=float, default=600)

    base = "hidden_size=128,num_layers=1,batch_size=128"
    add_flag(
        sc,
        "--base",
        "the configuration each sweep changes one factor of",
        type=parse_config,
        default=parse_config(base),
        metavar="FIELD=VALUE,...",
        shown=base,
    )
    sweep = {"nargs": "+", "type": int}
    add_flag(sc, "--hidden-sizes", "hidden_size sweep", **sweep, default=[32, 64, 128, 256, 512], shown="32 64 128 256 512")
    add_flag(sc, "--num-layers", "num_layers sweep", **sweep, default=[1, 2, 3, 4], shown="1 2 3 4")
    add_flag(sc, "--batch-sizes", "batch_size sweep", **sweep, default=[32, 64, 128, 256, 512], shown="32 64 128 256 512")
    add_flag(
        sc,
        "--reading-orders",
        "reading_order sweep: rows = 28 steps of 28 pixels, pixels = 784 steps of 1",
        nargs="+",
        choices=("rows", "pixels"),
        default=["rows", "pixels"],
        shown="rows pixels",
    )
    add_flag(sc, "--seconds", "each timed epoch is sized to last about this long", type=float, default=5.0)
    add_flag(sc, "--loops", "loops to measure", nargs="+", choices=("project", "baseline"), default=["project"], shown="project")
    return parser


def check_args(parser: argparse.ArgumentParser, args) -> None:
    """Stop with one line, before anything runs, on values that cannot work."""
    counts = {"--repeats": args.repeats, "--val-samples": args.val_samples}
    if args.mode == "throughput":
        counts["--samples + --val-samples"] = args.samples + args.val_samples
        counts["--accuracy-train-samples + --accuracy-val-samples"] = args.accuracy_train_samples + args.accuracy_val_samples
    for name, count in counts.items():
        if not 1 <= count <= MNIST_TRAIN_IMAGES:
            parser.error(f"{name} is {count}; it must be between 1 and {MNIST_TRAIN_IMAGES} (MNIST's training images)")
    if args.mode == "scaling":
        try:
            for factor, values in scaling_sweeps(args).items():
                for value in values:
                    TrainConfig(**{**args.base, factor: value})
        except ParameterError as error:
            parser.error(str(error))


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    device = resolve_device(args.device).type
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lstm-mnist-bench-") as workdir:
        try:
            mnist_root = write_raw_mnist(args.data_dir, Path(workdir) / "torchvision")  # decompressed, for torchvision
        except DataError as error:
            fail(str(error))
        run_mode, to_markdown = (throughput, throughput_markdown) if args.mode == "throughput" else (scaling, scaling_markdown)
        report = run_mode(args, device, mnist_root, Path(workdir))
    env = environment(device)
    report = {"environment": env, "settings": {k: v for k, v in vars(args).items() if k != "out"}, **report}
    markdown = to_markdown(report, env, args)
    stem = write_report(args.out, f"{args.mode}-{device}", report, markdown)
    print(markdown)
    log(f"wrote {stem}.json and {stem}.md in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
