"""Bad inputs raise ValueError/TypeError naming the argument and what it got, on every backend."""

from __future__ import annotations

import pytest
import torch

from llave_fast import FusedHardnessLoss, LlaveFastError, hardness_weighted_loss
from llave_fast.llave_compat import WeightedClipLoss

from _helpers import _cpu_test_env  # noqa: F401  (autouse fixture)

B, D, M = 4, 8, 3


def _q(dtype=torch.float32):
    return torch.nn.functional.normalize(torch.randn(B, D, dtype=torch.float32), dim=1).to(dtype)


def _t(dtype=torch.float32):
    return torch.nn.functional.normalize(torch.randn(B, D, dtype=torch.float32), dim=1).to(dtype)


def _neg(rows=M, width=D, dtype=torch.float32):
    return torch.randn(rows, width).to(dtype)


# id -> (query, target, kwargs, exception, regex): the regex names the argument and what it got
BAD_INPUTS = {
    # embeddings
    "width-mismatch": (lambda: (_q(), torch.randn(B, D + 1), {}), ValueError, r"target.*width 9.*query.*width 8"),
    "width-mismatch-negatives": (lambda: (_q(), _t(), dict(negatives=_neg(width=D - 1))), ValueError,
                                 r"negatives.*width 7.*\(3, 7\).*query.*width 8"),
    "rows-do-not-pair": (lambda: (_q(), torch.randn(B + 1, D), {}), ValueError,
                         r"query has 4 rows.*target has 5"),
    "rows-do-not-pair-empty-target": (lambda: (_q(), torch.randn(0, D), {}), ValueError,
                                      r"query has 4 rows.*target has 0"),
    "empty-batch": (lambda: (torch.randn(0, D), torch.randn(0, D), {}), ValueError, r"query.*empty.*\(0, 8\)"),
    "zero-width": (lambda: (torch.randn(B, 0), torch.randn(B, 0), {}), ValueError, r"query.*width 0"),
    "query-1d": (lambda: (torch.randn(D), _t(), {}), ValueError, r"query must be 2-D.*\(8,\)"),
    "target-3d": (lambda: (_q(), torch.randn(1, B, D), {}), ValueError, r"target must be 2-D.*\(1, 4, 8\)"),
    "negatives-1d": (lambda: (_q(), _t(), dict(negatives=torch.randn(D))), ValueError,
                     r"negatives must be 2-D.*\(8,\)"),
    "query-int64": (lambda: (torch.randint(0, 5, (B, D)), _t(), {}), TypeError, r"query.*torch\.int64"),
    "target-int32": (lambda: (_q(), torch.randint(0, 5, (B, D), dtype=torch.int32), {}), TypeError,
                     r"target.*torch\.int32"),
    "query-bool": (lambda: (torch.ones(B, D, dtype=torch.bool), _t(), {}), TypeError, r"query.*torch\.bool"),
    "query-complex": (lambda: (_q().to(torch.complex64), _t(), {}), TypeError, r"query.*torch\.complex64"),
    "query-not-a-tensor": (lambda: (_q().tolist(), _t(), {}), TypeError, r"query must be a torch\.Tensor.*list"),
    "query-numpy": (lambda: (_q().numpy(), _t(), {}), TypeError,
                    r"query must be a torch\.Tensor.*a numpy\.ndarray of dtype float32 and shape \(4, 8\)$"),
    "negatives-not-a-tensor": (lambda: (_q(), _t(), dict(negatives=[[0.5] * D])), TypeError,
                               r"negatives must be a torch\.Tensor.*list"),
    "mixed-dtypes": (lambda: (_q(), _t(torch.bfloat16), {}), TypeError,
                     r"target has dtype torch\.bfloat16.*query has dtype torch\.float32"),
    "mixed-dtypes-fp16-fp32": (lambda: (_q(torch.float16), _t(), {}), TypeError,
                               r"target has dtype torch\.float32.*query has dtype torch\.float16"),
    "mixed-dtypes-negatives": (lambda: (_q(), _t(), dict(negatives=_neg(dtype=torch.float64))), TypeError,
                               r"negatives has dtype torch\.float64.*query has dtype torch\.float32"),
    "mixed-devices-target-meta": (lambda: (_q(), _t().to("meta"), {}), ValueError, r"target is on meta.*query.*cpu"),
    "mixed-devices-query-meta": (lambda: (_q().to("meta"), _t(), {}), ValueError, r"target is on cpu.*query.*meta"),
    "mixed-devices-negatives-meta": (lambda: (_q(), _t(), dict(negatives=_neg().to("meta"))), ValueError,
                                     r"negatives is on meta.*query.*cpu"),
    # ids
    "target-ids-too-long": (lambda: (_q(), _t(), dict(target_ids=torch.arange(B + 1))), ValueError,
                            r"target_ids.*4 entries.*got shape \(5,\)"),
    "target-ids-too-short": (lambda: (_q(), _t(), dict(target_ids=torch.arange(B - 1))), ValueError,
                             r"target_ids.*got shape \(3,\)"),
    "target-ids-B+M-without-negatives": (lambda: (_q(), _t(), dict(target_ids=torch.arange(B + M))), ValueError,
                                         r"target_ids.*got shape \(7,\)"),
    "target-ids-neither-B-nor-B+M": (lambda: (_q(), _t(), dict(negatives=_neg(), target_ids=torch.arange(B + 2))),
                                     ValueError, r"target_ids.*4 or 7.*got shape \(6,\)"),
    "target-ids-float": (lambda: (_q(), _t(), dict(target_ids=torch.arange(B, dtype=torch.float32))), TypeError,
                         r"target_ids.*integer.*torch\.float32"),
    "target-ids-bool": (lambda: (_q(), _t(), dict(target_ids=torch.ones(B, dtype=torch.bool))), TypeError,
                        r"target_ids.*torch\.bool"),
    "target-ids-2d": (lambda: (_q(), _t(), dict(target_ids=torch.arange(B).reshape(2, 2))), ValueError,
                      r"target_ids must be 1-D.*got shape \(2, 2\)"),
    "target-ids-column": (lambda: (_q(), _t(), dict(target_ids=torch.arange(B).reshape(B, 1))), ValueError,
                          r"target_ids must be 1-D.*got shape \(4, 1\)"),
    "target-ids-list": (lambda: (_q(), _t(), dict(target_ids=list(range(B)))), TypeError, r"target_ids.*list"),
    "target-ids-meta": (lambda: (_q(), _t(), dict(target_ids=torch.arange(B, device="meta"))), ValueError,
                        r"target_ids is on meta.*cpu"),
    "query-ids-wrong-length": (lambda: (_q(), _t(), dict(query_ids=torch.arange(B - 1))), ValueError,
                               r"query_ids.*4 entries.*got shape \(3,\)"),
    "query-ids-cover-negatives": (lambda: (_q(), _t(), dict(negatives=_neg(), query_ids=torch.arange(B + M))),
                                  ValueError, r"query_ids.*got shape \(7,\)"),
    "query-ids-float": (lambda: (_q(), _t(), dict(query_ids=torch.arange(B, dtype=torch.float64))), TypeError,
                        r"query_ids.*torch\.float64"),
    "query-ids-2d": (lambda: (_q(), _t(), dict(query_ids=torch.arange(2 * B).reshape(B, 2))), ValueError,
                     r"query_ids must be 1-D.*got shape \(4, 2\)"),
    # logit_scale
    "scale-nan": (lambda: (_q(), _t(), dict(logit_scale=float("nan"))), ValueError, r"logit_scale.*got nan"),
    "scale-inf": (lambda: (_q(), _t(), dict(logit_scale=float("inf"))), ValueError, r"logit_scale.*got inf"),
    "scale-zero": (lambda: (_q(), _t(), dict(logit_scale=0.0)), ValueError, r"logit_scale.*> 0.*got 0\.0"),
    "scale-negative": (lambda: (_q(), _t(), dict(logit_scale=-50.0)), ValueError, r"logit_scale.*got -50\.0"),
    "scale-int-zero": (lambda: (_q(), _t(), dict(logit_scale=0)), ValueError, r"logit_scale.*got 0"),
    "scale-tensor-nan": (lambda: (_q(), _t(), dict(logit_scale=torch.tensor(float("nan")))), ValueError,
                         r"logit_scale.*got nan"),
    "scale-tensor-negative": (lambda: (_q(), _t(), dict(logit_scale=torch.tensor(-3.0, requires_grad=True))),
                              ValueError, r"logit_scale.*got -3\.0"),
    "scale-tensor-shape-3": (lambda: (_q(), _t(), dict(logit_scale=torch.ones(3))), ValueError,
                             r"logit_scale.*shape \(3,\)"),
    "scale-tensor-shape-1x1": (lambda: (_q(), _t(), dict(logit_scale=torch.ones(1, 1))), ValueError,
                               r"logit_scale.*shape \(1, 1\)"),
    "scale-tensor-int": (lambda: (_q(), _t(), dict(logit_scale=torch.tensor(50))), TypeError,
                         r"logit_scale.*torch\.int64"),
    "scale-string": (lambda: (_q(), _t(), dict(logit_scale="50")), TypeError, r"logit_scale.*str '50'"),
    "scale-none": (lambda: (_q(), _t(), dict(logit_scale=None)), TypeError, r"logit_scale.*None"),
    "scale-bool": (lambda: (_q(), _t(), dict(logit_scale=True)), TypeError, r"logit_scale.*bool True"),
    # alpha
    "alpha-nan": (lambda: (_q(), _t(), dict(alpha=float("nan"))), ValueError, r"alpha.*got nan"),
    "alpha-inf-tensor": (lambda: (_q(), _t(), dict(alpha=torch.tensor(float("inf")))), ValueError, r"alpha.*got inf"),
    "alpha-string": (lambda: (_q(), _t(), dict(alpha="9")), TypeError, r"alpha.*str '9'"),
    "alpha-none": (lambda: (_q(), _t(), dict(alpha=None)), TypeError, r"alpha.*None"),
    "alpha-vector": (lambda: (_q(), _t(), dict(alpha=torch.ones(2))), ValueError, r"alpha.*shape \(2,\)"),
    "alpha-tensor-shape-1x1": (lambda: (_q(), _t(), dict(alpha=torch.ones(1, 1))), ValueError,
                               r"alpha.*shape \(1, 1\)"),
    "alpha-bool-tensor": (lambda: (_q(), _t(), dict(alpha=torch.tensor(True))), TypeError, r"alpha.*torch\.bool"),
    "alpha-complex-tensor": (lambda: (_q(), _t(), dict(alpha=torch.tensor(1 + 0j))), TypeError,
                             r"alpha.*torch\.complex64"),
    "alpha-meta-tensor": (lambda: (_q(), _t(), dict(alpha=torch.tensor(9.0, device="meta"))), ValueError,
                          r"alpha is a meta tensor"),
    "alpha-requires-grad": (lambda: (_q(), _t(), dict(alpha=torch.tensor(9.0, requires_grad=True))), ValueError,
                            r"alpha is a tensor that requires grad.*detached"),
    # options
    "reduction-avg": (lambda: (_q(), _t(), dict(reduction="avg")), ValueError, r"reduction.*got 'avg'"),
    "reduction-none-object": (lambda: (_q(), _t(), dict(reduction=None)), ValueError, r"reduction.*got None"),
    "reduction-mean-uppercase": (lambda: (_q(), _t(), dict(reduction="MEAN")), ValueError, r"reduction.*got 'MEAN'"),
    "symmetric-int": (lambda: (_q(), _t(), dict(symmetric=1)), TypeError, r"symmetric.*got 1"),
    "symmetric-string": (lambda: (_q(), _t(), dict(symmetric="yes")), TypeError, r"symmetric.*got 'yes'"),
    "distributed-string": (lambda: (_q(), _t(), dict(distributed="no")), TypeError, r"distributed.*got 'no'"),
}

@pytest.mark.parametrize("backend", ["auto", "torch", "triton", "reference"])
@pytest.mark.parametrize("case_id", list(BAD_INPUTS))
def test_bad_input_raises_naming_the_argument(case_id, backend):
    make, exc, pattern = BAD_INPUTS[case_id]
    q, t, kw = make()
    with pytest.raises(exc, match=pattern) as info:
        hardness_weighted_loss(q, t, backend=backend, **kw)
    assert isinstance(info.value, LlaveFastError), f"{type(info.value).__name__} is no LlaveFastError: {info.value}"


def test_learnable_logit_scale_on_another_device():
    """A learnable logit_scale on another device than the embeddings (meta here: no CUDA on the
    test machine) is a bad logit_scale; loss.py means to raise "logit_scale is on ... but the
    embeddings are on ..." for it, and must, whatever the device."""
    scale = torch.tensor(50.0, device="meta", requires_grad=True)
    with pytest.raises(ValueError, match=r"logit_scale.*meta"):
        hardness_weighted_loss(_q(), _t(), logit_scale=scale, backend="torch")


@pytest.mark.parametrize("backend", ["auto", "torch", "reference"])
def test_meta_scale_beside_meta_embeddings_traces_shapes(backend):
    """Meta embeddings with a meta learnable scale: shapes only, as the reference always allowed
    (the fused backends read the scale's number, which a meta tensor does not have)."""
    q, t = (torch.empty(5, D, device="meta", requires_grad=True) for _ in range(2))
    scale = torch.tensor(50.0, device="meta", requires_grad=True)
    loss = hardness_weighted_loss(q, t, logit_scale=scale, backend=backend)
    loss.backward()
    assert loss.device.type == "meta" and loss.shape == () and q.grad.shape == (5, D) and scale.grad.shape == ()


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_bad_backend_name(backend):
    with pytest.raises(ValueError, match=r"backend.*got 'cuda'"):
        hardness_weighted_loss(_q(), _t(), backend="cuda")
    with pytest.raises(ValueError, match=r"backend.*got None"):
        hardness_weighted_loss(_q(), _t(), backend=None)


@pytest.mark.parametrize("with_negatives", [False, True])
def test_triton_rejects_float64(with_negatives):
    kw = dict(negatives=_neg(dtype=torch.float64)) if with_negatives else {}
    with pytest.raises(TypeError, match=r"triton.*torch\.float64"):
        hardness_weighted_loss(_q(torch.float64), _t(torch.float64), backend="triton", **kw)


@pytest.mark.parametrize("triton_v, numpy_v, clash", [
    ("3.6.0", "2.4.6", True), ("3.5.1", "2.4.0", True), ("3.6.0+git1a2b", "2.4.0rc1", True),
    ("3.6.0", "2.3.5", False), ("3.7.1", "2.4.6", False), ("3.10.0", "2.5.2", False), ("4.0", "3.0", False),
    ("unknown", "2.4.6", False),  # a source build without a version: no claim
])
def test_interpreter_clash_names_both_versions_and_the_fix(triton_v, numpy_v, clash):
    """triton < 3.7 under numpy >= 2.4: the interpreter cannot run (seen with 3.5.1 and 3.6.0)."""
    from llave_fast.backends.triton_backend import interpreter_clash

    why = interpreter_clash(triton_v, numpy_v)
    assert bool(why) == clash, why
    if clash:
        assert f"triton {triton_v}" in why and f"numpy {numpy_v}" in why and "numpy<2.4 or triton>=3.7" in why


def test_triton_on_cpu_refuses_a_clashing_interpreter_in_one_line(monkeypatch):
    """backend='triton' on CPU tensors says why the interpreter cannot run, before any kernel is
    launched (otherwise every launch fails inside the interpreter with a numpy TypeError)."""
    import numpy
    import triton

    from llave_fast.errors import InvalidArgument

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    with pytest.raises(InvalidArgument, match=r"backend='triton' cannot run here: .*triton 3\.6\.0.*numpy 2\.4\.6"):
        hardness_weighted_loss(_q(), _t(), backend="triton")
    assert torch.isfinite(hardness_weighted_loss(_q(), _t(), backend="auto"))  # auto takes torch on CPU


@pytest.mark.parametrize("backend", ["torch", "reference", "auto"])
def test_float64_is_accepted_by_torch_and_reference(backend):
    out = hardness_weighted_loss(_q(torch.float64), _t(torch.float64), backend=backend)
    assert out.dtype == torch.float64 and torch.isfinite(out), out


# ------------------------------------------------------------------ the module
MODULE_BAD = {
    "reduction": (dict(reduction="avg"), ValueError, r"reduction.*got 'avg'"),
    "backend": (dict(backend="xla"), ValueError, r"backend.*got 'xla'"),
    "scale-zero": (dict(logit_scale=0.0), ValueError, r"logit_scale.*got 0\.0"),
    "scale-shape": (dict(logit_scale=torch.ones(3)), ValueError, r"logit_scale.*shape \(3,\)"),
    "alpha-nan": (dict(alpha=float("nan")), ValueError, r"alpha.*got nan"),
    "local-loss-int": (dict(local_loss=1), TypeError, r"local_loss.*got 1"),
    "distributed-string": (dict(distributed="yes"), TypeError, r"distributed.*got 'yes'"),
    "deterministic-int": (dict(deterministic=0), TypeError, r"deterministic.*got 0"),
    "unknown-keyword": (dict(cache_label=True), TypeError, r"unexpected keyword.*cache_label\b.*WeightedClipLoss"),
}

# LLaVE's constructor keywords: WeightedClipLoss (llave_compat) checks them, and FusedHardnessLoss
# (which still takes them, deprecated) with the same messages
LLAVE_BAD = {
    "world-size-zero": (dict(world_size=0), ValueError, r"world_size.*got 0"),
    "world-size-float": (dict(world_size=2.0), TypeError, r"world_size must be an int.*2\.0"),
    "rank-out-of-range": (dict(rank=1), ValueError, r"rank.*got 1"),
    "rank-negative": (dict(rank=-1), ValueError, r"rank.*got -1"),
    "horovod": (dict(use_horovod=True), ValueError, r"use_horovod"),
    "cache-labels-not-bool": (dict(cache_labels="yes"), TypeError, r"cache_labels must be a bool.*'yes'"),
    "gather-with-grad-not-bool": (dict(gather_with_grad=1), TypeError, r"gather_with_grad must be a bool.*1"),
    "no-grad-through-gather": (dict(world_size=2, rank=1, local_loss=True), ValueError,
                               r"gather_with_grad=True.*got local_loss=True, gather_with_grad=False"),
}


@pytest.mark.parametrize("case_id", list(MODULE_BAD))
def test_module_constructor_rejects(case_id):
    kw, exc, pattern = MODULE_BAD[case_id]
    with pytest.raises(exc, match=pattern):
        FusedHardnessLoss(**kw)


@pytest.mark.parametrize("case_id", list(LLAVE_BAD))
def test_llave_keywords_are_checked(case_id):
    kw, exc, pattern = LLAVE_BAD[case_id]
    with pytest.raises(exc, match=pattern):
        WeightedClipLoss(**kw)
    with pytest.warns(DeprecationWarning, match=r"WeightedClipLoss"), pytest.raises(exc, match=pattern):
        FusedHardnessLoss(**kw)


def test_module_llave_positional_flag_is_caught():
    """LLaVE's WeightedClipLoss(local_loss, ...) positionally would land in logit_scale."""
    with pytest.raises(TypeError, match=r"logit_scale.*bool False.*keyword.*llave_compat"):
        FusedHardnessLoss(False)


@pytest.mark.parametrize("kw,exc,pattern", [
    (dict(logit_scale=-1.0), ValueError, r"logit_scale.*got -1\.0"),
    (dict(alpha="x"), TypeError, r"alpha.*str 'x'"),
    (dict(target_ids=torch.arange(B + 1)), ValueError, r"target_ids.*got shape \(5,\)"),
], ids=["scale", "alpha", "ids"])
def test_module_forward_rejects(kw, exc, pattern):
    with pytest.raises(exc, match=pattern):
        FusedHardnessLoss()(_q(), _t(), **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_every_backend_returns_the_same_loss_dtype(dtype, reduction):
    """float32 for 16/32-bit inputs whatever the backend (the reference computes in the input
    precision, as LLaVE does, and returned bf16 before)."""
    q, t = _q(dtype).requires_grad_(), _t(dtype).requires_grad_()
    got = {b: hardness_weighted_loss(q, t, backend=b, reduction=reduction).dtype for b in ("reference", "torch")}
    assert got == {"reference": torch.float32, "torch": torch.float32}, got
    loss = hardness_weighted_loss(q, t, backend="reference", reduction=reduction)
    loss.sum().backward()
    assert q.grad.dtype == dtype and torch.isfinite(q.grad.float()).all()


def test_alpha_tensor_without_grad_is_accepted():
    q, t = _q(), _t()
    a = hardness_weighted_loss(q, t, alpha=torch.tensor(9.0), backend="torch")
    b = hardness_weighted_loss(q, t, alpha=9.0, backend="torch")
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_double_backward_is_refused_by_the_fused_backends(backend):
    """backward(create_graph=True) through a fused backend (a gradient penalty) must not silently drop
    the second-order term: it raises, naming the way out; the reference backend differentiates twice."""
    q = torch.nn.functional.normalize(_q(), dim=1).requires_grad_()
    t = torch.nn.functional.normalize(_t(), dim=1).requires_grad_()
    loss = hardness_weighted_loss(q, t, backend=backend)
    with pytest.raises(RuntimeError, match=r"cannot be differentiated again.*backend='reference'") as caught:
        torch.autograd.grad(loss, q, create_graph=True)
    # a typed error (the command line's one-line report, ``except LlaveFastError``), still a RuntimeError
    assert isinstance(caught.value, LlaveFastError), type(caught.value)
    # a plain backward of the same loss still works
    (gq,) = torch.autograd.grad(hardness_weighted_loss(q, t, backend=backend), q)
    assert torch.isfinite(gq).all()
    # the reference: a gradient penalty has a gradient, and it is the one the fused backend would drop
    (gq,) = torch.autograd.grad(hardness_weighted_loss(q, t, backend="reference"), q, create_graph=True)
    (gt,) = torch.autograd.grad(gq.square().sum(), t)
    assert torch.isfinite(gt).all() and gt.abs().sum() > 0
