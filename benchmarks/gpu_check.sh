#!/usr/bin/env bash
# The GPU headline numbers in one run (meant for one H200, under 8 minutes), into
# benchmarks/results/gpu-<date>/: the hardware, the project loop against the tutorial's loop,
# the training time to 99% MNIST test accuracy, and a 40-trial study in 5 minutes.
#
#   bash benchmarks/gpu_check.sh                                  # DATA_DIR=../shared/data, DEVICE=cuda
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu_check.sh               # a few-minute plumbing check on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$PWD/.venv/bin/python}
DATA_DIR=$(realpath "${DATA_DIR:-../shared/data}")
DEVICE=${DEVICE:-cuda}
OUT=$(realpath -m "benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S)")
mkdir -p "$OUT"
export MLFLOW_TRACKING_URI="sqlite:///$OUT/mlflow.db"

if [ "${QUICK:-0}" = 1 ]; then  # tiny sizes: checks the commands, measures nothing
  bench=(--samples 512 --repeats 1 --configs hidden_size=32,num_layers=1)
  to_accuracy=(--train-limit 2000 --epochs 1 --config hidden_size=32,num_layers=1 --target 0.5)
  tune=(--study smoke --n-trials 2 --timeout 120 --n-workers 1 --epochs 1 --train-limit 2000 --val-size 500)
else
  bench=(--samples 50000 --repeats 3)
  to_accuracy=(--epochs 4 6 8 12)
  tune=(--study lstm --n-trials 40 --timeout 300 --n-workers 4 --epochs 6)
fi

{
  echo "# GPU check $(date -Iseconds)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi: $DEVICE"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
} | tee "$OUT/hardware.txt"

echo "== 1/3 throughput: project loop vs tutorial loop"
"$PY" -m benchmarks.bench throughput --device "$DEVICE" --data-dir "$DATA_DIR" --out "$OUT" "${bench[@]}"

echo "== 2/3 training time to 99% test accuracy"
"$PY" -m benchmarks.to_accuracy --device "$DEVICE" --data-dir "$DATA_DIR" --out "$OUT" "${to_accuracy[@]}"

echo "== 3/3 a study in 5 minutes (trials share the GPU), then the best retrained and tested once"
(cd "$OUT" && "$PY" -m experiments.tune --study-name gpu-check --storage "$OUT/study.journal" \
  --device "$DEVICE" --data-dir "$DATA_DIR" --register-name gpu-check "${tune[@]}" 2>&1 | tail -25) | tee "$OUT/study.txt"

echo "results: $OUT"
