#!/usr/bin/env bash
# The GPU checks on a lent NVIDIA GPU, in one run (about 10 minutes on an H100/H200):
#   bench/gpu/run_checks.sh /path/to/airbench94.py [--rounds 3] [--json bench/gpu/checks.json]
# airbench94.py: https://github.com/KellerJordan/cifar10-airbench (fetch it beforehand: the lent machine
# has no network). Runs tests/test_gpu.py, then bench/fast.py --target 94 and airbench94
# interleaved; figures and host provenance into the JSON. Details: bench/gpu/run_checks.py.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 /path/to/airbench94.py [--rounds N] [--json OUT]  (airbench94.py from https://github.com/KellerJordan/cifar10-airbench)" >&2
  exit 2
fi
cd "$(dirname "$0")/../.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
exec "$PY" bench/gpu/run_checks.py "$@"
