"""Shared pieces of the GradCache tests (module level so spawned ranks can import them)."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from llave_fast import FusedHardnessLoss, GradCache


class Encoder(nn.Module):
    """A small embedder; dict inputs carry a list of per-sample tile tensors of any count."""

    def __init__(self, d_in=12, d=16, p_drop=0.0, tiles=False):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, 32), nn.GELU(), nn.Dropout(p_drop), nn.Linear(32, d))
        self.tile = nn.Linear(d_in, d_in) if tiles else None

    def forward(self, x):
        if isinstance(x, dict):
            pooled = torch.stack([self.tile(t).mean(0) for t in x["tiles"]])
            x = x["x"] + pooled
        return F.normalize(self.net(x), dim=-1)


class OtherDeviceTensor(torch.Tensor):
    """A CPU tensor that says it lives on an accelerator whose generator GradCache cannot replay."""

    @property
    def device(self):
        return torch.device("hpu")


class Unwrapping(nn.Module):
    """The encoder reading such a tensor as the CPU tensor it is (its embeddings are plain CPU tensors)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.as_subclass(torch.Tensor))


def make_batch(n, d_in=12, seed=0, tiles=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d_in, generator=g)
    t = q + 0.5 * torch.randn(n, d_in, generator=g)
    if tiles:
        counts = torch.randint(1, 5, (n,), generator=g).tolist()
        q = {"x": q, "tiles": [torch.randn(c, d_in, generator=g) for c in counts], "note": "kept"}
    return q, t


def full_batch_grads(model, loss_fn, q, t):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model(q), model(t))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def gradcache_grads(model, loss_fn, q, t, chunk):
    model.zero_grad(set_to_none=True)
    loss = GradCache(model, loss_fn, chunk)(q, t)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def ddp_rank(rank, world, chunk):
    """Under DDP: GradCache's reduced gradients and one SGD step equal a plain DDP step's."""
    torch.manual_seed(0)
    base = Encoder()
    n_local = 5 + rank  # unequal batches
    q_all, t_all = make_batch(5 * world + sum(range(world)), seed=1)
    lo = sum(5 + r for r in range(rank))
    q, t = q_all[lo : lo + n_local], t_all[lo : lo + n_local]
    loss_fn = FusedHardnessLoss(local_loss=True, distributed=world > 1, backend="torch")
    results = []
    for use_gc in (False, True):
        model = nn.parallel.DistributedDataParallel(copy.deepcopy(base))
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        if use_gc:
            loss = GradCache(model, loss_fn, chunk)(q, t)
        else:
            loss = loss_fn(model(q), model(t))
            loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        assert len(grads) == 4, "net.0 and net.3 weights and biases get gradients"
        opt.step()
        results.append((loss.item(), grads, [p.detach().clone() for p in model.parameters()]))
    (l0, g0, p0), (l1, g1, p1) = results
    assert abs(l0 - l1) < 1e-5, f"rank {rank}: loss {l0} vs gradcache {l1}"
    for a, b in zip(g0, g1):
        err = ((b - a).norm() / a.norm()).item()
        assert err < 2e-5, f"rank {rank}: gradcache gradient relative error {err:.2e}"
    for a, b in zip(p0, p1):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    # and the reduced gradients are the same on every rank
    flat = torch.cat([g.flatten() for g in g1])
    other = flat.clone()
    dist.broadcast(other, 0)
    torch.testing.assert_close(flat, other, rtol=0, atol=0)


def empty_rank(rank, world):
    """Rank 1 has no pairs: every rank raises the same InvalidArgument, naming whose batch is empty."""
    import pytest

    from llave_fast.errors import InvalidArgument

    torch.manual_seed(0)
    q, t = make_batch(0 if rank == 1 else 4, seed=rank)
    loss_fn = FusedHardnessLoss(local_loss=True, distributed=True, backend="torch")
    who = "this rank" if rank == 1 else "another rank"
    with pytest.raises(InvalidArgument, match=f"GradCache: {who} has an empty batch"):
        GradCache(Encoder(), loss_fn, 2)(q, t)
    dist.barrier()  # every rank got here: none is left in a collective


def unreplayable_rank(rank, world):
    """Rank 1's inputs lie on a device whose generator GradCache cannot replay, dropout active: every rank
    raises, rank 1 naming the device; rank 1 alone used to, leaving the others in the loss's gather (a short
    group timeout makes that a failure in seconds, not gloo's half hour)."""
    import datetime

    import pytest

    from llave_fast.errors import InvalidArgument

    group = dist.new_group(timeout=datetime.timedelta(seconds=20))
    torch.manual_seed(0)
    model = Unwrapping(Encoder(p_drop=0.3)).train()
    q, t = make_batch(6, seed=rank)
    if rank == 1:
        q = q.as_subclass(OtherDeviceTensor)
    loss_fn = FusedHardnessLoss(local_loss=True, distributed=True, backend="torch", process_group=group)
    said = r"device hpu .*net\.2" if rank == 1 else r"GradCache: another rank cannot replay the random number"
    with pytest.raises(InvalidArgument, match=said):
        GradCache(model, loss_fn, 4)(q, t)
    dist.barrier(group)  # every rank got here: none is left in a collective


def deepspeed_rank(rank, world, stage, chunk, sizes=None, expect_calls=None):
    """Under a DeepSpeed engine: one GradCache step equals one full-batch engine step.

    ``sizes``: per-rank batch sizes (default 5 + rank); with sizes whose chunk counts differ
    (5 and 7 at chunk 2: 3 and 4 chunks) GradCache must equalise its encoder calls, or
    ZeRO-3's parameter gathers mismatch across ranks. ``expect_calls``: the encoder calls the
    GradCache step must make on every rank (checked when given)."""
    import os

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    base = Encoder()
    sizes = sizes or [5 + r for r in range(world)]
    n_local = sizes[rank]
    q_all, t_all = make_batch(sum(sizes), seed=2)
    lo = sum(sizes[:rank])
    q, t = q_all[lo : lo + n_local], t_all[lo : lo + n_local]
    loss_fn = FusedHardnessLoss(local_loss=True, distributed=world > 1, backend="torch")
    config = {
        "train_micro_batch_size_per_gpu": n_local,
        "gradient_accumulation_steps": 1,
        # threshold 0: even these tiny parameters are partitioned under ZeRO-3 (by default
        # parameters under 1e5 elements persist whole and are never gathered), so every
        # forward gathers, as with a real model
        "zero_optimization": {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})},
        "zero_allow_untested_optimizer": True,
    }
    params_after = []
    losses = []
    for use_gc in (False, True):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
        if use_gc:
            calls = []
            hook = engine.module.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
            loss = GradCache(engine, loss_fn, chunk)(q, t)
            hook.remove()
            if expect_calls is not None:
                assert len(calls) == expect_calls, f"rank {rank}: {len(calls)} encoder calls {calls}, want {expect_calls}"
        else:
            loss = loss_fn(engine(q), engine(t))
            engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            params_after.append([p.detach().clone() for p in engine.module.parameters()])
    assert abs(losses[0] - losses[1]) < 1e-5, f"rank {rank}: loss {losses}"
    moved = 0.0
    for a, b, p0 in zip(params_after[0], params_after[1], base.parameters()):
        moved = max(moved, (a - p0).abs().max().item())
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert moved > 1e-3, "the optimizer step must change the parameters"


def separate_encoders_rank(rank, world):
    """Separate DDP query and target encoders: both get reduced gradients equal to a plain step's."""
    torch.manual_seed(0)
    qe0, te0 = Encoder(), Encoder()
    q_all, t_all = make_batch(6 * world, seed=4)
    q, t = q_all[rank * 6 : (rank + 1) * 6], t_all[rank * 6 : (rank + 1) * 6]
    loss_fn = FusedHardnessLoss(local_loss=True, distributed=world > 1, backend="torch")
    grads = []
    for use_gc in (False, True):
        qe = nn.parallel.DistributedDataParallel(copy.deepcopy(qe0))
        te = nn.parallel.DistributedDataParallel(copy.deepcopy(te0))
        if use_gc:
            GradCache(qe, loss_fn, 2, target_encoder=te)(q, t)
        else:
            loss_fn(qe(q), te(t)).backward()
        grads.append([p.grad.clone() for m in (qe, te) for p in m.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) == 8
    for a, b in zip(*grads):
        err = ((b - a).norm() / a.norm()).item()
        assert err < 2e-5, f"rank {rank}: gradient relative error {err:.2e}"
        other = b.clone()
        dist.broadcast(other, 0)
        assert torch.equal(other, b), f"rank {rank}: gradients differ across ranks"
