"""The browser test of the records: docs/screenshots.py runs two pipelines and a study through
`mlflow run`, and fails unless the MLflow UI, read back by headless Chromium, shows their runs.
Skipped where Debian's `chromium` is not installed."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PICTURES = ("runs-table.png", "study-compare.png", "learning-curves.png")


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's header; fails if the file is not a PNG."""
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and header[12:16] == b"IHDR", f"{path.name} is not a PNG"
    return struct.unpack(">II", header[16:24])


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_screenshots_show_the_runs(tmp_path, mnist_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["TMPDIR"] = str(tmp_path)  # the script's throwaway store and browser profile
    # Smaller than the script's defaults: the check is the same, the runs are shorter.
    flags = {"--out": tmp_path / "images", "--data-dir": mnist_dir, "--train-limit": 2000, "--epochs": 2, "--n-trials": 3}
    command = [sys.executable, str(REPO / "docs" / "screenshots.py"), *(str(x) for item in flags.items() for x in item)]
    command += ["--window-size", "1280,800"]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    for name in PICTURES:
        assert png_size(tmp_path / "images" / name) == (1280, 800)
