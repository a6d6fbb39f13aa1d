"""Neither fused backend materialises a B x N tensor, forward or backward, on the paths
that do not keep S ("fused": the one-pass kernels / the torch backend's chunked loop;
"stream": fp32 blocks of the rows the budget holds); the S-cache path holds exactly one
B x stride fp32 S, as documented, and nothing else of that size.

A TorchDispatchMode records the size of every tensor every aten op returns while the
forward AND the backward run; the largest must stay far below B * N. The same recorder
sees the eager reference's B x N logits, so the check can fail.

Under the Triton interpreter the kernels' own tiles are numpy arrays, invisible to the
dispatch mode: there the check covers what the launchers and autograd allocate (the
kernels' partial statistics, gradients, input copies). On a GPU, test_loss_gpu.py bounds
the peak CUDA memory instead.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from llave_fast import hardness_weighted_loss
from llave_fast.backends.triton_backend import kernel_config

from _helpers import _cpu_test_env, make_case  # noqa: F401  (autouse fixture)


class AllocationRecorder(TorchDispatchMode):
    """Records (phase, op, numel) of every tensor output of every aten op."""

    def __init__(self):
        super().__init__()
        self.phase = "forward"
        self.records = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in tree_flatten(out)[0]:
            if isinstance(x, torch.Tensor):
                self.records.append((self.phase, str(func), x.numel()))
        return out

    def largest(self, phase=None):
        recs = [r for r in self.records if phase is None or r[0] == phase]
        return max(recs, key=lambda r: r[2]) if recs else ("", "", 0)


def record_forward_backward(q, t, neg, *, backend, gen, **kw):
    q = q.clone().requires_grad_(True)
    t = t.clone().requires_grad_(True)
    neg = None if neg is None else neg.clone().requires_grad_(True)
    scale = torch.tensor(50.0, requires_grad=True)
    rec = AllocationRecorder()
    with rec:
        out = hardness_weighted_loss(q, t, negatives=neg, logit_scale=scale, backend=backend, **kw)
        g = torch.randn(out.shape, generator=gen, dtype=out.dtype)
        rec.phase = "backward"
        inputs = [q, t, scale] + ([] if neg is None else [neg])
        grads = torch.autograd.grad(out, inputs, g)
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    return rec


def _check(rec: AllocationRecorder, B: int, N: int, what: str):
    assert any(r[0] == "backward" for r in rec.records), "the recorder saw no backward op"
    for phase in ("forward", "backward"):
        phase_, op, numel = rec.largest(phase)
        assert numel < B * N // 4, (
            f"{what}: {phase} allocated a tensor of {numel} elements (op {op}), B*N = {B * N}; "
            f"largest tensors: {sorted(rec.records, key=lambda r: -r[2])[:5]}"
        )


@pytest.mark.parametrize("M,masks,reduction", [(0, "both", "mean"), (64, "tid_neg", "none")])
def test_torch_backend_never_allocates_b_by_n(M, masks, reduction, monkeypatch, gen):
    monkeypatch.setenv("LLAVE_FAST_TORCH_CHUNK_ELEMS", "8192")  # read at every call
    B, d = 512, 64
    case = make_case(gen, B, d, M, torch.float32, masks=masks, min_loss=None)
    with kernel_config(S_MODE="fused"):
        rec = record_forward_backward(case.q, case.t, case.neg, backend="torch", gen=gen, reduction=reduction,
                                      target_ids=case.target_ids, query_ids=case.query_ids)
    _check(rec, B, B + M, f"torch backend B={B} M={M}")


def test_torch_backend_check_is_sensitive(monkeypatch, gen):
    """With one chunk as large as the whole strip the torch backend does hold B x N: the
    recorder catches it (so the passing check above means the chunking works)."""
    B, d = 256, 32
    monkeypatch.setenv("LLAVE_FAST_TORCH_CHUNK_ELEMS", "1")  # the override below wins over it
    case = make_case(gen, B, d, 0, torch.float32, min_loss=None)
    with kernel_config(S_MODE="fused", TORCH_CHUNK_ELEMS=B * B):
        rec = record_forward_backward(case.q, case.t, None, backend="torch", gen=gen)
    with pytest.raises(AssertionError, match="allocated a tensor"):
        _check(rec, B, B, "torch backend, one chunk")


@pytest.mark.parametrize("deterministic", [False, True])
def test_triton_backend_never_allocates_b_by_n(deterministic, gen):
    """The default fused path (one-pass forward, strip backward) with the dS strip bounded by
    bytes as on the GPU (the one-strip rule off, strips of 16 rows' bytes): nothing scales with B x N."""
    from llave_fast.backends.triton_backend import ds_row_stride

    # d small against N: the interpreter copies each input as raw bytes (d * 4 "elements" a row),
    # and the dS strip too (a 16-row strip, one tile, shows as 16 * stride * 4 "elements")
    B, d, M = 384, 8, 8
    case = make_case(gen, B, d, M, torch.float32, masks="tid_neg", min_loss=None)
    strip = 16 * ds_row_stride(B + M) * 4
    with kernel_config(S_MODE="fused", DS_ONE_STRIP_BYTES=0, DS_STRIP_BYTES=strip, DS_MIN_ROWS=0, DS_BM=16,
                       DS_BN=16, BK=16):
        rec = record_forward_backward(case.q, case.t, case.neg, backend="triton", gen=gen, reduction="mean",
                                      target_ids=case.target_ids, query_ids=case.query_ids,
                                      deterministic=deterministic)
    _check(rec, B, B + M, f"triton backend B={B}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_s_cache_holds_one_fp32_s_and_stream_one_block(backend, gen):
    """The S-cache path's largest tensor is its fp32 S, B x stride (the torch backend: B x NT),
    held from forward to backward; the stream path's is one block of the rows the budget holds
    (the triton backend; the torch backend's other path is its chunked loop, tested above)."""
    from llave_fast.backends.common import s_row_stride

    B, d, M = 192, 8, 8
    stride = s_row_stride(B + M)
    case = make_case(gen, B, d, M, torch.float32, masks="tid_neg", min_loss=None)
    kw = dict(backend=backend, gen=gen, reduction="mean", target_ids=case.target_ids, query_ids=case.query_ids)
    with kernel_config(S_MODE="cache", STATS_BM=32, STATS_BN=32, DS_BM=32, DS_BN=32, DS_STRIP_ROWS=16):
        rec = record_forward_backward(case.q, case.t, case.neg, **kw)
    want = B * (stride if backend == "triton" else B + M)
    # (the interpreter's raw-byte copies of a kernel's fp32 arguments count 4 "elements" a value)
    assert want <= rec.largest("forward")[2] <= (4 * want if backend == "triton" else want), rec.largest("forward")
    if backend == "torch":
        return
    rows = 8
    with kernel_config(S_MODE="stream", S_CACHE_BYTES=rows * stride * 4, STATS_BM=32, STATS_BN=32, DS_BM=32,
                       DS_BN=32, DS_STRIP_ROWS=16):
        rec = record_forward_backward(case.q, case.t, case.neg, **kw)
    _check(rec, B, B + M, f"stream path, {rows}-row blocks")
    for phase in ("forward", "backward"):
        assert rows * stride <= rec.largest(phase)[2] <= 4 * rows * stride, (phase, rec.largest(phase))


@pytest.mark.parametrize("backend", ["reference"])
def test_recorder_sees_the_reference_b_by_n(backend, gen):
    """The recorder does see B x N tensors when they exist (forward and backward): the
    checks above could fail."""
    B, d = 128, 16
    case = make_case(gen, B, d, 0, torch.float32, min_loss=None)
    rec = record_forward_backward(case.q, case.t, None, backend=backend, gen=gen)
    assert rec.largest("forward")[2] >= B * B, rec.largest("forward")
    assert rec.largest("backward")[2] >= B * B, rec.largest("backward")
    with pytest.raises(AssertionError, match="allocated a tensor"):
        _check(rec, B, B, "reference")


def test_triton_strip_backward_holds_one_strip(gen):
    """The strip backward's only large tensor is its dS strip: R x (N + M) for R rows (rows
    ``ds_row_stride(N + M)`` elements apart), however large B is (here 24 strips of 8 rows),
    so it stays far below B x N. (The interpreter hands the kernel a raw-byte copy of its
    fp32 arguments: the strip shows as 4 "elements" a value.)"""
    from llave_fast.backends.triton_backend import ds_row_stride

    B, d, M, R = 192, 8, 8, 8
    case = make_case(gen, B, d, M, torch.float32, masks="tid_neg", min_loss=None)
    with kernel_config(DS_STRIP_ROWS=R, BM=32, BN=32, BK=16, DS_BM=32, DS_BN=32, S_MODE="fused"):
        rec = record_forward_backward(case.q, case.t, case.neg, backend="triton", gen=gen, reduction="mean",
                                      target_ids=case.target_ids, query_ids=case.query_ids)
    _check(rec, B, B + M, f"triton strip backward B={B} R={R}")
    assert R * (B + M) <= rec.largest("backward")[2] <= 4 * R * ds_row_stride(B + M), rec.largest("backward")


def test_triton_strip_check_is_sensitive(gen):
    """One strip of all B rows is a B x N tensor: the recorder catches it."""

    B, d = 128, 8
    case = make_case(gen, B, d, 0, torch.float32, min_loss=None)
    with kernel_config(DS_STRIP_ROWS=B, BM=32, BN=32, BK=16, DS_BM=32, DS_BN=32, S_MODE="fused"):
        rec = record_forward_backward(case.q, case.t, None, backend="triton", gen=gen)
    with pytest.raises(AssertionError, match="allocated a tensor"):
        _check(rec, B, B, "triton strip backward, one strip")
