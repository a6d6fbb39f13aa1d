"""Cross-rank loss: 1-4 gloo ranks on the CPU, equal and unequal batches, every backend.

Each rank's loss and embedding gradients must equal the single-process float64 truth of
LLaVE's per-rank semantics (its local loss; gradients summed over ranks' losses).
"""

import pytest

from llave_fast.testing import spawn_ranks

import _dist_workers as W


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


def test_inconsistent_ids_across_ranks_raise_everywhere():
    spawn_ranks(W.inconsistent_ids, 2)
