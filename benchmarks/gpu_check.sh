#!/usr/bin/env bash
# The GPU issue's prepared run, in three stages, most important first; each fits one device
# call (timeouts below are upper bounds; typical runs are shorter):
#
#   bash benchmarks/gpu_check.sh A   # <= ~5 min: compiled-kernel tests (8 workers), the tuning sweep
#                                    # at B = N = 16384, d = 1536 (which backward, which tiles)
#   bash benchmarks/gpu_check.sh B   # <= ~6 min: the loss sweep at d = 1536, B = 4096..65536 with every
#                                    # backend (torch.compile at 16384 only), then B = N = 262144
#   bash benchmarks/gpu_check.sh C   # <= ~5 min: the sweep at d = 896 and 3584, the largest B per backend
#
# With 15 minutes of device time per issue, machine start included, plan on A and B: call B at
# once after A returns (a machine goes back 30 s after a call; a fresh one costs a start and
# cold compile caches). C fits only if A and B ran short. Device call, e.g.:
#   command "bash benchmarks/gpu_check.sh A" (the tool sets $OUT), carry [".whl"], timeout_s 360
# (bash benchmarks/fetch_wheels.sh first, here: it puts the Inf-CL wheel in .whl/).
#
# Each stage's files land under $OUT (default ./gpu_out), at most 4 per stage (the device tool
# returns 8): log.txt always; A: tests.xml, tune.json; B: loss.json, loss.png, loss_262k.json;
# C: loss_wide.json, loss_wide.png, maxb.json. Inf-CL travels as a wheel in .whl/ (ignored by
# git: name it in the device call's carry). Every step has its own timeout and deadline and
# writes partial results as it goes. Without CUDA every stage says so and exits 0 (dry run).
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:-A}
case "$STAGE" in A|B|C) ;; *) echo "usage: $0 A|B|C"; exit 2 ;; esac
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

if [ "$STAGE" = A ]; then
    step "A1. compiled kernels vs the float64 reference (pytest -m gpu)"
    EXTRA=""
    "$PY" -c "import xdist" 2>/dev/null && EXTRA="-n 8"
    "$PY" -c "import pytest_timeout" 2>/dev/null && EXTRA="$EXTRA --timeout 120"
    LLAVE_FAST_COMPILED=1 timeout 170 "$PY" -m pytest -q -m gpu tests/test_loss_gpu.py $EXTRA -p no:cacheprovider \
        -o addopts="" -rfE --tb=short --junitxml="$OUT/tests.xml" 2>&1

    step "A2. tuning sweep, B = N = 16384, d = 1536, bf16 (every candidate checked against the default)"
    timeout 150 "$PY" benchmarks/bench_tune.py --B 16384 --d 1536 --dtype bf16 --repeats 10 --deadline-s 120 \
        --out "$OUT/tune.json" 2>&1
fi

if [ "$STAGE" = B ]; then
    step "B1. loss sweep at d = 1536, bf16: ceilings, every backend, B = 4096..65536 (compile at 16384 only)"
    timeout 230 "$PY" benchmarks/bench_loss.py --device cuda --dtype bf16 --d 1536 --B 4096 16384 65536 \
        --backends triton_strip triton_tiles torch reference compile inf_cl gemm3 --alpha0-fused triton_strip \
        --only-B compile=16384 --warmup 1 --repeats 10 --point-budget-s 3 --deadline-s 190 \
        --out "$OUT/loss.json" 2>&1

    step "B2. B = N = 262144, d = 1536, bf16: the strip backward, Inf-CL and the GEMM floor"
    # (the tile backward is left out: its time grows as B^2 from the 65536 figure, ~10 s a run here)
    timeout 150 "$PY" benchmarks/bench_loss.py --device cuda --dtype bf16 --d 1536 --B 262144 \
        --backends triton_strip inf_cl gemm3 --alpha0-fused triton_strip --warmup 1 --repeats 2 --n-inputs 2 \
        --no-ceilings --no-plot --out "$OUT/loss_262k.json" 2>&1
fi

if [ "$STAGE" = C ]; then
    step "C1. loss sweep at d = 896 and 3584, bf16 (no torch.compile: one compile per shape costs ~1 min)"
    timeout 170 "$PY" benchmarks/bench_loss.py --device cuda --dtype bf16 --d 896 3584 --B 4096 16384 65536 \
        --backends triton_strip triton_tiles torch reference inf_cl gemm3 --alpha0-fused triton_strip --warmup 1 \
        --repeats 10 --point-budget-s 2 --deadline-s 140 --no-ceilings --out "$OUT/loss_wide.json" 2>&1

    step "C2. largest B = N per backend at d = 1536, bf16"
    timeout 130 "$PY" benchmarks/bench_maxb.py --d 1536 --dtype bf16 --start 65536 --max-try-s 12 \
        --backends triton_strip reference torch inf_cl --deadline-s 110 --out "$OUT/maxb.json" 2>&1
fi
step "summary"
case "$STAGE" in
    A) [ -f "$OUT/tune.json" ] && "$PY" benchmarks/report.py --tune "$OUT/tune.json" ;;
    B) F=""; for f in loss.json loss_262k.json; do [ -f "$OUT/$f" ] && F="$F $OUT/$f"; done
       [ -n "$F" ] && "$PY" benchmarks/report.py $F ;;
    C) [ -f "$OUT/loss_wide.json" ] && "$PY" benchmarks/report.py "$OUT/loss_wide.json"
       [ -f "$OUT/maxb.json" ] && "$PY" benchmarks/report.py --maxb "$OUT/maxb.json" ;;
esac
step "done; files under $OUT:"
ls -la "$OUT"
} 2>&1 | tee "$LOG"
# the device call returns the end of the output: a short summary last
