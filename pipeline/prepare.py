"""Stage 1, prepare: raw IDX files -> a verified, seeded train/val/test split in MLflow.

Reads:  the four raw IDX files of ``--dataset`` under ``--data-dir`` (torchvision's layout,
        ``.gz`` or not), downloading them there when none are found and the machine is online.
Writes: artifacts ``prepared/{train,val,test}.pt`` (uint8 tensors) and ``prepared/manifest.json``
        (counts, class histograms, sha256 of each file, source md5s, seed); the training split
        as an MLflow dataset input; params of PrepareConfig; metrics ``train_count``,
        ``val_count``, ``test_count``.

    python -m pipeline.prepare --data-dir ../shared/data --train-limit 6000
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import mlflow
import torch

from pipeline.config import OneLineParser, PrepareConfig, add_config_arguments, build_configs, fail, run_entry_point, say
from pipeline.data import DataError, Split, load_raw, save_prepared, split_train_val
from pipeline.tracking import PREPARED_ARTIFACT, log_params, log_split_input, stage_run


def prepare(config: PrepareConfig, out_dir: str | Path) -> dict:
    """Load, verify and split the dataset into ``out_dir``; return its manifest. A raw file missing or
    not the official one raises DataError before anything is written."""
    train, test, source_md5 = load_raw(config.dataset, config.data_dir)
    train, val = split_train_val(train, config.val_size, config.train_limit, config.seed)
    # The parameters, but not where the raw files were: a path is this machine's, not the data's.
    manifest = {name: value for name, value in dataclasses.asdict(config).items() if name != "data_dir"}
    return save_prepared(Path(out_dir), {"train": train, "val": val, "test": test}, {**manifest, "source_md5": source_md5})


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(prog="prepare", description=__doc__.split("\n")[0])
    add_config_arguments(parser, PrepareConfig)
    _, (config,) = build_configs(parser, argv, PrepareConfig)

    with tempfile.TemporaryDirectory(prefix="prepared-") as tmp:
        folder = Path(tmp) / PREPARED_ARTIFACT
        try:
            manifest = prepare(config, folder)  # all checks happen here, before any run opens
        except DataError as error:
            fail(str(error))
        with stage_run("prepare") as run:
            log_params(dataclasses.asdict(config))
            mlflow.log_metrics({f"{name}_count": split["count"] for name, split in manifest["splits"].items()})
            # The run's dataset input: the training split as saved, with the raw files' folder as its source.
            train = Split(**torch.load(folder / "train.pt", weights_only=True))
            log_split_input(train, f"{config.dataset}-train", manifest["splits"]["train"]["sha256"], config.data_dir, "training")
            mlflow.log_artifacts(str(folder), PREPARED_ARTIFACT)
        counts = ", ".join(f"{name} {split['count']}" for name, split in manifest["splits"].items())
        say(f"prepared {config.dataset}: {counts}; run {run.info.run_id}")


if __name__ == "__main__":
    run_entry_point(main)
