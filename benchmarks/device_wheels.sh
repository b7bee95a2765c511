#!/usr/bin/env bash
# What the GPU check carries to the lent machine, under the device tool's 64 MiB: .whl/ and .data/
# from the team's ../shared/tools/device-wheels.sh, less the wheels of the tests that never run there.
# That tool downloads every pin of requirements.txt, the Kubernetes manifest check and PostgreSQL's driver
# included (about 26 MB of the 82 MB); the GPU check (benchmarks/gpu_check.sh) imports neither.
#   bash benchmarks/device_wheels.sh        # here, from any folder; then the run tool's carry [".whl", ".data"]
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT_MIB=64
bash ../shared/tools/device-wheels.sh > /dev/null

# Keep the wheels that the GPU check's pins need (the same download, without the pins below): the closure,
# so that a dependency only the dropped packages need is dropped with them.
needed=$(mktemp -d)
trap 'rm -rf "$needed"' EXIT
pins=$(grep -vE '^\s*(#|$)' requirements.txt | grep -viE '^(torch|torchvision|ruff|pytest-cov|psycopg|flask-wtf|kubernetes-validate)[=<>~ []')
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d "$needed" $pins 2>&1 | grep -v "is ignored" || true
dropped=()
for wheel in .whl/*.whl; do
  [ -e "$needed/$(basename "$wheel")" ] || { dropped+=("$(basename "$wheel" | cut -d- -f1)"); rm "$wheel"; }
done

kib=$(git ls-files -co --exclude-standard -z | du -ck --files0-from=- 2>/dev/null | tail -1 | cut -f1)
kib=$((kib + $(du -sk .whl | cut -f1) + $(du -sk .data | cut -f1)))
echo "wheels: $(ls .whl | wc -l) files, $(du -sh .whl | cut -f1) (left out: ${dropped[*]:-none}); data: $(du -sh .data | cut -f1)"
echo "would travel: $((kib / 1024)) MiB of the ${LIMIT_MIB} MiB limit (tree, .whl, .data)"
[ "$kib" -le $((LIMIT_MIB * 1024)) ] || { echo "over the limit: the device tool would refuse the carry" >&2; exit 1; }
