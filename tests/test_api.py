"""The public API (issue 25): defaults that agree, the LLaVE shim, ``__all__``, a device scale read
without a host sync, the one test of which ids cover the negatives, and the cross-rank mean
(local vs global loss) pinned in one process by running ranks as threads."""

from __future__ import annotations

import inspect
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F

import llave_fast
from llave_fast import FusedHardnessLoss, LlaveFastError, hardness_weighted_loss
from llave_fast import _checks
from llave_fast import loss as loss_module
from llave_fast.distributed import RankComm
from llave_fast.llave_compat import WeightedClipLoss
from llave_fast.reference import reference_loss, reference_per_row

from _helpers import _cpu_test_env  # noqa: F401  (autouse fixture)


def _unit(n, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1).to(dtype)


# ------------------------------------------------------------------ 1. defaults that agree
def test_function_and_class_default_to_the_same_cross_rank_loss():
    fn_default = inspect.signature(hardness_weighted_loss).parameters["local_loss"].default
    cls_default = inspect.signature(FusedHardnessLoss.__init__).parameters["local_loss"].default
    llave_default = inspect.signature(WeightedClipLoss.__init__).parameters["local_loss"].default
    assert fn_default is cls_default is llave_default is False, (fn_default, cls_default, llave_default)
    assert FusedHardnessLoss().local_loss is False


def test_docstrings_say_llave_trains_with_local_loss_true():
    for doc in (hardness_weighted_loss.__doc__, FusedHardnessLoss.__doc__):
        assert "local_loss=True" in doc and "llava_qwen.py" in doc, doc


def test_reduction_none_is_refused_only_across_ranks():
    """On one process local and global loss are one loss: the default (global) takes "none"."""
    q, t = _unit(5, 8, 0), _unit(5, 8, 1)
    per_pair = hardness_weighted_loss(q, t, reduction="none", backend="torch")
    assert per_pair.shape == (5,)
    assert torch.allclose(per_pair, reference_loss(q, t, logit_scale=50.0, alpha=9.0, reduction="none"))
    with pytest.raises(ValueError, match=r"local_loss=False.*reduction='none'"):
        hardness_weighted_loss(q, t, reduction="none", distributed=True, backend="torch")


# ------------------------------------------------------------------ 2. the LLaVE shim
def test_weighted_clip_loss_takes_llave_arguments_in_llave_order():
    q, t = _unit(6, 16, 2, torch.float32), _unit(6, 16, 3, torch.float32)
    # LLaVE: WeightedClipLoss(local_loss, gather_with_grad, cache_labels, rank, world_size, use_horovod)
    llave = WeightedClipLoss(True, True, True, 0, 1, False, backend="torch")
    assert isinstance(llave, FusedHardnessLoss) and llave.local_loss is True and not llave.distributed
    got = llave(q, t, logit_scale=50.0, alpha=9.0)
    plain = FusedHardnessLoss(backend="torch")(q, t)
    assert torch.equal(got, plain), (got, plain)
    # cache_labels has no effect
    assert torch.equal(WeightedClipLoss(cache_labels=False, backend="torch")(q, t, 50.0, 9.0), got)
    # the loss is the float64 truth, not just equal to itself
    truth = reference_loss(q.double(), t.double(), logit_scale=50.0, alpha=9.0)
    assert abs(got.item() - truth.item()) < 1e-5 * truth.item(), (got, truth)
    # LLaVE's forward(query, target, logit_scale, alpha=0.5, output_dict=False): output_dict by position too
    out = llave(q, t, 50.0, 9.0, True)
    assert isinstance(out, dict) and torch.equal(out["contrastive_loss"], got)
    assert torch.equal(llave(q, t, 50.0, 9.0, output_dict=True)["contrastive_loss"], got)


def test_main_class_keeps_old_llave_keywords_with_a_deprecation_warning():
    q, t = _unit(4, 8, 4, torch.float32), _unit(4, 8, 5, torch.float32)
    with pytest.warns(DeprecationWarning, match=r"cache_labels=.*distributed=True.*WeightedClipLoss"):
        old = FusedHardnessLoss(local_loss=True, gather_with_grad=True, cache_labels=True, rank=0, world_size=1,
                                backend="torch")
    assert not old.distributed
    assert torch.equal(old(q, t), FusedHardnessLoss(backend="torch")(q, t))
    # the new spellings warn about nothing
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FusedHardnessLoss(local_loss=True, backend="torch")
        WeightedClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True, backend="torch")


def test_llave_world_size_turns_on_the_cross_rank_loss():
    """world_size > 1 means distributed=True; calling it without torch.distributed says so."""
    m = WeightedClipLoss(local_loss=True, gather_with_grad=True, rank=1, world_size=2, backend="torch")
    assert m.distributed and m.local_loss
    with pytest.raises(RuntimeError, match=r"torch\.distributed.*init_process_group") as info:
        m(_unit(3, 8, 0, torch.float32), _unit(3, 8, 1, torch.float32))
    assert isinstance(info.value, LlaveFastError), type(info.value)


def test_knob_table_lists_every_cross_rank_knob():
    doc = FusedHardnessLoss.__doc__
    table = doc[doc.index("====="):]
    for knob in ("distributed", "process_group", "local_loss", "gather_with_grad", "rank, world_size",
                 "cache_labels", "use_horovod"):
        assert f"\n    {knob} " in table, knob


# ------------------------------------------------------------------ 3. __all__
def test_top_level_all_is_the_user_api():
    assert sorted(llave_fast.__all__) == sorted(
        ["FusedHardnessLoss", "hardness_weighted_loss", "GradCache", "LlaveFastError", "__version__"])
    for name in llave_fast.__all__:
        assert hasattr(llave_fast, name), name
    assert issubclass(llave_fast.LlaveFastError, Exception)
    namespace: dict = {}
    exec("from llave_fast import *", namespace)
    assert "reference_loss" not in namespace and "FusedHardnessLoss" in namespace
    # the test oracle stays importable where it lives (and, for old code, at the top level)
    assert llave_fast.reference.reference_loss is reference_loss
    assert llave_fast.reference_loss is reference_loss


# ------------------------------------------------------------------ 4. no host sync for a device scale
@pytest.fixture
def item_on_device_fails(monkeypatch):
    """Any ``.item()`` of a tensor off the CPU (a host sync on a GPU) fails the test."""
    calls = []
    real = torch.Tensor.item

    def item(self):
        if self.device.type != "cpu":
            calls.append(self.device)
            raise AssertionError(f".item() on a {self.device} tensor: a host sync")
        return real(self)

    monkeypatch.setattr(torch.Tensor, "item", item)
    return calls


def test_check_scale_reads_no_device_value(item_on_device_fails):
    scale = torch.tensor(50.0, device="meta", requires_grad=True)
    value, tensor = _checks.check_scale(scale, torch.device("meta"))
    assert value is None and tensor is scale
    # shape, dtype and device are still checked without a read
    with pytest.raises(ValueError, match=r"logit_scale.*shape \(2,\)"):
        _checks.check_scale(torch.ones(2, device="meta"), torch.device("meta"))
    with pytest.raises(TypeError, match=r"logit_scale.*torch\.int64"):
        _checks.check_scale(torch.ones((), dtype=torch.int64, device="meta"), torch.device("meta"))
    with pytest.raises(ValueError, match=r"logit_scale is on meta.*cpu"):
        _checks.check_scale(scale, torch.device("cpu"))
    # a CPU scale is read and checked as before
    cpu_scale = torch.tensor(20.0)
    value, tensor = _checks.check_scale(cpu_scale)
    assert value == 20.0 and tensor is cpu_scale
    with pytest.raises(ValueError, match=r"logit_scale.*got -1\.0"):
        _checks.check_scale(torch.tensor(-1.0))
    assert item_on_device_fails == []


def test_learnable_device_scale_trains_without_a_host_read(item_on_device_fails):
    """The eager path on a non-CPU device (meta: shapes only) with a learnable scale: forward and
    backward, not one ``.item()``."""
    scale = torch.tensor(50.0, device="meta", requires_grad=True)
    q = torch.randn(4, 8, device="meta", requires_grad=True)
    t = torch.randn(4, 8, device="meta", requires_grad=True)
    loss = FusedHardnessLoss(backend="reference")(q, t, logit_scale=scale)
    loss.backward()
    assert scale.grad is not None and q.grad is not None
    assert item_on_device_fails == []


def test_read_scale_checks_the_value():
    assert _checks.read_scale(torch.tensor([3.0])) == 3.0
    with pytest.raises(ValueError, match=r"logit_scale.*got nan"):
        _checks.read_scale(torch.tensor(float("nan")))


# ------------------------------------------------------------------ 5. which ids cover the negatives
@pytest.mark.parametrize("n_ids,B,M,expected", [
    (None, 4, 3, False),  # no ids
    (4, 4, 3, False),     # one per target row only: negatives unmasked
    (7, 4, 3, True),      # one per target row, then one per negative
    (4, 4, 0, False),     # no negatives
])
def test_ids_cover_negatives(n_ids, B, M, expected):
    ids = None if n_ids is None else torch.arange(n_ids)
    assert _checks.ids_cover_negatives(ids, B, M) is expected


# ------------------------------------------------------------------ 7. the cross-rank mean, in one process
class _Threads:
    """Shared state of W ranks run as threads: slots and a barrier for the two collectives."""

    def __init__(self, world: int):
        self.world = world
        self.barrier = threading.Barrier(world, timeout=60)
        self.slots = [None] * world
        self.local = threading.local()


class _ThreadComm(RankComm):
    """RankComm over threads: RankComm's own exchanges on top of its two collective hooks."""

    def __init__(self, threads: _Threads, rank: int):
        self.group, self.threads, self.rank, self.world, self.backend = None, threads, rank, threads.world, "gloo"

    def _exchange(self, x):
        th = self.threads
        th.slots[self.rank] = x.clone()
        th.barrier.wait()
        everyone = list(th.slots)
        th.barrier.wait()
        return everyone

    def all_gather(self, out, x):
        for o, v in zip(out, self._exchange(x)):
            o.copy_(v)

    def all_reduce(self, x, op="sum"):
        parts = self._exchange(x)
        x.copy_(torch.stack(parts).amax(0) if op == "max" else torch.stack(parts).sum(0))


def _run_ranks(monkeypatch, world, fn):
    threads = _Threads(world)
    monkeypatch.setattr(loss_module, "RankComm", lambda group=None: threads.local.comm)
    results, errors = [None] * world, []

    def body(rank):
        threads.local.comm = _ThreadComm(threads, rank)
        try:
            results[rank] = fn(rank)
        except BaseException as exc:  # noqa: BLE001 - reported below, and the others released
            errors.append(exc)
            threads.barrier.abort()

    pool = [threading.Thread(target=body, args=(r,)) for r in range(world)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    if errors:
        raise errors[0]
    return results


def _errors_per_rank(monkeypatch, world, fn) -> list:
    """Each rank's exception (None where it returned): a bad layout must stop every rank alike."""
    out = [None] * world

    def body(rank):
        try:
            fn(rank)
        except Exception as exc:  # noqa: BLE001 - the test looks at every rank's
            out[rank] = exc

    _run_ranks(monkeypatch, world, body)
    return out


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("case", ["width", "dtype", "all-empty"])
def test_ranks_that_disagree_on_width_or_dtype_or_are_all_empty_are_refused_on_every_rank(monkeypatch, backend, case):
    """Under gloo a width or dtype mismatch aborted the process (gloo::EnforceNotMet), under NCCL it would
    hang or mix bytes; a batch empty on every rank returned 0 or NaN. Each is now one error, on every rank."""
    def rank_fn(rank):
        d = 8 if case != "width" or rank == 0 else 16
        dtype = torch.float64 if case == "dtype" and rank == 1 else torch.float32
        n = 0 if case == "all-empty" else 3
        q, t = _unit(n, d, 30 + rank).to(dtype), _unit(n, d, 40 + rank).to(dtype)
        return hardness_weighted_loss(q.requires_grad_(), t, backend=backend, distributed=True)

    errors = _errors_per_rank(monkeypatch, 2, rank_fn)
    want = "empty batch on every one of the 2 ranks" if case == "all-empty" else "one width and one dtype on every rank"
    assert all(isinstance(e, LlaveFastError) and want in str(e) for e in errors), errors
    if case == "width":
        assert "[(8, 'float32'), (16, 'float32')]" in str(errors[0])


SIZES = [2, 5]  # unequal: a mean over the wrong count (B_r against N = 7) cannot pass


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("local_loss", [True, False])
def test_cross_rank_mean_local_vs_global(monkeypatch, backend, local_loss):
    """Two ranks as threads through RankComm's collectives: local_loss=True is the mean over this
    rank's B_r pairs (LLaVE), False the mean over all N pairs, the same on every rank; gradients
    are the sum over ranks of the ranks' losses' gradients. Truth: the float64 reference."""
    d, N = 12, sum(SIZES)
    Q, T = _unit(N, d, 10), _unit(N, d, 11)
    starts = [sum(SIZES[:r]) for r in range(len(SIZES))]

    def rank_fn(rank):
        lo, hi = starts[rank], starts[rank] + SIZES[rank]
        q, t = Q[lo:hi].clone().requires_grad_(), T[lo:hi].clone().requires_grad_()
        loss = hardness_weighted_loss(q, t, logit_scale=50.0, alpha=9.0, backend=backend, distributed=True,
                                      local_loss=local_loss)
        loss.backward()
        return loss.detach(), q.grad, t.grad

    got = _run_ranks(monkeypatch, len(SIZES), rank_fn)

    Qt, Tt = Q.clone().requires_grad_(), T.clone().requires_grad_()
    per_rank = []
    for r, lo in enumerate(starts):
        hi = lo + SIZES[r]
        if local_loss:
            rows = reference_per_row(Qt[lo:hi], Tt[lo:hi], logit_scale=50.0, alpha=9.0, all_queries=Qt,
                                     all_targets=Tt, offset=lo)
            per_rank.append(rows.sum() / SIZES[r])
        else:
            per_rank.append(reference_loss(Qt, Tt, logit_scale=50.0, alpha=9.0))  # sum over N rows / N
    torch.stack(per_rank).sum().backward()
    for r, lo in enumerate(starts):
        hi = lo + SIZES[r]
        loss, gq, gt = got[r]
        assert torch.allclose(loss, per_rank[r].detach(), rtol=1e-10, atol=1e-12), (r, loss, per_rank[r])
        assert torch.allclose(gq, Qt.grad[lo:hi], rtol=1e-8, atol=1e-10), r
        assert torch.allclose(gt, Tt.grad[lo:hi], rtol=1e-8, atol=1e-10), r
    if not local_loss:
        assert torch.equal(got[0][0], got[1][0])  # the global loss is one value everywhere
    else:
        assert not torch.allclose(got[0][0], got[1][0])  # each rank its own


def test_class_and_function_default_to_the_same_loss_across_ranks(monkeypatch):
    """Two ranks: ``FusedHardnessLoss(distributed=True)`` and ``hardness_weighted_loss(distributed=True)``
    with no local_loss give the same (global) loss."""
    Q, T = _unit(7, 8, 20), _unit(7, 8, 21)
    starts = [0, 2]

    def rank_fn(rank):
        lo, hi = starts[rank], starts[rank] + SIZES[rank]
        q, t = Q[lo:hi], T[lo:hi]
        return (FusedHardnessLoss(backend="torch", distributed=True)(q, t),
                hardness_weighted_loss(q, t, backend="torch", distributed=True))

    got = _run_ranks(monkeypatch, 2, rank_fn)
    truth = reference_loss(Q, T, logit_scale=50.0, alpha=9.0)
    for cls_loss, fn_loss in got:
        assert torch.equal(cls_loss, fn_loss)
        assert torch.allclose(cls_loss, truth, rtol=1e-10), (cls_loss, truth)


# ------------------------------------------------------------------ 6. GradCache's progress bar
def test_gradcache_progress_is_tqdm_with_disable(capsys):
    from llave_fast.gradcache import _progress

    for enabled in (False, True):
        bar = _progress(2, enabled)
        assert bar.disable is (not enabled)  # before close(), which disables any bar
        bar.update(1)
        bar.update(1)
        bar.close()
        err = capsys.readouterr().err
        assert ("gradcache chunks" in err) is enabled, (enabled, err)


def test_every_public_name_and_method_has_a_docstring():
    """help() on the user API says something: every name of llave_fast.__all__ and of
    llave_fast.integrations' __all__, and every public method their classes define."""
    import inspect

    import llave_fast.integrations as integrations
    from llave_fast.llave_compat import WeightedClipLoss

    pytest.importorskip("sentence_transformers")
    objects = [getattr(llave_fast, n) for n in llave_fast.__all__ if n != "__version__"]
    objects += [getattr(integrations, n) for n in integrations.__all__] + [WeightedClipLoss]
    import llave_fast.train as train_api  # the Python training API's module (README "Python training API")

    objects += [o for o in (getattr(train_api, n) for n in train_api.__all__)
                if inspect.isclass(o) or inspect.isfunction(o)]
    missing = []
    for obj in objects:
        if not (obj.__doc__ or "").strip():
            missing.append(obj.__qualname__)
        if inspect.isclass(obj):
            for name, member in vars(obj).items():
                public = not name.startswith("_") or name == "__call__"
                # an override of a documented method (extra_repr) keeps its base's docstring in help()
                if public and inspect.isfunction(member) and not (inspect.getdoc(getattr(obj, name)) or "").strip():
                    missing.append(f"{obj.__qualname__}.{name}")
    assert not missing, f"no docstring: {missing}"
    # the docstring says what deterministic= does: nothing (the backward is always reproducible)
    assert "changes nothing" in hardness_weighted_loss.__doc__
