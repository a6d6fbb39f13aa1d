#!/usr/bin/env bash
# The GPU issue's prepared run, in two stages that each fit one device call:
#
#   bash benchmarks/gpu_check.sh A    # ~6 min: compiled-kernel tests, Inf-CL self-check, the
#                                     # tuning sweep and the loss sweep at d = 1536 (B up to 262144)
#   bash benchmarks/gpu_check.sh B    # ~4 min: the loss sweep at d = 896 and 3584, largest B per backend
#
# Everything lands under $OUT (default ./gpu_out) in at most 8 files (the device tool returns
# no more): log.txt (all output, versions, nvidia-smi), tests.xml, tune.json, loss.json +
# loss.png (stage A), loss_wide.json + loss_wide.png and maxb.json (stage B).
# Inf-CL travels as a wheel in .whl/ (ignored by git: name it in the device call's carry).
# Each step has its own timeout and deadline, and writes partial results as it goes.
# On a machine without CUDA every step says so and the script exits 0 (the CPU dry run).
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:-A}
case "$STAGE" in A|B|all) ;; *) echo "usage: $0 [A|B|all]"; exit 2 ;; esac
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
T0=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - T0 )) s] $*"; }
{
step "stage $STAGE: environment"
"$PY" - <<'PYEOF'
import platform
import torch, triton
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "triton", triton.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", torch.cuda.get_device_name(0), f"{p.total_memory / 2**30:.1f} GiB,", p.multi_processor_count, "SMs,",
          "capability", torch.cuda.get_device_capability(0), "count", torch.cuda.device_count())
else:
    print("no CUDA device")
PYEOF
if ! "$PY" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device: dry run only (the steps below need a GPU)"; exit 0
fi
nvidia-smi 2>&1 | head -20
# the package must import from this tree (kernels/ is mapped to llave_fast.kernels by setup.py)
"$PY" -m pip install --no-deps --no-build-isolation -q -e . 2>&1 | tail -3
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
else
    echo "no .whl/ folder: Inf-CL is not installed (carry .whl to include it)"
fi

if [ "$STAGE" = A ] || [ "$STAGE" = all ]; then
    step "1. compiled kernels vs the float64 reference (pytest -m gpu, 4 workers)"
    XDIST=""
    "$PY" -c "import xdist" 2>/dev/null && XDIST="-n 4"
    LLAVE_FAST_COMPILED=1 timeout 200 "$PY" -m pytest -q -m gpu tests/test_loss_gpu.py $XDIST -p no:cacheprovider \
        -o addopts="" --junitxml="$OUT/tests.xml" 2>&1 | tail -40

    step "2. Inf-CL self-check against the float64 reference"
    timeout 90 "$PY" benchmarks/_infcl.py 2>&1 | tail -25

    step "3. tuning sweep, B = N = 16384, d = 1536, bf16"
    timeout 170 "$PY" benchmarks/bench_tune.py --B 16384 --d 1536 --dtype bf16 --repeats 10 --deadline-s 140 \
        --out "$OUT/tune.json" 2>&1 | tail -45

    step "4. loss sweep at d = 1536, bf16 (ceilings measured first; compile only at B <= 16384)"
    timeout 330 "$PY" benchmarks/bench_loss.py --device cuda --dtype bf16 --d 1536 --B 16384 4096 65536 262144 \
        --backends triton triton_strip torch reference compile inf_cl gemm3 \
        --max-B compile=16384 reference=65536 torch=65536 --warmup 1 --repeats 10 --point-budget-s 3 \
        --deadline-s 280 --out "$OUT/loss.json" 2>&1 | grep -v '^timing\|^correctness' | tail -60
fi

if [ "$STAGE" = B ] || [ "$STAGE" = all ]; then
    step "5. loss sweep at d = 896 and 3584, bf16 (no torch.compile: a compile per shape costs ~1 min)"
    timeout 200 "$PY" benchmarks/bench_loss.py --device cuda --dtype bf16 --d 896 3584 --B 4096 16384 65536 \
        --backends triton triton_strip torch reference inf_cl gemm3 --warmup 1 --repeats 10 --point-budget-s 2 \
        --deadline-s 170 --no-ceilings --out "$OUT/loss_wide.json" 2>&1 | grep -v '^timing\|^correctness' | tail -50

    step "6. largest B = N per backend at d = 1536, bf16"
    timeout 200 "$PY" benchmarks/bench_maxb.py --d 1536 --dtype bf16 --start 65536 --max-try-s 15 \
        --backends triton_strip triton reference torch inf_cl --deadline-s 180 --out "$OUT/maxb.json" 2>&1 | tail -30
fi
step "done; files under $OUT:"
ls -la "$OUT"
} 2>&1 | tee "$LOG"
