"""benchmarks/gpu_check.sh, the one script a lent GPU machine runs, at toy sizes on the CPU
(``DEVICE=cpu QUICK=1``, as docs/gpu.md says): every step it runs there must run here first."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

STEPS = ("probe", "tests", "precision", "throughput", "to_accuracy", "study")


@pytest.mark.slow(seconds=180)
def test_every_step_of_the_gpu_check_runs_and_is_summarised(mnist_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PYTEST_"))}
    env.update(
        DEVICE="cpu",
        QUICK="1",
        OUT=str(tmp_path / "results"),
        DATA_DIR=str(mnist_dir),
        PY=sys.executable,  # this environment, as the script takes the project's .venv
        PYTEST_ADDOPTS=f"--basetemp={tmp_path / 'pytest'}",  # its own pytest keeps out of this one's folders
    )
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = (tmp_path / "results" / "summary.md").read_text()
    for step in STEPS:
        assert f"  {step}: exit 0 after" in summary, f"step {step} failed:\n{summary}"
    assert "nothing to summarise" not in summary and "nothing registered" not in summary, summary
    assert "2 worker(s)" in summary  # the study's spawned workers, as a GPU's
