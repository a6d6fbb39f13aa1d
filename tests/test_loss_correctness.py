"""Correctness of the fused backends against the float64 eager reference.

Every test draws fresh inputs (seeded per test id) and applies the tolerance rule of
``_helpers`` (backend error <= 2 * error of the eager reference in the same precision
+ margin[dtype]) to the loss and to every gradient.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import llave_fast
from llave_fast import FusedHardnessLoss, hardness_weighted_loss
from llave_fast.backends import resolve_backend
from llave_fast.backends.triton_backend import kernel_config
from llave_fast.reference import reference_loss

from _helpers import (
    DTYPES,
    MARGIN,
    MASKS,
    S_PATHS,
    SMALL_TILES,
    Case,
    _cpu_test_env,  # noqa: F401  (autouse fixture)
    assert_results_match,
    check_backend,
    combo_id,
    make_case,
    mismatch_report,
    pairwise,
    rel_err,
    run,
    run_truth,
    upstream_grad,
)

BACKENDS = ("torch", "triton")


@pytest.fixture
def small_chunks(monkeypatch):
    """Make the torch backend walk the strip in many row chunks (LLAVE_FAST_TORCH_CHUNK_ELEMS,
    read at every call)."""

    def set_chunk(elems):
        if elems is not None:
            monkeypatch.setenv("LLAVE_FAST_TORCH_CHUNK_ELEMS", str(elems))

    return set_chunk


def tiles(name, path=None):
    """A context for the triton launch config: small tiles (multi-block, multi-group) or the
    default, on the default path where S lives or on ``path`` (a key of S_PATHS)."""
    extra = {} if path is None else S_PATHS[path]
    if name == "small":
        return kernel_config(**SMALL_TILES, **extra)
    if name == "default":
        return kernel_config(**extra)  # no tile override: the launcher's own config
    return kernel_config(**name, **extra)


# ============================================================ torch backend: full grid
# (B, d, M, chunk elements or None for the default single chunk)
TORCH_SHAPES = [
    (1, 33, 5, None),  # one pair, only the hard negatives compete
    (2, 16, 3, None),
    (37, 130, 0, None),  # prime B, d not a multiple of 16
    (53, 33, 7, 256),  # 4 rows per chunk, N != B
    (64, 130, 0, 1000),  # 15 rows per chunk, last chunk partial
    (29, 64, 31, None),  # more negatives than pairs
]


def _torch_grid():
    for shape in TORCH_SHAPES:
        for masks in MASKS:
            if masks == "tid_neg" and shape[2] == 0:
                continue
            yield pytest.param(shape, masks, id=f"{shape[0]}x{shape[1]}x{shape[2]}" + ("c" if shape[3] else "") + f"-{masks}")


@pytest.mark.parametrize("learnable", [False, True], ids=["sfloat", "slearn"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "oneway"])
@pytest.mark.parametrize("shape,masks", list(_torch_grid()))
@pytest.mark.parametrize("dtype,margin", DTYPES)
def test_torch_backend_grid(dtype, margin, shape, masks, symmetric, reduction, learnable, gen, seed, small_chunks):
    B, d, M, chunk = shape
    small_chunks(chunk)
    # the shapes that walk the strip in chunks recompute them in the backward; the others keep S
    path = "fused" if chunk else "cache"
    case = make_case(gen, B, d, M, dtype, masks=masks, learnable_scale=learnable, symmetric=symmetric,
                     reduction=reduction, seed=seed, label=f"torch grid, {path} path")
    with kernel_config(S_MODE=path):
        check_backend(case, "torch", margin, gen)


# ============================================================ triton backend: pairwise grid
TRITON_AXES = dict(
    dtype=[torch.float32, torch.bfloat16, torch.float16],
    shape=[(1, 33, 5), (37, 130, 0), (53, 33, 7), (29, 48, 19)],
    symmetric=[True, False],
    reduction=["mean", "sum", "none"],
    masks=list(MASKS),
    scale=["float", "learn"],
    tiles=["small", "default"],
    path=list(S_PATHS),
)
TRITON_COMBOS = pairwise(TRITON_AXES, lambda c: not (c["masks"] == "tid_neg" and c["shape"][2] == 0))


@pytest.mark.parametrize("combo", TRITON_COMBOS, ids=[combo_id(c) for c in TRITON_COMBOS])
def test_triton_backend_pairwise(combo, gen, seed):
    B, d, M = combo["shape"]
    dtype = combo["dtype"]
    case = make_case(gen, B, d, M, dtype, masks=combo["masks"], learnable_scale=combo["scale"] == "learn",
                     symmetric=combo["symmetric"], reduction=combo["reduction"], seed=seed,
                     label=f"triton {combo['tiles']} tiles, {combo['path']} path")
    with tiles(combo["tiles"], combo["path"]):
        check_backend(case, "triton", MARGIN[dtype], gen)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "oneway"])
@pytest.mark.parametrize("masks", MASKS)
def test_triton_masks_directions_reductions(masks, symmetric, reduction, gen, seed):
    """Full product of the axes whose interplay is inside the kernels (the masks of each
    direction, the column statistics, the per-row gradients), on a multi-block multi-group
    shape; dtype and scale cycle."""
    i = MASKS.index(masks) * 6 + (0 if symmetric else 3) + ["mean", "sum", "none"].index(reduction)
    dtype = (torch.float32, torch.bfloat16, torch.float16)[i % 3]
    path = list(S_PATHS)[(i + i // 3) % 3]
    case = make_case(gen, 41, 33, 7, dtype, masks=masks, symmetric=symmetric, reduction=reduction,
                     learnable_scale=i % 2 == 0, seed=seed, label=f"triton masks x direction x reduction, {path}")
    with tiles("small", path):
        check_backend(case, "triton", MARGIN[dtype], gen)


def test_pairwise_selection_covers_every_pair():
    """The triton grid really is all-pairs over its axes (no pairing of two values is dropped)."""
    import itertools

    names = list(TRITON_AXES)
    valid = [dict(zip(names, v)) for v in itertools.product(*TRITON_AXES.values())]
    valid = [c for c in valid if not (c["masks"] == "tid_neg" and c["shape"][2] == 0)]
    n_pairs = 0
    for a, b in itertools.combinations(names, 2):
        for va in TRITON_AXES[a]:
            for vb in TRITON_AXES[b]:
                if any(c[a] == va and c[b] == vb for c in valid):
                    n_pairs += 1
                    assert any(c[a] == va and c[b] == vb for c in TRITON_COMBOS), (a, va, b, vb)
    assert n_pairs > 100 and len(TRITON_COMBOS) < 40, (n_pairs, len(TRITON_COMBOS))


@pytest.mark.parametrize("fwd_col", ["program", "tile", "transpose"])
@pytest.mark.parametrize("B,d,M", [(64, 130, 0), (41, 33, 9)])
def test_triton_many_groups(B, d, M, fwd_col, gen, seed):
    """More row/column blocks than program groups in both grid dimensions, every option on; the
    forward's column statistics from partials per program group (read back), per row tile (written
    once), or a second row-only sweep over S^T."""
    case = make_case(gen, B, d, M, torch.float32, masks="tid_neg" if M else "both", learnable_scale=True,
                     seed=seed, label=f"triton GR=2 GC=3 FWD_COL={fwd_col}")
    with kernel_config(BM=16, BN=16, BK=32, GR_MAX=2, GC_MAX=3, S_MODE="fused", FWD_COL=fwd_col):
        check_backend(case, "triton", MARGIN[torch.float32], gen)


@pytest.mark.parametrize("mode", ["tile", "transpose"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_forward_column_statistics_match_per_program(mode, dtype, monkeypatch, gen, seed):
    """FWD_COL="tile" writes each (row tile, column) partial once into a buffer that starts as
    NaN (LLAVE_FAST_POISON=1): a slot it forgot would poison the column log-sum-exp. "transpose"
    sweeps S^T for the column statistics (offset negated, query ids as the row mask). Both give
    the read-modify-write variant's statistics to fp32 rounding, on trained-like rows (positives
    near 0.85) with a partial last row tile, extra negative columns, both masks and a nonzero
    offset (this rank's rows start at column 5 of the gathered targets, as on rank > 0)."""
    from llave_fast.backends import triton_backend as tb
    from llave_fast.backends.common import StripIds

    monkeypatch.setenv("LLAVE_FAST_POISON", "1")
    B, M, d, off = 41, 7, 48, 5
    N = B + off + 3  # the gathered targets: 5 of earlier ranks, this rank's 41, 3 of a later rank
    q = torch.nn.functional.normalize(torch.randn(B, d, generator=gen), dim=1)
    t = torch.nn.functional.normalize(torch.randn(N, d, generator=gen), dim=1)
    t[off:off + B] = torch.nn.functional.normalize(q + 0.35 * torch.randn(B, d, generator=gen), dim=1)
    neg = torch.nn.functional.normalize(torch.randn(M, d, generator=gen), dim=1)
    Tc = torch.cat([t, neg]).to(dtype)
    tid = torch.randint(0, 12, (N,), generator=gen)
    qid = torch.randint(0, 12, (N,), generator=gen)
    ids = StripIds(tid_pos=tid[off:off + B].clone(), tid_cand=torch.cat([tid, torch.randint(0, 12, (M,),
                   generator=gen)]), qid_row=qid[off:off + B].clone(), qid_cand=qid)
    stats = {}
    for fwd_col in ("program", mode):
        with kernel_config(BM=16, BN=16, BK=16, GR_MAX=2, GC_MAX=2, S_MODE="fused", FWD_COL=fwd_col):
            stats[fwd_col] = tb.strip_forward(q.to(dtype), Tc, n_col=N, offset=off, scale=50.0, alpha=9.0,
                                              ids=ids, need_col=True, need_e=True)
    a, b = stats["program"], stats[mode]
    assert a.col_lse.shape == (N,) and a.row_lse.shape == (B,)
    for name in ("row_lse", "row_es", "col_lse", "col_es"):
        x, y = getattr(a, name), getattr(b, name)
        assert bool(torch.isfinite(y).all()), f"{name}: FWD_COL={mode} left NaN or inf: {y}"
        torch.testing.assert_close(y, x, rtol=2e-6, atol=2e-6, msg=lambda m: f"{name}: {m}")


# ============================================================ strip backward (hardness_ds + two GEMMs)
# 24-row strips of 16-row tiles: a full strip of two tiles, then a partial strip (17 rows of 41)
STRIP_TILES = dict(BK=16, DS_BM=16, DS_BN=16, DS_GROUP_M=2, DS_STRIP_ROWS=24, S_MODE="fused")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "oneway"])
@pytest.mark.parametrize("masks", MASKS)
def test_triton_strip_backward(masks, symmetric, reduction, gen, seed):
    """The strip backward over the mask x direction x reduction product, several strips and
    row tiles per strip, a partial last strip and a partial last column tile; dtype and scale cycle."""
    i = MASKS.index(masks) * 6 + (0 if symmetric else 3) + ["mean", "sum", "none"].index(reduction)
    dtype = (torch.float32, torch.bfloat16, torch.float16)[i % 3]
    case = make_case(gen, 41, 33, 7, dtype, masks=masks, symmetric=symmetric, reduction=reduction,
                     learnable_scale=i % 2 == 0, seed=seed, label="triton strip backward")
    # the fused strip, and the stream path (S blocks of 10 rows in the forward; dS strips of
    # min(24, 10) rows reading S the library GEMM writes per strip); the cache path has its own tests
    path = ("fused", "stream")[(MASKS.index(masks) + ["mean", "sum", "none"].index(reduction)) % 2]
    with kernel_config(**{**STRIP_TILES, **S_PATHS[path]}):
        check_backend(case, "triton", MARGIN[dtype], gen)


@pytest.mark.parametrize("B,d,M,rows", [(1, 33, 5, None), (37, 130, 0, None), (64, 48, 19, 16), (29, 40, 3, 7)],
                         ids=["one-pair", "one-strip-by-bytes", "exact-strips", "strip-smaller-than-tile"])
def test_triton_strip_backward_shapes(B, d, M, rows, gen, seed):
    case = make_case(gen, B, d, M, torch.float32, masks="tid_neg" if M else "both", learnable_scale=True,
                     seed=seed, label=f"strip rows={rows}")
    with kernel_config(**{**STRIP_TILES, "DS_STRIP_ROWS": rows}):
        check_backend(case, "triton", MARGIN[torch.float32], gen)


@pytest.mark.parametrize("path", ["cache", "stream", "fused"])
def test_every_triton_launch_runs_under_the_inputs_device(path, monkeypatch, gen, seed):
    """Each launch (forward, backward) enters the device of the tensors it gets, not the current
    one: on a machine with several GPUs, tensors on cuda:1 run there. (No lent machine has two
    GPUs, so this is checked where it is decided: the device every launch enters.)"""
    import contextlib

    from llave_fast.backends import triton_backend as tb

    entered = []
    real = tb._enter

    def recording(device):
        entered.append(device)
        return real(device)

    monkeypatch.setattr(tb, "_enter", recording)
    case = make_case(gen, 45, 40, 6, torch.float32, masks="tid_neg", learnable_scale=True, seed=seed)
    g = upstream_grad(gen, case)
    with tiles("small", path):
        run(case, torch.float32, g, backend="triton")
    assert len(entered) >= 2, f"forward and backward launches entered {entered}"  # at least one each
    assert all(d == case.q.device for d in entered), entered
    # and the guard itself selects a CUDA tensor's device
    assert isinstance(real(torch.device("cpu")), contextlib.nullcontext)
    if torch.cuda.is_available():
        assert isinstance(real(torch.device("cuda", 0)), torch.cuda.device)


@pytest.mark.parametrize("path", ["cache", "stream"])
def test_triton_strip_backward_is_bitwise_and_paths_agree(path, gen, seed):
    """The fused strip backward (S recomputed) reruns bitwise, and the strip backward reading a
    kept (cache) or rewritten (stream) fp32 S gives the same gradients to fp32 rounding."""
    case = make_case(gen, 45, 40, 6, torch.float32, masks="tid_neg", learnable_scale=True, seed=seed)
    g = upstream_grad(gen, case)
    with kernel_config(**STRIP_TILES):
        a = run(case, torch.float32, g, backend="triton")
        b = run(case, torch.float32, g, backend="triton")
    with tiles("small", path):
        t = run(case, torch.float32, g, backend="triton")
    assert torch.equal(a.out, b.out), mismatch_report("loss (run 2 vs run 1)", b.out, a.out)
    for n in a.grads:
        assert torch.equal(a.grads[n], b.grads[n]), mismatch_report(f"{n} (run 2 vs run 1)", b.grads[n], a.grads[n])
        assert rel_err(a.grads[n], t.grads[n]) < 1e-5, mismatch_report(f"{n} fused vs {path}", a.grads[n], t.grads[n])


@pytest.mark.parametrize("B,d,M,rows,dtype", [(41, 33, 6, 24, torch.float32), (37, 31, 0, None, torch.float32),
                                               (41, 33, 6, 24, torch.float16), (37, 31, 0, None, torch.bfloat16),
                                               (64, 48, 0, None, torch.float32)],
                         ids=["odd-N-odd-d-strips", "odd-B-odd-d-one-strip", "fp16-scaled-strips",
                              "bf16-strip-one", "even"])
def test_strip_backward_hands_the_library_gemms_aligned_shapes(monkeypatch, B, d, M, rows, dtype, gen, seed):
    """Every library GEMM of the strip backward gets K a multiple of 64 (of 8 below 64) and leading
    dimensions a multiple of 8, whatever B, N and d are (an odd N made cuBLAS 2-6x slower on the H200), and the
    zero padding changes nothing: the gradients still match float64 (NaN-poisoned outputs, so an
    unwritten padding element would show)."""
    from llave_fast.backends import triton_backend as tb

    seen = []
    real = tb._mm_into

    def recording(dst, a, b, *, accumulate):
        def ld(x):  # the leading dimension a BLAS call sees: the stride between rows or columns
            return x.stride(0) if x.stride(1) == 1 else x.stride(1)

        seen.append(dict(M=a.shape[0], K=a.shape[1], N=b.shape[1], lda=ld(a), ldb=ld(b), ldc=ld(dst)))
        assert a.shape[1] == b.shape[0]
        return real(dst, a, b, accumulate=accumulate)

    monkeypatch.setattr(tb, "_mm_into", recording)
    monkeypatch.setenv("LLAVE_FAST_POISON", "1")
    case = make_case(gen, B, d, M, dtype, masks="tid_neg" if M else "both", learnable_scale=True,
                     seed=seed, label=f"aligned GEMMs B={B} d={d} M={M} {dtype}")
    # bf16: the 16-bit strip forced (the interpreter's default for bf16 is an fp32 strip)
    lowp = {"DS_LOWP": True} if dtype == torch.bfloat16 else {}
    with kernel_config(**{**STRIP_TILES, "DS_STRIP_ROWS": rows, **lowp}):
        check_backend(case, "triton", MARGIN[dtype], gen)
    assert seen, "the strip backward ran no library GEMM"
    for g in seen:
        assert g["K"] % (64 if g["K"] >= 64 else 8) == 0, (g, seen)
        assert all(g[k] % 8 == 0 for k in ("lda", "ldb", "ldc")), (g, seen)
    assert any(g["K"] >= 64 for g in seen), seen  # the dq GEMM: K = the padded NT


@pytest.mark.parametrize("accumulate", [False, True], ids=["set", "add"])
def test_strip_gemm_into_fp32(monkeypatch, accumulate):
    """The strip backward's GEMM into an fp32 accumulator with 16-bit operands: whichever
    form this torch offers (on the CPU: the 16-bit product cast and added)."""
    from llave_fast.backends import gemm  # the strip backward's GEMMs and their probe live here

    monkeypatch.setattr(gemm, "_ACC_MM", {})
    g = torch.Generator().manual_seed(3)
    a = torch.randn(9, 17, generator=g).to(torch.bfloat16)
    b = torch.randn(17, 5, generator=g).to(torch.bfloat16)
    dst = torch.randn(9, 5, generator=g)
    want = (dst.double() if accumulate else 0) + a.double() @ b.double()
    gemm.mm_into(dst, a, b, accumulate=accumulate)
    assert list(gemm._ACC_MM) == [("cpu", None, torch.bfloat16)], gemm._ACC_MM
    assert gemm._ACC_MM[("cpu", None, torch.bfloat16)] in ("addmm", "mm", "cast")
    assert dst.dtype == torch.float32
    assert rel_err(dst, want) < 1e-2, rel_err(dst, want)


def test_strip_rows_rule():
    from llave_fast.backends.triton_backend import ds_row_stride, gpu_config, strip_rows

    cfg = gpu_config(torch.bfloat16)
    assert [ds_row_stride(n) for n in (1, 42, 64, 65, 16384, 16391)] == [64, 64, 64, 128, 16384, 16448]
    assert strip_rows(cfg, 16384, 16384, 2) == 16384  # the whole 512 MiB bf16 dS fits the 1 GiB one-strip budget
    assert strip_rows(cfg, 16384, 16384, 4) == 16384  # fp32: exactly 1 GiB, still one strip
    assert strip_rows(cfg, 16384, 16391, 4) == 4096  # padded to 16448 columns: over 1 GiB; 256 MiB = 4080 rows -> 4096
    assert strip_rows(cfg, 65536, 65536, 2) == 4096  # 8 GiB: strips of 256 MiB = 2048 rows, raised to DS_MIN_ROWS
    assert strip_rows(cfg, 262144, 262144, 2) == 4096  # DS_MIN_ROWS beats the byte budget at huge N
    assert strip_rows(cfg, 300, 16384, 2) == 300  # never more than B
    assert strip_rows(cfg.replace(DS_STRIP_ROWS=77), 1000, 10, 2) == 77
    multi = cfg.replace(DS_ONE_STRIP_BYTES=0, DS_MIN_ROWS=0)
    assert strip_rows(multi, 16384, 16384, 2) == 8192  # 256 MiB strips when one strip is refused
    assert strip_rows(multi.replace(DS_STRIP_BYTES=1), 1000, 10, 2) == cfg.DS_BM  # at least one row tile


# ============================================================ launch configuration (KernelConfig)
#: the fields the interpreter's default may set differently from the GPU's: tile sizes, warps,
#: stages and grid sizes, nothing that decides a path, a backward or a precision
TILE_FIELDS = {"BM", "BN", "BK", "GR_MAX", "GC_MAX", "num_warps", "num_stages", "DS_BM", "DS_BN", "DS_GROUP_M",
               "DS_WARPS", "DS_STAGES", "DSC_WARPS", "STATS_BM", "STATS_BN", "STATS_WARPS", "STATS_PROGRAMS",
               "STATS_GC_MAX"}


def _fake_cuda(monkeypatch, sms=132, memory=80 << 30):
    """A CUDA device as the host-side rules see it (SM count, total memory): the rules only."""
    import types

    props = types.SimpleNamespace(multi_processor_count=sms, total_memory=memory)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: props)
    return torch.device("cuda", 0)


@pytest.mark.parametrize("memory,reached", [(80 << 30, "cache"), (256 << 20, "stream"), (8 << 20, "fused")],
                         ids=["80G", "256M", "8M"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_interpreter_default_takes_the_gpu_choices(dtype, memory, reached, monkeypatch):
    """The CPU suite's default configuration (the interpreter's) makes the GPU default's choices:
    the same backward, the same plan of where S lives (auto, the same budget rule and S_MIN_ROWS)
    and the same strips, for shapes on every side of the thresholds; only tile sizes, warps,
    stages and grid caps differ. (Both devices are given the same total memory here: the
    budget is a fraction of the device's own memory.)"""
    from dataclasses import fields

    from llave_fast.backends import common
    from llave_fast.backends.launch import PATH_FIELDS, KernelConfig
    from llave_fast.backends.triton_backend import launch_config, s_plan_for, strip_rows

    cuda, cpu = _fake_cuda(monkeypatch, memory=memory), torch.device("cpu")
    monkeypatch.setattr(common, "total_memory", lambda dev: memory)
    for name in ("LLAVE_FAST_S_MODE", "LLAVE_FAST_S_CACHE_BYTES"):
        monkeypatch.delenv(name, raising=False)
    on_cpu, on_gpu = launch_config(cpu, dtype), launch_config(cuda, dtype)
    assert on_cpu.BWD == on_gpu.BWD == "strip"
    differ = {f.name for f in fields(KernelConfig) if getattr(on_cpu, f.name) != getattr(on_gpu, f.name)}
    assert differ <= TILE_FIELDS and not differ & set(PATH_FIELDS), differ
    modes = set()
    for B, NT in ((1, 6), (37, 42), (600, 600), (4096, 4160), (20000, 20000)):
        for keep in (True, False):
            a, b = s_plan_for(on_cpu, B, NT, cpu, keep), s_plan_for(on_gpu, B, NT, cuda, keep)
            assert a == b, (B, NT, keep, a, b)
            modes.add(a.mode)
        for ds_bytes in (2, 4):
            assert strip_rows(on_cpu, B, NT, ds_bytes) == strip_rows(on_gpu, B, NT, ds_bytes), (B, NT, ds_bytes)
    assert reached in modes, modes  # the shapes reach this memory's largest-shape path


@pytest.mark.parametrize("env_mode,want", [("", "cache"), ("stream", "stream"), ("fused", "fused")])
def test_interpreter_default_runs_the_strip_backward(env_mode, want, monkeypatch, gen, seed):
    """A triton loss with no kernel_config on CPU tensors runs the strip backward
    (``_strip_backward_ds``) on the path the default plan picks, as on the GPU."""
    from llave_fast.backends import triton_backend as tb

    seen = []
    real = tb._strip_backward_ds

    def spy(*a, **k):
        plan = k.get("s_plan")
        seen.append("fused" if plan is None else plan.mode)
        return real(*a, **k)

    monkeypatch.setattr(tb, "_strip_backward_ds", spy)
    monkeypatch.setenv("LLAVE_FAST_S_MODE", env_mode)
    monkeypatch.delenv("LLAVE_FAST_S_CACHE_BYTES", raising=False)
    case = make_case(gen, 37, 33, 5, torch.float32, masks="tid_neg", learnable_scale=True, seed=seed,
                     label=f"interpreter default, LLAVE_FAST_S_MODE={env_mode!r}")
    check_backend(case, "triton", MARGIN[torch.float32], gen)
    assert seen and set(seen) == {want}, seen


@pytest.mark.parametrize("name,value", [
    ("BM", 24), ("BK", 8), ("DS_BN", 0), ("STATS_BM", 48), ("num_warps", 3), ("DS_WARPS", 64), ("GR_MAX", 0),
    ("num_stages", 0), ("DS_MIN_ROWS", -1), ("DS_STRIP_ROWS", 0), ("TORCH_CHUNK_ELEMS", 0),
    ("S_MODE", "sometimes"), ("S_CACHE_BYTES", "lots"), ("S_CACHE_BYTES", -1), ("BWD", "tiles"),
    ("FWD_COL", "row"), ("BM", 16.0), ("GC_MAX", True), ("DS_LOWP", 1), ("autotune", "yes"),
])
def test_kernel_config_rejects_a_bad_value_by_name(name, value):
    """Every field is checked when kernel_config is called: the error names the field and the value."""
    import re

    from llave_fast.backends.launch import KernelConfig
    from llave_fast.errors import InvalidArgument, InvalidArgumentType

    with pytest.raises((InvalidArgument, InvalidArgumentType), match=f"{name}.*{re.escape(repr(value))}"):
        kernel_config(**{name: value})
    with pytest.raises((InvalidArgument, InvalidArgumentType), match=name):
        KernelConfig(**{name: value})


def test_kernel_config_rejects_unknown_names_and_lists_the_valid_ones():
    from llave_fast.backends.launch import FIELD_NAMES
    from llave_fast.errors import InvalidArgument

    for bad in (dict(bm=16), dict(BWD_BM=64, BWD_BN=64), dict(DS_STRIDE=64, BM=32)):
        with pytest.raises(InvalidArgument, match=r"unknown keyword") as info:
            kernel_config(**bad)
        msg = str(info.value)
        assert all(repr(k) in msg for k in bad if k not in FIELD_NAMES), msg
        assert all(n in msg for n in FIELD_NAMES), msg
    with kernel_config(BM=16, S_MODE="fused", DS_STRIP_ROWS=8, autotune=False):  # valid names pass
        pass


def test_every_field_and_environment_variable_is_documented():
    """KernelConfig's docstring has a row per field, and the launch module's docstring names every
    LLAVE_FAST_* variable the backends read."""
    import pathlib
    import re

    from llave_fast.backends import launch

    for name in launch.FIELD_NAMES:
        assert re.search(rf"^    ``{name}``", launch.KernelConfig.__doc__, flags=re.M), name
    read = set()
    for path in pathlib.Path(launch.__file__).parent.glob("*.py"):
        read |= set(re.findall(r"LLAVE_FAST_[A-Z_]+", path.read_text()))
    assert read >= {"LLAVE_FAST_S_MODE", "LLAVE_FAST_AUTOTUNE", "LLAVE_FAST_TORCH_CHUNK_ELEMS"}, read
    for var in read:
        assert f"``{var}``" in launch.__doc__, var


def test_kernel_config_overrides_and_restores(monkeypatch):
    from llave_fast.backends import triton_backend as tb
    from llave_fast.backends.launch import interpreter_config

    cpu = torch.device("cpu")
    assert tb.launch_config(cpu, torch.float32) == interpreter_config()
    with kernel_config(BM=16, S_MODE="stream"):
        cfg = tb.launch_config(cpu, torch.float32)
        assert (cfg.BM, cfg.S_MODE, cfg.BN) == (16, "stream", interpreter_config().BN)
        with kernel_config(DS_BM=16):  # a nested override replaces the enclosing one
            assert tb.launch_config(cpu, torch.float32) == interpreter_config().replace(DS_BM=16)
        assert tb.launch_config(cpu, torch.float32).BM == 16
    assert tb._CONFIG_OVERRIDE is None and tb.launch_config(cpu, torch.float32) == interpreter_config()


def test_environment_is_read_at_call_time(monkeypatch):
    """LLAVE_FAST_* variables are read when a value is needed, not at import: setenv suffices."""
    from llave_fast.backends import triton_backend as tb
    from llave_fast.backends.torch_backend import chunk_rows

    monkeypatch.delenv("LLAVE_FAST_TORCH_CHUNK_ELEMS", raising=False)
    monkeypatch.delenv("LLAVE_FAST_TORCH_CHUNK_ELEMS_CUDA", raising=False)
    assert chunk_rows(10**6, 1024) == (1 << 21) // 1024
    assert chunk_rows(10**6, 1024, "cuda") == (1 << 26) // 1024
    monkeypatch.setenv("LLAVE_FAST_TORCH_CHUNK_ELEMS", "5120")
    monkeypatch.setenv("LLAVE_FAST_TORCH_CHUNK_ELEMS_CUDA", "3072")
    assert chunk_rows(10**6, 1024) == 5 and chunk_rows(10**6, 1024, "cuda") == 3
    with kernel_config(TORCH_CHUNK_ELEMS=2048):
        assert chunk_rows(10**6, 1024) == 2  # the override wins
    monkeypatch.setenv("LLAVE_FAST_TORCH_CHUNK_ELEMS", "many")
    with pytest.raises(ValueError, match="LLAVE_FAST_TORCH_CHUNK_ELEMS.*'many'"):
        chunk_rows(10, 10)
    cpu = torch.device("cpu")
    cfg = tb.launch_config(cpu, torch.float32)
    for mode in ("stream", "fused", "cache"):
        monkeypatch.setenv("LLAVE_FAST_S_MODE", mode)
        assert tb.s_plan_for(cfg, 64, 64, cpu, True).mode == mode
    monkeypatch.setenv("LLAVE_FAST_S_MODE", "auto")
    monkeypatch.setenv("LLAVE_FAST_S_CACHE_BYTES", "0")
    assert tb.s_plan_for(cfg, 64, 64, cpu, True).mode == "fused"
    monkeypatch.setenv("LLAVE_FAST_S_CACHE_BYTES", "1M")
    assert tb.s_plan_for(cfg, 64, 64, cpu, True).mode == "cache"
    # autotuning: the environment without an override; an override's own autotune otherwise
    monkeypatch.setenv("LLAVE_FAST_AUTOTUNE", "1")
    assert tb._autotune_requested()
    with kernel_config(BM=16):
        assert not tb._autotune_requested()
    monkeypatch.setenv("LLAVE_FAST_AUTOTUNE", "0")
    assert not tb._autotune_requested()
    with kernel_config(autotune=True):
        assert tb._autotune_requested()


def test_acc_mm_probe_is_per_device_and_dtype(monkeypatch):
    """The fp32-accumulating GEMM form is probed once per (device, dtype): a second dtype in the
    same process gets its own answer, not the first one's."""
    from llave_fast.backends import gemm  # the strip backward's GEMMs and their probe live here

    calls = []
    answers = {torch.bfloat16: "cast", torch.float16: "mm"}

    def probe(device, dtype):
        calls.append((device.type, dtype))
        return answers[dtype]

    monkeypatch.setattr(gemm, "_probe_acc_mm", probe)
    monkeypatch.setattr(gemm, "_ACC_MM", {})
    cpu = torch.device("cpu")
    assert gemm.acc_mm_form(cpu, torch.bfloat16) == "cast"
    assert gemm.acc_mm_form(cpu, torch.float16) == "mm"
    assert gemm.acc_mm_form(cpu, torch.bfloat16) == "cast"
    assert calls == [("cpu", torch.bfloat16), ("cpu", torch.float16)], calls
    # mm_into asks for its own operands' dtype
    answers[torch.float16] = "cast"
    monkeypatch.setattr(gemm, "_ACC_MM", {})
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float16, torch.bfloat16):
        a, b = torch.randn(4, 8, generator=g).to(dtype), torch.randn(8, 3, generator=g).to(dtype)
        dst = torch.zeros(4, 3)
        gemm.mm_into(dst, a, b, accumulate=False)
        assert rel_err(dst, a.double() @ b.double()) < 1e-2
    assert sorted(k[2] is torch.float16 for k in gemm._ACC_MM) == [False, True], gemm._ACC_MM


def test_strip_dtype_rule():
    from llave_fast.backends.triton_backend import ds_dtype, gpu_config

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    cfg = gpu_config(torch.bfloat16)
    assert ds_dtype(cfg, torch.bfloat16, cuda) == torch.bfloat16
    assert ds_dtype(cfg, torch.float16, cuda) == torch.float16  # scaled by sigma
    assert ds_dtype(cfg, torch.float32, cuda) == torch.float32
    assert ds_dtype(cfg, torch.float16, cpu) == torch.float16  # fp16 is exact under the interpreter
    assert ds_dtype(cfg, torch.bfloat16, cpu) == torch.float32  # the interpreter truncates to bf16
    assert ds_dtype(cfg.replace(DS_LOWP=True), torch.bfloat16, cpu) == torch.bfloat16
    assert ds_dtype(cfg.replace(DS_LOWP=False), torch.float16, cuda) == torch.float32


def test_strip_fp16_scale_is_an_exact_power_of_two():
    """sigma = 2^(15 - e) for M = |s| (max|g_row| + max|g_col|) = m 2^e: sigma * M in [2^14, 2^15),
    sigma and 1/sigma exact powers of two; all-zero gradients and extreme ones stay finite."""
    from llave_fast.backends.triton_backend import SIGMA_MAX_EXP, ds_scale

    g = torch.Generator().manual_seed(5)
    for mag in (1e-20, 1e-6, 3e-3, 1.0, 2.0, 700.0, 1e3, 1e9):
        g_row = torch.randn(37, generator=g) * mag
        g_col = torch.randn(41, generator=g) * mag
        for gc, s in ((g_col, 50.0), (None, 14.3)):
            sigma, inv = ds_scale(g_row, gc, s)
            assert sigma.shape == (1,) and sigma.dtype == torch.float32 and inv.dtype == torch.float32
            mant, _ = torch.frexp(sigma)
            assert mant.item() == 0.5 and (sigma * inv).item() == 1.0, (mag, sigma, inv)
            M = s * (g_row.abs().max().double() + (0 if gc is None else gc.abs().max().double()))
            assert 2.0 ** 14 <= sigma.double().item() * M.item() < 2.0 ** 15, (mag, sigma, M)
    sigma, inv = ds_scale(torch.zeros(5), torch.zeros(5), 50.0)
    assert torch.isfinite(sigma).all() and torch.isfinite(inv).all() and sigma.item() == 2.0 ** 15
    sigma, inv = ds_scale(torch.full((3,), 1e-38), None, 1e-3)
    assert sigma.item() == 2.0 ** SIGMA_MAX_EXP and inv.item() == 2.0 ** -SIGMA_MAX_EXP


# ---- padded strip stride, fp16 scaled strip, bf16 strip with dq in bf16
# NT = B + M = 37 + 5 = 42: not a multiple of 16; the strip's rows are 64 elements apart
PAD_STRIP = dict(BK=16, DS_BM=16, DS_BN=16, DS_GROUP_M=2, DS_STRIP_ROWS=16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("rows", [16, None], ids=["strips-of-16", "one-strip"])
def test_strip_padded_stride_odd_nt(dtype, rows, gen, seed):
    """NT = 42 (hard negatives, M odd): the dS strip's row stride is padded to 64; the last
    column tile straddles NT, and the GEMMs read only the [:rows, :NT] view."""
    from llave_fast.backends.triton_backend import ds_row_stride

    assert ds_row_stride(37 + 5) == 64
    case = make_case(gen, 37, 33, 5, dtype, masks="tid_neg", learnable_scale=True, seed=seed,
                     label=f"padded strip rows={rows}")
    with kernel_config(**{**PAD_STRIP, "DS_STRIP_ROWS": rows}):
        check_backend(case, "triton", MARGIN[dtype], gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_strip_padded_stride_poisoned(dtype, monkeypatch, gen, seed):
    """LLAVE_FAST_POISON=1: the strip buffer (padding included) and dq start as NaN, so an
    element of the [:rows, :NT] view the kernel does not write, or a padding column a GEMM
    reads, shows as NaN in the gradients. 3 strips of 16 rows (the last partial), NT = 42."""
    monkeypatch.setenv("LLAVE_FAST_POISON", "1")
    for masks, reduction, sym in (("tid_neg", "mean", True), ("tid", "none", False)):
        case = make_case(gen, 37, 33, 5, dtype, masks=masks, learnable_scale=True, reduction=reduction,
                         symmetric=sym, seed=seed, label="poisoned padded strip")
        with kernel_config(**PAD_STRIP):
            check_backend(case, "triton", MARGIN[dtype], gen)


def _wide_upstream(gen, B):
    """Per-row upstream gradients from 1e-6 to 1e3 in magnitude (log-uniform, random signs),
    both ends present."""
    u = torch.rand(B, generator=gen, dtype=torch.float64) * 9 - 6
    g = torch.sign(torch.randn(B, generator=gen, dtype=torch.float64)) * 10 ** u
    g[0], g[1] = 1e-6, -1e3
    return g


def _dS_truth(case, g):
    """dL/dS (B x NT, float64) from the reference itself: with queries I (B x B) and
    candidates Tc q^T, the reference's similarity matrix is S = q Tc^T and the gradient of
    its candidates is dS^T (no second copy of the formula)."""
    f64 = torch.float64
    q = case.q.double()
    tq = (case.t.double() @ q.t()).requires_grad_(True)
    nq = None if case.neg is None else (case.neg.double() @ q.t()).requires_grad_(True)
    out = reference_loss(torch.eye(case.B, dtype=f64), tq, logit_scale=case.scale, alpha=case.alpha,
                         symmetric=case.symmetric, reduction=case.reduction, negatives=nq,
                         target_ids=case.target_ids, query_ids=case.query_ids)
    grads = torch.autograd.grad(out, [tq] + ([] if nq is None else [nq]), g.reshape(out.shape))
    return torch.cat(grads).t()


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "oneway"])
def test_strip_fp16_scaled_wide_upstream(symmetric, gen, seed):
    """The fp16 strip with upstream gradients spanning 1e-6..1e3 (reduction "none"): unscaled,
    |dS| reaches s * 1e3 = 5e4 (1e5 both ways) against fp16's 65504; scaled, nothing
    overflows, and no row underflows beyond what the kernel's docstring allows.

    Per row of dq, dt and dneg, against the same backward with an fp32 strip (DS_LOWP=False:
    the same fp32 dS, not rounded), the extra error is bounded by what an fp16 dS operand
    can cost (hardness_ds: 2^-11 of each entry, or 2^-25 / sigma below fp16's normal range)
    summed through the GEMM, |dS| @ |T| for dq and |dS|^T @ |q| for dT (rows with
    cancellation get a proportionally larger bound, as they should), plus the two outputs'
    rounding to fp16. Norm-wise, the loss and every gradient obey 2 * (fp32 eager error +
    the truth's rounding to fp16) + 1e-3 (the dS rounding, 2^-11, doubled for cancellation)
    and the CCE rule."""
    from llave_fast.backends.triton_backend import ds_scale

    B = 41
    case = make_case(gen, B, 33, 7, torch.float16, masks="tid_neg", symmetric=symmetric, reduction="none",
                     learnable_scale=True, seed=seed, label="fp16 strip, upstream 1e-6..1e3")
    g = _wide_upstream(gen, B)
    g32 = (g * (0.5 if symmetric else 1.0)).float()
    sigma, _ = ds_scale(g32, g32 if symmetric else None, case.scale)
    assert sigma.item() < 1.0, f"the scale must bring |dS| ~ 5e4 down, got sigma {sigma.item()}"
    truth = run_truth(case, g)
    acc32 = run(case, torch.float32, g, backend=None)
    with kernel_config(**STRIP_TILES):
        got = run(case, torch.float16, g, backend="triton")
        check_backend(case, "triton", MARGIN[torch.float16], gen, upstream=g, accumulation_rule=False)
    with kernel_config(**STRIP_TILES, DS_LOWP=False):
        got32 = run(case, torch.float16, g, backend="triton")

    def bound(ref, acc):
        return 2 * (rel_err(acc, ref) + rel_err(ref.to(torch.float16), ref)) + 1e-3

    assert rel_err(got.out, truth.out) <= bound(truth.out, acc32.out), mismatch_report("loss", got.out, truth.out)
    for n, ref in truth.grads.items():
        x = got.grads[n]
        assert torch.isfinite(x).all(), mismatch_report(f"{n} (non-finite)", x, ref)
        err, b = rel_err(x, ref), bound(ref, acc32.grads[n])
        assert err <= b, mismatch_report(n, x, ref, err=err, bound=b)
    # per row: the fp16 operand bound
    dS = _dS_truth(case, g).abs()
    Tc = torch.cat([case.t, case.neg]).double().abs()
    floor = 2.0 ** -25 / sigma.double().item()  # absolute error of an entry below fp16's normal range
    op_err = {"dq": 2.0 ** -11 * dS @ Tc + floor * Tc.sum(0)}
    dT_err = 2.0 ** -11 * dS.t() @ case.q.double().abs() + floor * case.q.double().abs().sum(0)
    op_err["dt"], op_err["dneg"] = dT_err[:B], dT_err[B:]
    worst = 0.0
    for n, e in op_err.items():
        ref, x, x32 = truth.grads[n], got.grads[n].double(), got32.grads[n].double()
        for i in range(ref.shape[0]):
            rounding = 2.0 ** -11 * (ref[i].abs() + x32[i].abs()).norm()
            b = ((x32[i] - ref[i]).norm() + e[i].norm() + rounding + 1e-12 * ref[i].norm()).item()
            err = (x[i] - ref[i]).norm().item()
            worst = max(worst, err / b)
            assert err <= b, mismatch_report(f"{n}[{i}]", x[i], ref[i], context=(
                f"row {i}, upstream {g[i].item():.2e}: |error| {err:.3e} > bound {b:.3e} (fp32 strip's error "
                f"{(x32[i] - ref[i]).norm().item():.3e}, fp16 operand {e[i].norm().item():.3e})"))
    assert worst > 0.0


def test_strip_bf16_one_strip_writes_dq_in_bf16(gen, seed):
    """A bf16 strip (forced on the CPU with DS_LOWP=True: the interpreter truncates to bf16
    instead of rounding, so only the CCE rule applies) in one strip returns dq in bf16
    straight from the GEMM; with several strips dq stays fp32. Both match the truth."""
    from llave_fast.backends import triton_backend as tb
    from llave_fast.backends.common import StripIds

    case = make_case(gen, 37, 33, 5, torch.bfloat16, masks="tid_neg", learnable_scale=True, seed=seed,
                     label="bf16 strip on the CPU")
    for rows, want in ((None, torch.bfloat16), (16, torch.float32)):
        with kernel_config(**{**PAD_STRIP, "DS_STRIP_ROWS": rows, "DS_LOWP": True}):
            check_backend(case, "triton", MARGIN[torch.bfloat16], gen, accumulation_rule=False)
            Tc = torch.cat([case.t, case.neg])
            g_row = torch.rand(37, generator=gen) / 37
            stats = tb.strip_forward(case.q, Tc, n_col=37, offset=0, scale=50.0, alpha=9.0, ids=StripIds(),
                                     need_col=True, need_e=False)
            dq, dTc = tb.strip_backward(case.q, Tc, n_col=37, offset=0, scale=50.0, alpha=9.0, ids=StripIds(),
                                        row_lse=stats.row_lse, col_lse=stats.col_lse, g_row=g_row, g_col=g_row,
                                        pos_coef=(2 * 50.0) * g_row, deterministic=False)
        assert dq.dtype == want and dTc.dtype == torch.float32, (rows, dq.dtype, dTc.dtype)


def test_bad_strip_rows_fails_before_any_launch(gen):
    from llave_fast.errors import InvalidArgument

    case = make_case(gen, 9, 16, 0, torch.float32)
    with pytest.raises(InvalidArgument, match="DS_STRIP_ROWS.*0"):
        with kernel_config(DS_STRIP_ROWS=0):
            hardness_weighted_loss(case.q.clone().requires_grad_(True), case.t, backend="triton").backward()


# ============================================================ alpha variants, scale, numerics
@pytest.mark.parametrize("alpha", [0.0, -3.0, 20.0], ids=["alpha0", "alpha-3", "alpha20"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,margin", [DTYPES[0], DTYPES[1]])
def test_alpha_variants(backend, alpha, dtype, margin, gen, seed):
    case = make_case(gen, 23, 40, 6, dtype, masks="tid_neg", alpha=alpha, learnable_scale=True, seed=seed,
                     label=f"alpha={alpha}")
    with tiles("small"):
        check_backend(case, backend, margin, gen)


def test_reference_alpha_zero_is_plain_infonce(gen):
    """The truth itself: with alpha=0 and no extras the reference is CLIP's symmetric cross-entropy."""
    case = make_case(gen, 31, 24, 0, torch.float64, alpha=0.0)
    q, t = case.q, case.t
    logits = case.scale * q @ t.t()
    labels = torch.arange(q.shape[0])
    clip = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    ours = reference_loss(q, t, logit_scale=case.scale, alpha=0.0)
    assert torch.allclose(ours, clip, rtol=1e-12, atol=0), (ours.item(), clip.item())
    one_way = reference_loss(q, t, logit_scale=case.scale, alpha=0.0, symmetric=False, reduction="none")
    assert torch.allclose(one_way, F.cross_entropy(logits, labels, reduction="none"), rtol=1e-9, atol=1e-12)
    # and the hardness weight does change it (alpha is not ignored)
    assert abs(reference_loss(q, t, logit_scale=case.scale, alpha=9.0).item() - clip.item()) > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,margin", [DTYPES[0], DTYPES[2]])
def test_large_logits_stay_finite_and_accurate(backend, dtype, margin, gen, seed):
    """logit_scale 100 and alpha 40: logits ~ 140, exp overflows without max-shifting (fp16 at 11)."""
    case = make_case(gen, 33, 20, 4, dtype, scale=100.0, alpha=40.0, masks="both", seed=seed, label="large logits")
    with tiles("small"):
        check_backend(case, backend, margin, gen)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1.0, 14.3], ids=["s1", "s14"])
def test_scale_values_and_tensor_scale(backend, scale, gen, seed):
    """Other scales, given as a learnable 0-d tensor (CLIP's exp(logit_scale) range)."""
    case = make_case(gen, 19, 33, 3, torch.float32, scale=scale, learnable_scale=True, masks="tid", seed=seed)
    with tiles("small"):
        check_backend(case, backend, MARGIN[torch.float32], gen)


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_scale_as_non_leaf_tensor_and_one_element_shape(backend, gen):
    """logit_scale = exp(log_scale) (a non-leaf) and a (1,)-shaped tensor both get their gradient."""
    case = make_case(gen, 13, 24, 2, torch.float32, masks="both")
    q, t, neg = case.q, case.t, case.neg
    log_s = torch.tensor(math.log(30.0), dtype=torch.float64, requires_grad=True)
    with tiles("small"):
        out = hardness_weighted_loss(q, t, logit_scale=log_s.exp(), negatives=neg, target_ids=case.target_ids,
                                     query_ids=case.query_ids, backend=backend)
    (g_log,) = torch.autograd.grad(out, [log_s])
    log_s64 = torch.tensor(math.log(30.0), dtype=torch.float64, requires_grad=True)
    ref = reference_loss(q.double(), t.double(), logit_scale=log_s64.exp(), alpha=9.0, negatives=neg.double(),
                         target_ids=case.target_ids, query_ids=case.query_ids)
    (g_ref,) = torch.autograd.grad(ref, [log_s64])
    assert rel_err(out, ref) < 1e-5, mismatch_report("loss", out, ref)
    assert rel_err(g_log, g_ref) < 1e-4, mismatch_report("d log_scale", g_log, g_ref)

    s1 = torch.tensor([30.0], requires_grad=True)
    with tiles("small"):
        out1 = hardness_weighted_loss(q, t, logit_scale=s1, negatives=neg, backend=backend)
    (g1,) = torch.autograd.grad(out1, [s1])
    assert g1.shape == (1,), g1.shape
    s0 = torch.tensor(30.0, dtype=torch.float64, requires_grad=True)
    ref1 = reference_loss(q.double(), t.double(), logit_scale=s0, alpha=9.0, negatives=neg.double())
    (g0,) = torch.autograd.grad(ref1, [s0])
    assert rel_err(g1.reshape(()), g0) < 1e-4, mismatch_report("d logit_scale (shape (1,))", g1.reshape(()), g0)


def test_torch_backend_float64_matches_truth_tightly(gen, seed, small_chunks):
    small_chunks(300)
    for masks in ("none", "tid_neg"):
        case = make_case(gen, 21, 18, 5, torch.float64, masks=masks, learnable_scale=True, seed=seed)
        check_backend(case, "torch", MARGIN[torch.float64], gen)


# ============================================================ edge cases of the formula
@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_single_pair_without_negatives_has_zero_loss(backend, dtype, gen):
    """B=1, M=0: the positive is the only candidate both ways, so loss and gradients vanish."""
    case = make_case(gen, 1, 33, 0, dtype, learnable_scale=True, min_loss=None)
    for reduction in ("mean", "none"):
        case.reduction = reduction
        g = upstream_grad(gen, case)
        res = run(case, dtype, g, backend=backend)
        assert res.out.abs().max().item() < 1e-4, f"loss {res.out} (B=1, M=0 must be 0) backend={backend}"
        for n, gr in res.grads.items():
            assert torch.isfinite(gr).all() and gr.abs().max().item() < 1e-3, f"{n} = {gr} (must be ~0)"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_all_candidates_masked(backend, gen, seed):
    """Every candidate shares the positive's id: each row's only candidate is its positive
    (loss 0, no NaN from an all -inf partial); negatives given without ids still count."""
    B, d, M = 37, 33, 6
    case = make_case(gen, B, d, M, torch.float32, learnable_scale=True, seed=seed)
    case.target_ids = torch.full((B,), 7, dtype=torch.int64)
    case.query_ids = torch.full((B,), 3, dtype=torch.int64)
    neg = case.neg
    g = upstream_grad(gen, case)
    with tiles("small"):
        case.neg = None
        res = run(case, torch.float32, g, backend=backend)
        assert res.out.abs().item() < 1e-5, f"loss {res.out.item()} with every negative masked, want 0"
        for n, gr in res.grads.items():
            assert torch.isfinite(gr).all() and gr.abs().max().item() < 1e-5, f"{n} = {gr}"
        # ids of length B: the negatives are never masked; ids of length B+M equal to the positives': all masked
        case.neg = neg
        check_backend(case, backend, MARGIN[torch.float32], gen)
        case.target_ids = torch.full((B + M,), 7, dtype=torch.int64)
        res = run(case, torch.float32, g, backend=backend)
        assert res.out.abs().item() < 1e-5, f"loss {res.out.item()} with negatives masked by ids, want 0"


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_distinct_ids_mask_nothing(backend, gen):
    """Ids that are all distinct exclude nothing: same loss and gradients as no ids."""
    case = make_case(gen, 29, 20, 4, torch.float32)
    g = upstream_grad(gen, case)
    with tiles("small"):
        plain = run(case, torch.float32, g, backend=backend)
        case.target_ids = torch.randperm(29 + 4, generator=gen)
        case.query_ids = torch.randperm(29, generator=gen)
        masked = run(case, torch.float32, g, backend=backend)
    assert rel_err(masked.out, plain.out) < 1e-6, mismatch_report("loss", masked.out, plain.out)
    for n in plain.grads:
        assert rel_err(masked.grads[n], plain.grads[n]) < 1e-6, mismatch_report(n, masked.grads[n], plain.grads[n])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_masks_change_the_loss(backend, gen):
    """Repeated ids do change the result (the mask tests are not vacuous) and match the truth."""
    case = make_case(gen, 31, 33, 5, torch.float32, masks="tid_neg", id_range=4)
    g = upstream_grad(gen, case)
    with tiles("small"):
        masked = run(case, torch.float32, g, backend=backend)
    plain = run_truth(Case(**{**case.__dict__, "target_ids": None, "query_ids": None}), g)
    truth = run_truth(case, g)
    assert rel_err(masked.out, truth.out) < 1e-5
    assert rel_err(plain.out, truth.out) > 1e-2, "masking 3/4 of the candidates should change the loss"


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_query_ids_ignored_one_way(backend, gen):
    """symmetric=False: only q->t exists, so query_ids cannot change anything."""
    case = make_case(gen, 17, 20, 3, torch.float32, masks="tid", symmetric=False)
    g = upstream_grad(gen, case)
    with tiles("small"):
        a = run(case, torch.float32, g, backend=backend)
        case.query_ids = torch.zeros(17, dtype=torch.int64)
        b = run(case, torch.float32, g, backend=backend)
    assert torch.equal(a.out, b.out), (a.out, b.out)
    for n in a.grads:
        assert torch.equal(a.grads[n], b.grads[n]), n


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_ids_refilled_between_forward_and_backward(backend, gen):
    """The backward rebuilds its masks from the ids: a caller who refills the id buffers after the
    forward (a reused buffer for the next batch) must not change the gradients. The fused backends
    once kept a view of int64 ids, and zeroing them changed dq by 5.9."""
    B, d, M = 23, 16, 5
    case = make_case(gen, B, d, M, torch.float32, masks="tid_neg", id_range=6)
    g = upstream_grad(gen, case)
    grads = []
    for refill in (False, True):
        tid, qid = case.target_ids.clone(), case.query_ids.clone()
        q, t, n = (x.clone().requires_grad_() for x in (case.q, case.t, case.neg))
        with tiles("small"):
            loss = hardness_weighted_loss(q, t, negatives=n, target_ids=tid, query_ids=qid, backend=backend,
                                          reduction="none")
        if refill:
            tid.copy_(torch.arange(B + M)), qid.zero_()
        (loss * g).sum().backward()
        grads.append((q.grad, t.grad, n.grad))
    for name, a, b in zip("qtn", *grads):
        assert torch.equal(a, b), f"d{name} changed when the ids were refilled after the forward ({backend})"


# ============================================================ NaN-poisoned outputs
@pytest.mark.parametrize("setup", ["triton-small", "triton-default", "triton-det", "torch"])
def test_poisoned_outputs_are_all_written(setup, monkeypatch, gen, seed, small_chunks):
    monkeypatch.setenv("LLAVE_FAST_POISON", "1")
    from llave_fast.backends.common import new_output

    assert torch.isnan(new_output((3, 5), torch.device("cpu"))).all(), "LLAVE_FAST_POISON=1 must poison new outputs"
    backend = setup.split("-")[0]
    small_chunks(200)
    for masks, reduction, sym in (("tid_neg", "mean", True), ("both", "none", False)):
        case = make_case(gen, 37, 33, 7, torch.float32, masks=masks, learnable_scale=True, reduction=reduction,
                         symmetric=sym, seed=seed, label=f"poisoned {setup}")
        with tiles("default" if setup == "triton-default" else "small"):
            check_backend(case, backend, MARGIN[torch.float32], gen, deterministic=setup == "triton-det")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_uninitialised_allocations_do_not_leak(backend, monkeypatch, gen, seed, small_chunks):
    """Every torch.empty/empty_like the backends make is filled with NaN: all must be overwritten."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def nan_fill(x):
        if isinstance(x, torch.Tensor) and (x.dtype.is_floating_point or x.dtype.is_complex):
            x.fill_(float("nan"))
        return x

    monkeypatch.setattr(torch, "empty", lambda *a, **k: nan_fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: nan_fill(real_empty_like(*a, **k)))
    assert torch.isnan(torch.empty(2)).all()
    small_chunks(300)
    case = make_case(gen, 41, 33, 6, torch.bfloat16, masks="tid_neg", learnable_scale=True, seed=seed)
    with tiles("small"):
        check_backend(case, backend, MARGIN[torch.bfloat16], gen)


# ============================================================ deterministic mode
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_deterministic_is_bitwise_reproducible(dtype, gen, seed):
    case = make_case(gen, 45, 40, 6, dtype, masks="tid_neg", learnable_scale=True, seed=seed)
    g = upstream_grad(gen, case)
    with tiles("small"):
        a = run(case, dtype, g, backend="triton", deterministic=True)
        b = run(case, dtype, g, backend="triton", deterministic=True)
    assert torch.equal(a.out, b.out), mismatch_report("loss (run 2 vs run 1)", b.out, a.out)
    for n in a.grads:
        assert torch.equal(a.grads[n], b.grads[n]), mismatch_report(f"{n} (run 2 vs run 1)", b.grads[n], a.grads[n])


@pytest.mark.parametrize("path", list(S_PATHS))
@pytest.mark.parametrize("B,M,bn", [(41, 30, 16), (40, 0, 32)], ids=["3-row-5-col-blocks", "3-row-2-col-blocks"])
def test_triton_uneven_block_grids(B, M, bn, path, gen, seed):
    """More column blocks than row blocks and fewer, in the forward's program groups and the dS
    kernel's grouped grid (partial row groups), on every path where S lives: both deterministic
    settings match the truth and rerun bitwise. (These shapes first covered the removed tile
    backward's staggered walk.) Per-row upstream gradients; a fixed scale: the scale's gradient,
    a sum of per-row terms of both signs here, cancels to fp32 noise on these shapes, and the
    grid and pairwise tests check it on every path."""
    case = make_case(gen, B, 24, M, torch.float32, masks="tid_neg" if M else "both", learnable_scale=False,
                     reduction="none", seed=seed, label=f"uneven block grids, {path}")
    g = upstream_grad(gen, case)
    with kernel_config(BM=16, BN=bn, BK=16, GR_MAX=2, GC_MAX=3, DS_BM=16, DS_BN=bn, DS_GROUP_M=2,
                       STATS_BM=16, STATS_BN=bn, STATS_GC_MAX=3, **S_PATHS[path]):
        check_backend(case, "triton", MARGIN[torch.float32], gen, upstream=g)
        check_backend(case, "triton", MARGIN[torch.float32], gen, upstream=g, deterministic=True)
        a = run(case, torch.float32, g, backend="triton", deterministic=True)
        b = run(case, torch.float32, g, backend="triton", deterministic=True)
    for n in a.grads:
        assert torch.equal(a.grads[n], b.grads[n]), mismatch_report(f"{n} (run 2 vs run 1)", b.grads[n], a.grads[n])


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_triton_deterministic_option_changes_nothing(reduction, gen, seed):
    """``deterministic=`` is accepted and changes nothing: the strip backward has no atomics, so
    True and False give bitwise the same loss and gradients, and both match the truth."""
    case = make_case(gen, 37, 130, 5, torch.float32, masks="both", learnable_scale=True, reduction=reduction,
                     seed=seed)
    g = upstream_grad(gen, case)
    with tiles("small", "fused"):
        det = run(case, torch.float32, g, backend="triton", deterministic=True)
        fast = run(case, torch.float32, g, backend="triton", deterministic=False)
        check_backend(case, "triton", MARGIN[torch.float32], gen, deterministic=True, upstream=g)
    assert torch.equal(det.out, fast.out), mismatch_report("loss det vs not", det.out, fast.out)
    for n in det.grads:
        assert torch.equal(det.grads[n], fast.grads[n]), mismatch_report(f"{n} det vs not", det.grads[n],
                                                                         fast.grads[n])


def test_torch_backend_is_deterministic(gen, small_chunks):
    small_chunks(256)
    case = make_case(gen, 40, 33, 5, torch.float32, masks="tid_neg", learnable_scale=True)
    g = upstream_grad(gen, case)
    a = run(case, torch.float32, g, backend="torch", deterministic=True)
    b = run(case, torch.float32, g, backend="torch", deterministic=True)
    assert torch.equal(a.out, b.out)
    for n in a.grads:
        assert torch.equal(a.grads[n], b.grads[n]), n


# ============================================================ non-finite inputs
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter: inf - inf
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["query", "target"])
@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_non_finite_embedding_gives_non_finite_loss(backend, where, value, gen):
    B, d = 11, 20
    case = make_case(gen, B, d, 0, torch.float32)
    row = 4
    x = case.q if where == "query" else case.t
    x[row, 7] = value
    for sym in (True, False):
        for reduction in ("mean", "sum", "none"):
            with tiles("small"):
                out = hardness_weighted_loss(case.q, case.t, reduction=reduction, symmetric=sym, backend=backend)
            what = f"backend={backend} {where}[{row}, 7]={value} symmetric={sym} reduction={reduction}: loss {out}"
            if reduction == "none":
                assert not torch.isfinite(out[row]), what
            else:
                assert not torch.isfinite(out), what


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_non_finite_negative_gives_non_finite_loss(backend, gen):
    case = make_case(gen, 9, 20, 3, torch.float32)
    case.neg[1, 2] = float("nan")
    with tiles("small"):
        out = hardness_weighted_loss(case.q, case.t, negatives=case.neg, backend=backend, symmetric=False)
    assert not torch.isfinite(out), out


# ============================================================ layouts
def _noncontiguous(q, t, neg):
    """q: transposed-then-transposed view; t: column slice of a wider tensor; neg: every other row."""
    q2 = q.t().contiguous().t()
    wide = torch.cat([t, torch.randn(t.shape[0], 5, dtype=t.dtype)], dim=1)
    t2 = wide[:, : t.shape[1]]
    neg2 = None
    if neg is not None:
        inter = torch.stack([neg, torch.randn_like(neg)], dim=1).reshape(-1, neg.shape[1])
        neg2 = inter[::2]
    for x in (q2, t2) + (() if neg2 is None else (neg2,)):
        assert not x.is_contiguous()
    return q2, t2, neg2


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
@pytest.mark.parametrize("dtype,margin", [DTYPES[0], DTYPES[1]])
def test_non_contiguous_inputs(backend, dtype, margin, gen, seed):
    case = make_case(gen, 27, 33, 5, dtype, masks="tid_neg", learnable_scale=True, seed=seed, label="non-contig")
    # ids as strided views too
    case.target_ids = torch.stack([case.target_ids, case.target_ids + 100], dim=1).reshape(-1)[::2]
    case.query_ids = torch.stack([case.query_ids, case.query_ids + 100], dim=1).reshape(-1)[::2]
    assert not case.target_ids.is_contiguous()
    g = upstream_grad(gen, case)
    with tiles("small"):
        strided = run(case, dtype, g, backend=backend, transform=_noncontiguous)
        dense = run(case, dtype, g, backend=backend)
        if backend != "reference":
            check_backend(case, backend, margin, gen, transform=_noncontiguous)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(strided.out, dense.out) <= tol, mismatch_report("loss strided vs dense", strided.out, dense.out)
    for n in dense.grads:
        assert rel_err(strided.grads[n], dense.grads[n]) <= tol, mismatch_report(
            f"{n} strided vs dense", strided.grads[n], dense.grads[n])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_only_some_inputs_require_grad(backend, gen):
    case = make_case(gen, 19, 24, 4, torch.float32, masks="both")
    q = case.q.clone().requires_grad_(True)
    g = upstream_grad(gen, case)
    with tiles("small"):
        out = hardness_weighted_loss(q, case.t, negatives=case.neg, target_ids=case.target_ids,
                                     query_ids=case.query_ids, backend=backend)
    (dq,) = torch.autograd.grad(out, [q], g.float())
    truth = run_truth(case, g)
    assert rel_err(out, truth.out) < 1e-5
    assert rel_err(dq, truth.grads["dq"]) < 1e-5, mismatch_report("dq", dq, truth.grads["dq"])


# ============================================================ module API and dispatch
@pytest.mark.parametrize("backend", ["auto", "torch", "triton", "reference"])
def test_module_matches_functional(backend, gen):
    from llave_fast.llave_compat import WeightedClipLoss

    case = make_case(gen, 21, 33, 0, torch.float32, masks="both")
    q, t = case.q, case.t
    with tiles("small"):
        plain = FusedHardnessLoss(backend=backend)(q, t)
        fn_default = hardness_weighted_loss(q, t, backend=backend)
        # LLaVE's class by name, built as LLaVE's training builds it (on one process)
        llave = WeightedClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True, rank=0, world_size=1,
                                 backend=backend)(q, t, logit_scale=50.0, alpha=9.0)
        d = FusedHardnessLoss(logit_scale=20.0, alpha=3.0, backend=backend, reduction="none")(
            q, t, output_dict=True, target_ids=case.target_ids, query_ids=case.query_ids)
        fn_d = hardness_weighted_loss(q, t, logit_scale=20.0, alpha=3.0, reduction="none", backend=backend,
                                      target_ids=case.target_ids, query_ids=case.query_ids)
        overridden = FusedHardnessLoss(logit_scale=20.0, alpha=3.0, backend=backend)(q, t, 50.0, 9.0)
    assert torch.equal(plain, fn_default), (plain, fn_default)
    assert torch.equal(llave, fn_default), (llave, fn_default)
    assert torch.equal(overridden, fn_default), (overridden, fn_default)
    assert isinstance(d, dict) and set(d) == {"contrastive_loss"}, d
    assert torch.equal(d["contrastive_loss"], fn_d)
    truth = reference_loss(q.double(), t.double(), logit_scale=50.0, alpha=9.0)
    assert rel_err(plain, truth) < 1e-5, (plain, truth)


def test_module_is_a_drop_in_module(gen):
    m = FusedHardnessLoss()
    assert isinstance(m, torch.nn.Module)
    assert "logit_scale=50.0" in repr(m) and "alpha=9.0" in repr(m), repr(m)
    assert list(m.parameters()) == []
    case = make_case(gen, 5, 16, 0, torch.float32)
    q = case.q.clone().requires_grad_(True)
    m(q, case.t).backward()
    assert q.grad is not None and torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_auto_resolves_to_torch_on_cpu(dtype, gen):
    assert resolve_backend("auto", torch.device("cpu"), dtype) == "torch"
    case = make_case(gen, 9, 16, 2, dtype, masks="tid")
    q = case.q.clone().requires_grad_(True)
    out = hardness_weighted_loss(q, case.t, negatives=case.neg, target_ids=case.target_ids, backend="auto")
    assert "TorchHardnessLoss" in type(out.grad_fn).__name__, type(out.grad_fn).__name__
    ref = hardness_weighted_loss(q, case.t, negatives=case.neg, target_ids=case.target_ids, backend="torch")
    assert torch.equal(out, ref)


def test_reference_backend_is_the_reference(gen):
    case = make_case(gen, 13, 16, 3, torch.float32, masks="tid_neg")
    kw = dict(negatives=case.neg, target_ids=case.target_ids, query_ids=case.query_ids)
    a = hardness_weighted_loss(case.q, case.t, backend="reference", reduction="none", **kw)
    b = reference_loss(case.q, case.t, logit_scale=50.0, alpha=9.0, reduction="none", **kw)
    assert torch.equal(a, b)
    assert llave_fast.reference_loss is reference_loss


# ============================================================ gradcheck (torch backend, float64)
def test_gradcheck_torch_backend_alpha0_all_inputs(gen, small_chunks):
    """alpha=0: the loss is an ordinary function of everything, so autograd's gradient is exact."""
    small_chunks(10)  # 2 rows per chunk
    case = make_case(gen, 5, 7, 2, torch.float64, masks="tid_neg", id_range=3, alpha=0.0)
    q, t, neg = (x.clone().requires_grad_(True) for x in (case.q, case.t, case.neg))
    s = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)

    for reduction in ("mean", "none"):
        def f(q, t, neg, s):
            return hardness_weighted_loss(q, t, logit_scale=s, alpha=0.0, negatives=neg, reduction=reduction,
                                          target_ids=case.target_ids, query_ids=case.query_ids, backend="torch")

        assert torch.autograd.gradcheck(f, (q, t, neg, s), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_torch_backend_scale_with_hardness(gen):
    """alpha != 0: the hardness weight is detached, but it does not depend on the scale, so
    d loss / d logit_scale is an exact derivative and gradcheck applies to it."""
    case = make_case(gen, 6, 5, 3, torch.float64, masks="tid_neg", id_range=3, alpha=9.0)
    s = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)

    def f(s):
        return hardness_weighted_loss(case.q, case.t, logit_scale=s, alpha=9.0, negatives=case.neg,
                                      target_ids=case.target_ids, query_ids=case.query_ids, backend="torch")

    assert torch.autograd.gradcheck(f, (s,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_hardness_weight_is_detached(gen):
    """With alpha != 0 the embedding gradient is NOT the derivative of the loss value: it
    is the derivative with the weights held fixed (finite differences must disagree)."""
    case = make_case(gen, 6, 5, 0, torch.float64, alpha=9.0)
    q = case.q.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="Jacobian mismatch"):
        torch.autograd.gradcheck(
            lambda q: hardness_weighted_loss(q, case.t, logit_scale=5.0, alpha=9.0, backend="torch"),
            (q,), eps=1e-6, atol=1e-7, rtol=1e-5,
        )


# ============================================================ the rule can fail
MUTATIONS = {
    "target_ids dropped": lambda c: Case(**{**c.__dict__, "target_ids": None}),
    "query_ids dropped": lambda c: Case(**{**c.__dict__, "query_ids": None}),
    "hardness dropped (alpha=0)": lambda c: Case(**{**c.__dict__, "alpha": 0.0}),
    "t->q direction dropped": lambda c: Case(**{**c.__dict__, "symmetric": False}),
    "scale 2% off": lambda c: Case(**{**c.__dict__, "scale": c.scale * 1.02}),
    "alpha 5% off": lambda c: Case(**{**c.__dict__, "alpha": c.alpha * 1.05}),
}


@pytest.mark.parametrize("shape", [(37, 33, 5), (257, 896, 31)], ids=["37x33x5", "257x896x31"])
@pytest.mark.parametrize("dtype,margin", DTYPES)
def test_tolerance_rule_catches_real_bugs(dtype, margin, shape, gen, seed):
    """A backend computing a subtly wrong loss (a dropped mask, a wrong scale, ...) fails the rule.

    The "backend" here is the float64 truth of a mutated problem, its gradients rounded to
    the dtype; the correct answer rounded the same way passes. The CCE rule alone catches
    everything in fp32; in bf16/fp16 the eager reference is so coarse that only large bugs
    fail it, and the CPU accumulation rule is what catches the rest.
    """
    case = make_case(gen, *shape, dtype, masks="tid_neg", learnable_scale=True, seed=seed)
    g = upstream_grad(gen, case)
    truth = run_truth(case, g)
    lowp = run(case, dtype, g, backend=None)
    acc_ref = run(case, torch.float32, g, backend=None) if dtype != torch.float32 else None

    def rounded(res):
        res.grads = {n: (x.float() if n == "dscale" else x.to(dtype)) for n, x in res.grads.items()}
        res.out = res.out.float()
        return res

    assert_results_match(rounded(run_truth(case, g)), truth, lowp, margin, acc_ref=acc_ref)

    def caught(name, acc):
        bad = rounded(run_truth(MUTATIONS[name](case), g))
        try:
            assert_results_match(bad, truth, lowp, margin, acc_ref=acc)
        except AssertionError:
            return True
        return False

    uncaught = [name for name in MUTATIONS if not caught(name, acc_ref)]
    assert not uncaught, f"the tolerance rule lets these bugs pass in {dtype}: {uncaught}"
    if dtype == torch.bfloat16:
        # the rule as the GPU applies it (a bf16 dS strip: 2^-8 more on the gradients) still
        # catches a dropped target-id mask and a 5 % alpha error (issue 20, item 5)
        def caught_cuda(name):
            bad = rounded(run_truth(MUTATIONS[name](case), g))
            try:
                assert_results_match(bad, truth, lowp, margin, acc_ref=acc_ref, strip_device="cuda")
            except AssertionError:
                return True
            return False

        assert_results_match(rounded(run_truth(case, g)), truth, lowp, margin, acc_ref=acc_ref, strip_device="cuda")
        uncaught = [name for name in MUTATIONS if not caught_cuda(name)]
        assert not uncaught, f"the GPU's bf16 rule lets these bugs pass: {uncaught}"
    if dtype != torch.float32:
        # the CCE rule alone (GPU runs) still catches the gross bugs in 16-bit
        gross = ("hardness dropped (alpha=0)", "t->q direction dropped")
        uncaught = [name for name in gross if not caught(name, None)]
        assert not uncaught, f"the CCE rule lets these bugs pass in {dtype}: {uncaught}"


# ============================================================ autotuning (LLAVE_FAST_AUTOTUNE=1)
def test_autotune_picks_a_candidate_once_and_stays_correct(monkeypatch, gen, seed):
    from llave_fast.backends import launch

    monkeypatch.setenv("LLAVE_FAST_AUTOTUNE", "1")
    monkeypatch.setenv("LLAVE_FAST_S_MODE", "fused")  # the tuner chooses the one-pass kernels' tiles
    monkeypatch.setattr(launch, "TUNED", {})
    monkeypatch.setattr(launch, "TUNE_LOG", [])
    case = make_case(gen, 40, 33, 5, torch.float32, masks="tid_neg", learnable_scale=True, seed=seed,
                     label="autotuned")
    check_backend(case, "triton", MARGIN[torch.float32], gen)
    kinds = [r["key"][0] for r in launch.TUNE_LOG]
    assert sorted(kinds) == ["bwd", "fwd"], kinds
    for r in launch.TUNE_LOG:
        cands = launch.FWD_CANDIDATES_CPU if r["key"][0] == "fwd" else launch.BWD_CANDIDATES_CPU
        assert r["choice"] in cands and r["ms"] > 0, r
        assert len(r["candidates"]) == len(cands) and all("ms" in c for c in r["candidates"]), r
        assert r["key"][1:4] == ("cpu", None, torch.float32), r["key"]  # device type, index, dtype
    # a second problem of the same class is not tuned again; an explicit config bypasses tuning
    check_backend(make_case(gen, 37, 33, 5, torch.float32, masks="tid_neg", learnable_scale=True, seed=seed + 1),
                  "triton", MARGIN[torch.float32], gen)
    with tiles("small"):
        check_backend(make_case(gen, 300, 33, 5, torch.float32, seed=seed + 2), "triton", MARGIN[torch.float32], gen)
    assert len(launch.TUNE_LOG) == 2, [r["key"] for r in launch.TUNE_LOG]
    # kernel_config(autotune=True): tuned on request, on top of the override (its S_MODE kept),
    # with LLAVE_FAST_AUTOTUNE off; another dtype is another problem class
    monkeypatch.setenv("LLAVE_FAST_AUTOTUNE", "0")
    monkeypatch.delenv("LLAVE_FAST_S_MODE")
    with kernel_config(autotune=True, S_MODE="fused"):
        check_backend(make_case(gen, 40, 33, 5, torch.float16, masks="tid_neg", seed=seed + 3), "triton",
                      MARGIN[torch.float16], gen)
    new = launch.TUNE_LOG[2:]
    assert sorted(r["key"][0] for r in new) == ["bwd", "fwd"], [r["key"] for r in new]
    assert all(r["key"][3] == torch.float16 and r["key"][-1].S_MODE == "fused" for r in new), [r["key"] for r in new]


def test_autotune_never_chooses_a_fast_wrong_candidate(monkeypatch):
    """Each candidate's outputs are compared with the base configuration's before it is timed: a
    candidate off beyond the tolerance (AGREE), or with a NaN, is refused and recorded, even when
    it is the fastest; the slower right one is chosen. Where the base itself fails, the first
    candidate that runs is the reference."""
    import time

    from llave_fast.backends import launch

    monkeypatch.setattr(launch, "TUNED", {})
    monkeypatch.setattr(launch, "TUNE_LOG", [])
    monkeypatch.setattr(launch, "FWD_CANDIDATES_CPU", [dict(BM=16), dict(BM=64), dict(BN=64)])
    truth = torch.linspace(-3.0, 5.0, 97, dtype=torch.float64)

    def run(cfg):  # BM=16: fast and 5 % off; BN=64: fast and NaN in one place; BM=64: right and slow
        if cfg.BM == 16:
            return (truth * 1.05,)
        if cfg.BN == 64:
            return (torch.where(truth > 4.9, float("nan"), truth),)
        time.sleep(0.002)
        return (truth * (1 + 1e-6),)

    base = launch.interpreter_config()
    chosen = launch.tuned("fwd", base, ("planted",), torch.device("cpu"), torch.float32, run)
    assert chosen.BM == 64, chosen
    rec = launch.TUNE_LOG[-1]
    assert rec["choice"] == dict(BM=64), rec
    errors = {str(c["config"]): c.get("error", "") for c in rec["candidates"]}
    assert errors["{'BM': 16}"].startswith("wrong: outputs differ"), errors
    assert errors["{'BN': 64}"].startswith("wrong: outputs differ") and "infx" in errors["{'BN': 64}"], errors

    # a base configuration that fails (an override that does not fit): the first candidate that
    # runs (BM=16 here) is the reference, and the others are held to it
    def failing_base(cfg):
        if cfg == base:
            raise RuntimeError("out of resources: shared memory")
        return run(cfg)

    chosen = launch.tuned("fwd", base, ("base fails",), torch.device("cpu"), torch.float32, failing_base)
    rec = launch.TUNE_LOG[-1]
    assert rec["reference"] == dict(BM=16) and "shared memory" in rec["base_error"] and chosen.BM == 16, rec


def test_autotune_agreement_rule_by_output_kind():
    """Log-sum-exps in nats (a 0.5-nat error at lse ~45 is refused though it is 1 % relative),
    softmax means absolutely, gradients relatively; -inf (a column every row masks) and NaN (NaN
    inputs) agree only with themselves."""
    from llave_fast.backends import launch
    from llave_fast.backends.common import StripStats

    g = torch.Generator().manual_seed(0)
    lse = 45.0 + torch.rand(256, generator=g, dtype=torch.float64)
    es = 0.8 + 0.1 * torch.rand(256, generator=g, dtype=torch.float64)
    ref = StripStats(lse, es, lse.flip(0), es.flip(0))

    def stats(**change):
        d = dict(row_lse=lse, row_es=es, col_lse=lse.flip(0), col_es=es.flip(0))
        d.update(change)
        return StripStats(**d)

    assert launch.disagreement(stats(row_lse=lse + 1e-4), ref) < 0.1  # rounding-level: agrees
    off = lse.flip(0).clone()
    off[64:128] += 0.5
    assert launch.disagreement(stats(col_lse=off), ref) > 10  # half a nat on one column block
    assert launch.disagreement(stats(row_es=es + 0.01), ref) > 5
    assert launch.disagreement(stats(row_es=None), ref) == float("inf")  # a different set of outputs
    masked = torch.where(lse > 45.9, float("-inf"), lse)
    assert launch.disagreement(stats(row_lse=masked + 1e-5), stats(row_lse=masked)) < 0.01
    assert launch.disagreement(stats(row_lse=masked), ref) == float("inf")
    assert launch.disagreement(ref, stats(row_lse=masked)) == float("inf")
    nan = torch.where(lse > 45.9, float("nan"), lse)
    assert launch.disagreement(stats(row_lse=nan), stats(row_lse=nan)) == 0.0  # NaN inputs: NaN in both
    assert launch.disagreement(ref, stats(row_lse=nan)) == float("inf")
    grad = torch.randn(64, 8, generator=g, dtype=torch.float64)
    assert launch.disagreement((grad * (1 + 1e-3), grad), (grad, grad)) < 0.1
    assert launch.disagreement((grad * 1.05, grad), (grad, grad)) > 1  # a 5 % error (alpha, a lost term)


def test_autotune_env_value_is_checked(monkeypatch, gen):
    monkeypatch.setenv("LLAVE_FAST_AUTOTUNE", "maybe")
    case = make_case(gen, 9, 16, 0, torch.float32)
    with pytest.raises(ValueError, match="LLAVE_FAST_AUTOTUNE.*'maybe'"):
        hardness_weighted_loss(case.q, case.t, backend="triton")
