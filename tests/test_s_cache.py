"""Where S lives: the S-cache, stream and fused paths, their choice by memory, and their results.

``backends.common.plan_s`` decides from the shapes and a byte budget alone (never the free
memory): "cache" when the whole fp32 S fits, "stream" (fp32 blocks recomputed in the backward)
when a block of S_MIN_ROWS rows fits, "fused" below that. Each test here runs a path on both
sides of its threshold and checks the result against float64, on random and on trained-like
inputs (positives at S ~ 0.85, same-cluster negatives at S ~ 0.7, where a 16-bit S would show).
"""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch
import torch.nn.functional as F

from llave_fast import hardness_weighted_loss
from llave_fast.backends import common
from llave_fast.backends.common import parse_bytes, plan_s, s_cache_budget, s_mode_setting, s_row_stride, total_memory
from llave_fast.backends.triton_backend import kernel_config

from _helpers import (
    DTYPES,
    MARGIN,
    SMALL_TILES,
    Case,
    _cpu_test_env,  # noqa: F401  (autouse fixture)
    check_backend,
    make_case,
)


# ------------------------------------------------------------------ the plan (pure function)
ROW = s_row_stride(70) * 4  # 128 columns of fp32: 512 bytes a row


@pytest.mark.parametrize("budget,keep,want", [
    (2000 * ROW, True, ("cache", 2000)),  # exactly fits
    (2000 * ROW - 1, True, ("stream", 1984)),  # one byte short: blocks of whole 64-row multiples
    (2000 * ROW, False, ("stream", 2000)),  # no backward follows: computed in one block, not kept
    (512 * ROW, True, ("stream", 512)),  # S_MIN_ROWS rows fit: still streamed
    (512 * ROW - 1, True, ("fused", 0)),  # not even a block of S_MIN_ROWS rows
    (0, False, ("fused", 0)),
], ids=["fits", "one-byte-short", "no-grad", "min-block", "below-min-block", "no-budget"])
def test_plan_thresholds(budget, keep, want):
    plan = plan_s(2000, 70, keep=keep, mode="auto", budget=budget)
    assert (plan.mode, plan.rows) == want, plan
    assert plan.stride == 128 and plan.budget == budget


def test_plan_small_batch_and_forced_modes():
    # fewer rows than S_MIN_ROWS: all of them or the fused kernels
    assert plan_s(100, 70, keep=True, mode="auto", budget=100 * ROW).mode == "cache"
    assert plan_s(100, 70, keep=True, mode="auto", budget=100 * ROW - 1).mode == "fused"
    # a forced path is taken whatever the budget; a forced "stream" takes what the budget holds
    assert plan_s(100, 70, keep=True, mode="cache", budget=0).mode == "cache"
    assert plan_s(100, 70, keep=True, mode="fused", budget=1 << 40).mode == "fused"
    assert (plan_s(100, 70, keep=True, mode="stream", budget=3 * ROW).rows) == 3
    assert (plan_s(100, 70, keep=True, mode="stream", budget=0).rows) == 1
    # never cached without a backward, even when forced
    assert plan_s(100, 70, keep=False, mode="cache", budget=0).mode == "stream"
    # an fp64 S (the torch backend's fp64 inputs) takes twice the bytes
    assert plan_s(100, 70, keep=True, mode="auto", budget=100 * ROW, elem_bytes=8).mode == "fused"


def test_budget_and_mode_settings(monkeypatch):
    monkeypatch.delenv("LLAVE_FAST_S_CACHE_BYTES", raising=False)
    monkeypatch.delenv("LLAVE_FAST_S_MODE", raising=False)
    cpu = torch.device("cpu")
    # the default is a fraction of the total memory: the same whatever is allocated right now
    assert s_cache_budget(cpu) == total_memory(cpu) // common.S_CACHE_FRACTION > 0
    assert s_mode_setting() == "auto"
    monkeypatch.setenv("LLAVE_FAST_S_CACHE_BYTES", "1.5G")
    assert s_cache_budget(cpu) == 3 << 29
    assert s_cache_budget(cpu, 4096) == 4096  # a kernel_config's value wins
    assert s_cache_budget(cpu, "2M") == 2 << 20
    assert [parse_bytes(x, "x") for x in ("0", "512", "1k", "3MiB", "2GB")] == [0, 512, 1024, 3 << 20, 2 << 30]
    monkeypatch.setenv("LLAVE_FAST_S_CACHE_BYTES", "lots")
    with pytest.raises(ValueError, match="LLAVE_FAST_S_CACHE_BYTES must be a byte count.*'lots'"):
        s_cache_budget(cpu)
    with pytest.raises(ValueError, match="S_CACHE_BYTES must be a byte count >= 0, got -1"):
        s_cache_budget(cpu, -1)
    monkeypatch.setenv("LLAVE_FAST_S_MODE", "kept")
    with pytest.raises(ValueError, match="LLAVE_FAST_S_MODE must be one of .*'kept'"):
        s_mode_setting()
    with pytest.raises(ValueError, match="kernel config S_MODE must be one of .*'all'"):
        s_mode_setting("all")
    monkeypatch.setenv("LLAVE_FAST_S_MODE", "stream")
    assert s_mode_setting() == "stream"


def test_bad_mode_reaches_the_caller_torch_and_triton(gen, monkeypatch):
    """A bad mode is refused: by kernel_config itself (before any launch), and, from
    LLAVE_FAST_S_MODE, by either backend's loss call."""
    with pytest.raises(ValueError, match="S_MODE must be None or one of.*'sometimes'"):
        kernel_config(S_MODE="sometimes")
    case = make_case(gen, 9, 16, 0, torch.float32)
    monkeypatch.setenv("LLAVE_FAST_S_MODE", "sometimes")
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match="LLAVE_FAST_S_MODE must be one of.*'sometimes'"):
            hardness_weighted_loss(case.q.requires_grad_(), case.t, backend=backend)


# ------------------------------------------------------------------ trained-like inputs
def trained_like_case(gen, B: int, d: int, M: int, dtype, *, late: bool = False, masks: str = "both",
                      learnable_scale: bool = True, reduction: str = "mean", label: str = "") -> Case:
    """Embeddings as a trained model gives them: clusters of related pairs. A query's positive
    sits at cos ~ 0.85 (0.97 late in training), its cluster's other targets at ~ 0.7 (both),
    other clusters near 0; hard negatives come from the query's own cluster. Early: loss ~ 1-4;
    late: loss ~ 0.01-0.06 (alpha's weight makes the same-cluster negatives compete with the
    positive). Ids mark a few true duplicates (masked as false negatives)."""
    f64 = torch.float64
    k = max(2, B // 6)
    centers = F.normalize(torch.randn(k, d, generator=gen, dtype=f64), dim=1)
    cl = torch.randint(0, k, (B,), generator=gen)
    # cos(q_i, q_j) = 1 / (1 + spread^2) within a cluster, cos(q_i, t_i) = 1 / sqrt(1 + pos_noise^2)
    spread, pos_noise = (0.65, 0.25) if late else (0.45, 0.62)
    q = F.normalize(centers[cl] + spread * F.normalize(torch.randn(B, d, generator=gen, dtype=f64), dim=1), dim=1)
    t = F.normalize(q + pos_noise * F.normalize(torch.randn(B, d, generator=gen, dtype=f64), dim=1), dim=1)
    neg = None
    if M:
        src = torch.randint(0, B, (M,), generator=gen)
        neg = F.normalize(centers[cl[src]] + spread * F.normalize(torch.randn(M, d, generator=gen, dtype=f64), dim=1),
                          dim=1)
    ids = torch.arange(B)
    dup = torch.randint(0, B, (max(1, B // 10),), generator=gen)
    ids[dup[1:]] = int(ids[dup[0]])  # a few rows share one id
    tid = None
    if masks in ("tid", "both"):
        tid = ids.clone() if not M else torch.cat([ids, torch.arange(B, B + M)])
    qid = ids.clone() if masks in ("qid", "both") else None
    return Case(q=q.to(dtype), t=t.to(dtype), neg=None if neg is None else neg.to(dtype), target_ids=tid,
                query_ids=qid, scale=50.0, learnable_scale=learnable_scale, alpha=9.0, symmetric=True,
                reduction=reduction, seed=0, label=label or ("late-training" if late else "trained-like"))


def test_trained_like_family_has_the_intended_statistics(gen):
    from llave_fast.reference import reference_loss

    for late, pos_range, (lo, hi) in ((False, (0.8, 0.9), (0.8, 6.0)), (True, (0.95, 0.99), (0.003, 0.2))):
        case = trained_like_case(gen, 240, 64, 0, torch.float64, late=late, masks="none")
        S = case.q @ case.t.t()
        pos = S.diagonal().mean().item()
        same = (case.q @ case.q.t()) > 0.5  # same-cluster pairs (other clusters: ~0 +- 0.15)
        same.fill_diagonal_(False)
        assert pos_range[0] < pos < pos_range[1], (late, pos)
        assert 0.6 < S[same].mean() < 0.8, (late, S[same].mean())
        loss = reference_loss(case.q, case.t, logit_scale=50.0, alpha=9.0).item()
        assert lo < loss < hi, (late, loss)


# ------------------------------------------------------------------ every path at its thresholds
B_E2E, M_E2E = 40, 5  # NT = 45: a 64-column stride, 256 bytes a row of fp32
ROW_E2E = s_row_stride(B_E2E + M_E2E) * 4


def _counts():
    return dict(common.PATH_COUNTS)


def _delta(before):
    return {k: v - before[k] for k, v in common.PATH_COUNTS.items() if v != before[k]}


# (budget, backend, path the forward takes)
THRESHOLDS = [
    (B_E2E * ROW_E2E, "triton", "cache"),
    (B_E2E * ROW_E2E - 1, "triton", "stream"),  # 39-row blocks: a block of 39, then one of 1
    (8 * ROW_E2E, "triton", "stream"),  # S_MIN_ROWS (8 here) rows fit
    (8 * ROW_E2E - 1, "triton", "fused"),
    (B_E2E * ROW_E2E, "torch", "cache"),
    (B_E2E * ROW_E2E - 1, "torch", "fused"),  # the torch backend's chunked loop
]


@pytest.mark.parametrize("dtype,margin", DTYPES)
@pytest.mark.parametrize("family", ["random", "trained", "late"])
@pytest.mark.parametrize("budget,backend,path", THRESHOLDS,
                         ids=[f"{b}-{p}-{n}B" for n, b, p in THRESHOLDS])
def test_paths_at_their_thresholds(budget, backend, path, family, dtype, margin, gen):
    if family == "random":
        case = make_case(gen, B_E2E, 48, M_E2E, dtype, masks="tid_neg", learnable_scale=True,
                         label=f"{backend} {path}")
    else:
        case = trained_like_case(gen, B_E2E, 48, M_E2E, dtype, late=family == "late", label=f"{family} {path}")
    before = _counts()
    with kernel_config(**SMALL_TILES, S_CACHE_BYTES=budget, S_MIN_ROWS=8):
        check_backend(case, backend, margin, gen)
    # the backend ran once with a gradient wanted (the references do not reach a strip)
    assert _delta(before) == {path: 1}, (_delta(before), case.describe())


def _inputs(case, requires_grad=True):
    q = case.q.clone().requires_grad_(requires_grad)
    t = case.t.clone().requires_grad_(requires_grad)
    n = case.neg.clone().requires_grad_(requires_grad)
    return q, t, n


@pytest.mark.parametrize("backend,unkept", [("triton", "stream"), ("torch", "fused")])
def test_never_cached_without_a_backward(backend, unkept, gen):
    """Under no_grad, and with inputs that want no gradient, S is computed but not kept; the
    loss is the same number as with a gradient wanted."""
    case = make_case(gen, B_E2E, 48, M_E2E, torch.float32, masks="tid_neg")
    kw = dict(negatives=None, target_ids=case.target_ids, query_ids=case.query_ids, backend=backend)
    with kernel_config(**SMALL_TILES, S_MIN_ROWS=8):
        q, t, n = _inputs(case)
        before = _counts()
        with_grad = hardness_weighted_loss(q, t, **{**kw, "negatives": n})
        assert _delta(before) == {"cache": 1}
        before = _counts()
        with torch.no_grad():
            no_grad = hardness_weighted_loss(q, t, **{**kw, "negatives": n})
        assert _delta(before) == {unkept: 1}
        q, t, n = _inputs(case, requires_grad=False)
        before = _counts()
        plain = hardness_weighted_loss(q, t, **{**kw, "negatives": n})
        assert _delta(before) == {unkept: 1}
    assert no_grad.grad_fn is None and plain.grad_fn is None
    assert torch.equal(with_grad.detach(), no_grad) and torch.equal(no_grad, plain)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_kept_s_is_freed_by_the_backward(backend, gen):
    """The kept S goes through save_for_backward: autograd frees it when the backward ran,
    even while the caller still holds the loss (logging it, say)."""
    case = make_case(gen, B_E2E, 48, M_E2E, torch.float32, masks="tid_neg", learnable_scale=True)
    stride = s_row_stride(B_E2E + M_E2E)
    kept = []

    def pack(x):
        if x.dtype == torch.float32 and x.dim() == 2 and x.shape[0] == B_E2E and x.shape[1] in (stride, B_E2E + M_E2E):
            kept.append(weakref.ref(x))
        return x

    for path, n_kept in (("cache", 1), ("stream", 0), ("fused", 0)):
        kept.clear()
        q, t, n = _inputs(case)
        with kernel_config(**SMALL_TILES, S_MODE=path), torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            loss = hardness_weighted_loss(q, t, negatives=n, target_ids=case.target_ids, query_ids=case.query_ids,
                                          backend=backend)
        assert len(kept) == n_kept, (path, len(kept))
        loss.backward()
        gc.collect()
        assert all(r() is None for r in kept), f"{backend} {path}: the kept S outlived the backward"
        assert math.isfinite(loss.item())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cache_path_is_bitwise_reproducible(backend, gen):
    case = trained_like_case(gen, B_E2E, 48, M_E2E, torch.bfloat16)
    grads = []
    for _ in range(2):
        q, t, n = _inputs(case)
        with kernel_config(**SMALL_TILES, S_MODE="cache"):
            hardness_weighted_loss(q, t, negatives=n, target_ids=case.target_ids, query_ids=case.query_ids,
                                   backend=backend).backward()
        grads.append((q.grad, t.grad, n.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_triton_and_torch_paths_agree_on_trained_like_bf16(gen):
    """The three triton paths and the torch backend's two, same bf16 inputs: every result within
    the bf16 output rounding of the others (they differ only in where S lives, not in precision:
    S is fp32 on all of them)."""
    case = trained_like_case(gen, 64, 96, 9, torch.bfloat16)
    out = {}
    for backend, path in (("triton", "cache"), ("triton", "stream"), ("triton", "fused"), ("torch", "cache"),
                          ("torch", "fused")):
        q, t, n = _inputs(case)
        with kernel_config(**SMALL_TILES, **({"S_MODE": path} if path != "stream" else
                                              {"S_MODE": "stream", "S_CACHE_BYTES": 20 * 128 * 4})):
            loss = hardness_weighted_loss(q, t, negatives=n, target_ids=case.target_ids, query_ids=case.query_ids,
                                          backend=backend)
            loss.backward()
        out[(backend, path)] = (loss.detach().double(), q.grad.double(), t.grad.double(), n.grad.double())
    base = out[("triton", "cache")]
    for key, res in out.items():
        for name, a, b in zip(("loss", "dq", "dt", "dneg"), res, base):
            err = ((a - b).norm() / b.norm()).item()
            assert err < (1e-6 if name == "loss" else 2 * 2.0**-8), (key, name, err)


def _emulated_loss_grad(q, t, s_dtype):
    """dq of the symmetric hardness-weighted loss computed as the kernels do in 16 bits: fp32
    arithmetic, S kept in ``s_dtype`` (None: fp32) between forward and backward, dS rounded to
    bf16 before the dq GEMM, dq returned in the inputs' dtype."""
    qq, tt = q.float().requires_grad_(), t.float()
    S = qq @ tt.t()
    S.register_hook(lambda g: g.to(torch.bfloat16).float())  # the kernels hand the GEMM a bf16 dS
    if s_dtype is not None:  # S stored in 16 bits: forward and backward read the rounded values
        S = S + (S.to(s_dtype).float() - S).detach()
    eye = torch.eye(S.shape[0], dtype=torch.bool)

    def one_way(s):
        logits = 50.0 * s + torch.where(eye, torch.zeros_like(s), 9.0 * s.detach())
        return torch.logsumexp(logits, 1) - 50.0 * s.diagonal()

    ((one_way(S) + one_way(S.t())) / 2).mean().backward()
    return qq.grad.to(q.dtype).double()


@pytest.mark.parametrize("late,least", [(False, 6.0), (True, 15.0)], ids=["trained-like", "late-training"])
def test_a_16_bit_S_costs_about_ten_times_the_gradient_error(gen, late, least):
    """Why S is fp32 on every path (README, "Where S lives"): on trained-like bf16 embeddings,
    keeping S in bf16 multiplies dq's error against float64 (of the same rounded inputs) by about
    10 (early) to 26 (late in training) over an fp32 S, the rest of the arithmetic alike."""
    from llave_fast.reference import reference_loss

    case = trained_like_case(gen, 1024, 256, 0, torch.bfloat16, late=late, masks="none")
    q64 = case.q.double().requires_grad_()
    reference_loss(q64, case.t.double(), logit_scale=50.0, alpha=9.0).backward()
    truth = q64.grad

    def err(s_dtype):
        return ((_emulated_loss_grad(case.q, case.t, s_dtype) - truth).norm() / truth.norm()).item()

    fp32_s, bf16_s = err(None), err(torch.bfloat16)
    assert fp32_s < 5e-3, fp32_s  # the bf16 dS and dq roundings alone
    assert bf16_s > least * fp32_s, (bf16_s, fp32_s)
