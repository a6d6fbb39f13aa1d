"""The COMPILED kernels on CUDA (run with LLAVE_FAST_COMPILED=1 on a GPU machine).

    LLAVE_FAST_COMPILED=1 python -m pytest -m gpu tests/test_loss_gpu.py

Every test skips at run time when TRITON_INTERPRET=1 (conftest sets it unless
LLAVE_FAST_COMPILED=1) or when CUDA is unavailable; nothing probes CUDA at import time.
The tolerance rule is that of ``_helpers``: the CCE rule and the accumulation rule, which on
CUDA allows the bf16 dS strip's rounding (2^-8) on top of fp32 arithmetic (S is fp32 on every
path: cuBLAS with fp32 output, or the fused kernels' fp32 accumulators). Paths where S lives
(``backends.common.S_MODES``) are forced per test: "cache", "stream", and the fused kernels
("strip": the one-pass forward and the strip backward recomputing S).
"""

from __future__ import annotations

import os

import pytest
import torch

from llave_fast import FusedHardnessLoss, hardness_weighted_loss
from llave_fast.backends import resolve_backend
from llave_fast.backends.triton_backend import kernel_config
from llave_fast.reference import reference_loss

from _helpers import (
    DTYPES,
    MARGIN,
    check_backend,
    make_case,
    mismatch_report,
    rel_err,
    run,
    upstream_grad,
)

pytestmark = pytest.mark.gpu


@pytest.fixture
def cuda():
    """The CUDA device, or a skip: decided when the test runs, never at import."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("TRITON_INTERPRET=1: the compiled kernels are not in use (run with LLAVE_FAST_COMPILED=1)")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch.device("cuda", torch.cuda.current_device())


# (B, d, M): B and N = B + M from 1 to 4096+, LLaVE's widths 896/1536/3584 and an odd 130
GPU_SHAPES = [
    (1, 896, 9),
    (17, 130, 0),
    (130, 130, 3),
    (257, 1536, 31),
    (1000, 3584, 0),
    (2048, 896, 100),
    (4096, 896, 0),
    (4096, 3584, 0),
]
# where S lives (backends.common.S_MODES) and, on the fused path, which backward; "stream" with
# 1 MiB blocks of fp32 S (64 rows of a 4096-column stride): several blocks at every grid size
PATH_CONFIG = {
    "cache": dict(S_MODE="cache"),
    "stream": dict(S_MODE="stream", S_CACHE_BYTES=1 << 20),
    "strip": dict(S_MODE="fused"),
    # the one-pass forward's column statistics from partials per row tile, or from a sweep over S^T
    "strip_tile": dict(S_MODE="fused", FWD_COL="tile"),
    "strip_transpose": dict(S_MODE="fused", FWD_COL="transpose"),
}
PATHS = tuple(PATH_CONFIG)
OPTIONS = [  # cycled over the grid: (masks, symmetric, reduction, learnable scale)
    ("none", True, "mean", False),
    ("tid_neg", True, "mean", True),
    ("both", False, "sum", False),
    ("tid", True, "none", True),
    ("qid", True, "mean", False),
]


def _gpu_grid():
    i = 0
    for dt in DTYPES:
        dtype, margin = dt.values
        for B, d, M in GPU_SHAPES:
            masks, sym, red, learn = OPTIONS[i % len(OPTIONS)]
            bwd = PATHS[(i // 2) % len(PATHS)]  # every path over every dtype and most shapes
            i += 1
            if masks == "tid_neg" and M == 0:
                masks = "both"
            yield pytest.param(dtype, margin, (B, d, M), masks, sym, red, learn, bwd,
                               id=f"{dt.id}-{B}x{d}x{M}-{masks}-{'sym' if sym else 'oneway'}-{red}"
                                  + ("-slearn" if learn else "") + f"-{bwd}")


@pytest.mark.parametrize("dtype,margin,shape,masks,symmetric,reduction,learnable,bwd", list(_gpu_grid()))
def test_compiled_triton_matches_reference(cuda, dtype, margin, shape, masks, symmetric, reduction, learnable, bwd,
                                           gen, seed):
    B, d, M = shape
    case = make_case(gen, B, d, M, dtype, masks=masks, symmetric=symmetric, reduction=reduction,
                     learnable_scale=learnable, device=cuda, seed=seed, label="gpu")
    with kernel_config(**PATH_CONFIG[bwd]):
        check_backend(case, "triton", margin, gen)


@pytest.mark.parametrize("dtype,margin", DTYPES)
@pytest.mark.parametrize("masks", ["none", "tid_neg"])
def test_compiled_triton_small_tiles_many_groups(cuda, dtype, margin, masks, gen):
    """Several row/column blocks per program group and several dS tiles per strip (strips of
    128 rows), on the compiled path."""
    case = make_case(gen, 301, 130, 17, dtype, masks=masks, learnable_scale=True, device=cuda)
    with kernel_config(BM=32, BN=32, BK=32, GR_MAX=2, GC_MAX=3, DS_BM=32, DS_BN=32, DS_STRIP_ROWS=128,
                       S_MODE="fused"):
        check_backend(case, "triton", margin, gen)
        check_backend(case, "triton", margin, gen, deterministic=True)


@pytest.mark.parametrize("dtype,margin", DTYPES)
def test_torch_backend_on_cuda(cuda, dtype, margin, gen):
    case = make_case(gen, 513, 896, 40, dtype, masks="tid_neg", learnable_scale=True, device=cuda)
    check_backend(case, "torch", margin, gen)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_compiled_deterministic_is_bitwise(cuda, dtype, gen):
    """deterministic=True and False run the same strip backward: every run, either way, is
    bitwise the same (the option changes nothing; the loss still accepts it)."""
    case = make_case(gen, 2048, 896, 64, dtype, masks="tid_neg", learnable_scale=True, device=cuda)
    g = upstream_grad(gen, case)
    with kernel_config(S_MODE="fused"):
        a = run(case, dtype, g, backend="triton", deterministic=True)
        b = run(case, dtype, g, backend="triton", deterministic=True)
        fast = run(case, dtype, g, backend="triton", deterministic=False)
    for other, what in ((b, "run 2 vs 1"), (fast, "deterministic=False vs True")):
        assert torch.equal(a.out, other.out), mismatch_report(f"loss ({what})", other.out, a.out)
        for n in a.grads:
            assert torch.equal(a.grads[n], other.grads[n]), mismatch_report(f"{n} ({what})", other.grads[n],
                                                                            a.grads[n])


@pytest.mark.parametrize("dtype,margin", [DTYPES[0], DTYPES[1]])
def test_compiled_non_contiguous(cuda, dtype, margin, gen):
    def strided(q, t, neg):
        wide = torch.cat([t, torch.randn_like(t[:, :5])], dim=1)
        return q.t().contiguous().t(), wide[:, : t.shape[1]], neg[::1].t().contiguous().t()

    case = make_case(gen, 333, 896, 21, dtype, masks="tid_neg", learnable_scale=True, device=cuda)
    check_backend(case, "triton", margin, gen, transform=strided)


def test_compiled_poisoned_outputs(cuda, monkeypatch, gen):
    monkeypatch.setenv("LLAVE_FAST_POISON", "1")
    case = make_case(gen, 777, 130, 11, torch.bfloat16, masks="tid_neg", learnable_scale=True, device=cuda)
    check_backend(case, "triton", MARGIN[torch.bfloat16], gen)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_compiled_non_finite(cuda, value, gen):
    case = make_case(gen, 300, 130, 0, torch.bfloat16, device=cuda)
    case.q[5, 3] = value
    out = hardness_weighted_loss(case.q, case.t, backend="triton")
    assert not torch.isfinite(out), out


def test_cuda_default_is_the_gpu_config(cuda):
    """On a real device the launch config is gpu_config for its SM count, with the same
    backward and S-path choices as the interpreter's default (the CPU suite's)."""
    from llave_fast.backends.launch import PATH_FIELDS, gpu_config, interpreter_config
    from llave_fast.backends.triton_backend import launch_config

    sms = torch.cuda.get_device_properties(cuda).multi_processor_count
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        cfg = launch_config(cuda, dtype)
        assert cfg == gpu_config(dtype, sms), cfg
        for name in PATH_FIELDS:
            assert getattr(cfg, name) == getattr(interpreter_config(), name), name


def test_auto_is_triton_on_cuda(cuda, gen):
    assert resolve_backend("auto", cuda, torch.bfloat16) == "triton"
    assert resolve_backend("auto", cuda, torch.float64) == "torch"
    case = make_case(gen, 64, 130, 0, torch.bfloat16, device=cuda)
    q = case.q.clone().requires_grad_(True)
    out = FusedHardnessLoss()(q, case.t)
    assert "TritonHardnessLoss" in type(out.grad_fn).__name__, type(out.grad_fn).__name__


@pytest.mark.parametrize("bwd", ["strip", "stream"])
def test_compiled_never_allocates_b_by_n(cuda, bwd, gen):
    """Peak CUDA memory above the inputs stays below a quarter of one fp32 B x N matrix
    (the eager reference needs several) on the paths that do not keep S. The strip backward is
    given 8 MiB strips (512 rows here; the one-strip rule is off): its dS strip is bounded by
    its configuration, not by B; the stream path 8 MiB blocks of fp32 S."""
    B, d = 8192, 128
    case = make_case(gen, B, d, 0, torch.bfloat16, masks="both", device=cuda, min_loss=None)
    q = case.q.clone().requires_grad_(True)
    t = case.t.clone().requires_grad_(True)
    scale = torch.tensor(50.0, device=cuda, requires_grad=True)

    def peak_of(backend):
        torch.cuda.synchronize(cuda)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(cuda)
        base = torch.cuda.memory_allocated(cuda)
        out = hardness_weighted_loss(q, t, logit_scale=scale, target_ids=case.target_ids, query_ids=case.query_ids,
                                     backend=backend)
        grads = torch.autograd.grad(out, [q, t, scale])
        torch.cuda.synchronize(cuda)
        assert all(torch.isfinite(x).all() for x in grads)
        return torch.cuda.max_memory_allocated(cuda) - base

    budget = B * B * 4 // 4
    path = dict(S_MODE="stream", S_CACHE_BYTES=8 << 20) if bwd == "stream" else dict(S_MODE="fused")
    with kernel_config(**path, DS_ONE_STRIP_BYTES=0, DS_STRIP_BYTES=8 << 20, DS_MIN_ROWS=0):
        fused = peak_of("triton")
    assert fused < budget, f"triton backend peak {fused} bytes, budget {budget} (B*N*4/4)"
    eager = peak_of("reference")
    assert eager >= B * B * 4, f"the reference's peak {eager} should hold a B x N fp32 matrix"


def test_compiled_matches_reference_llave_shape(cuda, gen):
    """LLaVE's setting: bf16, d=3584, s=50, alpha=9, symmetric mean, via the module; the loss and
    both gradients against float64 of the same (rounded) inputs, on trained-like embeddings."""
    from test_s_cache import trained_like_case

    case = trained_like_case(gen, 1024, 3584, 0, torch.bfloat16, masks="none", learnable_scale=False)
    case = type(case)(**{**case.__dict__, "q": case.q.to(cuda), "t": case.t.to(cuda)})
    q = case.q.clone().requires_grad_(True)
    t = case.t.clone().requires_grad_(True)
    from llave_fast.llave_compat import WeightedClipLoss

    out = WeightedClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True, rank=0, world_size=1)(
        q, t, logit_scale=50.0, alpha=9.0)
    out.backward()
    q64, t64 = case.q.double().requires_grad_(True), case.t.double().requires_grad_(True)
    ref = reference_loss(q64, t64, logit_scale=50.0, alpha=9.0)
    ref.backward()
    assert rel_err(out, ref) < 1e-5, (out.item(), ref.item())
    for name, got, want in (("dq", q.grad, q64.grad), ("dt", t.grad, t64.grad)):
        # the bf16 dS strip (2^-8) and the bf16 output rounding (2^-9), with room for neither to add up
        assert rel_err(got, want) < 2 * (2.0**-8 + 2.0**-9), mismatch_report(name, got, want)
    # and the rule of every other test, on the same inputs
    check_backend(case, "triton", MARGIN[torch.bfloat16], gen)


# ---------------------------------------------------------------- the strip backward on the GPU
@pytest.mark.parametrize("dtype,margin", DTYPES)
@pytest.mark.parametrize("shape,rows", [((257, 1536, 31), None), ((1000, 896, 0), 384), ((2048, 3584, 64), 1000)],
                         ids=["one-strip", "strips-of-384", "strips-of-1000"])
def test_compiled_strip_backward(cuda, dtype, margin, shape, rows, gen):
    """The strip backward (hardness_ds_kernel + cuBLAS GEMMs), one strip or several (partial last)."""
    B, d, M = shape
    case = make_case(gen, B, d, M, dtype, masks="tid_neg" if M else "both", learnable_scale=True, device=cuda)
    for path in ("fused", "cache"):  # the dS strips recomputing S, and reading the kept S
        with kernel_config(DS_STRIP_ROWS=rows, S_MODE=path):
            check_backend(case, "triton", margin, gen)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_compiled_strip_backward_is_bitwise(cuda, dtype, gen):
    case = make_case(gen, 2048, 1536, 64, dtype, masks="tid_neg", learnable_scale=True, device=cuda)
    g = upstream_grad(gen, case)
    with kernel_config(DS_STRIP_ROWS=768, S_MODE="fused"):
        a = run(case, dtype, g, backend="triton")
        b = run(case, dtype, g, backend="triton")
    assert torch.equal(a.out, b.out), mismatch_report("loss (run 2 vs 1)", b.out, a.out)
    for n in a.grads:
        assert torch.equal(a.grads[n], b.grads[n]), mismatch_report(f"{n} (run 2 vs 1)", b.grads[n], a.grads[n])


@pytest.mark.parametrize("dtype,margin", DTYPES)
@pytest.mark.parametrize("shape,rows", [((1000, 896, 7), None), ((1000, 1536, 13), 384), ((333, 130, 1), None)],
                         ids=["one-strip-nt1007", "strips-of-384-nt1013", "nt334-d130"])
def test_compiled_strip_padded_stride(cuda, dtype, margin, shape, rows, monkeypatch, gen):
    """NT = B + M not a multiple of 16 (odd hard negatives): the strip's rows are padded to a
    multiple of 64 (vector stores, aligned cuBLAS leading dimension); poisoned outputs (the
    strip buffer starts as NaN) show any unwritten element of the [:rows, :NT] view."""
    from llave_fast.backends.triton_backend import ds_row_stride

    B, d, M = shape
    assert ds_row_stride(B + M) % 64 == 0 and ds_row_stride(B + M) > B + M
    monkeypatch.setenv("LLAVE_FAST_POISON", "1")
    case = make_case(gen, B, d, M, dtype, masks="tid_neg", learnable_scale=True, device=cuda)
    with kernel_config(DS_STRIP_ROWS=rows):
        check_backend(case, "triton", margin, gen)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "oneway"])
def test_compiled_strip_fp16_scaled(cuda, symmetric, gen):
    """The fp16 strip (dS scaled by a power of two sigma, fp16 cuBLAS GEMMs into fp32) with
    per-row upstream gradients from 1e-6 to 1e3: |dS| would reach 5e4-1e5 unscaled (fp16
    overflows at 65504); scaled, every gradient is finite and within the CCE rule, and
    within 2x of the fp32-strip backward's error (DS_LOWP=False) + 1e-3."""
    B, d, M = 2048, 1536, 37
    case = make_case(gen, B, d, M, torch.float16, masks="tid_neg", learnable_scale=True, symmetric=symmetric,
                     reduction="none", device=cuda)
    u = torch.rand(B, generator=gen, dtype=torch.float64) * 9 - 6
    g = torch.sign(torch.randn(B, generator=gen, dtype=torch.float64)) * 10 ** u
    g[0], g[1] = 1e-6, -1e3
    truth = run(case, torch.float64, g, backend=None)
    with kernel_config():
        check_backend(case, "triton", MARGIN[torch.float16], gen, upstream=g)
        got = run(case, torch.float16, g, backend="triton")
    with kernel_config(DS_LOWP=False):
        ref32 = run(case, torch.float16, g, backend="triton")
    for n in truth.grads:
        assert torch.isfinite(got.grads[n]).all(), n
        e16, e32 = rel_err(got.grads[n], truth.grads[n]), rel_err(ref32.grads[n], truth.grads[n])
        assert e16 <= 2 * e32 + 1e-3, mismatch_report(f"{n} (fp16 strip {e16:.2e}, fp32 strip {e32:.2e})",
                                                      got.grads[n], truth.grads[n])


def test_compiled_autotune(cuda, monkeypatch, gen):
    """LLAVE_FAST_AUTOTUNE=1 on the GPU: both kernels tuned once (do_bench), the result still right."""
    from llave_fast.backends import launch

    monkeypatch.setenv("LLAVE_FAST_AUTOTUNE", "1")
    monkeypatch.setenv("LLAVE_FAST_S_MODE", "fused")  # the tuner chooses the one-pass kernels' tiles
    monkeypatch.setattr(launch, "TUNED", {})
    monkeypatch.setattr(launch, "TUNE_LOG", [])
    case = make_case(gen, 4096, 1536, 0, torch.bfloat16, masks="both", device=cuda)
    check_backend(case, "triton", MARGIN[torch.bfloat16], gen)
    assert sorted(r["key"][0] for r in launch.TUNE_LOG) == ["bwd", "fwd"], launch.TUNE_LOG
    for r in launch.TUNE_LOG:
        assert any("ms" in c for c in r["candidates"]), r


# ---------------------------------------------------------------- the largest sizes
@pytest.mark.parametrize("bwd", ["strip", "stream", "cache"])
def test_compiled_65536_against_float64(cuda, bwd, gen):
    """B = N = 65536 (d = 896, bf16, masks, learnable scale) against a float64 truth.

    A float64 B x N matrix would take 32 GiB per copy, so the truth is the chunked torch
    backend in float64 (checked equal to the eager reference at every small size of the CPU
    suite). Norm-wise relative errors, bf16 tolerances."""
    B, d = 65536, 896
    case = make_case(gen, B, d, 0, torch.bfloat16, masks="both", learnable_scale=True, device=cuda, min_loss=None,
                     id_range=B // 3)
    g = upstream_grad(gen, case)
    truth = run(case, torch.float64, g, backend="torch")
    assert truth.out.abs().item() > 1e-2, truth.out
    # the grid's 1 MiB stream blocks would be 4 rows here (16384 blocks a pass): 1 GiB gives 16 blocks of 4096
    cfg = dict(PATH_CONFIG[bwd], **({"S_CACHE_BYTES": 1 << 30} if bwd == "stream" else {}))
    with kernel_config(**cfg):
        got = run(case, torch.bfloat16, g, backend="triton")
    assert rel_err(got.out, truth.out) < 5e-3, (got.out.item(), truth.out.item())
    for n in truth.grads:
        e = rel_err(got.grads[n], truth.grads[n])
        assert torch.isfinite(got.grads[n]).all(), n
        assert e < 3e-2, mismatch_report(f"{n} ({bwd}, rel err {e:.2e})", got.grads[n], truth.grads[n])


def test_strip_gemm_accumulates_in_fp32_on_cuda(cuda):
    """torch >= 2.8 takes fp32 output for bf16 GEMMs on CUDA; the strip backward must find it
    (else dT's strip partials are rounded to bf16 before they are summed)."""
    from llave_fast.backends.triton_backend import _probe_acc_mm

    form = _probe_acc_mm(cuda, torch.bfloat16)
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    if (major, minor) >= (2, 8):
        assert form in ("addmm", "mm"), f"torch {torch.__version__}: fp32-output bf16 GEMM not found ({form})"


# ---------------------------------------------------------------- S in fp32, trained-like inputs
def test_similarity_gemm_has_fp32_output_on_cuda(cuda):
    """The S-cache path's S: cuBLAS with fp32 output from bf16/fp16 operands (torch >= 2.8), never
    a 16-bit S; the probe is per device and dtype."""
    from llave_fast.backends import common

    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(64, 96, device=cuda).to(dtype)
        assert common.sim_operand_dtype(x) == (dtype if (major, minor) >= (2, 8) else torch.float32)
        T = torch.randn(80, 96, device=cuda).to(common.sim_operand_dtype(x))
        out = torch.full((64, 80), float("nan"), device=cuda)
        common.similarity_into(out, x, T)
        want = x.double() @ T.double().t()
        assert rel_err(out, want) < 1e-6, rel_err(out, want)


@pytest.mark.parametrize("dtype,margin", DTYPES)
@pytest.mark.parametrize("family", ["trained", "late"])
@pytest.mark.parametrize("path", ["cache", "stream", "strip", "strip_tile", "strip_transpose"])
def test_compiled_trained_like(cuda, dtype, margin, family, path, gen):
    """Trained-like embeddings (positives ~0.85, same-cluster negatives ~0.7; late: loss ~0.03),
    every path, the accumulation rule (tight in bf16); the torch backend (fp32 S on CUDA) too."""
    from test_s_cache import trained_like_case

    case = trained_like_case(gen, 1031, 896, 33, dtype, late=family == "late")
    case = type(case)(**{**case.__dict__, **{k: getattr(case, k).to(cuda) for k in
                                            ("q", "t", "neg", "target_ids", "query_ids")}})
    with kernel_config(**PATH_CONFIG[path]):
        check_backend(case, "triton", margin, gen)
        if not path.startswith("strip"):
            check_backend(case, "torch", margin, gen)
