"""Cross-rank plumbing of the loss: gathers, the column-statistics all-reduce, the reduce-scatter.

The strip algorithm (README, "Across ranks"): each rank computes only its row strip
``S_r = q_r @ T^T`` of the global similarity matrix. Row statistics (q->t) are local;
column statistics (t->q) are partial and combined across ranks by one all-reduce of
O(N) floats; the backward's partial dT is returned to its owners by a reduce-scatter.
Ranks may hold different batch sizes: every gather pads to the largest and trims.

Collectives used: all_gather, all_reduce (gloo and NCCL), reduce_scatter_tensor (NCCL
only; gloo falls back to all_reduce + slice).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from ._checks import ids_cover_negatives
from .errors import DistributedNotReady, InvalidArgument


def collective_device(group=None) -> torch.device:
    """Where a tensor handed to a collective of ``group`` must live: NCCL takes CUDA tensors only (the
    current device; "nccl" or "cuda:nccl"), gloo and a group with a CPU backend ("cpu:gloo,cuda:nccl") CPU
    tensors."""
    backend = str(dist.get_backend(group))
    if "nccl" in backend and "cpu:" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# dtypes exchanged as small ints (exchange_layout compares them across ranks)
_DTYPE_CODES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _dtype_name(code: int) -> str:
    return str(_DTYPE_CODES[code]).replace("torch.", "") if 0 <= code < len(_DTYPE_CODES) else "other"


@dataclass
class RankComm:
    """A process group seen from one rank."""

    group: object = None

    def __post_init__(self):
        if not (dist.is_available() and dist.is_initialized()):
            raise DistributedNotReady(
                "cross-rank loss needs torch.distributed to be initialised (init_process_group) "
                "before the loss is called"
            )
        self.world = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.backend = dist.get_backend(self.group)

    # -- the collectives every exchange below goes through (a single-process test replaces these
    #    two to run several ranks as threads; see tests/test_api.py) -----------------------
    def all_gather(self, out: list[torch.Tensor], x: torch.Tensor) -> None:
        """``out[r]`` = rank r's ``x`` (same shape on every rank)."""
        dist.all_gather(out, x, group=self.group)

    def all_reduce(self, x: torch.Tensor, op: str = "sum") -> None:
        """In place: the sum (``op="sum"``) or max (``op="max"``) of ``x`` over the ranks."""
        dist.all_reduce(x, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=self.group)

    # -- small exchanges ---------------------------------------------------------------
    @property
    def nccl_only(self) -> bool:
        """Whether the group takes CUDA tensors only ("nccl", "cuda:nccl"; not a group with a CPU backend)."""
        backend = str(self.backend)
        return "nccl" in backend and "cpu:" not in backend

    def exchange_ints(self, values: list[int], device) -> torch.Tensor:
        """All ranks' ``values``, shape (world, len(values)), int64 on the CPU."""
        dev = device if self.nccl_only else torch.device("cpu")
        mine = torch.tensor(values, dtype=torch.int64, device=dev)
        out = [torch.empty_like(mine) for _ in range(self.world)]
        self.all_gather(out, mine)
        return torch.stack(out).cpu()

    def exchange_layout(self, B: int, M: int, target_ids, query_ids, device, d: int = -1, dtype=None):
        """Every rank's batch and negative counts, checked for consistent id options, embedding
        width ``d`` and ``dtype`` (ranks with rows compared), and for a batch on some rank.

        Returns (b_sizes, m_sizes, neg_with_ids): per rank, query rows, negatives, and whether
        its target_ids also cover its negatives. All ranks raise the same error together
        (they see the same table), so a bad option cannot leave one rank in a collective.
        """
        neg_ids = ids_cover_negatives(target_ids, B, M)
        code = _DTYPE_CODES.index(dtype) if dtype in _DTYPE_CODES else -1
        table = self.exchange_ints([B, M, target_ids is not None, query_ids is not None, int(neg_ids), d, code],
                                   device)
        for col, name in ((2, "target_ids"), (3, "query_ids")):
            if table[:, col].min() != table[:, col].max():
                raise InvalidArgument(f"{name} must be given on every rank or on none; per rank: {table[:, col].tolist()}")
        b_sizes, m_sizes = table[:, 0].tolist(), table[:, 1].tolist()
        if sum(b_sizes) == 0:
            raise InvalidArgument(f"query is an empty batch on every one of the {self.world} ranks: the loss needs at "
                                  "least one pair somewhere")
        busy = [r for r in range(self.world) if b_sizes[r] + m_sizes[r] > 0]
        widths = {int(table[r, 5]) for r in busy}
        kinds = {int(table[r, 6]) for r in busy}
        if len(widths) > 1 or len(kinds) > 1:
            per_rank = [(int(table[r, 5]), _dtype_name(int(table[r, 6]))) for r in range(self.world)]
            raise InvalidArgument("the embeddings must have one width and one dtype on every rank (the ranks exchange "
                                  f"rows of them); per rank (d, dtype): {per_rank}")
        neg_with_ids = [bool(x) for x in table[:, 4].tolist()]
        if any(neg_with_ids) and any(m > 0 and not w for m, w in zip(m_sizes, neg_with_ids)):
            raise InvalidArgument(
                "target_ids must cover the negatives on every rank that has negatives, or on none; "
                f"per rank (negatives, ids cover them): {list(zip(m_sizes, neg_with_ids))}"
            )
        return b_sizes, m_sizes, neg_with_ids

    def gather_ids(self, target_ids, query_ids, b_sizes, m_sizes, neg_with_ids):
        """Every rank's ids in the gathered candidates' order (``exchange_layout``'s result):
        target ids of all target rows, then of all negatives when any rank's ids cover its
        negatives; query ids of all query rows. Each is None when not given."""
        B = b_sizes[self.rank]
        tid = qid = None
        if target_ids is not None:
            tid = self.gather_rows(target_ids[:B], b_sizes)
            if any(neg_with_ids):
                local = target_ids[B:] if neg_with_ids[self.rank] else target_ids.new_empty((0,))
                tid = torch.cat([tid, self.gather_rows(local, m_sizes)])
        if query_ids is not None:
            qid = self.gather_rows(query_ids, b_sizes)
        return tid, qid

    # -- rows ---------------------------------------------------------------------------
    def gather_rows(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Concatenate every rank's ``x`` (rank r has ``sizes[r]`` rows) in rank order."""
        n_max = max(sizes)
        if n_max == 0:
            return x.new_empty((0,) + tuple(x.shape[1:]))
        pad = x.new_zeros((n_max,) + tuple(x.shape[1:]))
        pad[: x.shape[0]] = x
        out = [torch.empty_like(pad) for _ in range(self.world)]
        self.all_gather(out, pad.contiguous())
        return torch.cat([o[:n] for o, n in zip(out, sizes)], dim=0)

    def reduce_scatter_rows(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Sum ``x`` (sum(sizes) rows, identical layout on every rank) and return this rank's rows."""
        starts = [0]
        for n in sizes:
            starts.append(starts[-1] + n)
        lo, hi = starts[self.rank], starts[self.rank + 1]
        if self.nccl_only:
            n_max = max(sizes)
            padded = x.new_zeros((self.world * n_max,) + tuple(x.shape[1:]))
            for r, n in enumerate(sizes):
                padded[r * n_max : r * n_max + n] = x[starts[r] : starts[r] + n]
            out = x.new_empty((n_max,) + tuple(x.shape[1:]))
            dist.reduce_scatter_tensor(out, padded, group=self.group)
            return out[: hi - lo]
        total = x.contiguous().clone()
        self.all_reduce(total)
        return total[lo:hi]

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        """In place: the sum of ``x`` over the ranks (a few scalars)."""
        self.all_reduce(x)
        return x

    # -- statistics ---------------------------------------------------------------------
    def combine_lse(self, lse: torch.Tensor, es: torch.Tensor | None):
        """Merge per-rank partial (log-sum-exp, softmax-mean of S) of the same columns."""
        m = lse.clone()
        self.all_reduce(m, "max")
        shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        w = torch.exp(lse - shift)
        # NaN (a non-finite embedding anywhere) must survive the sum, not be dropped
        parts = [w] if es is None else [w, torch.where(torch.isneginf(lse), torch.zeros_like(w), w * es)]
        buf = torch.stack(parts)
        self.all_reduce(buf)
        total = shift + torch.log(buf[0])
        total = torch.where(torch.isnan(m), m, total)
        es_total = None if es is None else buf[1] / buf[0]
        return total, es_total


class GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient (LLaVE's gather_with_grad).

    Unlike torch.distributed.nn.all_gather it allows unequal row counts and runs on gloo.
    """

    @staticmethod
    def forward(ctx, x, comm: RankComm, sizes: list[int]):
        ctx.comm, ctx.sizes = comm, sizes
        return comm.gather_rows(x, sizes)

    @staticmethod
    def backward(ctx, grad):
        return ctx.comm.reduce_scatter_rows(grad.contiguous(), ctx.sizes), None, None


def gather_with_grad(x: torch.Tensor, comm: RankComm, sizes: list[int]) -> torch.Tensor:
    return GatherWithGrad.apply(x, comm, sizes)
