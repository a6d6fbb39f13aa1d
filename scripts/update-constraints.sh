#!/usr/bin/env bash
# Rewrites constraints.txt with the newest releases pyproject.toml allows today: a new virtual
# environment, `LLAVE_FAST_LATEST=1 bash scripts/setup.sh` in it, then its `pip freeze` (torch, triton
# and CUDA packages left out: see the file's header). Run the tests (`bash scripts/test.sh`) before
# committing the new file.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
PYTHON="$tmp/venv/bin/python" LLAVE_FAST_LATEST=1 bash scripts/setup.sh
{
    sed -n '/^#/p' constraints.txt
    "$tmp/venv/bin/python" -m pip freeze --exclude-editable | grep -viE '^(torch|triton|nvidia-|cuda-)'
} > "$tmp/constraints.txt"
diff constraints.txt "$tmp/constraints.txt" || true
cp "$tmp/constraints.txt" constraints.txt
echo "constraints.txt updated (diff above); now: bash scripts/test.sh"
