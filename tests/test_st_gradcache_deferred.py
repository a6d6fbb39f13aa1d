"""GradCache's deferred backward (``defer_backward=True``), the mode the sentence-transformers
integration uses: the call returns a loss whose backward (a trainer's) runs the cached re-encode.

Gradients equal the default mode's (cached path and single pass, dropout replayed, with hard
negatives), are scaled by the loss's upstream gradient, nothing reaches the parameters before
the backward, evaluation under no_grad only encodes, and under DDP one deferred step equals a
plain DDP step. Needs no sentence-transformers.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from llave_fast import FusedHardnessLoss, GradCache
from llave_fast.testing import spawn_ranks

import _gc_workers as W


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _step(model, loss_fn, chunk, q, t, neg, deferred, scale=1.0, **kw):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    calls = []
    hook = model.register_forward_hook(lambda m, i, o: calls.append(torch.is_grad_enabled()))
    try:
        loss = GradCache(model, loss_fn, chunk, defer_backward=deferred, **kw)(q, t, neg)
        after_call = list(calls)
        rng = torch.rand(3)
        if deferred:
            assert loss.requires_grad and not any(p.grad is not None for p in model.parameters())
            (scale * loss).backward()
        else:
            assert not loss.requires_grad
    finally:
        hook.remove()
    return loss.detach(), _grads(model), after_call, calls, rng


@pytest.mark.parametrize("chunk", [4, 100], ids=["cached", "single-pass"])
@pytest.mark.parametrize("with_negatives", [False, True])
def test_deferred_equals_the_default_mode(chunk, with_negatives):
    torch.manual_seed(0)
    model = W.Encoder(p_drop=0.3)
    q, t = W.make_batch(9, seed=4)
    neg = W.make_batch(5, seed=5)[0] if with_negatives else None
    loss_fn = FusedHardnessLoss(backend="torch")
    l0, g0, _, calls0, rng0 = _step(model, loss_fn, chunk, q, t, neg, deferred=False)
    l1, g1, first, calls1, rng1 = _step(model, loss_fn, chunk, q, t, neg, deferred=True)
    assert abs(l0.item() - l1.item()) < 1e-6
    assert g0.keys() == g1.keys() and len(g0) == 4
    for k in g0:
        assert ((g1[k] - g0[k]).norm() / g0[k].norm()).item() < 2e-5, k
    assert torch.equal(rng0, rng1), "the RNG continues as after one full-batch forward, in both modes"
    assert calls1 == calls0  # the same encoder calls, in the same order
    if chunk == 4:
        assert first == [False] * len(first) and calls1[len(first):] == [True] * len(first)  # re-encode in backward
    else:
        assert first == calls1 == [True] * (3 if with_negatives else 2)  # single pass: one forward per side


@pytest.mark.parametrize("chunk", [3, 100])
def test_deferred_gradients_scale_with_the_upstream_gradient(chunk):
    torch.manual_seed(0)
    model = W.Encoder()
    q, t = W.make_batch(7, seed=8)
    loss_fn = FusedHardnessLoss(backend="torch")
    _, g1, *_ = _step(model, loss_fn, chunk, q, t, None, deferred=True)
    _, g_half, *_ = _step(model, loss_fn, chunk, q, t, None, deferred=True, scale=0.5)
    for k in g1:
        torch.testing.assert_close(g_half[k], 0.5 * g1[k], rtol=1e-6, atol=1e-8)


def test_deferred_under_no_grad_only_encodes():
    torch.manual_seed(0)
    model = W.Encoder()
    q, t = W.make_batch(7, seed=8)
    loss_fn = FusedHardnessLoss(backend="torch")
    want = GradCache(model, loss_fn, 3)(q, t)
    model.zero_grad(set_to_none=True)
    for chunk in (3, 100):
        with torch.no_grad():
            got = GradCache(model, loss_fn, chunk, defer_backward=True)(q, t)
        assert not got.requires_grad and abs(got.item() - want.item()) < 1e-5 * abs(want.item())
    assert all(p.grad is None for p in model.parameters())


def test_custom_split_with_count_and_several_chunks_per_side_on_the_single_pass():
    """A custom split that yields one chunk per column of hard negatives (as the
    sentence-transformers integration's does) and a count for its chunks."""
    torch.manual_seed(0)
    model = W.Encoder()
    q, t = W.make_batch(4, seed=1)
    neg_cols = [W.make_batch(4, seed=s)[0] for s in (2, 3)]
    boxed = lambda x: {"x": x}  # noqa: E731

    def split(inputs, size):
        if isinstance(inputs, list):
            return [boxed(c) for c in inputs]
        return [boxed(inputs[i:i + size]) for i in range(0, inputs.shape[0], size)]

    encoder = lambda chunk: model(chunk["x"])  # noqa: E731
    loss_fn = FusedHardnessLoss(backend="torch")
    model.zero_grad(set_to_none=True)
    want = loss_fn(model(q), model(t), negatives=model(torch.cat(neg_cols)))
    want.backward()
    g_want = _grads(model)
    for chunk in (2, 16):  # cached; single pass with two negative chunks
        model.zero_grad(set_to_none=True)
        gc = GradCache(encoder, loss_fn, chunk, split=split, count=lambda c: c["x"].shape[0], defer_backward=True)
        got = gc(q, t, neg_cols)
        got.backward()
        assert abs(got.item() - want.item()) < 1e-6
        for k, g in _grads(model).items():
            assert ((g - g_want[k]).norm() / g_want[k].norm()).item() < 2e-5, k
    with pytest.raises(ValueError, match=r"count must return a sample count .* got 'x'"):
        GradCache(encoder, loss_fn, 2, split=split, count=lambda c: "x")(q, t)


def test_deferred_refusals():
    class FakeEngine(nn.Module):  # what GradCache takes for a DeepSpeed engine
        module = None

        def backward(self, loss, **kw):
            pass

        def step(self):
            pass

        def zero_optimization_stage(self):
            return 3

        def gradient_accumulation_steps(self):
            return 1

    with pytest.raises(ValueError, match=r"defer_backward=True .* DeepSpeed engine .*got encoder FakeEngine"):
        GradCache(FakeEngine(), FusedHardnessLoss(), 4, defer_backward=True)
    with pytest.raises(TypeError, match=r"defer_backward must be True or False, got 'yes'"):
        GradCache(W.Encoder(), FusedHardnessLoss(), 4, defer_backward="yes")
    with pytest.raises(TypeError, match=r"count must be a callable .* got int"):
        GradCache(W.Encoder(), FusedHardnessLoss(), 4, count=3)


def deferred_ddp_rank(rank, world):
    """Under DDP: a deferred GradCache step (re-encode in loss.backward(), no_sync on all chunks but
    the last) reduces the same gradients as a plain DDP step."""
    torch.manual_seed(0)
    base = W.Encoder()
    q_all, t_all = W.make_batch(6 * world, seed=1)
    q, t = q_all[6 * rank: 6 * rank + 6], t_all[6 * rank: 6 * rank + 6]
    loss_fn = FusedHardnessLoss(local_loss=True, distributed=True, backend="torch")
    out = []
    for deferred in (False, True):
        model = nn.parallel.DistributedDataParallel(copy.deepcopy(base))
        if deferred:
            loss = GradCache(model, loss_fn, 4, defer_backward=True)(q, t)
            loss.backward()
        else:
            loss = loss_fn(model(q), model(t))
            loss.backward()
        out.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    (l0, g0), (l1, g1) = out
    assert abs(l0 - l1) < 1e-5, (rank, l0, l1)
    for a, b in zip(g0, g1):
        assert ((b - a).norm() / a.norm()).item() < 2e-5


@pytest.mark.slow
def test_deferred_under_ddp():
    import test_st_gradcache_deferred as this

    spawn_ranks(this.deferred_ddp_rank, 2)
