"""What every benchmark shares: its flags, configurations, the environment it ran in, its tables and report files."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import pandas as pd
import torch

from pipeline.config import TrainConfig, parse_bool
from pipeline.tables import markdown_table
from pipeline.tracking import device_params, library_versions

RESULTS = Path("benchmarks/results")


def parse_config(spec: str) -> dict:
    """``"hidden_size=256,num_layers=2"`` -> TrainConfig overrides, checked by building a TrainConfig."""
    kinds = {f.name: type(f.default) for f in dataclasses.fields(TrainConfig) if f.name not in ("device", "epochs")}
    try:
        items = [item.partition("=") for item in spec.split(",") if item]
        overrides = {name: (parse_bool if kinds[name] is bool else kinds[name])(text) for name, _, text in items}
        TrainConfig(**overrides)
    except KeyError as error:
        raise argparse.ArgumentTypeError(f"{error} in {spec!r} is not a TrainConfig field the benchmark sets") from None
    except ValueError as error:  # ParameterError is one
        raise argparse.ArgumentTypeError(str(error)) from None
    return overrides


def config_label(config: TrainConfig) -> str:
    """``h256-l2-b128-rows``, then any other field that differs from TrainConfig's default."""
    shown = ("hidden_size", "num_layers", "batch_size", "reading_order", "device", "seed", "epochs")
    fields = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in shown]
    changed = [f"{name}={getattr(config, name)}" for name in fields if getattr(config, name) != getattr(TrainConfig(), name)]
    return " ".join([f"h{config.hidden_size}-l{config.num_layers}-b{config.batch_size}-{config.reading_order}", *changed])


def flag(parser: argparse.ArgumentParser, name: str, default, help: str, shown=None, **options) -> None:
    """A flag whose help ends with its default, as the stages write it."""
    shown = shown or (" ".join(map(str, default)) if isinstance(default, list) else default)
    parser.add_argument(name, default=default, help=f"{help} (default: {shown})", **options)


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """``--device``, ``--data-dir`` and ``--out``, spelled the same in every script that trains."""
    flag(parser, "--device", "auto", "where to train", choices=("auto", "cpu", "cuda"))
    flag(parser, "--data-dir", "data", "folder holding MNIST/raw, .gz or not")
    flag(parser, "--out", RESULTS, "folder for the .json and .md results", type=Path)


def environment(device: torch.device) -> dict:
    """The machine and libraries of a measurement: the train stage's own run params (device_params,
    library_versions), plus the CPU, the thread count, the date and the command."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []  # Linux
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), platform.processor())
    main = getattr(sys.modules["__main__"], "__spec__", None)  # python -m benchmarks.<name>
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([f"python -m {main.name}" if main else Path(sys.argv[0]).name, *sys.argv[1:]]),
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "threads": torch.get_num_threads(),
        **device_params(device),
        **library_versions(),
    }


def describe(env: dict) -> str:
    """One line for a report's header."""
    where = env.get("gpu_name") or env["cpu"]
    return f"{env['resolved_device']} ({where}), torch {env['torch_version']}, {env['threads']} thread(s), {env['date']}"


def write_report(out: Path, name: str, report: dict, markdown: str) -> Path:
    """``<out>/<name>-<date>-<time>.json`` and ``.md``; returns that path without its suffix."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{name}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    stem.with_suffix(".md").write_text(markdown)
    return stem


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def render(rows: list[dict], columns: dict[str, str]) -> str:
    """A markdown table of ``rows``, each column a format string of a row's fields: '-' where one is missing,
    and a column that is '-' in every row left out."""

    def cell(row: dict, spec: str) -> str:
        try:
            return spec.format(**{k: None if pd.isna(v) else v for k, v in row.items() if not isinstance(v, dict | list)})
        except (KeyError, TypeError, ValueError):  # a field missing or None
            return "-"

    table = pd.DataFrame([{name: cell(row, spec) for name, spec in columns.items()} for row in rows])
    return markdown_table(table.loc[:, (table != "-").any()])
