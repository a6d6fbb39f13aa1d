"""Helpers for tests and benchmarks: run a function on several local ranks; write a test clip.

``spawn_ranks(fn, world, *args)`` starts ``world`` processes (spawn), initialises a
process group in each (gloo on CPU, NCCL when asked), calls ``fn(rank, world, *args)``
and re-raises any rank's failure in the caller. Environment variables, including
TRITON_INTERPRET, are inherited by the ranks.

Before the first spawn, ``warm_deepspeed_ops()`` builds DeepSpeed's CPU communication op
(``deepspeed_shm_comm``) once, in one helper process, so the ranks only load it (see
:mod:`llave_fast.training.deepspeed_setup`, where it lives: training runs with several CPU
ranks use it too; it and its helpers are re-exported here).

A rank whose function returned leaves with ``os._exit(0)`` after the group is destroyed,
skipping interpreter finalization (see ``_entry``), and faulthandler is on in every rank.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# testing may import production code, never the reverse: the op warm-up lives in the training package
from .training.deepspeed_setup import (  # noqa: F401  (re-exported)
    SHM_OP,
    STALE_LOCK_S,
    WARM_ENV,
    WARM_TIMEOUT_S,
    _exclusive,
    _remove_stale_lock,
    _warmed_dirs,
    extension_dir,
    warm_deepspeed_ops,
)

def _entry(rank, fn, world, store_path, backend, args):
    # a rank that aborts in C++ (SIGABRT, SIGSEGV) prints every thread's Python stack first
    faulthandler.enable(all_threads=True)
    dist.init_process_group(backend, init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Every rank has finished and passed its checks. Leave now, without Python's interpreter
    # finalization: objects that still hold a gloo group (DDP's reducer, DeepSpeed's
    # partitioned parameters and engine, reference cycles) would be destroyed there, in no
    # particular order and with gloo's threads alive, which can abort the process ("terminate
    # called without an active exception", SIGABRT) after the test itself has passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_ranks(fn, world: int, *args, backend: str = "gloo") -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` fresh processes joined in one group."""
    warm_deepspeed_ops()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        mp.spawn(_entry, args=(fn, world, store, backend, args), nprocs=world, join=True)


def write_clip(path, frames: int, fps, colour=(255, 40, 0), *, step: int = 3, size: int = 64,
               codec: str = "mpeg4") -> str:
    """A clip for tests and benchmarks (PyAV): a 16-px square of ``colour`` on black, ``size`` x ``size`` px,
    ``frames`` frames at ``fps``; frame i has the square's left edge at ``i * step`` (from the right edge
    when ``step`` is negative), wrapping at the far edge. Its folder is made if missing."""
    from fractions import Fraction

    import av
    import numpy as np

    span, top = size - 16, size // 2 - 8
    os.makedirs(os.path.dirname(os.path.abspath(str(path))), exist_ok=True)
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        for i in range(frames):
            img, x = np.zeros((size, size, 3), np.uint8), (i * abs(step)) % span
            x = x if step >= 0 else span - x
            img[top: top + 16, x: x + 16] = colour
            for packet in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(packet)
        for packet in s.encode():  # flush
            c.mux(packet)
    return str(path)
