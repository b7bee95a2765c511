"""Train fully over seeds, choose on validation, test once: the time each candidate needs to reach an accuracy.

    python -m benchmarks.to_accuracy --data-dir ../shared/data --seeds 1 2 3 --epochs 3 --against-tutorial

Each ``--config`` candidate (in each of ``--precisions``) trains for each ``--epochs`` schedule, shortest
first, once per seed on that seed's split. Its schedule is the shortest whose mean best_val_accuracy
reaches ``--target`` (else its best on validation); only that schedule's models are scored, once, on
the test images. A training time is the sum of its epochs, validation passes included, after an
untimed warm-up; ``--against-tutorial`` measures an epoch of the tutorial's loop before and after.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import pandas as pd

from benchmarks.bench import run_job
from benchmarks.report import add_common_flags, config_label, describe, environment, flag, log, parse_config, render, write_report
from benchmarks.tutorial_baseline import write_raw_mnist
from pipeline.config import PrepareConfig, TrainConfig
from pipeline.data import PreparedData, Split, load_prepared
from pipeline.inference import model_device
from pipeline.numerics import resolve_device
from pipeline.prepare import prepare
from pipeline.training import evaluate_split, train

DEFAULT = "hidden_size=256,num_layers=2"  # the pipeline's defaults
TUTORIAL = {"hidden_size": 256, "num_layers": 2, "batch_size": 128, "learning_rate": 1e-3, "precision": "fp32"}


def head(data: PreparedData, n: int) -> PreparedData:
    """The first ``n`` training and 256 validation images: a warm-up's data."""
    return dataclasses.replace(data, train=Split(*(t[:n] for t in data.train)), val=Split(*(t[:256] for t in data.val)))


def tutorial_epoch_seconds(raw_root: Path, device: str, seed: int) -> float:
    """One timed epoch of the tutorial's loop in a fresh process (``benchmarks/measure.py``)."""
    config = dataclasses.asdict(TrainConfig(**TUTORIAL, device=device, seed=seed))
    job = {"kind": "epoch", "loop": "baseline", "config": config, "raw_root": str(raw_root), "seed": seed}
    return run_job({**job, "samples": 55_000, "val_samples": 5_000})["epoch_seconds"]


def train_schedule(config: TrainConfig, data: dict[int, PreparedData], seeds: list[int]) -> tuple[dict, list]:
    """One schedule over seeds: its validation summary, and the models to test if it is chosen."""
    runs, models = [], []
    for seed in seeds:
        result = train(dataclasses.replace(config, seed=seed), data[seed], progress=False)
        epochs = pd.DataFrame([vars(m) for m in result.history])
        runs.append({"seed": seed, "train_seconds": epochs.epoch_seconds.sum(), "best_val_accuracy": result.best_val_accuracy})
        runs[-1]["samples_per_second"] = epochs.samples_per_second.median()
        models.append((seed, result))
    frame = pd.DataFrame(runs)
    val = frame.best_val_accuracy.agg(["mean", "std"]).fillna(0)  # one seed: no spread
    row = {"config": config_label(config), "precision": models[0][1].precision, "epochs": config.epochs}
    row |= {"train_seconds": frame.train_seconds.mean(), "samples_per_second": frame.samples_per_second.median()}
    row |= {"val_accuracy": val["mean"], "val_std": val["std"], "runs": runs}
    log(f"{row['config']}, {config.epochs} epochs: mean best_val_accuracy {val['mean']:.4f}")
    return row, models


def candidate(config: TrainConfig, schedules: list[int], target: float, data: dict, seeds: list[int]) -> list[dict]:
    """Every schedule, shortest first, until one reaches ``target`` on validation: that one (or the best
    on validation) is the candidate's choice, and only its models are scored on the test set."""
    train(dataclasses.replace(config, epochs=1), head(data[seeds[0]], 4 * config.batch_size), progress=False)  # warm-up
    rows, models = [], []
    for epochs in sorted(schedules):
        row, trained = train_schedule(dataclasses.replace(config, epochs=epochs), data, seeds)
        rows.append(row)
        models.append(trained)
        if row["val_accuracy"] >= target:
            break
    chosen = max(range(len(rows)), key=lambda i: (rows[i]["val_accuracy"] >= target, rows[i]["val_accuracy"]))
    test = [evaluate_split(r.model, data[s].test.to(model_device(r.model)), config.reading_order)[1] for s, r in models[chosen]]
    test = pd.Series(test).agg(["mean", "std", "min"]).fillna(0)
    rows[chosen] |= {"chosen": True, "reached": rows[chosen]["val_accuracy"] >= target}
    rows[chosen] |= {"test_accuracy": test["mean"], "test_std": test["std"], "test_min": test["min"]}
    return rows


COLUMNS = {  # header: the row's fields as a format string
    "config": "{config}",
    "precision": "{precision}",
    "epochs": "{epochs}",
    "training s": "{train_seconds:.1f}",
    "tutorial epochs": "{tutorial_epochs:.2f}",
    "samples/s": "{samples_per_second:.0f}",
    "best_val_accuracy mean ± std": "{val_accuracy:.4f} ± {val_std:.4f}",
    "test_accuracy mean ± std, min (the chosen schedule only)": "{test_accuracy:.4f} ± {test_std:.4f}, {test_min:.4f}",
}


def markdown(report: dict) -> str:
    env, unit, reached = report["environment"], report["tutorial_epoch_seconds"], report["reached"]
    rows = [{**r, "tutorial_epochs": r["train_seconds"] / (sum(unit) / len(unit)) if unit else None} for r in report["rows"]]
    tutorial = f" One epoch of the tutorial's loop took {' and '.join(f'{s:.1f}' for s in unit)} s, before and after."
    parts = [
        f"# Train, choose on validation, test once: {describe(env)}\n\n`{env['command']}`\n\n{report['train_images']} "
        f"training images; seeds {report['seeds']}, {report['split']}. A candidate's schedule is the shortest whose mean "
        f"best_val_accuracy reaches {report['target']}; only that one is tested." + (tutorial if unit else ""),
        render(rows, COLUMNS),
        f"**fastest to {report['target']} on validation: {reached['config']}, {reached['epochs']} epochs, "
        f"{reached['train_seconds']:.1f} s of training; test_accuracy {reached['test_accuracy']:.4f}**"
        if reached
        else f"**{report['target']} not reached on validation by any candidate**",
    ]
    return "\n\n".join(parts) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_flags(parser)
    flag(parser, "--config", [parse_config(DEFAULT)], "candidates: TrainConfig overrides", DEFAULT, nargs="+", type=parse_config)
    flag(parser, "--precisions", None, "each candidate in each", "its own", nargs="+", choices=("fp32", "bf16", "auto"))
    flag(parser, "--epochs", [TrainConfig.epochs], "schedules to try, in epochs", nargs="+", type=int)
    flag(parser, "--target", 0.99, "mean best_val_accuracy to reach", type=float)
    flag(parser, "--seeds", [42], "training seeds", nargs="+", type=int)
    flag(parser, "--split-seed", None, "one split for every seed", "each seed its own, as -P seed=s makes it", type=int)
    flag(parser, "--train-limit", 0, "training images, 0 = all 55,000", type=int)
    flag(parser, "--against-tutorial", False, "also time an epoch of the tutorial's loop", action="store_true")
    args = parser.parse_args()
    device = resolve_device(args.device)
    precisions = [{"precision": p} for p in args.precisions or []] or [{}]
    candidates = [TrainConfig(**overrides, **p, device=device.type) for overrides in args.config for p in precisions]
    data, unit = {}, []
    with tempfile.TemporaryDirectory(prefix="to-accuracy-") as tmp:
        for seed in args.seeds:
            split_seed = seed if args.split_seed is None else args.split_seed
            prepare(PrepareConfig(data_dir=args.data_dir, train_limit=args.train_limit, seed=split_seed), Path(tmp) / str(seed))
            data[seed] = load_prepared(Path(tmp) / str(seed))
        raw_root = write_raw_mnist(args.data_dir, Path(tmp) / "torchvision") if args.against_tutorial else None
        unit += [tutorial_epoch_seconds(raw_root, device.type, args.seeds[0])] if raw_root else []
        rows = [row for config in candidates for row in candidate(config, args.epochs, args.target, data, args.seeds)]
        unit += [tutorial_epoch_seconds(raw_root, device.type, args.seeds[0])] if raw_root else []
    split = "each seed its own split" if args.split_seed is None else f"one split (seed {args.split_seed})"
    report = {"environment": environment(device), "target": args.target, "seeds": args.seeds, "split": split, "rows": rows}
    report |= {"train_images": len(data[args.seeds[0]].train.labels), "tutorial_epoch_seconds": unit}
    report["reached"] = min((r for r in rows if r.get("reached")), key=lambda r: r["train_seconds"], default=None)
    text = markdown(report)
    write_report(args.out, f"to-accuracy-{device.type}", report, text)
    print(text)


if __name__ == "__main__":
    main()
