"""pytest-benchmark microbenchmarks of the loss backends (benchmarks/README.md, "Microbenchmarks").

    python -m pytest benchmarks --benchmark-only [--benchmark-json=out.json]
"""

from __future__ import annotations

import functools
import itertools
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("pytest_benchmark")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
from llave_fast import hardness_weighted_loss  # noqa: E402
from llave_fast.reference import reference_loss  # noqa: E402

D, ALPHA, SCALE, N_PAIRS = 256, 9.0, 50.0, 3
ROUNDS = {512: 15, 1024: 8, 2048: 4, 8192: 10}
# (loss, gradient) tolerances against the float64 truth, as in bench_loss.py
TOL = {torch.float32: (1e-4, 2e-3), torch.bfloat16: (1e-2, 6e-2)}
CASES = ([("cpu", torch.float32, b, B) for b in ("torch", "reference") for B in (512, 1024, 2048)]
         + [("cuda", torch.bfloat16, b, 8192) for b in ("triton", "torch", "reference")])


def loss_fn(backend):
    return functools.partial(hardness_weighted_loss, logit_scale=SCALE, alpha=ALPHA, symmetric=True, backend=backend)


@functools.lru_cache(maxsize=None)
def pairs_for(device: str, dtype: torch.dtype, B: int):
    return C.make_pairs(N_PAIRS, B, D, dtype=dtype, device=device, seed=B)


@functools.lru_cache(maxsize=None)
def errors(device: str, dtype: torch.dtype, backend: str, B: int) -> dict:
    """The backend against the float64 reference on the first input pair."""
    q0, t0 = pairs_for(device, dtype, B)[0]
    q64, t64 = (x.detach().double().requires_grad_() for x in (q0, t0))
    truth = reference_loss(q64, t64, logit_scale=SCALE, alpha=ALPHA, symmetric=True)
    truth.backward()
    q, t = (x.detach().clone().requires_grad_() for x in (q0, t0))
    loss = loss_fn(backend)(q, t)
    loss.backward()
    return {"loss": C.rel_err(loss, truth), "dq": C.rel_err(q.grad, q64.grad), "dt": C.rel_err(t.grad, t64.grad)}


@pytest.mark.parametrize("phase", ["fwd", "bwd", "fwd_bwd"])
@pytest.mark.parametrize("device,dtype,backend,B", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_loss_microbench(benchmark, device, dtype, backend, B, phase):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    errs = errors(device, dtype, backend, B)  # correctness first: no timing of a backend that is off
    tol_loss, tol_grad = TOL[dtype]
    assert errs["loss"] <= tol_loss, f"{backend} loss off by {errs['loss']:.2e} at B={B}"
    assert errs["dq"] <= tol_grad and errs["dt"] <= tol_grad, f"{backend} gradients off at B={B}: {errs}"
    fn, pairs, rotation = loss_fn(backend), pairs_for(device, dtype, B), itertools.count()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def setup():
        q, t = pairs[next(rotation) % len(pairs)]
        q.grad = t.grad = None
        sync()
        if phase != "bwd":
            return (q, t), {}
        loss = fn(q, t)  # the forward, untimed
        sync()
        return (loss,), {}

    def run(*args):
        loss = args[0] if phase == "bwd" else fn(*args)
        if phase != "fwd":
            loss.backward()
        sync()

    benchmark.group = f"{device} {str(dtype)[6:]} B=N={B} d={D} {phase}"
    gemm = 2.0 * B * B * D
    benchmark.extra_info.update(B=B, N=B, d=D, phase=phase, backend=backend, device=device,
                                useful_gemm_flops={"fwd": gemm, "bwd": 3 * gemm, "fwd_bwd": 4 * gemm}[phase],
                                errors_vs_fp64=errs)
    benchmark.pedantic(run, setup=setup, rounds=ROUNDS[B], iterations=1, warmup_rounds=1)
    for q, t in pairs:
        q.grad = t.grad = None
