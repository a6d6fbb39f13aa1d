"""DeepSpeed set-up: joining the process group, building DeepSpeed's CPU communication op once
before the ranks load it, its op probe kept off the terminal, and the run's DeepSpeed config.

``warm_deepspeed_ops()`` builds DeepSpeed's CPU communication op (``deepspeed_shm_comm``) once,
in one helper process, when DeepSpeed is installed: every ``deepspeed.init_distributed`` loads
that op, and on a machine whose extension cache is cold each rank would otherwise JIT-compile it
(ninja, ~30-60 s) inside its own process, with its process group already up, racing the other
ranks on one build folder guarded only by torch's lock file (which waits forever when a killed
builder left it behind). Warm, the ranks only load the built library, as on every later run.
Several CPU ranks of a run call it before joining their group; ``llave_fast.testing.spawn_ranks``
calls it before spawning.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist

from ..errors import InvalidArgument
from .config import TrainConfig, _config_path, _json_kind
from .console import _log

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


def _shm_op_built() -> bool:
    """Whether the CPU communication op DeepSpeed loads is built already (or DeepSpeed is absent)."""
    if importlib.util.find_spec("deepspeed") is None:
        return True
    return os.path.isfile(os.path.join(extension_dir(), SHM_OP + ".so"))


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


#: what :func:`init_distributed` sets in the environment when no launcher did (and ``setdefault``s when a
#: caller had joined a group): :func:`~.engine.run_leaves_process_as_found` puts back what was there
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _deepspeed_chatter_to_stderr():
    """DeepSpeed prints on stdout while it is imported (its logger's handler is made then, on the
    stdout of that moment: "Setting accelerator to CPU") and while it joins a process group ("...
    built successfully"): both go to stderr, where the run's notes go, so stdout keeps the run's report."""
    return contextlib.redirect_stdout(sys.stderr)


def init_distributed() -> tuple[int, int]:
    """Join the launcher's process group (torchrun / deepspeed), or make a 1-process one."""
    with _deepspeed_chatter_to_stderr():
        import deepspeed

    if dist.is_available() and dist.is_initialized():  # a caller already joined a group
        os.environ.setdefault("RANK", str(dist.get_rank()))
        os.environ.setdefault("WORLD_SIZE", str(dist.get_world_size()))
        # DeepSpeed's engine moves to cuda:LOCAL_RANK: without one, the device the caller chose, else (still
        # on device 0: maybe never chosen) the rank modulo the node's devices (the global rank is no device
        # index on a second node)
        local = dist.get_rank()
        if torch.cuda.is_available():
            local = torch.cuda.current_device() or local % max(1, torch.cuda.device_count())
        os.environ.setdefault("LOCAL_RANK", str(local))
        with _deepspeed_chatter_to_stderr():
            deepspeed.init_distributed(dist_backend=dist.get_backend())
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    missing = [k for k in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:  # DeepSpeed would fall back to MPI discovery (mpi4py) and fail far from the cause
        raise InvalidArgument(
            f"RANK={os.environ['RANK']} is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: "
            "start several ranks with torchrun or the deepspeed launcher (they set RANK, WORLD_SIZE, LOCAL_RANK, "
            "MASTER_ADDR and MASTER_PORT), or unset RANK for one process")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    elif int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))) > 1:
        # several CPU ranks on this machine: DeepSpeed's CPU communication op is built once,
        # ranks taking turns under a file lock, instead of every rank JIT-building it at once
        # into one folder on a cold machine (see warm_deepspeed_ops)
        _log(int(os.environ.get("RANK", "0")), "DeepSpeed CPU op: " + warm_deepspeed_ops())
    elif not _shm_op_built():
        # one CPU rank: DeepSpeed builds the op inside init_distributed, its compiler output hidden
        _log(int(os.environ.get("RANK", "0")), f"DeepSpeed builds its CPU communication op ({SHM_OP}) on this "
             f"machine's first run, into {extension_dir()}: about 1-2 minutes, once (later runs load it)")
    quiet_deepspeed_op_probe()
    with _deepspeed_chatter_to_stderr():
        deepspeed.init_distributed(dist_backend=backend)
    return dist.get_rank(), dist.get_world_size()


def quiet_deepspeed_op_probe() -> None:
    """Run DeepSpeed's probe of which ops can build (``deepspeed.ops.__compatible_ops__``, first
    needed by ``init_distributed``) with file descriptor 2 pointed at a scratch file.

    The probe compiles and links small test programs; async_io's links ``-laio``, which fails on a
    machine without libaio. DeepSpeed silences the compiler by redirecting ``sys.stderr``'s file
    descriptor, which is not fd 2 when ``sys.stderr`` is redirected (``llave-fast ablate`` writes
    each run's output to its log): the linker's ``cannot find -laio`` then reached the terminal.
    The probe runs once a process; its result is kept by DeepSpeed, so later uses are silent."""
    ops = sys.modules.get("deepspeed.ops")
    if ops is not None and "__compatible_ops__" in vars(ops):  # probed already in this process
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                import deepspeed.ops  # older DeepSpeed probes at this import, newer on the first use below

                getattr(deepspeed.ops, "__compatible_ops__", None)
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def deepspeed_config(cfg: TrainConfig, world: int, bf16: bool) -> dict:
    """The DeepSpeed config of a run: ``cfg.deepspeed_config``'s JSON with the batch sizes (one engine step
    per global batch, no accumulation: GradCache is the accumulation), clipping and bf16 set from ``cfg``."""
    what = "deepspeed_config (--deepspeed-config)"
    path = _config_path(cfg.deepspeed_config, what)
    with open(path) as f:
        try:
            ds = json.load(f)
        except json.JSONDecodeError as e:
            raise InvalidArgument(f"{what} {path!r}: not valid JSON ({e})") from e
    if not isinstance(ds, dict):
        raise InvalidArgument(f"{what} {path!r}: a DeepSpeed config is a JSON object, got {_json_kind(ds)}")
    if cfg.global_batch % world:
        raise InvalidArgument(f"global_batch={cfg.global_batch} must be divisible by the number of ranks ({world})")
    # GradCache is the accumulation: one engine step per global batch
    ds["train_batch_size"] = cfg.global_batch
    ds["train_micro_batch_size_per_gpu"] = cfg.global_batch // world
    ds["gradient_accumulation_steps"] = 1
    ds["gradient_clipping"] = cfg.grad_clip
    ds["bf16"] = {"enabled": bool(bf16)}
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 10**9)
    return ds
