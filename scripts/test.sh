#!/usr/bin/env bash
# Sets up and runs the test suite on the CPU (Triton kernels through the interpreter).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
exec "$PY" -m pytest -q "$@"
