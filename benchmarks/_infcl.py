"""Inf-CL (PyPI ``inf-cl`` 1.2.1, import name ``inf_cl``) as a loss benchmark backend.

Inf-CL computes plain InfoNCE (no hardness weights), so it is compared with
``reference_loss(q, t, logit_scale=scale, alpha=0.0, symmetric=..., reduction="mean")``.

What Inf-CL 1.2.1 computes (read from its source, ``inf_cl/ring.py`` and ``inf_cl/flash.py``):

* ``cal_inf_loss(q, k, labels=None, scale=None, head_dim=256)`` returns the **mean** over rows i
  of ``logsumexp_j(<s*q_i, k_j>) - <s*q_i, k_{labels_i}>``: the one-way q->k InfoNCE, with the
  scale multiplied into ``q`` (``scale * q``, in q's dtype) before the logits; ``labels``
  defaults to ``arange(B)`` (positives on the diagonal), ``scale`` to 1. A symmetric CLIP loss
  is ``(cal_inf_loss(q, t, scale=s) + cal_inf_loss(t, q, scale=s)) / 2``, exactly as in the
  ``__main__`` of ``inf_cl/ring.py``.
* Without an initialised ``torch.distributed`` group it runs ``_cal_flash_loss``: the Triton
  kernels of ``inf_cl/flash.py`` (``FlashProb``: forward ``_prob_fwd_kernel`` for the row
  logsumexp; backward ``_dq_prob_bwd_kernel`` and ``_dk_prob_bwd_kernel``, each recomputing the
  logits). No process group is needed on one GPU. With a group it runs ``InfProb`` (the same
  kernels in a ring over the ranks; with one rank, plus a send/recv of dK to itself, which
  needs NCCL: gloo cannot send to its own rank).
* Inputs are reshaped ``view(B, -1, head_dim)`` and cast ``.float()``: any float dtype is
  computed in fp32, with TF32 matmuls (``tl.dot`` on fp32 defaults to TF32; the backward
  rounds its operands to TF32 with inline PTX ``cvt.rna.tf32.f32``). ``head_dim`` must be a
  power of two in [16, 256] dividing d (the kernels load ``max(next_pow2(head_dim), 16)``
  columns per head without a mask and use that as the row stride).
* CUDA only: ``_flash_prob_forward``/``_flash_prob_backward`` ``assert q.is_cuda and
  k.is_cuda``, and the inline PTX cannot run under ``TRITON_INTERPRET=1``.
* ``scale`` as a tensor that requires grad is wrapped in ``GradientGather``, whose backward
  calls ``dist.all_reduce`` (fails without a process group); this adapter passes a Python
  float, so that never runs.

    python benchmarks/_infcl.py      # self-check against reference_loss (float64 truth)
"""

from __future__ import annotations

import math
import sys
import tempfile
import warnings
from pathlib import Path

import torch

__all__ = [
    "INF_CL_ALIGN",
    "destroy_created_process_group",
    "ensure_single_process_group",
    "inf_cl_available",
    "inf_cl_head_dim",
    "make_inf_cl_loss",
]

HEAD_DIMS = (256, 128, 64, 32, 16)  # powers of two the kernels handle; the largest dividing d is used
INF_CL_ALIGN = 64  # BLOCK_M = BLOCK_N of the kernels; see the note on B in make_inf_cl_loss
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_created_group = False  # whether ensure_single_process_group created the default group


def inf_cl_available(device: torch.device | str | None = None) -> tuple[bool, str]:
    """(True, version) when Inf-CL can run on ``device`` (default: cuda), else (False, why)."""
    device = torch.device("cuda" if device is None else device)
    try:
        import inf_cl  # noqa: F401
        from inf_cl import cal_inf_loss  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return False, (f"inf_cl is not importable ({type(exc).__name__}: {exc}); install the wheel "
                       "(pip install inf-cl==1.2.1, no deps needed beyond torch, triton, numpy)")
    if device.type != "cuda":
        return False, (f"Inf-CL runs on CUDA only (its kernels assert q.is_cuda and use inline PTX); "
                       f"device is {device}")
    if not torch.cuda.is_available():
        return False, "Inf-CL needs CUDA, and torch.cuda.is_available() is False"
    try:
        from importlib.metadata import version

        ver = version("inf-cl")
    except Exception:  # noqa: BLE001
        ver = "unknown version"
    return True, f"inf-cl {ver}"


def inf_cl_head_dim(d: int) -> int | None:
    """The head_dim this adapter passes for embedding width d (largest of 256..16 dividing d)."""
    for h in HEAD_DIMS:
        if d % h == 0:
            return h
    return None


def ensure_single_process_group(device: torch.device | str) -> bool:
    """Initialises a 1-rank default process group if none exists; returns True if it made one.

    Not needed for ``make_inf_cl_loss(..., path="flash")`` (the default). ``path="ring"`` runs
    Inf-CL's ``InfProb`` over this group; its backward sends dK to its own rank, which NCCL
    allows and gloo does not, so CUDA devices get NCCL. Rendezvous is a file under a fresh temp
    dir (no port to pick). An existing group is kept if it has one rank; more is an error.
    """
    global _created_group
    import torch.distributed as dist

    device = torch.device(device)
    if dist.is_available() and dist.is_initialized():
        ws = dist.get_world_size()
        if ws != 1:
            raise RuntimeError(f"a process group of {ws} ranks is initialised: Inf-CL would compute a "
                               "cross-rank loss; this adapter handles one process")
        return False
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this torch build")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device if device.index is not None else torch.cuda.current_device())
    init_file = Path(tempfile.mkdtemp(prefix="infcl_pg_")) / "rendezvous"
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=0, world_size=1)
    _created_group = True
    return True


def destroy_created_process_group() -> None:
    """Destroys the group made by ensure_single_process_group (no-op otherwise)."""
    global _created_group
    import torch.distributed as dist

    if _created_group and dist.is_initialized():
        dist.destroy_process_group()
    _created_group = False


def _check_inputs(q: torch.Tensor, t: torch.Tensor, d: int) -> None:
    for name, x in (("q", q), ("t", t)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"{name} must be 2-D (B x d), got shape {tuple(x.shape)}")
        if x.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be fp16/bf16/fp32/fp64 (Inf-CL computes in fp32), got {x.dtype}")
        if x.shape[1] != d:
            raise ValueError(f"{name} has width {x.shape[1]}, but make_inf_cl_loss was built for d={d}")
        if x.device.type != "cuda":
            raise ValueError(f"{name} is on {x.device}: Inf-CL runs on CUDA only")
    if q.shape != t.shape:
        raise ValueError(f"q and t must have the same shape (positives on the diagonal), got "
                         f"{tuple(q.shape)} and {tuple(t.shape)}")
    if q.device != t.device:
        raise ValueError(f"q and t must be on the same device, got {q.device} and {t.device}")


def make_inf_cl_loss(*, scale: float, symmetric: bool, d: int, head_dim: int | None = None,
                     path: str = "flash", check_inputs: bool = True):
    """A callable ``(q, t) -> scalar`` equal to ``reference_loss(q, t, logit_scale=scale,
    alpha=0.0, symmetric=symmetric, reduction="mean")``, differentiable in q and t, via Inf-CL.

    scale: the logit scale (multiplied into the logits, as reference_loss's ``logit_scale``);
        taken as a Python float (no gradient flows to it).
    symmetric: mean of the q->t and t->q InfoNCE means (two ``cal_inf_loss`` calls), else q->t.
    d: the embedding width; head_dim defaults to the largest of 256, 128, 64, 32, 16 dividing d.
    path: "flash" (default): ``inf_cl.cal_inf_loss`` with no process group, which is its single
        GPU path (FlashProb kernels); the call raises if a group is initialised, since
        cal_inf_loss would silently switch to the ring path. "ring": ``cal_inf_loss`` over a
        1-rank group (made here with ensure_single_process_group if none exists; NCCL): the
        InfProb ring code, one self send/recv of dK per backward more.

    Note on B: the dK kernel (``_dk_prob_bwd_kernel``) masks its dLSE/LSE loads with
    ``offs_m < seqlen_q`` instead of ``start_m + offs_m < seqlen_q``; for B not a multiple of 64
    it reads up to 63 floats past dLSE and multiplies them by 0, so garbage NaN/Inf there could
    reach dT. A warning is issued for such B.
    """
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"scale must be a scalar, got a tensor of shape {tuple(scale.shape)}")
        scale = float(scale.detach())
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}") from None
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite positive float, got {scale}")
    if not isinstance(d, int) or d <= 0:
        raise ValueError(f"d must be a positive int, got {d!r}")
    if head_dim is None:
        head_dim = inf_cl_head_dim(d)
        if head_dim is None:
            raise ValueError(f"d={d} is not supported by Inf-CL: it needs d divisible by a head_dim "
                             f"in {HEAD_DIMS} (d divisible by 16)")
    else:
        if head_dim not in HEAD_DIMS:
            raise ValueError(f"head_dim={head_dim} is not supported by Inf-CL: use one of {HEAD_DIMS}")
        if d % head_dim:
            raise ValueError(f"d={d} is not divisible by head_dim={head_dim}")
    if path not in ("flash", "ring"):
        raise ValueError(f"path must be 'flash' or 'ring', got {path!r}")

    import torch.distributed as dist
    from inf_cl import cal_inf_loss

    warned = set()

    def _group_state() -> int:
        """0 when no default group is initialised, else its world size."""
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size()
        return 0

    def loss_fn(q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if check_inputs:
            _check_inputs(q, t, d)
            B = q.shape[0]
            if B % INF_CL_ALIGN and B not in warned:
                warned.add(B)
                warnings.warn(f"B={B} is not a multiple of {INF_CL_ALIGN}: Inf-CL's dK kernel reads "
                              "past the end of dLSE for the last row block (see make_inf_cl_loss)",
                              stacklevel=2)
        ws = _group_state()
        if path == "flash" and ws:
            raise RuntimeError(f"a process group ({ws} rank(s)) is initialised, so cal_inf_loss would run "
                               "its ring path; use path='ring' or destroy the group")
        if path == "ring":
            if ws == 0:
                ensure_single_process_group(q.device)
            elif ws != 1:
                raise RuntimeError(f"a process group of {ws} ranks is initialised: Inf-CL would compute a "
                                   "cross-rank loss; this adapter handles one process")
        q = q.contiguous()  # Inf-CL views k as (B, heads, head_dim); no-ops for contiguous inputs
        t = t.contiguous()
        l_qt = cal_inf_loss(q, t, scale=scale, head_dim=head_dim)
        if not symmetric:
            return l_qt
        return (l_qt + cal_inf_loss(t, q, scale=scale, head_dim=head_dim)) / 2

    loss_fn.head_dim = head_dim
    loss_fn.path = path
    return loss_fn


# --------------------------------------------------------------------------- self-check


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref|, as benchmarks/_common.rel_err."""
    x = x.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    if not bool(torch.isfinite(x).all()):
        return float("inf")
    return (x - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)


def _pairs(B: int, d: int, seed: int):
    """Unit rows, positives correlated with their queries (as in the benchmark inputs)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(B, d, generator=g, dtype=torch.float64), dim=1)
    t = torch.nn.functional.normalize(q + 0.5 * torch.randn(B, d, generator=g, dtype=torch.float64), dim=1)
    return q, t


def _check_case(B, d, dtype, symmetric, scale, device, path, tol):
    from llave_fast.reference import reference_loss

    q0, t0 = _pairs(B, d, seed=B * 7 + d)
    q0, t0 = q0.to(dtype).to(torch.float64), t0.to(dtype).to(torch.float64)  # truth of the rounded inputs
    qr, tr = q0.clone().requires_grad_(), t0.clone().requires_grad_()
    ref = reference_loss(qr, tr, logit_scale=scale, alpha=0.0, symmetric=symmetric, reduction="mean")
    ref.backward()
    q = q0.to(device=device, dtype=dtype).requires_grad_()
    t = t0.to(device=device, dtype=dtype).requires_grad_()
    fn = make_inf_cl_loss(scale=scale, symmetric=symmetric, d=d, path=path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = fn(q, t)
    loss.backward()
    errs = {"loss": _rel_err(loss, ref), "dq": _rel_err(q.grad, qr.grad), "dt": _rel_err(t.grad, tr.grad)}
    ok = errs["loss"] <= tol[0] and errs["dq"] <= tol[1] and errs["dt"] <= tol[1]
    return ok, errs, float(loss.detach()), float(ref.detach())


def _self_check() -> int:
    repo = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(repo))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    avail, why = inf_cl_available(device)
    print(f"Inf-CL self-check on {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}: "
          f"available={avail} ({why}); torch {torch.__version__}")
    if not avail:
        print("SKIP: nothing to check here (Inf-CL needs CUDA); run on a GPU machine")
        return 0
    scale = 50.0
    # tolerances as benchmarks/bench_loss.py: Inf-CL's fp32 is TF32 (loss rel, grad max-abs / max |grad|)
    tols = {torch.float32: (5e-3, 5e-2), torch.bfloat16: (1e-2, 6e-2), torch.float16: (5e-3, 3e-2)}
    cases = [  # (B, d, dtype, symmetric, path, counted)
        (64, 64, torch.float32, True, "flash", True),
        (256, 128, torch.float32, True, "flash", True),
        (256, 128, torch.float32, False, "flash", True),
        (4096, 1024, torch.float32, True, "flash", True),
        (4096, 1536, torch.bfloat16, True, "flash", True),
        (4096, 896, torch.bfloat16, False, "flash", True),  # head_dim 128
        (1000, 256, torch.float32, True, "flash", False),  # B % 64 != 0: informational
        (256, 128, torch.float32, True, "ring", True),  # InfProb over a 1-rank NCCL group (made last)
    ]
    all_ok = True
    for B, d, dtype, sym, path, counted in cases:
        tag = f"B={B:5d} d={d:5d} {str(dtype).replace('torch.', ''):8s} {'sym ' if sym else 'q2t '} {path:5s}"
        try:
            ok, errs, loss, ref = _check_case(B, d, dtype, sym, scale, device, path, tols[dtype])
            msg = (f"loss {loss:.6f} ref {ref:.6f}  rel: loss {errs['loss']:.2e} dq {errs['dq']:.2e} "
                   f"dt {errs['dt']:.2e}")
        except Exception as exc:  # noqa: BLE001
            ok, msg = False, f"{type(exc).__name__}: {exc}"
        verdict = ("PASS" if ok else "FAIL") if counted else ("ok (info)" if ok else "FAIL (info)")
        print(f"  {tag}  {msg}  {verdict}", flush=True)
        all_ok &= ok or not counted
    # bad inputs are refused with the argument's name
    for kwargs, needle in (({"d": 40}, "d=40"), ({"d": 128, "head_dim": 48}, "head_dim=48")):
        try:
            make_inf_cl_loss(scale=scale, symmetric=True, **kwargs)
            print(f"  bad input {kwargs}: not refused  FAIL")
            all_ok = False
        except ValueError as exc:
            good = needle in str(exc)
            print(f"  bad input {kwargs}: {exc}  {'PASS' if good else 'FAIL'}")
            all_ok &= good
    destroy_created_process_group()
    print("Inf-CL self-check:", "PASS" if all_ok else "FAIL", flush=True)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(_self_check())
