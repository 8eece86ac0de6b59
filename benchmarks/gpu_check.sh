#!/usr/bin/env bash
# The project's GPU check on a machine with one CUDA GPU and no package registry (< 8 minutes):
# signals and lens vs float64 through the CUDA kernel path, every config's --dry-run, tiny recipes
# end to end in bf16, and the speed benchmarks; the last line printed is one JSON summary.
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine, from the project root
#   bash benchmarks/gpu_check.sh --cpu-smoke     # any machine: the same stages at CPU sizes
#   bash benchmarks/gpu_check.sh --only accuracy,dry_runs
#
# Packages: whatever the machine has plus the wheels in .whl/ (../shared/gpu/prepare_wheels.sh on a
# machine with registry access; add `pytest pytest-timeout pluggy iniconfig` to its arguments to
# also run tests/test_gpu.py). They are installed into /tmp/site, never `pip install -e .`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec "$PY" benchmarks/gpu_check.py "$@"
