#!/usr/bin/env bash
# The tests whose processes start at the same moment, run ROUNDS times over: on a cluster commands
# start together, so one that fails once in twenty is a race in the product until shown otherwise.
# Prints one line a round and the failures in all; exits 1 if any round failed (its output is kept
# in $LOGS/round-<n>.log). About 85 s a round on 2 cores.
#   bash benchmarks/race_check.sh                 # ROUNDS=10
#   ROUNDS=20 bash benchmarks/race_check.sh tests/test_scale_out.py   # or any pytest arguments
set -uo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-10}
LOGS=${LOGS:-$(mktemp -d /tmp/race-check.XXXXXX)}
tests=("$@")
[ ${#tests[@]} -gt 0 ] || tests=(
  tests/test_start_together.py  # a new store, and a new dataset, opened by several processes at once
  tests/test_coordination.py    # the study lock: killed and stalled holders, waiters taking turns
  tests/test_scale_out.py::test_three_workers_started_at_once_run_exactly_n_trials
  tests/test_tune_recovery.py::test_two_worker_processes_share_one_study_and_confirm_two_seeds_at_once
  tests/test_reliability.py::test_four_processes_logging_to_one_local_store_lose_nothing
  tests/test_tune_mlflow_run.py::test_two_mlflow_run_workers_started_at_once_share_one_study_to_its_end
)
failed=0
for round in $(seq 1 "$ROUNDS"); do
  log=$LOGS/round-$round.log
  .venv/bin/python -m pytest -n 3 -q -p no:randomly -p no:cacheprovider "${tests[@]}" > "$log" 2>&1
  rc=$?
  echo "round $round of $ROUNDS: $(tail -1 "$log")"
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
done
echo "$failed of $ROUNDS rounds failed; their output: $LOGS"
[ "$failed" -eq 0 ]
