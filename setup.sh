#!/usr/bin/env bash
# Creates .venv with the pinned requirements and this project installed in it; safe to rerun.
#   bash setup.sh           the pipeline, tuning and benchmarks
#   bash setup.sh --tests   also Debian's postgresql and slurm-wlm, which the scale-out and Slurm tests start throwaway clusters of
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3.11}
if [ "${1:-}" = "--tests" ] && ! { compgen -G "/usr/lib/postgresql/*/bin/initdb" > /dev/null && [ -x /usr/sbin/slurmctld ] && [ -x /usr/sbin/slurmd ]; }; then
  sudo=$([ "$(id -u)" = 0 ] || echo sudo)
  export DEBIAN_FRONTEND=noninteractive
  packages="postgresql slurm-wlm"
  $sudo apt-get install -y -qq $packages > /dev/null || { $sudo apt-get update -qq && $sudo apt-get install -y -qq $packages > /dev/null; }
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.requirements.sha256
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -r requirements.txt
  .venv/bin/python -m pip install --quiet --no-deps -e .
  echo "$want" > "$stamp"
fi
