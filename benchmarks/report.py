"""What every benchmark script shares: its common flags, and writing its result as .json and .md."""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

RESULTS = Path("benchmarks/results")


def add_common_flags(parser: argparse.ArgumentParser, *, device: bool = True, data_dir: bool = True) -> None:
    """``--device`` and ``--data-dir`` (where asked), and ``--out``, spelled the same in every script."""
    if device:
        parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to train (default: auto)")
    if data_dir:
        parser.add_argument("--data-dir", default="data", help="folder holding MNIST/raw, .gz or not (default: data)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"folder for the .json and .md results (default: {RESULTS})")


def write_report(out: Path, name: str, report: dict, markdown: str) -> Path:
    """``<out>/<name>-<date>-<time>.json`` and ``.md``; returns that path without its suffix."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{name}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    stem.with_suffix(".md").write_text(markdown)
    return stem
