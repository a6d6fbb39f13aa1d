#!/usr/bin/env bash
# The prepared GPU run (bash benchmarks/fetch_wheels.sh here first, then the two device calls below).
# Stages and step limits (LIMIT_<step>=... overrides one; STEPS="A1 B0 ..." runs only the steps named):
#   A   A1 compiled-kernel and environment tests (pytest -m 'gpu or env', 8 workers)         110 s
#   B   B0 S-cache kernel probe (probe_scache.py: S GEMM with fp32 output, dq/dT at odd N, the
#          stats and dS passes against the copy bandwidth, the fused forward)                  60 s
#       B1 loss sweep, d = 1536, bf16, B = 4096 16384 65536, every backend, ceilings, the floor  135 s
#       B2 B = N = 262144: the default (stream) and fused paths, the floor (no Inf-CL: on the H200
#          its warm-up run was unfinished at a 65 s limit; B1 compares it up to 65536)            70 s
#       B3 odd N = 16383 vs 16384, default and fused paths, d = 256 and 1536, bf16 and fp16      70 s
#   T   the training loop (benchmarks/bench_train_step.py, train_step.json): T0 DeepSpeed, PyAV and
#       transformers >= 5.23 from .whl/train (offline) and the optimizer check 20 + 15 s; T1 the tiny
#       default job cut to 80 steps (its 240 would not fit) 80 s; T2 the LLaVE-0.5B-size step, its encode
#       throughput, memory without GradCache 125 s; T3 eval and eval-video with T1's model 25 s.
#       "bash benchmarks/gpu_check.sh T", timeout_s 350.
# The stages run in the order named (AB, TB, TBA...), after one set-up (~30 s). A lease of 15 minutes,
# the machine's start (1-2 minutes) included, takes two calls, what has never run first:
#   1. STEPS="T0 T1 T2 T3 B0 B1 B3" bash benchmarks/gpu_check.sh TB, carry [".whl"], timeout_s 590
#      (30 + 265 + 265 s of limits);
#   2. at once on the warm machine, no carry, with call 1's reply's lease.budget_left_s (no status call):
#      >= 240 s: LIMIT_A1=125 STEPS="A1 B2" bash benchmarks/gpu_check.sh AB, timeout_s 230 (the warm set-up
#      ~5 s + 125 + 70 s + 20 s of one step's grace); 150-239 s: LIMIT_A1=<left - 60> STEPS=A1 ... A, timeout_s
#      left - 20; < 150 s: give_back. Then give_back. Its log_B.txt is B2's alone. A warm machine keeps the
#      set-up of call 1 (SETUP_MARKER, default /tmp/llave_fast_gpu_setup: this tree, this Python).
# Files under $OUT (default ./gpu_out; a device call brings back at most 8):
#   A: log_A.txt tests.xml   B: log_B.txt probe.json loss.json loss_262k.json loss_variants.json
#   T: log_T.txt train_step.json
# Each step runs under run_step (benchmarks/_steps.sh): SIGINT at its limit, so the scripts and pytest
# write what they have (the JSON files are also rewritten as results come in). Without CUDA every
# stage says so and exits 0; GPU_CHECK_DRY=1 runs every step with tiny CPU arguments instead (the
# plumbing: install, limits, files, summaries; tests/test_benchmarks.py does).
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:-AB}
# the stages to run, in the order given: one to three of A, B, T, each once (e.g. AB, TB, TBA)
if ! [[ "$STAGE" =~ ^[ABT]{1,3}$ ]] || [ "$(echo "$STAGE" | fold -w1 | sort -u | wc -l)" != ${#STAGE} ]; then
    echo "usage: $0 STAGES: one to three of A, B, T in the order to run them, each once (A, AB, T, TB, TBA...)"
    exit 2
fi
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# shellcheck source=benchmarks/_steps.sh
source benchmarks/_steps.sh
LIMIT_A1=${LIMIT_A1:-110}; LIMIT_B1=${LIMIT_B1:-135}; LIMIT_B2=${LIMIT_B2:-70}
LIMIT_B3=${LIMIT_B3:-70}; LIMIT_B0=${LIMIT_B0:-60}
LIMIT_T0=${LIMIT_T0:-20}; LIMIT_T0_ENV=${LIMIT_T0_ENV:-15}; LIMIT_T1=${LIMIT_T1:-80}; LIMIT_T2=${LIMIT_T2:-125}
LIMIT_T3=${LIMIT_T3:-25}
T0=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - T0 )) s] $*"; }
# STEPS="A1 B1 ..." runs only the steps named (a short lease); default: every step of the stage
want() { [ -z "${STEPS:-}" ] || [[ " $STEPS " == *" $1 "* ]]; }
STAGES=$(echo "$STAGE" | fold -w1 | paste -sd' ')
FIRST=${STAGES%% *}

# a warm machine (call 2 right after call 1) keeps the editable install and /tmp/site: the set-up of the
# call before is reused when its marker names this tree and this Python and llave_fast imports from here
SETUP_MARKER=${SETUP_MARKER:-/tmp/llave_fast_gpu_setup}
warm_setup() {
    [ -f "$SETUP_MARKER" ] && [ "$(sed -n 1p "$SETUP_MARKER")" = "$PWD|$PY" ] || return 1
    local pp here=$PWD
    pp=$(sed -n 3p "$SETUP_MARKER")
    # run from / (not this tree, which python -c would put first on sys.path): the editable install must find it
    (cd / && PYTHONPATH="$pp" "$PY" -c "import llave_fast.kernels, llave_fast, os, sys
sys.exit(0 if os.path.realpath(llave_fast.__file__).startswith(os.path.realpath('$here') + os.sep) else 1)") \
        2>/dev/null || return 1
    step "environment: warm machine, the set-up of the call before is kept ($SETUP_MARKER)"
    DRY=$(sed -n 2p "$SETUP_MARKER")
    [ -n "$pp" ] && export PYTHONPATH="$pp"
    [ "$DRY" = 1 ] && export TRITON_INTERPRET=1
    [ "$DRY" = 1 ] || nvidia-smi -L 2>&1
    _kernels_import_check "$PY"
}

setup() {
    warm_setup && return 0
    rm -f "$SETUP_MARKER"
    step "environment"
    df -h /dev/shm /tmp 2>&1
    "$PY" -m torch.utils.collect_env 2>/dev/null | grep -v "^\(Flags\|Vulnerability\)"
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
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "no .whl/ folder: Inf-CL is not installed (bash benchmarks/fetch_wheels.sh here, then carry .whl)"
    elif run_step 90 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl; then
        export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}/tmp/site"
        "$PY" -c "import inf_cl; print('inf_cl importable')" || echo "WARNING: the wheels installed, but inf_cl does not import: its rows will say why"
    else
        echo "WARNING: installing the carried wheels failed: Inf-CL rows will be skipped"
    fi
    # not after the fallback to a copy of the package (PYTHONSAFEPATH): the next call sets up again
    [ -n "${PYTHONSAFEPATH:-}" ] || printf '%s\n%s\n%s\n' "$PWD|$PY" "$DRY" "${PYTHONPATH:-}" > "$SETUP_MARKER" 2>/dev/null \
        || true
    return 0
}

# pick DRY_ARGS... -- GPU_ARGS...: ARGS=(the tiny CPU arguments) in a dry run, else the GPU ones
pick() { local dry=() gpu=() seen=0; for a in "$@"; do if [ "$a" = -- ]; then seen=1; elif [ $seen = 0 ]; then dry+=("$a"); else gpu+=("$a"); fi; done
         if [ "$DRY" = 1 ]; then ARGS=("${dry[@]}"); else ARGS=("${gpu[@]}"); fi; }
LOSS_CPU=(--device cpu --dtype fp32 --backends torch reference --repeats 2 --no-plot)

stage_A() {
    if want A1; then
        step "A1. compiled kernels vs the float64 reference (pytest -m gpu)"
        local extra=()
        "$PY" -c "import xdist" 2>/dev/null && extra+=(-n "$([ "$DRY" = 1 ] && echo 2 || echo 8)")
        [ "$DRY" = 1 ] || { "$PY" -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout 120); }
        LLAVE_FAST_COMPILED=$((1 - DRY)) run_step "$LIMIT_A1" "$PY" -m pytest -q -m "gpu or env" tests/test_loss_gpu.py \
            tests/test_environment.py "${extra[@]}" -p no:cacheprovider -p no:benchmark -o addopts="" -rfE --tb=short \
            --junitxml="$OUT/tests.xml"
    fi
    step "A summary"
    [ -f "$OUT/tests.xml" ] && "$PY" benchmarks/report.py --junit "$OUT/tests.xml"
    return 0
}

stage_B() {
    if want B0; then
        step "B0. S-cache kernel probe: cuBLAS S fp32 output, dq/dT at odd N, stats and dS passes vs copy bandwidth"
        pick --dry -- --B 16384 --d 1536
        run_step "$LIMIT_B0" "$PY" benchmarks/probe_scache.py "${ARGS[@]}" --out "$OUT/probe.json"
    fi
    if want B1; then
        step "B1. loss sweep at d = 1536, bf16: ceilings, every backend, B = 4096..65536 (compile at 16384 only)"
        pick "${LOSS_CPU[@]}" --d 32 --B 64 128 --only-B reference=64 --point-budget-s 0.2 -- --device cuda --dtype bf16 \
            --d 1536 --B 4096 16384 65536 --backends triton triton_cache triton_stream triton_strip torch reference \
            compile inf_cl gemm3 --alpha0-fused triton --only-B compile=16384 --warmup 1 --repeats 10 --point-budget-s 3 \
            --no-plot
        run_step "$LIMIT_B1" "$PY" benchmarks/bench_loss.py "${ARGS[@]}" --deadline-s $(( LIMIT_B1 - 20 )) --out "$OUT/loss.json"
    fi
    if want B2; then
        step "B2. B = N = 262144, d = 1536, bf16: the default path (stream), the fused strip, the floor"
        pick "${LOSS_CPU[@]}" --d 32 --B 256 --repeats-for reference=1 -- --device cuda --dtype bf16 --d 1536 --B 262144 \
            --backends triton triton_strip gemm3 --warmup 1 --repeats 2 --no-ceilings --no-plot
        run_step "$LIMIT_B2" "$PY" benchmarks/bench_loss.py "${ARGS[@]}" --sequential --n-inputs 2 \
            --deadline-s $(( LIMIT_B2 - 15 )) --out "$OUT/loss_262k.json"
    fi
    if want B3; then
        step "B3. odd N: B = N = 16383 and 16384, the default path and the fused strip against the floor, d = 256 and 1536, bf16 and fp16"
        pick "${LOSS_CPU[@]}" --d 16 32 --B 63 64 --point-budget-s 0.2 -- --device cuda --dtype bf16 fp16 --d 256 1536 \
            --B 16383 16384 --backends triton triton_strip gemm3 --warmup 1 --repeats 5 --point-budget-s 1 --no-ceilings --no-plot
        run_step "$LIMIT_B3" "$PY" benchmarks/bench_loss.py "${ARGS[@]}" --deadline-s $(( LIMIT_B3 - 15 )) --out "$OUT/loss_variants.json"
    fi
    step "B summary"
    local files=()
    for f in loss.json loss_262k.json loss_variants.json; do [ -f "$OUT/$f" ] && files+=("$OUT/$f"); done
    [ ${#files[@]} -gt 0 ] && "$PY" benchmarks/report.py "${files[@]}"
    return 0
}

stage_T() {
    local json="$OUT/train_step.json" dry=() k=1
    # a dry run gets 3x the limits: the tiny sizes on a small shared CPU, where the plumbing is what is tested
    [ "$DRY" = 1 ] && dry=(--dry) && k=3
    # scratch (the tiny run, generated eval files and clips): not under $OUT, which brings back 8 files at most
    export TRAIN_STEP_WORK=${TRAIN_STEP_WORK:-/tmp/llave_fast_train_step}
    if want T0; then
        # the image's transformers (5.17) cannot build a model from its config under ZeRO-3: the carried one can
        local TF_MIN
        TF_MIN=$(transformers_floor) || return 1
        step "T0. DeepSpeed, PyAV and transformers >= $TF_MIN from the carried wheels (.whl/train, offline), then import deepspeed and the optimizer check"
        if ls .whl/train/*.whl >/dev/null 2>&1; then
            # dependencies resolved against what is installed plus .whl/train, never an index; in a dry run pip
            # only resolves (--dry-run): this machine's environment is left as it is
            local pipdry=()
            [ "$DRY" = 1 ] && pipdry=(--dry-run)
            if ! run_step $(( LIMIT_T0 * k )) "$PY" -m pip install -q --no-index --find-links .whl/train --no-cache-dir \
                    --no-compile "${pipdry[@]}" deepspeed hjson pydantic av "transformers>=$TF_MIN"; then
                echo "WARNING: pip could not install into this Python's environment; trying --target /tmp/site_train"
                echo "         (the missing packages only, no dependency check)"
                local whl=()
                for n in deepspeed hjson pydantic pydantic_core annotated_types typing_inspection typing_extensions av \
                         transformers regex; do
                    whl+=(.whl/train/"$n"-*.whl)
                done
                if [ "$DRY" != 1 ] && run_step "$LIMIT_T0" "$PY" -m pip install -q --no-index --no-deps --no-compile \
                        --no-cache-dir --upgrade --target /tmp/site_train "${whl[@]}"; then
                    export PYTHONPATH="/tmp/site_train${PYTHONPATH:+:$PYTHONPATH}"
                fi
            fi
        else
            echo "no .whl/train/: DeepSpeed and PyAV must be installed already (bash benchmarks/fetch_wheels.sh here, then carry .whl)"
        fi
        run_step $(( LIMIT_T0_ENV * k )) "$PY" benchmarks/bench_train_step.py env "${dry[@]}" --out "$json"
    fi
    if want T1; then
        step "T1. (a) the tiny default job (python3 -m llave_fast train, 80 steps): bf16, ZeRO-3, GradCache, P@1 before and after"
        run_step $(( LIMIT_T1 * k )) "$PY" benchmarks/bench_train_step.py tiny "${dry[@]}" --out "$json"
    fi
    if want T2; then
        step "T2. (b) the LLaVE-0.5B-size step (ZeRO-3, bf16, GradCache, AdamW), (d) its encode throughput, (c) memory without GradCache"
        run_step $(( LIMIT_T2 * k )) "$PY" benchmarks/bench_train_step.py step "${dry[@]}" --deadline-s $(( LIMIT_T2 * k - 12 )) \
            --out "$json"
    fi
    if want T3; then
        step "T3. (d) llave-fast eval (generated MMEB-eval files) and eval-video (generated clips) with T1's model"
        run_step $(( LIMIT_T3 * k )) "$PY" benchmarks/bench_train_step.py eval "${dry[@]}" --out "$json"
    fi
    step "T summary"
    [ -f "$json" ] && "$PY" benchmarks/bench_train_step.py report --out "$json"
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
