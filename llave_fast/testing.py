"""Helpers for tests and benchmarks: run a function on several local ranks.

``spawn_ranks(fn, world, *args)`` starts ``world`` processes (spawn), initialises a
process group in each (gloo on CPU, NCCL when asked), calls ``fn(rank, world, *args)``
and re-raises any rank's failure in the caller. Environment variables, including
TRITON_INTERPRET, are inherited by the ranks.

Before the first spawn, ``warm_deepspeed_ops()`` builds DeepSpeed's CPU communication op
(``deepspeed_shm_comm``) once, in one helper process, when DeepSpeed is installed: every
``deepspeed.init_distributed`` loads that op, and on a machine whose extension cache is
cold each rank would otherwise JIT-compile it (ninja, ~30-60 s) inside its own process,
with its process group already up, racing the other ranks on one build folder guarded only
by torch's lock file (which waits forever when a killed builder left it behind). Warm, the
ranks only load the built library, as on every later run.

A rank whose function returned leaves with ``os._exit(0)`` after the group is destroyed,
skipping interpreter finalization (see ``_entry``), and faulthandler is on in every rank.
"""

from __future__ import annotations

import contextlib
import faulthandler
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SHM_OP = "deepspeed_shm_comm"
STALE_LOCK_S = 600  # a torch build lock older than this has lost its builder (a build takes about a minute)
WARM_TIMEOUT_S = 900
_warmed_dirs: set[str] = set()  # extension folders warmed by this process
WARM_ENV = "LLAVE_FAST_WARM_OPS_DIR"  # set once warm: child processes skip the check

# mirrors deepspeed.comm.torch.build_shm_op: what each rank's init_distributed loads
_WARM_CODE = """
import deepspeed.ops
from deepspeed.accelerator import get_accelerator
b = get_accelerator().create_op_builder("ShareMemCommBuilder")
if b is not None and deepspeed.ops.__compatible_ops__.get(b.NAME, False):
    b.load()
    print("built", b.NAME)
else:
    print("not used here")
"""


def extension_dir(name: str = SHM_OP) -> str:
    """The folder torch JIT-builds extension ``name`` in (``TORCH_EXTENSIONS_DIR`` or the user cache)."""
    from torch.utils import cpp_extension

    return cpp_extension._get_build_directory(name, verbose=False)


@contextlib.contextmanager
def _exclusive(path: str):
    """An flock on ``path``: released by the kernel even when the holder is killed."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, torch's own lock file still guards the build
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_stale_lock(build_dir: str) -> str | None:
    """Remove torch's build lock if its builder is long gone; returns what was done."""
    lock = os.path.join(build_dir, "lock")
    try:
        age = time.time() - os.path.getmtime(lock)
    except FileNotFoundError:
        return None
    if age < STALE_LOCK_S:
        return None
    os.remove(lock)
    return f"removed a stale build lock {lock} ({age:.0f} s old)"


def warm_deepspeed_ops(force: bool = False) -> str:
    """Build (or find built) the DeepSpeed op every rank loads, once per process; says what it did.

    Runs in a helper process (the op is not loaded into this one), one warm-up at a time per
    extension folder (an flock, so parallel test sessions take turns); a torch build lock
    left by a killed builder is removed first. A failed build raises here, with the
    compiler's output, rather than in every rank.
    """
    if importlib.util.find_spec("deepspeed") is None:
        return "deepspeed not installed"
    build_dir = extension_dir()
    if build_dir in _warmed_dirs and not force:
        return "already warm in this process"
    if os.environ.get(WARM_ENV) == build_dir and not force:  # a parent process warmed it
        return "already warm (built by the parent process)"
    os.makedirs(build_dir, exist_ok=True)
    notes = []
    t0 = time.perf_counter()
    with _exclusive(os.path.join(build_dir, "llave_fast_warm.lock")):
        stale = _remove_stale_lock(build_dir)
        if stale:
            notes.append(stale)
        r = subprocess.run([sys.executable, "-c", _WARM_CODE], capture_output=True, text=True,
                           timeout=WARM_TIMEOUT_S)
    if r.returncode != 0:
        raise RuntimeError(f"building DeepSpeed's {SHM_OP} op in {build_dir} failed (exit {r.returncode}):\n"
                           f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    _warmed_dirs.add(build_dir)
    os.environ[WARM_ENV] = build_dir  # inherited by the ranks this process starts
    last = (r.stdout.strip().splitlines() or ["?"])[-1]
    notes.append(f"{last} ({time.perf_counter() - t0:.1f} s, {build_dir})")
    return "; ".join(notes)


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
