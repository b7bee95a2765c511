"""Raw MNIST-style IDX files in, a verified and split dataset out, and back again.

Reading: the four IDX files are looked up in torchvision's layout (``<data_dir>/MNIST/raw/``,
``.gz`` or decompressed), checked byte for byte against the official md5 of the decompressed
file, and parsed by torchvision's own dataset class. Nothing is found: torchvision downloads.

Writing: a prepared split is a folder of three uint8 tensor files and ``manifest.json``,
which records each file's sha256 so a reader can tell a complete folder from a half-written one.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torchvision

NUM_CLASSES = 10
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
# How a 28x28 image becomes a (seq_len, input_size) sequence.
SEQUENCE_SHAPES = {"rows": (28, 28), "pixels": (784, 1)}


class DataError(RuntimeError):
    """Input data missing or not what it claims to be; the message names the file and the fix."""


@dataclass(frozen=True)
class RawFile:
    name: str  # decompressed file name, as in torchvision's raw folder
    md5: str  # md5 of the decompressed file
    magic: int  # IDX magic number: 0x803 images, 0x801 labels
    count: int  # number of images or labels


@dataclass(frozen=True)
class DatasetSpec:
    torchvision_class: type
    folder: str  # torchvision's folder name under data_dir
    files: tuple[RawFile, ...]  # train images, train labels, test images, test labels
    extra_dirs: tuple[str, ...] = ()  # other places the raw files are commonly installed


def _files(*md5s: str) -> tuple[RawFile, ...]:
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    magics, counts = (0x803, 0x801, 0x803, 0x801), (60_000, 60_000, 10_000, 10_000)
    return tuple(RawFile(*row) for row in zip(names, md5s, magics, counts, strict=True))


DATASETS = {
    "mnist": DatasetSpec(
        torchvision.datasets.MNIST,
        "MNIST",
        _files(
            "6bbc9ace898e44ae57da46a324031adb",
            "a25bea736e30d166cdddb491f175f624",
            "2646ac647ad5339dbf082846283269ea",
            "27ae3e4e09519cfbb04c329615203637",
        ),
    ),
    "fashion-mnist": DatasetSpec(
        torchvision.datasets.FashionMNIST,
        "FashionMNIST",
        _files(
            "f4a8712d7a061bf5bd6d2ca38dc4d50a",
            "9018921c3c673c538a1fc5bad174d6f9",
            "8181f5470baa50b63fa0f6fddb340f0a",
            "15d484375f8d13e6eb1aabb0c3f46965",
        ),
        extra_dirs=("/usr/share/datasets/fashion-mnist",),  # Debian's dataset-fashion-mnist
    ),
}


class Split(NamedTuple):
    images: torch.Tensor  # (N, 28, 28) uint8
    labels: torch.Tensor  # (N,) int64

    def to(self, device: torch.device) -> Split:
        return Split(self.images.to(device), self.labels.to(device))


@dataclass(frozen=True)
class PreparedData:
    train: Split
    val: Split
    test: Split
    manifest: dict

    @property
    def class_names(self) -> list[str]:
        return [str(name) for name in DATASETS[self.manifest["dataset"]].torchvision_class.classes]


# --- raw IDX files ----------------------------------------------------------------------------


def search_dirs(spec: DatasetSpec, data_dir: str | os.PathLike) -> list[Path]:
    root = Path(data_dir)
    return [root / spec.folder / "raw", root, *map(Path, spec.extra_dirs)]


def find_raw_file(raw: RawFile, dirs: list[Path]) -> Path | None:
    candidates = (folder / name for folder in dirs for name in (raw.name, raw.name + ".gz"))
    return next((path for path in candidates if path.is_file()), None)


def read_raw_file(path: Path) -> bytes:
    """The decompressed bytes of an IDX file, ``.gz`` or not."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise DataError(f"{path}: truncated or corrupt gzip file ({error}); {_FIX}") from None


_FIX = "replace it with the official file or delete it so it is downloaded again"


def check_raw_file(path: Path, data: bytes, raw: RawFile) -> None:
    """Raise DataError unless ``data`` is the official ``raw`` file, saying how it differs."""
    digest = hashlib.md5(data).hexdigest()
    if digest == raw.md5:
        return
    expected_size = 16 + 784 * raw.count if raw.magic == 0x803 else 8 + raw.count  # images: 3 dims; labels: 1
    magic, count = struct.unpack(">II", data[:8]) if len(data) >= 8 else (raw.magic, raw.count)
    if magic != raw.magic:
        problem = f"IDX magic number 0x{magic:08x}, expected 0x{raw.magic:08x} (not this kind of IDX file)"
    elif count != raw.count:
        problem = f"header says {count} items, expected {raw.count}"
    elif len(data) != expected_size:
        problem = f"{len(data)} bytes, expected {expected_size} (truncated)"
    else:
        problem = f"md5 {digest} differs from the official {raw.md5} (altered bytes)"
    raise DataError(f"{path}: {problem}; {_FIX}")


def load_raw(dataset: str, data_dir: str | os.PathLike) -> tuple[Split, Split, dict[str, str]]:
    """Official train and test splits of ``dataset`` (found in ``search_dirs`` or downloaded into
    ``data_dir``), and the md5 of each verified file."""
    spec = DATASETS[dataset]
    dirs = search_dirs(spec, data_dir)
    if missing := [raw.name for raw in spec.files if find_raw_file(raw, dirs) is None]:
        _download(spec, data_dir, dirs, missing)
    paths = [find_raw_file(raw, dirs) for raw in spec.files]
    with tempfile.TemporaryDirectory(prefix="lstm-mnist-raw-") as staging:
        raw_folder = Path(staging) / spec.folder / "raw"
        raw_folder.mkdir(parents=True)
        counts = []
        for raw, path in zip(spec.files, paths, strict=True):
            data = read_raw_file(path)
            check_raw_file(path, data, raw)
            counts.append(int.from_bytes(data[4:8], "big"))
            (raw_folder / raw.name).write_bytes(data)
        for i in (0, 2):  # (images, labels) of train, then of test
            if counts[i] != counts[i + 1]:
                raise DataError(
                    f"{paths[i]} holds {counts[i]} images but {paths[i + 1]} holds {counts[i + 1]} labels; "
                    "they must come from the same release"
                )
        train, test = (spec.torchvision_class(staging, train=is_train, download=False) for is_train in (True, False))
        train, test = (Split(d.data.contiguous(), d.targets.long()) for d in (train, test))
    return train, test, {raw.name: raw.md5 for raw in spec.files}


def _download(spec: DatasetSpec, data_dir, dirs: list[Path], missing: list[str]) -> None:
    try:
        spec.torchvision_class(str(data_dir), train=True, download=True)
        spec.torchvision_class(str(data_dir), train=False, download=True)
    except Exception as error:  # torchvision raises RuntimeError, URLError, OSError, ...
        looked = ", ".join(str(d) for d in dirs)
        reason = " ".join(f"{type(error).__name__}: {error}".split())  # torchvision's message spans lines
        raise DataError(
            f"{', '.join(missing)} not found (looked in {looked}) and the download failed "
            f"({reason}); copy the raw files (.gz or not) into "
            f"{Path(data_dir) / spec.folder / 'raw'} or pass -P data_dir=<folder holding {spec.folder}/raw>"
        ) from None


# --- the prepared split -----------------------------------------------------------------------


def split_train_val(train: Split, val_size: int, train_limit: int, seed: int) -> tuple[Split, Split]:
    """Hold out ``val_size`` seeded random training images; keep ``train_limit`` of the rest."""
    if val_size >= len(train.labels):
        raise DataError(f"val_size={val_size} leaves no training images out of {len(train.labels)}")
    order = torch.randperm(len(train.labels), generator=torch.Generator().manual_seed(seed))
    train_index, val_index = order[val_size:][: train_limit or None].sort().values, order[:val_size].sort().values
    return Split(train.images[train_index], train.labels[train_index]), Split(train.images[val_index], train.labels[val_index])


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)``, then move the finished file into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_prepared(out_dir: Path, splits: dict[str, Split], manifest: dict) -> dict:
    """Write each split as uint8 tensors and then the manifest, which goes last: a folder
    without a manifest, or whose files don't match it, is incomplete."""
    out_dir.mkdir(parents=True, exist_ok=True)
    train_pixels = splits["train"].images.float().div(255)
    manifest = {
        **manifest,
        "format_version": FORMAT_VERSION,
        # The model standardises its input with these (training split only: no peeking).
        "pixel_mean": train_pixels.mean().item(),
        "pixel_std": train_pixels.std().item(),
        "splits": {},
    }
    for name, (images, labels) in splits.items():
        path = out_dir / f"{name}.pt"
        tensors = {"images": images.to(torch.uint8).contiguous(), "labels": labels.to(torch.uint8).contiguous()}
        atomic_write(path, lambda tmp, tensors=tensors: torch.save(tensors, tmp))
        manifest["splits"][name] = {
            "file": path.name,
            "count": len(labels),
            "class_counts": torch.bincount(labels, minlength=NUM_CLASSES).tolist(),
            "sha256": sha256_file(path),
        }
    atomic_write(out_dir / "manifest.json", lambda tmp: tmp.write_text(json.dumps(manifest, indent=2)))
    return manifest


def load_prepared(folder: str | os.PathLike) -> PreparedData:
    """Read a folder written by ``save_prepared``, checking it is complete and unaltered."""
    folder = Path(folder)
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise DataError(f"{folder}: no manifest.json, so not a complete prepared split; rerun the prepare stage")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{folder}: prepared in format {manifest.get('format_version')}, and this code reads format "
            f"{FORMAT_VERSION}; rerun the prepare stage"
        )
    splits = {}
    for name in SPLITS:
        entry = manifest["splits"][name]
        path = folder / entry["file"]
        if not path.is_file() or sha256_file(path) != entry["sha256"]:
            raise DataError(f"{path}: missing or does not match its manifest checksum; rerun the prepare stage")
        try:
            tensors = torch.load(path, weights_only=True)  # plain tensors only: no pickled code runs
        except pickle.UnpicklingError as error:
            raise DataError(f"{path}: refused, it holds more than plain tensors ({error}); rerun the prepare stage") from None
        splits[name] = Split(tensors["images"], tensors["labels"].long())
    return PreparedData(**splits, manifest=manifest)


def to_sequences(images: torch.Tensor, reading_order: str) -> torch.Tensor:
    """uint8 images (B, 28, 28) -> float sequences (B, seq_len, input_size) in [0, 1]."""
    seq_len, input_size = SEQUENCE_SHAPES[reading_order]
    return images.reshape(-1, seq_len, input_size).float().div_(255)
