#!/usr/bin/env bash
# The wheels the GPU run needs and the lent machines lack (they reach no package index), for CPython
# 3.12 on manylinux x86_64, at constraints.txt's versions, into the git-ignored .whl/; then name .whl
# in the device call's carry.
#   .whl/*.whl        Inf-CL 1.2.1 (pure Python); gpu_check.sh's set-up installs it (stages A, B, C).
#   .whl/train/*.whl  stage T: DeepSpeed built here without ops (DS_BUILD_OPS=0: pure Python; the step's
#                     optimizer is torch's AdamW), the requirements of DeepSpeed and pydantic the machines
#                     lack, PyAV (eval-video), transformers at ZERO3_MIN_TRANSFORMERS (theirs is older) and
#                     DeepSpeed's other small requirements in case an image lacks them; stage T installs
#                     them with `pip install --no-index --find-links`.
# The total is printed with the working tree that travels beside it: over the 64 MiB a device call
# carries, this script fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LIMIT_MIB=${WHEEL_LIMIT_MIB:-64}
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.whl/' >> .git/info/exclude; }
mkdir -p .whl/train

pin() {  # the version constraints.txt pins for a distribution name (any spelling: _ - . case)
    local want
    want=$(echo "$1" | tr 'A-Z_.' 'a-z--')
    awk -F'==' -v w="$want" '!/^#/ && NF == 2 { n = tolower($1); gsub(/[_.]/, "-", n); if (n == w) { print $2; exit } }' constraints.txt
}

PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
download() {  # download DIR SPEC...: binary wheels for CPython 3.12 on manylinux x86_64, no dependencies
    local dir=$1
    shift
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" -d "$dir" "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

echo "== Inf-CL (stages A/B/C) -> .whl/"
download .whl inf-cl==1.2.1

DS_VERSION=$(pin deepspeed)
[ -n "$DS_VERSION" ] || { echo "FATAL: constraints.txt pins no deepspeed version"; exit 1; }
echo "== DeepSpeed $DS_VERSION, built here without ops (DS_BUILD_OPS=0) -> .whl/train/"
if ls .whl/train/deepspeed-"$DS_VERSION"-*.whl >/dev/null 2>&1; then
    echo "already there: $(ls .whl/train/deepspeed-"$DS_VERSION"-*.whl)"
else
    DS_BUILD_OPS=0 DS_BUILD_STRING="" "$PY" -m pip wheel -q --no-deps --no-cache-dir -w .whl/train \
        "deepspeed==$DS_VERSION" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
fi
ls .whl/train/deepspeed-"$DS_VERSION"-py3-none-any.whl >/dev/null 2>&1 || {
    echo "FATAL: no pure-Python deepspeed-$DS_VERSION-py3-none-any.whl in .whl/train (the build made:"
    ls .whl/train/deepspeed-* 2>/dev/null || echo "  nothing"
    echo "); a wheel with compiled ops would not load on the GPU machine's torch"
    exit 1
}

# what the lent machines lack (../shared/DESIGN.md, the device tool's KINDS.md), then what they have today
NEEDED=(hjson pydantic pydantic_core annotated-types typing-inspection typing_extensions av)
FALLBACK=(py-cpuinfo msgpack psutil einops ninja regex)
# their transformers (5.17) cannot build a model from its config under ZeRO-3: the oldest release that can
# (its other requirements are met there; regex above in case theirs is older than it asks)
# shellcheck source=benchmarks/_steps.sh
source benchmarks/_steps.sh
TF_VERSION=$(transformers_floor)
specs=()
for name in "${NEEDED[@]}" "${FALLBACK[@]}"; do
    v=$(pin "$name")
    [ -n "$v" ] || { echo "FATAL: constraints.txt pins no version of $name"; exit 1; }
    specs+=("$name==$v")
done
echo "== ${specs[*]} -> .whl/train/"
# one version of each distribution (two stop the offline install): only the pinned ones stay
find .whl/train -name '*.whl' ! -name "deepspeed-$DS_VERSION-*" -delete
download .whl/train "${specs[@]}" "transformers==$TF_VERSION"

echo
ls -la .whl .whl/train
whl_bytes=$(du -sb .whl | cut -f1)
tree_bytes=$( { git ls-files -z; git ls-files -z -o --exclude-standard; } | xargs -0 -r stat -c %s -- 2>/dev/null \
              | awk '{ s += $1 } END { print s + 0 }')
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
echo "wheels: $(mib "$whl_bytes") in .whl ($(ls .whl/train/*.whl | wc -l) in .whl/train: $(mib "$(du -sb .whl/train | cut -f1)")); "\
"the working tree that travels beside them: $(mib "$tree_bytes"); together $(mib $(( whl_bytes + tree_bytes ))) of the ${LIMIT_MIB} MiB a device call carries"
if [ $(( whl_bytes + tree_bytes )) -gt $(( LIMIT_MIB * 1048576 )) ]; then
    echo "FATAL: over the ${LIMIT_MIB} MiB limit: the device call would refuse this carry (drop a wheel, or carry less of the tree)"
    exit 1
fi
git check-ignore -q .whl && echo ".whl is ignored by git: carry it with the device call (carry [\".whl\"])"
