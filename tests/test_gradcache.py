"""GradCache: parameter gradients equal a full-batch step, plain and under DDP; dropout replays
bitwise; activation memory stays flat as the batch grows with a fixed chunk size."""

import copy
import re

import pytest
import torch

from llave_fast import FusedHardnessLoss, GradCache
from llave_fast.gradcache import split_batch
from llave_fast.testing import spawn_ranks

import _gc_workers as W


def _assert_rel(got, want, name, tol=2e-5):
    err = ((got - want).norm() / want.norm()).item()
    assert err < tol, f"{name}: relative error {err:.2e} (fp32 tolerance {tol:.0e})"


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("n,chunk", [(12, 5), (7, 7), (9, 1), (7, 14), (5, 13)])  # the last two: single pass
def test_gradients_equal_full_batch(backend, n, chunk):
    torch.manual_seed(0)
    model = W.Encoder()
    loss_fn = FusedHardnessLoss(backend=backend)
    q, t = W.make_batch(n, seed=n)
    l_full, g_full = W.full_batch_grads(model, FusedHardnessLoss(backend="reference"), q, t)
    l_gc, g_gc = W.gradcache_grads(model, loss_fn, q, t, chunk)
    assert not l_gc.requires_grad
    assert abs(l_full.item() - l_gc.item()) < 1e-5
    assert g_full.keys() == g_gc.keys() and len(g_full) == 4  # net.0, net.3 weights and biases
    for k in g_full:
        _assert_rel(g_gc[k], g_full[k], k)


def test_variable_tile_counts_split_and_match():
    torch.manual_seed(0)
    model = W.Encoder(tiles=True)
    q, t = W.make_batch(10, seed=3, tiles=True)
    chunks = split_batch(q, 4)
    assert [len(c["tiles"]) for c in chunks] == [4, 4, 2]
    assert all(c["note"] == "kept" for c in chunks)
    loss_fn = FusedHardnessLoss(backend="torch")
    _, g_full = W.full_batch_grads(model, loss_fn, q, t)
    _, g_gc = W.gradcache_grads(model, loss_fn, q, t, 4)
    assert "tile.weight" in g_gc
    for k in g_full:
        _assert_rel(g_gc[k], g_full[k], k)


def test_optimizer_step_equals_full_batch_step():
    torch.manual_seed(0)
    a = W.Encoder()
    b = copy.deepcopy(a)
    q, t = W.make_batch(16, seed=5)
    loss_fn = FusedHardnessLoss(backend="torch")
    for model, use_gc in ((a, False), (b, True)):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        if use_gc:
            GradCache(model, loss_fn, 3)(q, t)
        else:
            loss_fn(model(q), model(t)).backward()
        opt.step()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-7, msg=lambda m: f"{n}: {m}")


def test_dropout_replays_bitwise():
    torch.manual_seed(0)
    model = W.Encoder(p_drop=0.5).train()
    seen = {True: [], False: []}

    def enc(x):
        out = model(x)
        seen[torch.is_grad_enabled()].append(out.detach().clone())
        return out

    q, t = W.make_batch(10, seed=7)
    GradCache(enc, FusedHardnessLoss(backend="torch"), 4)(q, t)
    assert len(seen[False]) == len(seen[True]) == 6
    for a, b in zip(seen[False], seen[True]):
        assert torch.equal(a, b)
    # the chunks really differ from a dropout-free pass, so the check above has teeth
    model.eval()
    assert not torch.equal(model(q[:4]), seen[False][0])


class _FakeDeviceRng:
    """An accelerator's generator on the CPU: a torch.Generator behind the get/set hooks GradCache calls
    (``torch.mps.get_rng_state``, ``torch.xpu.get_rng_state_all``, ...), patched in by the test."""

    def __init__(self, monkeypatch, device: str):
        self.gen = torch.Generator().manual_seed(11)
        mod = getattr(torch, device)
        if device == "mps":
            monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
            monkeypatch.setattr(mod, "get_rng_state", lambda device="mps": self.gen.get_state())
            monkeypatch.setattr(mod, "set_rng_state", lambda state, device="mps": self.gen.set_state(state))
        else:
            monkeypatch.setattr(mod, "is_available", lambda: True)
            monkeypatch.setattr(mod, "is_initialized", lambda: True)
            monkeypatch.setattr(mod, "get_rng_state_all", lambda: [self.gen.get_state()])
            monkeypatch.setattr(mod, "set_rng_state_all", lambda states: self.gen.set_state(states[0]))


@pytest.mark.parametrize("device", ["mps", "xpu"])
def test_dropout_drawn_on_an_accelerator_replays(monkeypatch, device):
    """Dropout whose masks come from the accelerator's generator (MPS, XPU; faked on the CPU): the
    re-encode draws the first pass's masks, and the generator ends as after one full-batch forward."""
    rng = _FakeDeviceRng(monkeypatch, device)
    torch.manual_seed(0)
    model = W.Encoder()
    seen = {True: [], False: []}

    def enc(x):
        keep = (torch.rand(x.shape, generator=rng.gen) > 0.5).to(x.dtype)  # the device's dropout mask
        out = model(x * keep * 2)
        seen[torch.is_grad_enabled()].append(out.detach().clone())
        return out

    q, t = W.make_batch(10, seed=7)
    GradCache(enc, FusedHardnessLoss(backend="torch"), 4)(q, t)
    after_step = torch.rand(4, generator=rng.gen)
    assert len(seen[False]) == len(seen[True]) == 6
    for k, (a, b) in enumerate(zip(seen[False], seen[True])):
        assert torch.equal(a, b), f"chunk {k}: the re-encode drew other {device} dropout masks than the first pass"
    rng.gen.manual_seed(11)
    for x in (q[:4], q[4:8], q[8:], t[:4], t[4:8], t[8:]):  # the first pass's draws, in order
        torch.rand(x.shape, generator=rng.gen)
    assert torch.equal(after_step, torch.rand(4, generator=rng.gen))


_OtherDeviceTensor, _Unwrapping = W.OtherDeviceTensor, W.Unwrapping  # shared with the ranks' workers


@pytest.mark.parametrize("p_drop,mode", [(0.3, "train"), (0.0, "train"), (0.3, "eval")])
def test_inputs_on_a_device_whose_rng_cannot_be_replayed(p_drop, mode):
    """Dropout active there: refused, naming the device and the layer (its masks would differ between the
    passes, the gradients silently wrong); no dropout layer in training mode: a warning; eval: nothing."""
    import warnings

    from llave_fast.errors import LlaveFastError

    torch.manual_seed(0)
    model = _Unwrapping(W.Encoder(p_drop=p_drop)).train(mode == "train")
    q, t = W.make_batch(6, seed=2)
    q = q.as_subclass(_OtherDeviceTensor)
    gc = GradCache(model, FusedHardnessLoss(backend="torch"), 4)
    if p_drop and mode == "train":
        with pytest.raises(LlaveFastError, match=r"device hpu .*net\.2"):
            gc(q, t)
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc(q, t)
    said = [str(w.message) for w in caught if "cannot replay" in str(w.message)]
    assert len(said) == (1 if mode == "train" else 0), said
    assert all("device hpu" in m for m in said)


def test_bad_inputs():
    model = W.Encoder()
    with pytest.raises(ValueError, match="chunk_size"):
        GradCache(model, FusedHardnessLoss(), 0)
    q, t = W.make_batch(6)
    with pytest.raises(ValueError, match="6 samples but target_inputs has 5"):
        GradCache(model, FusedHardnessLoss(), 2)(q, t[:5])
    with pytest.raises(ValueError, match="different lengths"):
        split_batch({"a": torch.zeros(3, 2), "b": torch.zeros(4, 2)}, 2)


class _SavedBytes:
    """Peak bytes of tensors saved for backward (the activation memory) while active."""

    def __init__(self):
        self.live = 0
        self.peak = 0

    def pack(self, x):
        n = x.numel() * x.element_size()
        self.live += n
        self.peak = max(self.peak, self.live)
        return _Token(self, x, n)

    @staticmethod
    def unpack(tok):
        return tok.x


class _Token:
    def __init__(self, meter, x, n):
        self.meter, self.x, self.n = meter, x, n

    def __del__(self):
        self.meter.live -= self.n


def _peak_saved(batch, use_gc, chunk=8):
    torch.manual_seed(0)
    model = W.Encoder(d_in=64, d=32)
    q, t = W.make_batch(batch, d_in=64, seed=batch)
    meter = _SavedBytes()
    loss_fn = FusedHardnessLoss(backend="torch")
    # the loss's own memory (its kept fp32 S: B x N on the S-cache path) is not the encoder's
    # activations: it is measured in test_loss_memory.py; here the loss keeps no S
    from llave_fast.backends.triton_backend import kernel_config

    with kernel_config(S_MODE="fused"), torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        if use_gc:
            GradCache(model, loss_fn, chunk)(q, t)
        else:
            loss_fn(model(q), model(t)).backward()
    return meter.peak


def test_activation_memory_flat_with_batch():
    small, big = _peak_saved(16, True), _peak_saved(128, True)
    plain_small, plain_big = _peak_saved(16, False), _peak_saved(128, False)
    print(f"saved-activation peak: gradcache {small} B -> {big} B, plain {plain_small} B -> {plain_big} B")
    # the encoder's activations are one chunk's; only the loss's O(B*d) inputs grow
    assert plain_big >= 6 * plain_small
    assert big <= 1.5 * small + 128 * 32 * 4 * 2


@pytest.mark.slow
def test_an_empty_rank_stops_every_rank_with_one_message():
    """A rank with no pairs while others have chunks: every rank raises (the empty one alone used to, which
    left the others in their encoders' and the loss's collectives: gloo aborts, NCCL waits for its timeout)."""
    spawn_ranks(W.empty_rank, 3)


@pytest.mark.slow
def test_a_rank_that_cannot_replay_its_dropout_stops_every_rank():
    """The refusal of a re-encode whose dropout cannot be replayed (inputs on a device GradCache does not record)
    was raised by that rank alone, after the ranks had agreed to take the cached path: the others went on into
    their encoders' and the loss's collectives and waited there (gloo aborts, NCCL waits for its timeout)."""
    spawn_ranks(W.unreplayable_rank, 2)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.slow
def test_ddp_gradients_and_step_equal_plain_ddp(world):
    spawn_ranks(W.ddp_rank, world, 3)


@pytest.mark.parametrize("stage", [3, 2, 0])
@pytest.mark.slow
def test_deepspeed_step_equals_full_batch_step(stage):
    """ZeRO-3 (and 2, and no ZeRO) with 2 gloo ranks: chunks reduced once, one optimizer step."""
    pytest.importorskip("deepspeed")
    spawn_ranks(W.deepspeed_rank, 2, stage, 3)


@pytest.mark.parametrize("stage,chunk,calls", [(3, 12, 4), (3, 14, 2), (2, 14, 2), (0, 14, 2)])
@pytest.mark.slow
def test_deepspeed_single_pass_only_when_every_rank_fits(stage, chunk, calls):
    """Per-rank batches of 5 and 7 pairs: at chunk 12 rank 0's 10 samples fit one chunk but rank
    1's 14 do not, so both ranks take the cached path (2 x (1 + 1) calls each; a single pass on
    rank 0 alone would leave rank 1 in a collective rank 0 never joins); at chunk 14 both take
    the single pass (2 calls). Either way the step equals the full-batch step; the single pass
    also under ZeRO-2 and without ZeRO (one reduction at the accumulation boundary)."""
    pytest.importorskip("deepspeed")
    spawn_ranks(W.deepspeed_rank, 2, stage, chunk, [5, 7], calls)


@pytest.mark.slow
def test_zero3_uneven_batches_make_equal_encoder_calls():
    """Per-rank batches of 5 and 7 at chunk 2 (3 and 4 chunks): under ZeRO-3 every forward
    gathers parameters, so the ranks must make the same number of encoder calls (without the
    padding calls gloo aborts with a collective mismatch); the step equals the full-batch one."""
    pytest.importorskip("deepspeed")
    spawn_ranks(W.deepspeed_rank, 2, 3, 2, [5, 7])


def test_padding_calls_add_nothing_and_keep_the_rng(monkeypatch):
    """One process standing in for the smaller rank: forced chunk counts (as agreed with a
    larger rank) add encoder calls whose gradients are zero, and the RNG after the step is
    the same as without them."""
    torch.manual_seed(0)
    model = W.Encoder(p_drop=0.2)
    q, t = W.make_batch(5, seed=3)
    loss_fn = FusedHardnessLoss(backend="torch")
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))

    def run(pad):
        model.zero_grad(set_to_none=True)
        calls.clear()
        gc = GradCache(model, loss_fn, 2)
        if pad:
            monkeypatch.setattr(gc, "_chunk_targets", lambda counts, fits, empty: (
                [counts[0] + 1, counts[1] + 1, counts[2] + 2], False, empty))
        torch.manual_seed(7)
        loss = gc(q, t)
        rng = torch.rand(3)
        return loss, [p.grad.clone() for p in model.parameters()], list(calls), rng

    l0, g0, c0, r0 = run(False)
    l1, g1, c1, r1 = run(True)
    assert len(c0) == 2 * (3 + 3) and len(c1) == 2 * (4 + 4 + 2), (c0, c1)
    assert torch.equal(l0, l1) and torch.equal(r0, r1)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-7)


def test_hard_negatives_are_encoded_and_match_full_batch():
    torch.manual_seed(0)
    model = W.Encoder()
    q, t = W.make_batch(9, seed=11)
    neg, _ = W.make_batch(5, seed=12)
    loss_fn = FusedHardnessLoss(backend="torch")
    model.zero_grad()
    full = loss_fn(model(q), model(t), negatives=model(neg))
    full.backward()
    g_full = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    loss = GradCache(model, loss_fn, 4)(q, t, neg)
    assert abs(loss.item() - full.item()) < 1e-5
    no_neg = loss_fn(model(q), model(t)).item()
    assert abs(no_neg - full.item()) > 1e-3, "negatives must change the loss"
    for k in g_full:
        _assert_rel(model.get_parameter(k).grad, g_full[k], k)


@pytest.mark.slow
def test_separate_query_and_target_encoders_under_ddp():
    spawn_ranks(W.separate_encoders_rank, 2)


@pytest.mark.parametrize("with_negatives", [False, True])
def test_single_pass_equals_the_cached_path(with_negatives):
    """A batch that fits one chunk: one forward per side instead of two, and the same loss,
    gradients (dropout on: the masks are those the cached path replays) and RNG afterwards."""
    torch.manual_seed(0)
    model = W.Encoder(p_drop=0.3)
    q, t = W.make_batch(6, seed=21)
    neg = W.make_batch(3, seed=22)[0] if with_negatives else None
    loss_fn = FusedHardnessLoss(backend="torch")
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append((torch.is_grad_enabled(), o.shape[0])))
    out = {}
    for single in (True, False):
        model.zero_grad(set_to_none=True)
        calls.clear()
        torch.manual_seed(3)
        loss = GradCache(model, loss_fn, 15, single_pass=single)(q, t, neg)
        out[single] = (loss, {n: p.grad.clone() for n, p in model.named_parameters()}, list(calls), torch.rand(4))
    sides = 3 if with_negatives else 2
    assert out[True][2] == [(True, 6), (True, 6), (True, 3)][:sides]
    assert len(out[False][2]) == 2 * sides and [g for g, _ in out[False][2]] == [False] * sides + [True] * sides
    assert torch.equal(out[True][3], out[False][3]), "the RNG must continue as after the cached path"
    assert abs(out[True][0].item() - out[False][0].item()) < 1e-6
    for k, g in out[False][1].items():
        _assert_rel(out[True][1][k], g, k, tol=1e-6)
    # a batch one sample too large for the chunk takes the cached path
    calls.clear()
    GradCache(model, loss_fn, 2 * 6 + (3 if with_negatives else 0) - 1)(q, t, neg)
    assert [g for g, _ in calls].count(False) == sides


def test_last_pass_says_which_path_the_call_took():
    """``last_pass``: "single" when the batch fit one chunk (one forward per side, checked by the hook),
    "cached" when it did not (a forward without grad, then the re-encode); a call without grad sets neither."""
    torch.manual_seed(0)
    model = W.Encoder(p_drop=0.0)
    q, t = W.make_batch(6, seed=21)
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(torch.is_grad_enabled()))
    gc = GradCache(model, FusedHardnessLoss(backend="torch"), 12)
    assert gc.last_pass is None
    gc(q, t)
    assert gc.last_pass == "single" and calls == [True, True]
    calls.clear()
    gc.chunk_size = 11
    gc(q, t)
    assert gc.last_pass == "cached" and calls.count(False) == 2
    deferred = GradCache(model, FusedHardnessLoss(backend="torch"), 12, defer_backward=True)
    with torch.no_grad():  # only encodes (an evaluation): no path of a training step
        deferred(q, t)
    assert deferred.last_pass is None


def test_single_pass_is_not_taken_for_ddp_or_separate_encoders():
    model, other = W.Encoder(), W.Encoder()
    q, t = W.make_batch(4, seed=1)
    assert GradCache(model, FusedHardnessLoss(), 8)._fits_one_pass([4, 4, 0])
    assert not GradCache(model, FusedHardnessLoss(), 7)._fits_one_pass([4, 4, 0])
    assert not GradCache(model, FusedHardnessLoss(), 8, single_pass=False)._fits_one_pass([4, 4, 0])
    assert not GradCache(model, FusedHardnessLoss(), 8, target_encoder=other)._fits_one_pass([4, 4, 0])

    class NoSync(W.Encoder):  # what DDP looks like to GradCache
        def no_sync(self):
            raise AssertionError("not called by this check")

    assert not GradCache(NoSync(), FusedHardnessLoss(), 8)._fits_one_pass([4, 4, 0])
    with pytest.raises(TypeError, match="single_pass must be True or False, got 1"):
        GradCache(model, FusedHardnessLoss(), 8, single_pass=1)


# ------------------------------------------------------------------ edge cases a helper's hunt found
def _nce(a, b):
    return torch.nn.functional.cross_entropy(10 * torch.nn.functional.normalize(a, dim=-1)
                                             @ torch.nn.functional.normalize(b, dim=-1).T, torch.arange(a.shape[0]))


def _data(n=8, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("chunk", [3, 100])  # the cached path and the single pass
def test_deferred_loss_parameters_get_the_scaled_gradient_once(chunk):
    """defer_backward=True: a learnable logit scale got its gradient in the forward, unscaled by what
    reached the loss (a trainer's 1/accumulation steps), and never again in the backward."""
    q, t = _data()
    enc = torch.nn.Linear(16, 8).double()
    scale = torch.nn.Parameter(torch.tensor(20.0, dtype=torch.float64))
    loss_fn = FusedHardnessLoss(alpha=0.0, backend="torch")
    (0.5 * loss_fn(enc(q), enc(t), logit_scale=scale)).backward()
    want_s, want_w = scale.grad.clone(), enc.weight.grad.clone()
    enc.zero_grad()
    scale.grad = None
    loss = GradCache(enc, loss_fn, chunk, defer_backward=True)(q, t, logit_scale=scale)
    assert scale.grad is None, "the loss's own parameter got a gradient before any backward"
    (0.5 * loss).backward()
    torch.testing.assert_close(scale.grad, want_s, rtol=1e-10, atol=0)
    torch.testing.assert_close(enc.weight.grad, want_w, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("defer", [False, True])
@pytest.mark.parametrize("chunk", [2, 100])
def test_a_frozen_target_encoder_is_not_backpropagated_into(defer, chunk):
    q, t = _data(6, 4)
    enc = torch.nn.Linear(4, 3).double()
    frozen = torch.nn.Linear(4, 3).double().requires_grad_(False)
    (_nce(enc(q), frozen(t))).backward()
    want = enc.weight.grad.clone()
    enc.zero_grad()
    loss = GradCache(enc, _nce, chunk, target_encoder=frozen, defer_backward=defer)(q, t)
    if defer:
        loss.backward()
    torch.testing.assert_close(enc.weight.grad, want, rtol=1e-10, atol=1e-14)
    assert frozen.weight.grad is None


def test_deferred_re_encode_runs_under_the_first_pass_autocast():
    """The caller's backward runs outside autocast (AMP's recipe): the re-encode must not run in fp32
    when the first pass ran in bf16, or the cached gradients belong to another function."""
    q, t = (x.float() for x in _data(8, 16))
    seen = {}
    for defer in (False, True):
        torch.manual_seed(1)
        m = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))
        dtypes = []

        def enc(x, m=m, dtypes=dtypes):
            e = m(x)
            dtypes.append((torch.is_grad_enabled(), e.dtype))
            return e

        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = GradCache(enc, lambda a, b: _nce(a.float(), b.float()), 3, defer_backward=defer)(q, t)
        if defer:
            loss.backward()
        seen[defer] = (sorted(set(dtypes), key=str), m[0].weight.grad.clone())
    assert seen[True][0] == seen[False][0] == [(False, torch.bfloat16), (True, torch.bfloat16)], seen
    torch.testing.assert_close(seen[True][1], seen[False][1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("defer", [False, True])
def test_the_loss_own_random_draws_are_not_rewound(defer):
    """The RNG continues as after a plain chunked step: the loss's own draws are not replayed."""
    q, t = (x.float() for x in _data(8, 16))
    enc = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Dropout(0.2))

    def noisy_loss(a, b):
        return _nce(a, b) * (1 + torch.rand(()))

    torch.manual_seed(7)
    _ = [enc(c) for c in (*q.split(3), *t.split(3))]
    noisy_loss(torch.zeros(8, 8), torch.ones(8, 8))
    want = torch.rand(3)
    torch.manual_seed(7)
    loss = GradCache(enc, noisy_loss, 3, defer_backward=defer)(q, t)
    if defer:
        loss.backward()
    torch.testing.assert_close(torch.rand(3), want)


def test_batchnorm_running_statistics_count_each_sample_once():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 4))
    ref = copy.deepcopy(m)
    q, t = torch.randn(8, 6), torch.randn(8, 6)
    GradCache(m, lambda a, b: (a @ b.T).logsumexp(1).mean(), 4)(q, t)
    for c in (*q.split(4), *t.split(4)):
        ref(c)
    assert m[1].num_batches_tracked.item() == ref[1].num_batches_tracked.item() == 4
    torch.testing.assert_close(m[1].running_mean, ref[1].running_mean)
    torch.testing.assert_close(m[1].running_var, ref[1].running_var)


def test_bad_encoders_losses_and_arguments_are_named():
    from llave_fast.errors import LlaveFastError

    q, t = (x.float() for x in _data(6, 4))
    enc = torch.nn.Linear(4, 3)
    cases = [
        (lambda: GradCache(lambda x: enc(x)[:1], _nce, 2)(q, t), r"query chunk 0 holds 2 samples but gave 1 rows"),
        (lambda: GradCache(enc, _nce, 2)(q, "oops"), r"target_inputs must be a tensor.*got str"),
        (lambda: GradCache(enc, _nce, 2)(q, t, {"a": torch.zeros(3, 4), "b": torch.zeros(2, 4)}),
         r"negative_inputs holds batch-first entries of different lengths"),
        (lambda: GradCache(enc, lambda a, b: (_nce(a, b), 0), 2)(q, t), r"loss_fn must return the loss as a one-"),
        (lambda: GradCache(enc, lambda a, b: _nce(a, b).detach(), 2)(q, t), r"loss without a graph"),
        (lambda: GradCache(enc, _nce, 2)(q[:0], t[:0]), r"empty on every rank"),
        (lambda: GradCache("x", _nce, 2), r"encoder must be callable, got str"),
        (lambda: GradCache(enc, None, 2), r"loss_fn must be callable, got NoneType"),
        (lambda: GradCache(enc, _nce, 2, progress="yes"), r"progress must be True or False, got 'yes'"),
    ]
    for make, pattern in cases:
        with pytest.raises(LlaveFastError, match=pattern):
            make()
    with torch.no_grad(), pytest.raises(LlaveFastError, match=r"needs grad mode.*torch\.no_grad"):
        GradCache(enc, _nce, 2)(q, t)
    import numpy as np

    assert GradCache(enc, _nce, np.int64(2)).chunk_size == 2  # a numpy integer is an integer
    from llave_fast.errors import InvalidArgumentType

    for bad in (2.0, True, "2"):  # the wrong type is a TypeError, as a bad value is a ValueError
        with pytest.raises(InvalidArgumentType, match=rf"chunk_size must be a positive int, got "
                                                      rf"{type(bad).__name__} {re.escape(repr(bad))}"):
            GradCache(enc, _nce, bad)
    # a loss that ignores the targets: their chunks get a zero gradient, no AttributeError
    loss = GradCache(enc, lambda a, b: a.pow(2).mean(), 2)(q, t)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("chunk", [2, 100])
def test_a_frozen_encoder_still_passes_gradients_to_its_inputs(chunk):
    """A frozen encoder over trainable inputs (soft prompts): the re-encode still runs and the inputs
    get their gradient, the same on the cached path and the single pass."""
    frozen = torch.nn.Linear(4, 3).double().requires_grad_(False)
    q, t = _data(6, 4)
    want = []
    for x in (q, t):
        x.requires_grad_()
    _nce(frozen(q), frozen(t)).backward()
    want = [q.grad.clone(), t.grad.clone()]
    q.grad = t.grad = None
    GradCache(frozen, _nce, chunk)(q, t)
    torch.testing.assert_close(q.grad, want[0], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(t.grad, want[1], rtol=1e-10, atol=1e-14)


def test_a_custom_split_of_tuples_needs_no_count():
    """Chunks that are (features, mask) tuples: their length is no sample count, so rows are not
    checked against it (they are with the default split or a given count)."""
    enc_lin = torch.nn.Linear(4, 3).double()
    q, t = _data(6, 4)

    def split(x, n):
        return list(zip(x.split(n), torch.ones(x.shape[0]).split(n)))

    loss = GradCache(lambda chunk: enc_lin(chunk[0]) * chunk[1][:, None], _nce, 3, split=split)(q, t)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("defer", [False, True])
@pytest.mark.parametrize("change", ["width", "rows"])
def test_a_re_encode_of_another_shape_is_refused(defer, change):
    """An encoder that returns another shape for a chunk in the re-encode than in the first pass
    (a stateful encoder, a wrapper that changes outputs between calls) is refused, naming both
    shapes, instead of failing in a broadcast deep inside the backward (or broadcasting silently)."""
    from llave_fast.errors import LlaveFastError

    q, t = (x.float() for x in _data(6, 4))
    enc = torch.nn.Linear(4, 3)
    def changing(x):
        e = enc(x)
        if torch.is_grad_enabled():  # the re-encode (the first pass runs without grad)
            e = e[:, :2] if change == "width" else e[:1].expand(x.shape[0] + 1, -1)
        return e

    want = r"gave \(2, 2\) when re-encoding a chunk that gave shape \(2, 3\)" if change == "width" else \
        r"gave \(3, 3\) when re-encoding a chunk that gave shape \(2, 3\)"
    with pytest.raises(LlaveFastError, match=want):
        loss = GradCache(changing, _nce, 2, defer_backward=defer)(q, t)
        loss.backward()


@pytest.mark.parametrize("chunk", [2, 100], ids=["cached", "single-pass"])
def test_a_second_backward_of_the_deferred_loss_fails_as_a_plain_graph_does(chunk):
    """The deferred loss's backward runs the re-encode; a second backward without retain_graph raised
    nothing on the cached path and added every gradient again (the single pass, like a plain graph,
    refuses it). With retain_graph=True a second backward accumulates, as a retained graph does."""
    q, t = (x.float() for x in _data(6, 4))
    enc = torch.nn.Linear(4, 3)
    loss = GradCache(enc, _nce, chunk, defer_backward=True)(q, t)
    loss.backward()
    first = enc.weight.grad.clone()
    with pytest.raises(RuntimeError, match=r"backward through the graph a second time"):
        loss.backward()
    assert torch.equal(enc.weight.grad, first)
    enc.zero_grad()
    loss = GradCache(enc, _nce, chunk, defer_backward=True)(q, t)
    loss.backward(retain_graph=True)
    loss.backward()
    torch.testing.assert_close(enc.weight.grad, 2 * first)
