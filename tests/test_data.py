"""Raw IDX files are verified before use; prepared splits are deterministic and tamper-evident."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from pipeline import data as data_module
from pipeline.data import DataError, RawFile, load_prepared, load_raw, save_prepared, split_train_val, to_sequences
from tests.conftest import REPO, write_synthetic_mnist

TRAIN_IMAGES = "train-images-idx3-ubyte"


def test_synthetic_files_load_through_torchvision(synthetic_mnist):
    train, test, md5s = load_raw("mnist", synthetic_mnist)
    assert train.images.shape == (400, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (100, 28, 28) and len(test.labels) == 100
    assert set(md5s) == {f.name for f in data_module.DATASETS["mnist"].files}


def test_decompressed_files_are_found_too(tmp_path, monkeypatch):
    spec = write_synthetic_mnist(tmp_path, compress=False)
    monkeypatch.setitem(data_module.DATASETS, "mnist", spec)
    train, _, _ = load_raw("mnist", tmp_path)
    assert len(train.labels) == 400


def test_real_mnist_matches_the_official_checksums(mnist_dir):
    train, test, md5s = load_raw("mnist", mnist_dir)
    assert (len(train.labels), len(test.labels)) == (60_000, 10_000)
    assert md5s[TRAIN_IMAGES] == "6bbc9ace898e44ae57da46a324031adb"
    assert torch.bincount(test.labels).tolist()[:2] == [980, 1135]  # the official test histogram


def corrupt(root, mutate):
    path = root / "MNIST" / "raw" / f"{TRAIN_IMAGES}.gz"
    payload = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(mutate(payload)))
    return path


@pytest.mark.parametrize(
    "mutate, problem",
    [
        (lambda b: b[: len(b) // 2], "truncated"),
        (lambda b: b[:100] + bytes([b[100] ^ 0xFF]) + b[101:], "altered bytes"),
        (lambda b: b"\x00\x00\x08\x01" + b[4:], "magic number"),
        (lambda b: b[:4] + (399).to_bytes(4, "big") + b[8:], "399 items, expected 400"),
    ],
    ids=["truncated", "altered", "magic", "count"],
)
def test_a_bad_file_is_named_with_its_problem(synthetic_mnist, mutate, problem):
    path = corrupt(synthetic_mnist, mutate)
    with pytest.raises(DataError) as error:
        load_raw("mnist", synthetic_mnist)
    assert str(path) in str(error.value) and problem in str(error.value)
    assert "replace it" in str(error.value)


def test_images_and_labels_of_different_lengths_are_named(tmp_path, monkeypatch):
    spec = write_synthetic_mnist(tmp_path)
    labels_path = tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz"
    payload = gzip.decompress(labels_path.read_bytes())
    shorter = payload[:4] + (399).to_bytes(4, "big") + payload[8:-1]  # a consistent file of 399 labels
    labels_path.write_bytes(gzip.compress(shorter))
    trusted = RawFile(spec.files[1].name, hashlib.md5(shorter).hexdigest(), 0x801, 399)
    monkeypatch.setitem(data_module.DATASETS, "mnist", dataclasses.replace(spec, files=(spec.files[0], trusted, *spec.files[2:])))
    with pytest.raises(
        DataError, match=r"train-images-idx3-ubyte.gz holds 400 images but .*train-labels-idx1-ubyte.gz holds 399 labels"
    ):
        load_raw("mnist", tmp_path)


LOAD_UNDER_O = """
import sys
from pathlib import Path
from pipeline import data
from tests.conftest import write_synthetic_mnist

assert False, "this line runs only without -O"
data.DATASETS["mnist"] = write_synthetic_mnist(Path(sys.argv[2]))  # the md5s of the good files
try:
    data.load_raw("mnist", sys.argv[1])
except data.DataError as error:
    print(error)
    sys.exit(3)
"""


@pytest.mark.slow
def test_the_checks_hold_under_python_O(synthetic_mnist, tmp_path):
    corrupt(synthetic_mnist, lambda b: b[:100] + bytes([b[100] ^ 0xFF]) + b[101:])
    done = subprocess.run(
        [sys.executable, "-O", "-c", LOAD_UNDER_O, str(synthetic_mnist), str(tmp_path / "good")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 3, done.stderr
    assert "altered bytes" in done.stdout


def test_truncated_gzip_stream_is_named(synthetic_mnist):
    path = synthetic_mnist / "MNIST" / "raw" / f"{TRAIN_IMAGES}.gz"
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(DataError, match=f"{path}: truncated or corrupt gzip"):
        load_raw("mnist", synthetic_mnist)


def test_missing_files_and_no_network_say_where_to_put_them(tmp_path, monkeypatch):
    class Offline:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    spec = data_module.DATASETS["mnist"]
    monkeypatch.setitem(data_module.DATASETS, "mnist", data_module.DatasetSpec(Offline, spec.folder, spec.files))
    with pytest.raises(DataError) as error:
        load_raw("mnist", tmp_path / "empty")
    message = str(error.value)
    assert TRAIN_IMAGES in message and "download failed" in message and "data_dir" in message


def test_split_is_seeded_disjoint_and_limited(synthetic_mnist):
    train, _, _ = load_raw("mnist", synthetic_mnist)
    a_train, a_val = split_train_val(train, 100, 0, seed=7)
    b_train, b_val = split_train_val(train, 100, 0, seed=7)
    _, c_val = split_train_val(train, 100, 0, seed=8)
    assert torch.equal(a_val.images, b_val.images) and torch.equal(a_train.labels, b_train.labels)
    assert not torch.equal(a_val.images, c_val.images)
    assert (len(a_train.labels), len(a_val.labels)) == (300, 100)
    # Together the two parts are the original set, each image once.
    rows = lambda split: {bytes(image.numpy()) for image in split.images}  # noqa: E731
    assert rows(a_train).isdisjoint(rows(a_val)) and rows(a_train) | rows(a_val) == rows(train)
    limited, val = split_train_val(train, 100, 50, seed=7)
    assert len(limited.labels) == 50 and torch.equal(val.images, a_val.images)


def prepared_folder(tmp_path, synthetic_mnist):
    train, test, md5s = load_raw("mnist", synthetic_mnist)
    train, val = split_train_val(train, 100, 0, 0)
    folder = tmp_path / "prepared"
    manifest = save_prepared(folder, {"train": train, "val": val, "test": test}, {"source_md5": md5s, "dataset": "mnist"})
    return folder, manifest, train


def test_prepared_split_round_trips_with_its_manifest(tmp_path, synthetic_mnist):
    folder, manifest, train = prepared_folder(tmp_path, synthetic_mnist)
    loaded = load_prepared(folder)
    assert torch.equal(loaded.train.images, train.images) and torch.equal(loaded.train.labels, train.labels)
    assert loaded.train.images.dtype == torch.uint8
    assert manifest["splits"]["train"]["class_counts"] == torch.bincount(train.labels, minlength=10).tolist()
    assert sum(manifest["splits"]["val"]["class_counts"]) == manifest["splits"]["val"]["count"] == 100
    assert json.loads((folder / "manifest.json").read_text()) == loaded.manifest
    assert 0 < manifest["pixel_mean"] < 1 and 0 < manifest["pixel_std"] < 1
    assert not list(folder.glob(".*tmp*")), "temporary files left behind"


def test_a_tampered_or_incomplete_prepared_split_is_refused(tmp_path, synthetic_mnist):
    folder, _, _ = prepared_folder(tmp_path, synthetic_mnist)
    (folder / "val.pt").write_bytes((folder / "val.pt").read_bytes()[:-10])
    with pytest.raises(DataError, match="val.pt: missing or does not match"):
        load_prepared(folder)
    (folder / "manifest.json").unlink()
    with pytest.raises(DataError, match="no manifest.json"):
        load_prepared(folder)


def test_a_split_prepared_in_another_format_is_refused_in_one_line(tmp_path, synthetic_mnist):
    folder, manifest, _ = prepared_folder(tmp_path, synthetic_mnist)
    (folder / "manifest.json").write_text(json.dumps({**manifest, "format_version": 0}))
    with pytest.raises(DataError, match=r"prepared in format 0, and this code reads format 1; rerun the prepare stage"):
        load_prepared(folder)


@pytest.mark.parametrize("order, shape", [("rows", (2, 28, 28)), ("pixels", (2, 784, 1))])
def test_reading_order_shapes_and_scales(order, shape):
    images = torch.full((2, 28, 28), 255, dtype=torch.uint8)
    images[0, 0, 1] = 0
    sequences = to_sequences(images, order)
    assert sequences.shape == shape and sequences.dtype == torch.float32
    assert sequences.max() == 1.0 and sequences.flatten(1)[0, 1] == 0.0  # row-major: pixel (0, 1) is step/feature 1


def test_fashion_mnist_is_also_found_where_debian_installs_it(tmp_path, monkeypatch):
    debian = tmp_path / "usr-share-datasets-fashion-mnist"
    spec = write_synthetic_mnist(tmp_path / "written")
    for path in (tmp_path / "written" / "MNIST" / "raw").iterdir():
        debian.mkdir(exist_ok=True)
        path.rename(debian / path.name)  # flat, as the Debian package lays them out
    fashion = data_module.DATASETS["fashion-mnist"]
    assert fashion.extra_dirs == ("/usr/share/datasets/fashion-mnist",)
    monkeypatch.setitem(
        data_module.DATASETS,
        "fashion-mnist",
        data_module.DatasetSpec(fashion.torchvision_class, fashion.folder, spec.files, (str(debian),)),
    )
    train, test, _ = load_raw("fashion-mnist", tmp_path / "empty-data-dir")
    assert (len(train.labels), len(test.labels)) == (400, 100)


def test_a_prepared_file_holding_pickled_code_is_refused(tmp_path, synthetic_mnist):
    folder, _, _ = prepared_folder(tmp_path, synthetic_mnist)
    marker = tmp_path / "pwned"

    class Planted:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"images": Planted(), "labels": torch.zeros(1)}, folder / "val.pt")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["splits"]["val"]["sha256"] = data_module.sha256_file(folder / "val.pt")  # even with a matching checksum
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="val.pt: refused, it holds more than plain tensors"):
        load_prepared(folder)
    assert not marker.exists()
