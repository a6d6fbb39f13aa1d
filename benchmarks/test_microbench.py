"""pytest-benchmark microbenchmarks of the CPU backends ("torch" chunked, "reference" eager).

    python -m pytest benchmarks/test_microbench.py --benchmark-only
    python -m pytest benchmarks/test_microbench.py --benchmark-only --benchmark-group-by=group

Not part of the default test run (testpaths = tests). Each benchmark first asserts that both
backends match the float64 reference (``llave_fast.reference.reference_loss``) on its own
inputs, then times one phase: the forward (with autograd recording, as in training), the
backward alone (the forward runs, untimed, in pedantic's setup), or forward + backward.
Inputs rotate among a few fresh random L2-normalised pairs.
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

D = 256
ALPHA = 9.0
SCALE = 50.0
N_PAIRS = 3
ROUNDS = {512: 15, 1024: 8, 2048: 4}
TOL_LOSS, TOL_GRAD = 1e-4, 2e-3  # fp32 against the float64 truth (as in bench_loss.py)
CPU = torch.device("cpu")


def loss_fn(backend):
    def fn(q, t):
        return hardness_weighted_loss(q, t, logit_scale=SCALE, alpha=ALPHA, symmetric=True, backend=backend)
    return fn


@functools.lru_cache(maxsize=None)
def pairs_for(B: int):
    return C.make_pairs(N_PAIRS, B, D, dtype=torch.float32, device=CPU, seed=B)


@functools.lru_cache(maxsize=None)
def check_outputs(B: int) -> dict:
    """Both backends against the float64 reference on the first input pair; errors per backend."""
    q0, t0 = pairs_for(B)[0]
    q64 = q0.detach().double().requires_grad_()
    t64 = t0.detach().double().requires_grad_()
    truth = reference_loss(q64, t64, logit_scale=SCALE, alpha=ALPHA, symmetric=True)
    truth.backward()
    out = {}
    for backend in ("torch", "reference"):
        q = q0.detach().clone().requires_grad_()
        t = t0.detach().clone().requires_grad_()
        loss = loss_fn(backend)(q, t)
        loss.backward()
        out[backend] = {
            "loss": C.rel_err(loss, truth),
            "dq": C.rel_err(q.grad, q64.grad),
            "dt": C.rel_err(t.grad, t64.grad),
        }
    return out


@pytest.mark.parametrize("phase", ["fwd", "bwd", "fwd_bwd"])
@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("B", [512, 1024, 2048])
def test_loss_microbench(benchmark, B, backend, phase):
    # correctness first: no timing of a backend whose outputs do not match
    errs = check_outputs(B)
    for name, e in errs.items():
        assert e["loss"] <= TOL_LOSS, f"{name} loss off by {e['loss']:.2e} at B={B}"
        assert e["dq"] <= TOL_GRAD and e["dt"] <= TOL_GRAD, f"{name} gradients off at B={B}: {e}"

    fn = loss_fn(backend)
    pairs = pairs_for(B)
    rotation = itertools.count()

    def next_pair():
        q, t = pairs[next(rotation) % len(pairs)]
        q.grad = None
        t.grad = None
        return q, t

    if phase == "fwd":
        def setup():
            return next_pair(), {}

        def target(q, t):
            return fn(q, t)
    elif phase == "bwd":
        def setup():
            q, t = next_pair()
            return (fn(q, t),), {}  # the forward, untimed

        def target(loss):
            loss.backward()
    else:
        def setup():
            return next_pair(), {}

        def target(q, t):
            fn(q, t).backward()

    benchmark.group = f"B=N={B} d={D} {phase}"
    gemm = 2.0 * B * B * D
    benchmark.extra_info.update(B=B, N=B, d=D, phase=phase, backend=backend,
                                useful_gemm_flops={"fwd": gemm, "bwd": 3 * gemm, "fwd_bwd": 4 * gemm}[phase],
                                errors_vs_fp64=errs[backend])
    benchmark.pedantic(target, setup=setup, rounds=ROUNDS[B], iterations=1, warmup_rounds=1)
    for q, t in pairs:
        q.grad = None
        t.grad = None
