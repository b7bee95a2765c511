#!/usr/bin/env bash
# The GPU check: one command, under 8 minutes on one H200, that runs the GPU tests and measures the
# headline numbers (docs/gpu.md, "The GPU check"), each step under a hard time limit, then prints ONE
# summary block saying each target met or missed, and by how much. On a lent GPU machine (Python 3.12
# and torch, no .venv, no network): first, here, `bash benchmarks/device_wheels.sh` (.whl/ and .data/,
# under the 64 MiB carry), then the device command, with the run tool's carry [".whl", ".data"] and timeout_s 600:
#
#   bash benchmarks/gpu_check.sh                      # DEVICE=cuda
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu_check.sh   # plumbing check at toy sizes (the GPU tests skip)
#
# It writes into $OUT (which the device tool sets and returns), else benchmarks/results/gpu-<date>/:
# summary.md (the block), results.json, log.txt (every step's output), study.md, throughput.md,
# precision.md, to-accuracy.md.
#
# Settings, from the environment: DEVICE (cuda), QUICK (0), DATA_DIR (.data if it holds MNIST/raw,
# else ../shared/data), WHEELS (.whl), BUDGET_S (465; 900 with QUICK), KEEP_WORK=1 (keep the work
# folder: MLflow store, study journal), PY (an interpreter to use as it is), NO_VENV=1 (ignore .venv
# and install $WHEELS as on the GPU machine), PYTHON3 (the interpreter that installs them; python3).
set -uo pipefail  # no -e: a step that fails or times out is a result, and the next step still runs
cd "$(dirname "$0")/.."
REPO=$PWD
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
BUDGET_S=${BUDGET_S:-$([ "$QUICK" = 1 ] && echo 900 || echo 465)}
RESERVE_S=25  # kept back for the summary
WHEELS=${WHEELS:-.whl}
DATA_DIR=$(realpath "${DATA_DIR:-$([ -d .data/MNIST/raw ] && echo .data || echo ../shared/data)}")
RESULTS=${OUT:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$RESULTS" && RESULTS=$(realpath "$RESULTS")
WORK=$(mktemp -d /tmp/gpu-check.XXXXXX)
LOG=$RESULTS/log.txt
: > "$LOG" && : > "$WORK/steps.tsv"

# --- Python: the project's .venv, else python3 with the carried wheels ------------------------------
[ -z "${PY:-}" ] && [ -x .venv/bin/python ] && [ "${NO_VENV:-0}" != 1 ] && PY=$REPO/.venv/bin/python
if [ -z "${PY:-}" ]; then
  PY=$(command -v "${PYTHON3:-python3}") || { echo "no python3 on PATH" >&2; exit 2; }
  ls "$WHEELS"/*.whl > /dev/null 2>&1 || { echo "no .venv and no wheels in $WHEELS: run bash benchmarks/device_wheels.sh first" >&2; exit 2; }
  echo "== installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $WORK/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$WHEELS"/*.whl >> "$LOG" 2>&1 \
    || { echo "installing the wheels failed; see $LOG" >&2; tail -5 "$LOG" >&2; exit 2; }
  export PYTHONPATH=$WORK/site
fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}  # the project's packages, from any folder
# MLflow starts each entry point with the shell's `python`, which may not exist or be another one, and
# mlflow.run(synchronous=False) starts the `mlflow` command, which a --target install does not create.
mkdir -p "$WORK/bin"
printf '#!/bin/sh\nexec "%s" "$@"\n' "$PY" > "$WORK/bin/python"
printf '#!/bin/sh\nexec "%s" -m mlflow "$@"\n' "$PY" > "$WORK/bin/mlflow"
chmod +x "$WORK/bin/python" "$WORK/bin/mlflow"
export PATH=$WORK/bin:$PATH
export GIT_PYTHON_REFRESH=quiet  # MLflow asks git for the commit; a machine without git is fine
export MLFLOW_TRACKING_URI=sqlite:///$WORK/mlflow.db
export MNIST_DATA_DIR=$DATA_DIR  # tests/conftest.py's mnist_dir
"$PY" -c "import mlflow, optuna, torch" 2>> "$LOG" || { echo "$PY cannot import mlflow, optuna and torch; see $LOG" >&2; exit 2; }

if [ "$QUICK" = 1 ]; then  # toy sizes: checks the commands, measures nothing
  declare -A cap=([probe]=90 [tests]=90 [precision]=150 [throughput]=150 [to_accuracy]=150)
  probe=(--shapes 32,1,64)
  precision=(--train-limit 2000 --epochs 1 --config hidden_size=32,num_layers=1 --seeds 1)
  bench=(--samples 512 --repeats 1 --configs hidden_size=32,num_layers=1)
  to_accuracy=(--train-limit 2000 --epochs 1 2 --target 0.3 --config hidden_size=32,num_layers=1,learning_rate=0.01
    hidden_size=32,num_layers=1,batch_size=64,learning_rate=0.01)
  # Two spawned workers, as the GPU's four are (a CPU's n_workers=auto is one, in the tune process).
  study=(--study smoke --n-trials 4 --epochs 1 --train-limit 2000 --val-size 500 --n-workers 2)
  study_timeout=120
else
  declare -A cap=([probe]=45 [tests]=150 [precision]=70 [throughput]=80 [to_accuracy]=70)
  probe=()
  precision=(--seeds 1 2)
  bench=(--samples 25000 --repeats 2)
  # On a GPU a step costs about the same at batch 128 or 512 (the LSTM's 28 steps are latency-bound),
  # so fewer, larger steps at a higher learning rate reach 99% sooner: two batch sizes, fp32 and bf16.
  to_accuracy=(--epochs 4 6 8 --precisions fp32 bf16 --config
    hidden_size=256,num_layers=2,batch_size=256,learning_rate=0.002 hidden_size=256,num_layers=2,batch_size=512,learning_rate=0.003)
  study=(--study lstm --n-trials 40 --epochs 2)
  study_timeout=300
fi

# --- steps ---------------------------------------------------------------------------------------------
elapsed() { echo "$SECONDS"; }  # since the script started
limit_of() { local left=$(( BUDGET_S - RESERVE_S - SECONDS )); echo $(( $1 < left ? $1 : left )); }  # a cap, or what is left
# step NAME LIMIT COMMAND...: run it with its output in the log, stopped (with what it started) after LIMIT s.
step() {
  local name=$1 limit=$2; shift 2
  if [ "$limit" -lt 10 ]; then
    printf '%s\tskipped\t0\tno time left\n' "$name" >> "$WORK/steps.tsv"
    printf '== %-12s skipped: no time left of %s s\n' "$name" "$BUDGET_S"
    return
  fi
  printf '== %-12s limit %3s s ... ' "$name" "$limit"
  printf '\n===== %s (limit %s s): %s\n' "$name" "$limit" "$*" >> "$LOG"
  local rc marker=gpu-check-$$-$name t0=$SECONDS
  GPU_CHECK_STEP=$marker timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
  rc=$?
  [ "$rc" -ne 0 ] && end_leftovers "$marker"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( SECONDS - t0 ))" "$limit" >> "$WORK/steps.tsv"
  echo "exit $rc after $(( SECONDS - t0 )) s"
}

# After a failed or stopped step: end, by pid, any process it started that outlived it (e.g. a GPU worker).
end_leftovers() {
  local environ pid
  for environ in /proc/[0-9]*/environ; do
    pid=${environ#/proc/}; pid=${pid%/environ}
    grep -qzx "GPU_CHECK_STEP=$1" "$environ" 2> /dev/null && kill -9 "$pid" 2> /dev/null
  done
  return 0
}

echo "== GPU check: DEVICE=$DEVICE QUICK=$QUICK, python $PY, data $DATA_DIR, budget $BUDGET_S s; log $LOG"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$LOG" 2>&1

step probe "$(limit_of "${cap[probe]}")" "$PY" -m benchmarks.gpu_probe --device "$DEVICE" --out "$WORK/probe.json" ${probe[@]+"${probe[@]}"}

xdist=() tests_cap=${cap[tests]}  # the tests are independent: side by side they take about as long as the slowest
if [ "$QUICK" != 1 ]; then
  if "$PY" -c "import xdist" 2> /dev/null; then xdist=(-n 4); else tests_cap=$(( tests_cap + 60 )); fi
fi
step tests "$(limit_of "$tests_cap")" "$PY" -m pytest -m gpu tests/test_gpu.py tests/test_logged_model.py tests/test_numerics.py -p no:cacheprovider \
  --junitxml="$WORK/pytest.xml" -o junit_family=xunit1 ${xdist[@]+"${xdist[@]}"}

step precision "$(limit_of "${cap[precision]}")" "$PY" -m benchmarks.to_accuracy --device "$DEVICE" --data-dir "$DATA_DIR" \
  --precisions fp32 bf16 --out "$WORK/precision" "${precision[@]}"

step throughput "$(limit_of "${cap[throughput]}")" "$PY" -m benchmarks.bench throughput --device "$DEVICE" --data-dir "$DATA_DIR" \
  --out "$WORK/bench" "${bench[@]}"

step to_accuracy "$(limit_of "${cap[to_accuracy]}")" "$PY" -m benchmarks.to_accuracy --device "$DEVICE" --data-dir "$DATA_DIR" \
  --out "$WORK/to-accuracy" "${to_accuracy[@]}"

# The study: trials start until --timeout, then the running ones finish and the last worker summarises
# (leaderboard, plots, the best trial's model registered and tested once): 50 s are kept for that.
# --confirm-top 0: the target is the best trial registered as champion; the default confirmation (9 more
# runs of 2 epochs, each logging and testing a model) would not fit in those 50 s.
study_limit=$(limit_of 100000)
trials_for=$(( study_limit - 50 < study_timeout ? study_limit - 50 : study_timeout ))
trials_for=$(( trials_for > 10 ? trials_for : 10 ))
echo "$trials_for" > "$WORK/study_timeout"
mkdir -p "$WORK/study"
(cd "$WORK/study" && step study "$study_limit" "$PY" -m experiments.tune --study-name gpu-check --storage "$WORK/study.journal" \
  --register-name gpu-check --device "$DEVICE" --data-dir "$DATA_DIR" --n-workers auto --workers-per-gpu 4 \
  --confirm-top 0 --timeout "$trials_for" "${study[@]}")

# --- the summary ---------------------------------------------------------------------------------------
"$PY" -m benchmarks.gpu_summary --work "$WORK" --results "$RESULTS" --budget "$([ "$QUICK" = 1 ] && echo "$BUDGET_S" || echo 480)" \
  --elapsed "$(elapsed)" --device "$DEVICE" $([ "$QUICK" = 1 ] && echo --quick) 2>> "$LOG" \
  || { echo "the summary failed (see $LOG); the steps:"; cat "$WORK/steps.tsv"; }
if [ "${KEEP_WORK:-0}" = 1 ]; then echo "work folder kept: $WORK"; else rm -rf "$WORK"; fi
