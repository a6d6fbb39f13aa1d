#!/usr/bin/env bash
# Installs llave-fast and its CPU test/benchmark dependencies into the current Python, at the tested
# versions of constraints.txt (LLAVE_FAST_LATEST=1: the newest releases pyproject.toml allows instead).
# The [st] extra (sentence-transformers) is included: its equivalence tests run in CI.
# torch is pinned to the CPU build kept on these machines' disk; an unpinned torch would
# pull a multi-GB CUDA build. GPU machines keep their own torch (pyproject asks torch>=2.4).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q "torch==2.13.0"
fi
if [ "${LLAVE_FAST_LATEST:-0}" = 1 ]; then
    echo "setup: LLAVE_FAST_LATEST=1: the newest releases, not the tested set of constraints.txt" >&2
    "$PY" -m pip install -q -e ".[dev,train,st]"
else
    "$PY" -m pip install -q -c constraints.txt -e ".[dev,train,st]"
fi
