"""Crash-safe DeepSpeed checkpoints: a run killed at any moment resumes from the last complete one.

Layout under ``<output_dir>/checkpoints``:

    step-00000040/           DeepSpeed's sharded checkpoint (one folder per save)
    step-00000040/COMPLETE   written by rank 0 only after every rank finished saving
    latest                   name of the newest complete folder, replaced atomically

A folder without COMPLETE is a torn save (the process died while writing) and is never
loaded. Resuming takes the newest folder that has the marker.

Nothing in a checkpoint runs code: every ``.pt`` file is read with
``torch.load(weights_only=True)`` (:func:`safe_load`), allowing, besides tensors and plain
containers, only the few DeepSpeed classes its optimizer states pickle
(:func:`allowed_globals`): DeepSpeed's own loads are routed through it while it loads
(:func:`trusted_loads`, :func:`safe_zero_to_fp32`). A full disk is reported as such
(:class:`DiskFull`), naming the device, the file and the last complete checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import shutil

import torch
import torch.distributed as dist
from .errors import InvalidArgument, LlaveFastError

MARKER = "COMPLETE"
POINTER = "latest"
_TAG = re.compile(r"^step-(\d{8})$")


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def step_of(tag: str) -> int:
    """The step a checkpoint tag names (:func:`tag_for`'s inverse)."""
    m = _TAG.match(tag)
    if m is None:
        raise InvalidArgument(f"{tag!r} is not a checkpoint tag (step-NNNNNNNN)")
    return int(m.group(1))


# -- writes that are whole or absent ---------------------------------------------------------


def _fsync_dir(folder: str) -> None:
    """Make a rename in ``folder`` durable (where the file system allows opening a folder)."""
    try:
        fd = os.open(folder or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str, data: str | bytes) -> None:
    """Replace (or create) ``path`` with ``data``, whole or not at all: a temporary file beside it,
    fsync, rename over ``path``, fsync of the folder. A failed write removes the temporary file and
    leaves ``path`` as it was; a full disk raises :class:`DiskFull` naming the device and the file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        error = disk_full(exc, path) if isinstance(exc, OSError) else None
        if error is None:
            raise
        raise error from exc
    _fsync_dir(os.path.dirname(path))


_atomic_write = write_atomic  # the name train.py uses


# -- complete checkpoints ------------------------------------------------------------------


def complete_tags(root: str) -> list[str]:
    if not os.path.isdir(root):
        return []
    tags = [t for t in os.listdir(root) if _TAG.match(t) and os.path.exists(os.path.join(root, t, MARKER))]
    return sorted(tags)


def latest_complete(root: str) -> str | None:
    """The newest complete checkpoint's tag, or None."""
    # the marker is the truth; the pointer file is for people and may lag by one save
    tags = complete_tags(root)
    return tags[-1] if tags else None


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier():
    if _distributed():
        dist.barrier()


def _is_rank0() -> bool:
    return not _distributed() or dist.get_rank() == 0


# -- a full disk -------------------------------------------------------------------------------

NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# torch.save reports a failed write as a generic stream error (a RuntimeError from
# inline_container.cc, no errno): when the file system holds less than this afterwards, the
# failure is a full disk
LOW_SPACE_BYTES = 1 << 20


class DiskFull(LlaveFastError, RuntimeError, ValueError):
    """A write failed because the file system is full. ``path`` is the file being written,
    ``device`` the file system (source, type and mount point), ``checkpoint`` the last complete
    checkpoint of the run (None when there is none, or the write was not a run's). A ValueError
    too: the command reports it as a problem of the machine, not a bug."""

    def __init__(self, path: str, device: str, ckpt_root: str | None = None, note: str = ""):
        self.path, self.device, self.ckpt_root = path, device, ckpt_root
        msg = f"no space left on {device} while writing {path}"
        self.checkpoint = None
        if ckpt_root is not None:
            tag = latest_complete(ckpt_root)
            self.checkpoint = None if tag is None else os.path.abspath(os.path.join(ckpt_root, tag))
            if self.checkpoint:
                msg += (f"; last complete checkpoint: {self.checkpoint} (free some space there, then run the same "
                        "command again: it resumes from that checkpoint)")
            else:
                msg += ("; last complete checkpoint: none yet (free some space there, then run the same command "
                        "again: it starts over)")
        super().__init__(msg + note)


def _existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def device_of(path: str) -> str:
    """The file system ``path`` lies on, for people: ``SOURCE (TYPE mounted at MOUNT, N MiB free)``
    where /proc/self/mounts tells, else the mount point."""
    mount = _existing(path)
    while not os.path.ismount(mount) and os.path.dirname(mount) != mount:
        mount = os.path.dirname(mount)
    source = fstype = None
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[1].replace("\\040", " ") == mount:
                    source, fstype = parts[0], parts[2]  # the last entry is the one in effect
    except OSError:
        pass
    try:
        free = shutil.disk_usage(mount).free
        space = f", {free / 2**20:.1f} MiB free"
    except OSError:
        space = ""
    if source:
        return f"{source} ({fstype} mounted at {mount}{space})"
    return f"the file system mounted at {mount}" + (f" ({space[2:]})" if space else "")


def is_disk_full(exc: BaseException, path: str) -> bool:
    """Whether ``exc``, raised while writing ``path``, comes from a full file system: an OSError
    with ENOSPC or EDQUOT anywhere in its chain, or a RuntimeError or errno-less OSError (torch.save's
    stream errors carry no errno) after which the file system has under 1 MiB left."""
    seen, e = set(), exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS or "No space left on device" in str(e):
            return True  # (the text: libraries that wrap the OSError, safetensors' "os error 28")
        e = e.__cause__ or e.__context__
    vague = isinstance(exc, RuntimeError) or (isinstance(exc, OSError) and exc.errno is None)
    if vague and not isinstance(exc, DiskFull):
        try:
            return shutil.disk_usage(_existing(path)).free < LOW_SPACE_BYTES
        except OSError:
            return False
    return False


def disk_full(exc: BaseException, path: str, ckpt_root: str | None = None, note: str = "") -> DiskFull | None:
    """A :class:`DiskFull` for ``exc`` raised while writing ``path`` if the disk is full, else None.
    A DiskFull without a checkpoint gets the one of ``ckpt_root``."""
    if isinstance(exc, DiskFull):
        if ckpt_root is None or exc.ckpt_root is not None:
            return exc
        return DiskFull(exc.path, exc.device, ckpt_root, note)
    if not is_disk_full(exc, path):
        return None
    return DiskFull(os.path.abspath(path), device_of(path), ckpt_root, note)


@contextlib.contextmanager
def reporting_full_disk(path: str, ckpt_root: str | None = None):
    """Within: a full disk while writing ``path`` raises :class:`DiskFull` naming the device, the
    file and (``ckpt_root`` given) the last complete checkpoint; other errors pass unchanged."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - anything but a full disk is raised unchanged
        error = disk_full(exc, path, ckpt_root)
        if error is None or error is exc:
            raise
        raise error from exc


# -- what a checkpoint may hold ----------------------------------------------------------------


class UntrustedCheckpoint(InvalidArgument):
    """A checkpoint file pickles something that is not checkpoint data (a class or function
    ``torch.load(weights_only=True)`` refuses): it was not unpickled, so nothing in it ran."""

    def __init__(self, path: str, detail: str):
        self.path = path
        super().__init__(
            f"refusing to load {path}: {detail}. Nothing in it ran: checkpoint files are read with "
            "torch.load(weights_only=True), which rebuilds tensors and plain containers only (and DeepSpeed's "
            "loss-scaler, ZeRO-stage and fragment-address classes), and this one asks for more. A checkpoint "
            "llave-fast writes never does: the file was changed or made elsewhere. Use run folders only from "
            "sources you trust, or train again")


def allowed_globals() -> list:
    """The classes DeepSpeed's checkpoints pickle besides tensors and plain containers: found by
    saving real ZeRO-3 and ZeRO-2 checkpoints (fp32 and bf16) and loading each file with
    ``weights_only=True``. ZeRO-3's model states need none; the optimizer states hold the ZeRO
    stage (an int enum) and the loss scaler (a plain object: its state is a dict of numbers and a
    dtype, ``LossScaler`` static / ``DynamicLossScaler`` for fp16), and ZeRO-2's the partition
    offsets (``fragment_address``, a dataclass of two ints). None of them runs code when rebuilt."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


@contextlib.contextmanager
def _allowed():
    """``allowed_globals`` allowed for weights_only loads within (only those not allowed already,
    so leaving removes nothing that was there before)."""
    try:
        extra = allowed_globals()
    except ImportError:  # no deepspeed: plain tensors only
        extra = []
    have = set(map(str, torch.serialization.get_safe_globals()))
    with torch.serialization.safe_globals([g for g in extra if str(g) not in have]):
        yield


def _weights_only_reason(exc: BaseException) -> str:
    """torch's reason for refusing a pickle (the global it names), without its advice to load unsafely."""
    text = str(exc)
    m = re.search(r"WeightsUnpickler error: (.*?)(?: Please use|\n|$)", text, re.S)
    if m:
        what = m.group(1)
    else:  # torch >= 2.x words some refusals as a paragraph of their own
        skip = ("Weights only load failed", "Check the documentation", "(1)", "(2)")
        paras = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
        what = next((p for p in paras if not p.startswith(skip)), "torch refused it")
    return f"it holds pickled data that is not checkpoint data ({what.strip().splitlines()[0].rstrip('.')})"


def safe_load(path: str, map_location=None, mmap: bool | None = None):
    """``torch.load(path, weights_only=True)`` with :func:`allowed_globals`; a refused pickle raises
    :class:`UntrustedCheckpoint` and an unreadable file a ValueError, both naming ``path``."""
    with _allowed():
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as exc:
            raise UntrustedCheckpoint(str(path), _weights_only_reason(exc)) from None
        except (RuntimeError, EOFError, ValueError) as exc:
            raise InvalidArgument(f"{path} is not a readable checkpoint file ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}); a torn or changed file") from exc


def check_files(folder: str) -> None:
    """Refuse (:class:`UntrustedCheckpoint`) a checkpoint folder any of whose ``.pt`` files names a
    class or function beyond what ``weights_only`` loads allow. Reads only each file's pickle (not
    its tensors), so every file is checked before any is loaded; the loads themselves are
    ``weights_only`` as well (this check only makes the refusal early and whole). Files in torch's
    legacy (non-zip) format are left to the load."""
    with _allowed():
        for dirpath, dirnames, names in os.walk(folder):
            dirnames.sort()
            for name in sorted(names):
                if not name.endswith(".pt"):
                    continue
                path = os.path.join(dirpath, name)
                with open(path, "rb") as f:
                    if f.read(4) != b"PK\x03\x04":  # torch's legacy format: only its (weights_only) load checks it
                        continue
                try:
                    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
                except (RuntimeError, ValueError, EOFError, KeyError, pickle.UnpicklingError) as exc:
                    raise InvalidArgument(f"{path} is not a readable checkpoint file ({type(exc).__name__}: {exc}); "
                                     "a torn or changed file") from exc
                if unsafe:
                    raise UntrustedCheckpoint(path, "it holds pickled data that is not checkpoint data (it names "
                                                    + ", ".join(sorted(unsafe)) + ")")


class _GuardedCheckpointEngine:
    """Stands for a DeepSpeed engine's checkpoint engine while it saves or loads: every load goes
    through :func:`safe_load`, and a save records the file it writes (to name it on a failure)."""

    def __init__(self, inner):
        self.inner = inner
        self.writing: str | None = None

    def load(self, path, map_location=None):
        return safe_load(path, map_location=map_location)

    def save(self, state_dict, path):
        self.writing = path
        return self.inner.save(state_dict, path)

    def __getattr__(self, name):  # create, commit, makedirs, ...: DeepSpeed's own
        return getattr(self.inner, name)


@contextlib.contextmanager
def trusted_loads(engine):
    """Within: ``engine`` (a DeepSpeed engine) loads every checkpoint file with :func:`safe_load`
    (its own checkpoint engine loads with ``weights_only=False``); yields the guard."""
    inner = engine.checkpoint_engine
    guard = _GuardedCheckpointEngine(inner)
    engine.checkpoint_engine = guard
    try:
        yield guard
    finally:
        engine.checkpoint_engine = inner


class _TorchWithSafeLoad:
    """The ``torch`` module as ``deepspeed.utils.zero_to_fp32`` sees it within
    :func:`safe_zero_to_fp32`: everything torch's own, but ``load`` is :func:`safe_load`."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def load(f, map_location=None, weights_only=None, mmap=None, **_):
        return safe_load(f, map_location=map_location, mmap=mmap)


@contextlib.contextmanager
def safe_zero_to_fp32():
    """Within: DeepSpeed's ``zero_to_fp32`` (which loads with ``weights_only=False``) reads every
    file through :func:`safe_load`; yields the module. Only that module's name ``torch`` is
    replaced, for the length of the block: ``torch.load`` itself is untouched."""
    from deepspeed.utils import zero_to_fp32

    real = zero_to_fp32.torch
    zero_to_fp32.torch = _TorchWithSafeLoad()
    try:
        yield zero_to_fp32
    finally:
        zero_to_fp32.torch = real


# -- save and load ---------------------------------------------------------------------------


def save(engine, root: str, step: int, client_state: dict, keep: int = 2) -> str:
    """Save a DeepSpeed checkpoint for ``step``; mark it complete only when every rank is done.

    A full disk raises :class:`DiskFull` naming the file being written and the last complete
    checkpoint; the unfinished folder is removed (by rank 0: it frees the space a retry needs)."""
    tag = tag_for(step)
    folder = os.path.join(root, tag)
    if _is_rank0():
        os.makedirs(root, exist_ok=True)
        # torn earlier attempts (a save killed midway, at this step or, before a resume with another
        # --save-every, at any other): no marker, and no save but this one runs in the folder
        for name in os.listdir(root):
            torn = os.path.join(root, name)
            if _TAG.match(name) and os.path.isdir(torn) and not os.path.exists(os.path.join(torn, MARKER)):
                shutil.rmtree(torn)
    _barrier()
    with trusted_loads(engine) as guard:
        try:
            engine.save_checkpoint(root, tag=tag, client_state=client_state, save_latest=False)
        except (OSError, RuntimeError) as exc:
            path = guard.writing or folder
            if not is_disk_full(exc, path):
                raise
            device = device_of(path)  # before the unfinished folder frees its space
            raise DiskFull(os.path.abspath(path), device, root, _removed_note(folder)) from exc
    _barrier()
    if _is_rank0():
        for path, text in ((os.path.join(folder, MARKER), json.dumps({"step": step})),
                           (os.path.join(root, POINTER), tag)):
            with reporting_full_disk(path, root):
                _atomic_write(path, text)
        for old in complete_tags(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    _barrier()
    return tag


def _removed_note(folder: str) -> str:
    """Remove an unfinished checkpoint folder (rank 0; never one with the marker); says so."""
    if not _is_rank0() or not os.path.isdir(folder) or os.path.exists(os.path.join(folder, MARKER)):
        return ""
    shutil.rmtree(folder, ignore_errors=True)
    return f". The unfinished {folder} was removed"


def load(engine, root: str, tag: str | None = None):
    """Load checkpoint ``tag`` (None: the newest complete one) into ``engine``; returns its client
    state, or None when there is no complete checkpoint. Every file is checked first, on every rank
    (:func:`check_files`: all ranks refuse together, naming the file), then read through
    :func:`safe_load`."""
    tag = tag or latest_complete(root)
    if tag is None:
        return None
    folder = os.path.join(root, tag)
    refusal = None
    try:
        check_files(folder)
    except ValueError as exc:
        refusal = exc
    if _distributed() and dist.get_world_size() > 1:
        found = [None] * dist.get_world_size()
        dist.all_gather_object(found, None if refusal is None else str(refusal))
        first = next((m for m in found if m), None)
        if refusal is None and first is not None:
            refusal = ValueError(first)
    if refusal is not None:
        raise refusal
    # zero_to_fp32 too: DeepSpeed reaches it when a load leaves the optimizer states out
    with trusted_loads(engine), safe_zero_to_fp32():
        _, client_state = engine.load_checkpoint(root, tag=tag)
    if client_state is None:
        raise RuntimeError(f"checkpoint {folder} is marked complete but could not be loaded")
    return client_state
