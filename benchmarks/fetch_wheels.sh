#!/usr/bin/env bash
# Fetch the wheels the GPU run needs and the lent machines lack (they reach no package index):
# Inf-CL 1.2.1, pure Python (its needs, numpy and triton, are on those machines). Run here,
# then name .whl in the device call's carry; benchmarks/gpu_check.sh installs it there.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.whl/' >> .git/info/exclude; }
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl inf-cl==1.2.1
ls -la .whl
git check-ignore -q .whl && echo ".whl is ignored by git: carry it with the device call"
