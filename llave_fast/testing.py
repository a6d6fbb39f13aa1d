"""Helpers for tests and benchmarks: run a function on several local ranks.

``spawn_ranks(fn, world, *args)`` starts ``world`` processes (spawn), initialises a
process group in each (gloo on CPU, NCCL when asked), calls ``fn(rank, world, *args)``
and re-raises any rank's failure in the caller. Environment variables, including
TRITON_INTERPRET, are inherited by the ranks.
"""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank, fn, world, store_path, backend, args):
    dist.init_process_group(backend, init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn_ranks(fn, world: int, *args, backend: str = "gloo") -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` fresh processes joined in one group."""
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        mp.spawn(_entry, args=(fn, world, store, backend, args), nprocs=world, join=True)
