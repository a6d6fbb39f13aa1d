#!/usr/bin/env bash
# The prepared GPU run. Stages, most important first:
#
#   A   A1 compiled-kernel tests vs the float64 reference, and the environment checks (pytest -m 'gpu or env', 8 workers)   <= 110 s
#       A2 tuning sweep at B = N = 16384, d = 1536, bf16 (which backward, which tiles:
#          the backward candidates first)                                             <=  85 s
#   B   B0 the S-cache kernel probe (probe_scache.py: cuBLAS S with fp32 output, the dq/dT GEMMs
#          at odd N, the statistics and dS passes against the copy bandwidth, the fused forward)  <= 60 s
#       B1 loss sweep at d = 1536, bf16, B = 4096, 16384, 65536, every backend
#          (torch.compile at 16384 only), ceilings and the three-GEMM floor           <= 165 s
#          (the default path, S-cache, stream and the fused strip side by side)
#       B2 B = N = 262144: the default (stream) and fused paths, the floor, Inf-CL      <= 100 s
#       B3 odd N: default and fused paths at d = 256 and 1536, bf16 and fp16, against the
#          padded floor, B = N = 16383 (odd: padded K for the library GEMMs) and 16384  <= 70 s
#   C   C1 the sweep at d = 896 and 3584; C2 the largest B per backend                 <= 300 s
#
# THE FIRST GPU RUN (15 minutes of device time per issue, machine start included):
#   here, once:   bash benchmarks/fetch_wheels.sh          (Inf-CL's wheel into .whl/)
#   device call:  command "bash benchmarks/gpu_check.sh AB", carry [".whl"], timeout_s 590
# AB is stages A then B in one call: at most ~30 s of set-up + 530 s of steps (every step has
# its own limit, above; typical runs are shorter), so with a 1-2 minute machine start the call
# costs ~11-12 minutes and leaves ~3 minutes: rerun one failed stage at once on the still-warm
# machine (it goes back 30 s after a call; a fresh start costs 1-2 minutes and needs 4 left),
# else give the machine back. C is for a later lease: "bash benchmarks/gpu_check.sh C", 330.
# Since the S-cache path (B0 added): "STEPS='A1 B0 B1 B2 B3' bash benchmarks/gpu_check.sh AB" fits
# one call (<= 505 s of step limits + set-up); the tuning sweep A2 goes to a later call.
#
# Files under $OUT (default ./gpu_out; the device tool returns at most 8):
#   A: log_A.txt, tests.xml, tune.json   B: log_B.txt, probe.json, loss.json, loss_262k.json,
#   loss_variants.json (AB: 8 files; the plot is drawn here from loss.json by report.py)
#   C: log_C.txt, loss_wide.json, loss_wide.png, maxb.json
# Each step runs under run_step (benchmarks/_steps.sh): SIGINT at its limit, so the scripts
# and pytest write what they have; the JSON files are also rewritten as results come in.
# Without CUDA every stage says so and exits 0. GPU_CHECK_DRY=1 without CUDA runs every step
# with tiny CPU arguments instead: the plumbing (install, limits, files, summaries) is tested
# that way by tests/test_benchmarks.py. Step limits can be overridden: LIMIT_A1=... etc.
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:-AB}
case "$STAGE" in A|B|C|AB) ;; *) echo "usage: $0 A|B|C|AB"; exit 2 ;; esac
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# shellcheck source=benchmarks/_steps.sh
source benchmarks/_steps.sh
LIMIT_A1=${LIMIT_A1:-110}; LIMIT_A2=${LIMIT_A2:-85}; LIMIT_B1=${LIMIT_B1:-165}; LIMIT_B2=${LIMIT_B2:-100}
LIMIT_B3=${LIMIT_B3:-70}; LIMIT_B0=${LIMIT_B0:-60}
LIMIT_C1=${LIMIT_C1:-170}; LIMIT_C2=${LIMIT_C2:-130}
T0=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - T0 )) s] $*"; }
# STEPS="A1 B1 ..." runs only the steps named (a short lease); default: every step of the stage
want() { [ -z "${STEPS:-}" ] || [[ " $STEPS " == *" $1 "* ]]; }
STAGES=$STAGE; [ "$STAGE" = AB ] && STAGES="A B"
FIRST=${STAGES%% *}

setup() {
    step "environment"
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
    DRY=0
    if ! "$PY" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        if [ "${GPU_CHECK_DRY:-0}" != 1 ]; then
            echo "no CUDA device: nothing to run (GPU_CHECK_DRY=1 runs the steps with tiny CPU arguments)"
            return 2
        fi
        DRY=1
        export TRITON_INTERPRET=1
        echo "DRY RUN on the CPU: every step with tiny arguments (plumbing only; no figure means anything)"
    else
        nvidia-smi 2>&1 | head -20
    fi
    step "install"
    install_package "$PY" || return 1
    if ls .whl/*.whl >/dev/null 2>&1; then
        if run_step 90 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target /tmp/site .whl/*.whl; then
            export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}/tmp/site"
            "$PY" -c "import inf_cl; print('inf_cl importable')" || echo "WARNING: the wheels installed, but inf_cl does not import: its rows will say why"
        else
            echo "WARNING: installing the carried wheels failed: Inf-CL rows will be skipped"
        fi
    else
        echo "no .whl/ folder: Inf-CL is not installed (bash benchmarks/fetch_wheels.sh here, then carry .whl)"
    fi
    return 0
}

stage_A() {
    if want A1; then
        step "A1. compiled kernels vs the float64 reference (pytest -m gpu)"
        local extra=()
        if [ "$DRY" = 1 ]; then
            "$PY" -c "import xdist" 2>/dev/null && extra+=(-n 2)
        else
            "$PY" -c "import xdist" 2>/dev/null && extra+=(-n 8)
            "$PY" -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout 120)
        fi
        LLAVE_FAST_COMPILED=$([ "$DRY" = 1 ] && echo 0 || echo 1) run_step "$LIMIT_A1" "$PY" -m pytest -q -m "gpu or env" \
            tests/test_loss_gpu.py tests/test_environment.py "${extra[@]}" -p no:cacheprovider -p no:benchmark -o addopts="" -rfE --tb=short \
            --junitxml="$OUT/tests.xml"

    fi
    if want A2; then
        step "A2. tuning sweep, B = N = 16384, d = 1536, bf16 (every candidate checked against the default)"
        if [ "$DRY" = 1 ]; then
            run_step "$LIMIT_A2" "$PY" benchmarks/bench_tune.py --dry-run-cpu --B 40 --d 24 --dtype fp32 --repeats 1 \
                --out "$OUT/tune.json"
        else
            run_step "$LIMIT_A2" "$PY" benchmarks/bench_tune.py --B 16384 --d 1536 --dtype bf16 --repeats 10 \
                --deadline-s $(( LIMIT_A2 - 25 )) --out "$OUT/tune.json"
        fi
    fi
    step "A summary"
    [ -f "$OUT/tune.json" ] && "$PY" benchmarks/report.py --tune "$OUT/tune.json"
    [ -f "$OUT/tests.xml" ] && "$PY" benchmarks/report.py --junit "$OUT/tests.xml"
    return 0
}

stage_B() {
    if want B0; then
        step "B0. S-cache kernel probe: cuBLAS S fp32 output, dq/dT at odd N, stats and dS passes vs copy bandwidth"
        if [ "$DRY" = 1 ]; then
            TRITON_INTERPRET=1 run_step "$LIMIT_B0" "$PY" benchmarks/probe_scache.py --dry --out "$OUT/probe.json"
        else
            run_step "$LIMIT_B0" "$PY" benchmarks/probe_scache.py --B 16384 --d 1536 --out "$OUT/probe.json"
        fi
    fi
    if want B1; then
        step "B1. loss sweep at d = 1536, bf16: ceilings, every backend, B = 4096..65536 (compile at 16384 only)"
        if [ "$DRY" = 1 ]; then
            run_step "$LIMIT_B1" "$PY" benchmarks/bench_loss.py --device cpu --dtype fp32 --d 32 --B 64 128 \
                --backends torch reference --only-B reference=64 --repeats 2 --no-live-memory --point-budget-s 0.2 \
                --deadline-s $(( LIMIT_B1 - 20 )) --no-plot --out "$OUT/loss.json"
        else
            run_step "$LIMIT_B1" "$PY" benchmarks/bench_loss.py --device cuda --dtype bf16 --d 1536 --B 4096 16384 65536 \
                --backends triton triton_cache triton_stream triton_strip torch reference compile inf_cl gemm3 \
                --alpha0-fused triton --only-B compile=16384 --warmup 1 --repeats 10 --point-budget-s 3 --deadline-s $(( LIMIT_B1 - 20 )) \
                --no-plot --out "$OUT/loss.json"
        fi

    fi
    if want B2; then
        step "B2. B = N = 262144, d = 1536, bf16: the default path (stream), the fused strip, the floor, then Inf-CL"
        # the tile backward is left out: its time grows as B^2 from the 65536 figure (~10 s a run)
        if [ "$DRY" = 1 ]; then
            run_step "$LIMIT_B2" "$PY" benchmarks/bench_loss.py --device cpu --dtype fp32 --d 32 --B 256 \
                --backends torch reference --repeats 2 --repeats-for reference=1 --sequential --n-inputs 2 \
                --no-live-memory --no-plot --deadline-s $(( LIMIT_B2 - 15 )) --out "$OUT/loss_262k.json"
        else
            run_step "$LIMIT_B2" "$PY" benchmarks/bench_loss.py --device cuda --dtype bf16 --d 1536 --B 262144 \
                --backends triton triton_strip gemm3 inf_cl --alpha0-fused triton --warmup 1 --repeats 2 \
                --warmup-for inf_cl=1 --repeats-for inf_cl=1 --sequential --n-inputs 2 --no-ceilings --no-plot \
                --deadline-s $(( LIMIT_B2 - 15 )) --out "$OUT/loss_262k.json"
        fi
    fi
    if want B3; then
        step "B3. odd N: B = N = 16383 and 16384, the default path and the fused strip against the floor, d = 256 and 1536, bf16 and fp16"
        if [ "$DRY" = 1 ]; then
            run_step "$LIMIT_B3" "$PY" benchmarks/bench_loss.py --device cpu --dtype fp32 --d 16 32 --B 63 64 \
                --backends torch reference --repeats 2 --no-live-memory --no-plot --point-budget-s 0.2 \
                --deadline-s $(( LIMIT_B3 - 15 )) --out "$OUT/loss_variants.json"
        else
            run_step "$LIMIT_B3" "$PY" benchmarks/bench_loss.py --device cuda --dtype bf16 fp16 --d 256 1536 \
                --B 16383 16384 --backends triton triton_strip gemm3 --warmup 1 --repeats 5 --point-budget-s 1 \
                --no-ceilings --no-plot --deadline-s $(( LIMIT_B3 - 15 )) --out "$OUT/loss_variants.json"
        fi
    fi
    step "B summary"
    local files=()
    for f in loss.json loss_262k.json loss_variants.json; do [ -f "$OUT/$f" ] && files+=("$OUT/$f"); done
    [ ${#files[@]} -gt 0 ] && "$PY" benchmarks/report.py "${files[@]}"
    return 0
}

stage_C() {
    if want C1; then
        step "C1. loss sweep at d = 896 and 3584, bf16 (no torch.compile: one compile per shape costs ~1 min)"
        if [ "$DRY" = 1 ]; then
            run_step "$LIMIT_C1" "$PY" benchmarks/bench_loss.py --device cpu --dtype fp32 --d 16 32 --B 64 \
                --backends torch reference --repeats 2 --no-live-memory --out "$OUT/loss_wide.json"
        else
            run_step "$LIMIT_C1" "$PY" benchmarks/bench_loss.py --device cuda --dtype bf16 --d 896 3584 \
                --B 4096 16384 65536 --backends triton triton_strip torch reference inf_cl gemm3 \
                --alpha0-fused triton --warmup 1 --repeats 10 --point-budget-s 2 --deadline-s $(( LIMIT_C1 - 20 )) \
                --no-ceilings --out "$OUT/loss_wide.json"
        fi
    fi
    if want C2; then
        step "C2. largest B = N per backend at d = 1536, bf16"
        if [ "$DRY" = 1 ]; then
            run_step "$LIMIT_C2" "$PY" benchmarks/bench_maxb.py --device cpu --backends torch --d 32 --start 64 \
                --B-max 128 --warmup-B 32 --out "$OUT/maxb.json"
        else
            run_step "$LIMIT_C2" "$PY" benchmarks/bench_maxb.py --d 1536 --dtype bf16 --start 65536 --max-try-s 12 \
                --backends triton triton_strip reference torch inf_cl --deadline-s $(( LIMIT_C2 - 20 )) --out "$OUT/maxb.json"
        fi
    fi
    step "C summary"
    [ -f "$OUT/loss_wide.json" ] && "$PY" benchmarks/report.py "$OUT/loss_wide.json"
    [ -f "$OUT/maxb.json" ] && "$PY" benchmarks/report.py --maxb "$OUT/maxb.json"
    return 0
}

# set-up in this shell (its exports reach every stage), logged at the top of the first stage's log
setup > >(tee -a "$OUT/log_$FIRST.txt") 2>&1
rc=$?
sleep 0.2  # let tee finish the set-up's lines before the stage's own
if [ $rc = 2 ]; then exit 0; fi
if [ $rc != 0 ]; then echo "set-up failed: no stage ran (see $OUT/log_$FIRST.txt)"; exit 1; fi
for S in $STAGES; do
    { "stage_$S"; step "stage $S done; files under $OUT:"; ls -la "$OUT"; } 2>&1 | tee -a "$OUT/log_$S.txt"
done
echo "total $(( $(date +%s) - T0 )) s"
