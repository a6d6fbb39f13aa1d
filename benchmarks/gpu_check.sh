#!/usr/bin/env bash
# One short GPU run (the GPU issue's prepared script): compiled-kernel tests, the two
# ceilings, the loss sweep. Writes everything under $OUT (default: ./gpu_out).
# Lent machines have torch/triton/pytest but no deepspeed: nothing here needs it.
# Dry run on a CPU machine: every step reports that CUDA is missing and the script exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'PYEOF' > "$OUT/env.txt" 2>&1
import torch, triton, platform
print("python", platform.python_version(), "torch", torch.__version__, "triton", triton.__version__)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "-")
PYEOF
cat "$OUT/env.txt"
if ! "$PY" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device: dry run only (the steps below need a GPU)"; exit 0
fi
# the package must import from this tree (kernels/ is mapped to llave_fast.kernels by setup.py)
"$PY" -m pip install --no-deps --no-build-isolation -q -e . > "$OUT/install.txt" 2>&1 || cat "$OUT/install.txt"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
# 1. compiled kernels against the float64 reference (about 1-2 minutes)
LLAVE_FAST_COMPILED=1 timeout 240 "$PY" -m pytest -q -m gpu tests/test_loss_gpu.py -x \
    --junitxml="$OUT/gpu_tests.xml" 2>&1 | tail -30 | tee "$OUT/gpu_tests.txt"
# 2. ceilings
timeout 120 "$PY" benchmarks/gpu_ceilings.py --out "$OUT/ceilings.json" 2>&1 | tee "$OUT/ceilings.txt"
# 3. the loss sweep at the acceptance point (the full grid is the issue's; start here)
timeout 300 "$PY" benchmarks/bench_loss.py --device cuda --dtype bf16 --B 4096 16384 --d 1536 \
    --backends triton torch reference compile --out "$OUT/bench_loss.json" 2>&1 | tail -40 | tee "$OUT/bench_loss.txt"
echo "results under $OUT"
