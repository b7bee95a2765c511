#!/usr/bin/env bash
# The tests on the GPU machine's versions, here on the CPU, before a device is lent: Python 3.12 with
# torch 2.11.0 and torchvision 0.26.0 (docs/gpu.md), every other pin as requirements.txt has it. What
# differs between torch versions (torch.export above all, which logs every model) shows here, not in
# the GPU check's few minutes. The venv is made once (a CUDA build of torch: a few GB, a few minutes).
#   PYTHON312=/path/to/python3.12 bash benchmarks/gpu_versions.sh              # the fast tier
#   bash benchmarks/gpu_versions.sh tests/test_logged_model.py                  # or any pytest arguments
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/tmp/lstm-mnist-gpu-versions}
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON312:-python3.12}" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q torch==2.11.0 torchvision==0.26.0 \
    $(grep -vE '^\s*(#|$)' requirements.txt | grep -vE '^(torch|torchvision)==')
  "$VENV/bin/python" -m pip install -q --no-deps -e .
fi
"$VENV/bin/python" -c "import sys, torch; print(f'Python {sys.version.split()[0]}, torch {torch.__version__}')"
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(-m "not slow")
"$VENV/bin/python" -m pytest -n 3 -p no:cacheprovider "${args[@]}"
