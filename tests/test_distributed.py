"""Cross-rank loss: 1-4 gloo ranks on the CPU, equal and unequal batches, every backend.

Each rank's loss and embedding gradients must equal the single-process float64 truth of
LLaVE's per-rank semantics (its local loss; gradients summed over ranks' losses).
"""

import pytest
import torch

from llave_fast.testing import spawn_ranks

import _dist_workers as W

pytestmark = pytest.mark.slow  # processes, ranks, wheel builds or compiles: -m 'not slow' skips them


def _cases(world):
    unequal = [3 + 2 * r for r in range(world)]
    equal = [4] * world
    cases = []
    for backend in ("torch", "triton", "reference"):
        cases.append(dict(backend=backend, b=unequal, m=[0] * world, d=24, tid=False, qid=False,
                          neg_ids=False, sym=True, seed=1))
        cases.append(dict(backend=backend, b=equal, m=[r % 2 * 3 for r in range(world)], d=33, tid=True,
                          qid=True, neg_ids=True, sym=True, seed=2))
    # the strip backward across ranks (several strips per rank, hard negatives, both masks)
    cases.append(dict(backend="triton", b=[5 + 2 * r for r in range(world)], m=[r % 2 * 3 for r in range(world)],
                      d=33, tid=True, qid=True, neg_ids=True, sym=True, seed=5,
                      kernel_config=dict(BWD="strip", DS_STRIP_ROWS=2, DS_BM=16, DS_BN=16)))
    cases.append(dict(backend="torch", b=unequal, m=[2] * world, d=17, tid=True, qid=False, neg_ids=False,
                      sym=False, seed=3))
    cases.append(dict(backend="torch", b=unequal, m=[0] * world, d=20, tid=False, qid=True, neg_ids=False,
                      sym=True, seed=4, module=True))
    return cases


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_cross_rank_loss_matches_float64_truth(world):
    spawn_ranks(W.check_cases, world, _cases(world))


def _empty_rank_cases(world):
    b = [3 + r for r in range(world)]
    b[1] = 0  # rank 1 has an empty batch
    cases = []
    for backend in ("torch", "triton", "reference"):
        cases.append(dict(backend=backend, b=b, m=[0] * world, d=16, tid=False, qid=False, neg_ids=False,
                          sym=True, seed=6))
    # an empty rank with hard negatives elsewhere, masks on, and the strip backward
    cases.append(dict(backend="triton", b=b, m=[2] + [0] * (world - 1), d=16, tid=True, qid=True, neg_ids=True,
                      sym=True, seed=7, kernel_config=dict(BWD="strip", DS_STRIP_ROWS=2, DS_BM=16, DS_BN=16)))
    # float64 inputs: the empty rank's column partials must be float64 like the others' (a float32
    # buffer met float64 ones in the all-reduce: gloo aborted on the size mismatch, NCCL would not notice)
    cases.append(dict(backend="torch", b=b, m=[0] * world, d=16, tid=True, qid=False, neg_ids=False, sym=True,
                      seed=11, dtype=torch.float64, tol=1e-9))
    return cases


@pytest.mark.parametrize("world", [2, 3])
def test_rank_with_an_empty_batch_takes_part_and_contributes_nothing(world):
    spawn_ranks(W.check_cases, world, _empty_rank_cases(world))


def _global_cases(world):
    unequal = [3 + 2 * r for r in range(world)]
    cases = []
    for backend in ("torch", "triton", "reference"):
        cases.append(dict(backend=backend, b=unequal, m=[r % 2 * 3 for r in range(world)], d=24, tid=True, qid=True,
                          neg_ids=True, sym=True, seed=8))
    cases.append(dict(backend="torch", b=unequal, m=[0] * world, d=20, tid=False, qid=False, neg_ids=False,
                      sym=False, seed=9, reduction="sum"))
    cases.append(dict(backend="triton", b=[4, 0, 5][:world], m=[0] * world, d=16, tid=False, qid=False,
                      neg_ids=False, sym=True, seed=10, module=True))
    return cases


@pytest.mark.parametrize("world", [1, 2, 3])
def test_global_loss_across_ranks_matches_float64_truth(world):
    """FusedHardnessLoss(local_loss=False): open_clip's global loss from one strip per rank."""
    spawn_ranks(W.check_global_cases, world, _global_cases(world))


def test_inconsistent_ids_across_ranks_raise_everywhere():
    spawn_ranks(W.inconsistent_ids, 2)


def test_collective_device_follows_the_backend(monkeypatch):
    """NCCL takes CUDA tensors only ("No backend type associated with device type cpu" otherwise);
    gloo, and a group with a CPU backend beside NCCL, CPU tensors."""
    import torch
    import torch.distributed as dist

    from llave_fast.distributed import collective_device

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    for backend, want in (("nccl", torch.device("cuda", 3)), ("cuda:nccl", torch.device("cuda", 3)),
                          ("gloo", torch.device("cpu")), ("cpu:gloo,cuda:nccl", torch.device("cpu"))):
        monkeypatch.setattr(dist, "get_backend", lambda group=None, b=backend: b)
        assert collective_device() == want, backend


def test_the_training_loop_s_all_reduces_go_to_the_backend_s_device(monkeypatch, tmp_path):
    """The loop's per-step loss/health table and the bad-data flag were all-reduced as CPU tensors, which
    the 2-rank gloo tests accept and NCCL (every multi-GPU run) refuses at step 1. Both now move to
    ``collective_device()`` first. Here it names the meta device (no CUDA on this machine): each all-reduce
    must receive a tensor there (reading it back then fails, which the test expects)."""
    import torch

    from llave_fast.training import stops

    seen = []

    def all_reduce(t, *a, **k):
        seen.append(t.device.type)
        if t.device.type == "cpu":  # as if the other rank held the same values
            t.mul_(2)

    monkeypatch.setattr(stops.dist, "all_reduce", all_reduce)
    monkeypatch.setattr(stops, "collective_device", lambda group=None: torch.device("cpu"))  # gloo's
    got = stops.all_ranks_stats([1.5, 0.0, 2.0, 0.0, 10.0], rank=1, world=2)
    assert got.device.type == "cpu" and got.dtype == torch.float64 and seen == ["cpu"]
    assert got.tolist() == [[0.0] * 5, [3.0, 0.0, 4.0, 0.0, 20.0]]
    assert stops.all_ranks_stats([7.0], rank=0, world=1).tolist() == [[7.0]] and seen == ["cpu"]  # one rank: none
    monkeypatch.setattr(stops, "collective_device", lambda group=None: torch.device("meta"))
    for call in (lambda: stops.all_ranks_stats([1.0, 2.0], rank=0, world=2),
                 lambda: stops._stop_if_asked(None, 3, 0, 2, str(tmp_path), save=lambda step: None)):
        with pytest.raises((NotImplementedError, RuntimeError), match="meta"):
            call()
    assert seen == ["cpu", "meta", "meta"]
