"""Shared machinery of the loss tests: inputs, runs, the tolerance rule and the mismatch reporter.

Truth is ``llave_fast.reference.reference_loss`` (the one copy of the formula) run in
float64 on upcast copies of the very inputs the backend sees. Tolerance rule (Cut
Cross-Entropy's): a backend's relative error against the truth must be no worse than

    FACTOR * (relative error of the eager reference run in the same low precision) + margin[dtype]

for the loss and for every gradient (query, target, negatives, logit_scale). For 16-bit
inputs on the CPU a second, tighter bound applies as well (see ``assert_close_rule``):
both fused backends accumulate in fp32 there, and the bf16 eager reference is too coarse
(1-4% on gradients) for the first rule alone to catch e.g. a dropped mask.
"""

from __future__ import annotations

import itertools
import math
import os
import zlib
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from llave_fast import hardness_weighted_loss
from llave_fast.reference import reference_loss

# ---------------------------------------------------------------- tolerance table
FACTOR = 2.0
MARGIN = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}
#: accumulation rule (16-bit inputs on the CPU): margin over 2 * (fp32 eager error + output rounding)
ACC_MARGIN = 5e-5
#: ... plus the unit roundoff of the one intermediate that is 16-bit: the dS strip the backward's
#: GEMMs take (fp16: scaled fp16 everywhere; bf16: bf16 on CUDA, fp32 under the CPU interpreter).
#: S itself is fp32 on every path, so nothing else is rounded before the outputs.
ACC_STRIP_ROUNDING = {("cpu", torch.float16): 2.0**-11, ("cuda", torch.float16): 2.0**-11,
                      ("cuda", torch.bfloat16): 2.0**-8}
DTYPE_NAMES = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

#: parametrisation of the 16/32-bit dtypes with their margins: ``@pytest.mark.parametrize("dtype,margin", DTYPES)``
DTYPES = [
    pytest.param(torch.float32, MARGIN[torch.float32], id="fp32"),
    pytest.param(torch.bfloat16, MARGIN[torch.bfloat16], id="bf16"),
    pytest.param(torch.float16, MARGIN[torch.float16], id="fp16"),
]

#: tile sizes that make small shapes span several row/column blocks and program groups
SMALL_TILES = dict(BM=16, BN=16, BK=16, GR_MAX=2, GC_MAX=3, STATS_BM=16, STATS_BN=16, STATS_GC_MAX=3,
                   STATS_PROGRAMS=64)
#: kernel_config of each path where S lives (backends.common.S_MODES); "stream" with a budget of
#: 10 fp32 rows of a 64-column stride: several blocks on every shape of more than 10 rows
S_PATHS = {"cache": dict(S_MODE="cache"), "stream": dict(S_MODE="stream", S_CACHE_BYTES=10 * 64 * 4),
           "fused": dict(S_MODE="fused")}

MASKS = ("none", "tid", "qid", "both", "tid_neg")


@pytest.fixture(autouse=True)
def _cpu_test_env(request):
    """CPU test environment (autouse where imported).

    * One intra-op thread while a test runs: the tensors are tiny, and on a shared 2-core
      machine OpenMP's spinning threads make each small op ~100x slower (restored afterwards).
    * A CPU test of the triton backend needs the interpreter: with LLAVE_FAST_COMPILED=1
      (GPU runs) conftest leaves TRITON_INTERPRET off, and those tests skip.
    """
    if "triton" in request.node.name and os.environ.get("TRITON_INTERPRET", "0") != "1":
        pytest.skip("the triton backend on CPU tensors needs TRITON_INTERPRET=1 (conftest sets it "
                    "unless LLAVE_FAST_COMPILED=1)")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def seed_for(nodeid: str) -> int:
    """A per-test seed: every test draws fresh inputs, reproducibly (the seed is in every report)."""
    return zlib.crc32(nodeid.encode()) & 0x7FFFFFFF


# ---------------------------------------------------------------- inputs
@dataclass
class Case:
    """Inputs of one loss evaluation. q, t, neg are in the run's dtype (what every run sees)."""

    q: torch.Tensor
    t: torch.Tensor
    neg: torch.Tensor | None
    target_ids: torch.Tensor | None
    query_ids: torch.Tensor | None
    scale: float
    learnable_scale: bool
    alpha: float
    symmetric: bool = True
    reduction: str = "mean"
    seed: int = 0
    label: str = ""

    @property
    def B(self):
        return self.q.shape[0]

    @property
    def M(self):
        return 0 if self.neg is None else self.neg.shape[0]

    def describe(self) -> str:
        tid = None if self.target_ids is None else tuple(self.target_ids.shape)
        qid = None if self.query_ids is None else tuple(self.query_ids.shape)
        return (
            f"[{self.label}] seed={self.seed} B={self.B} d={self.q.shape[1]} M={self.M} "
            f"dtype={DTYPE_NAMES.get(self.q.dtype, self.q.dtype)} scale={self.scale} "
            f"learnable_scale={self.learnable_scale} alpha={self.alpha} symmetric={self.symmetric} "
            f"reduction={self.reduction} target_ids={tid} query_ids={qid}"
        )


def correlation_for(d: int, n_cand: int, scale: float, alpha: float) -> float:
    """cos(q_i, t_i) that puts the positive logit near the largest negative one: loss O(1).

    Random unit vectors have S_ij ~ N(0, 1/d); the largest of n of them is ~ sqrt(2 ln n / d),
    weighted by (s + alpha). A positive far above that gives a loss ~1e-12 (cancellation makes
    relative errors meaningless); one far below gives a flat softmax. Neither is wanted.
    """
    spread = math.sqrt(2.0 * math.log(max(n_cand, 2)) / d)
    ratio = abs(scale + alpha) / scale
    return float(min(0.95, max(0.08, 0.75 * ratio * spread)))


def make_case(
    gen: torch.Generator,
    B: int,
    d: int,
    M: int = 0,
    dtype: torch.dtype = torch.float32,
    *,
    masks: str = "none",
    scale: float = 50.0,
    learnable_scale: bool = False,
    alpha: float = 9.0,
    symmetric: bool = True,
    reduction: str = "mean",
    id_range: int | None = None,
    min_loss: float | None = 0.3,
    seed: int = 0,
    label: str = "",
    device: torch.device | str = "cpu",
) -> Case:
    """L2-normalised Gaussian embeddings, targets correlated with their queries, never zeros.

    masks: "none", "tid" (target_ids of length B), "qid" (query_ids), "both" (both, length B),
    "tid_neg" (target_ids of length B + M covering the negatives, and query_ids).
    Ids are drawn from a small range so that repeated ids (false negatives) are common.

    With ``min_loss`` the draw is repeated until the float64 loss averages at least that
    per row: a loss near 0 is the difference of two large logits, and its relative error
    would measure cancellation, not the backend (tiny B draws it now and then).
    """
    if masks not in MASKS:
        raise ValueError(f"unknown masks option {masks!r}")
    if masks == "tid_neg" and M == 0:
        raise ValueError("masks='tid_neg' needs negatives (M > 0)")
    f64 = torch.float64
    cos = correlation_for(d, B + M, scale, alpha)
    c = math.sqrt(1.0 / cos**2 - 1.0)
    k = id_range if id_range is not None else max(2, (B + 2) // 3)
    for _attempt in range(50):
        q = F.normalize(torch.randn(B, d, generator=gen, dtype=f64), dim=1)
        noise = F.normalize(torch.randn(B, d, generator=gen, dtype=f64), dim=1)
        t = F.normalize(q + c * noise, dim=1)
        neg = None
        if M:
            # hard negatives: near some queries, a little further than the positives
            src = torch.randint(0, B, (M,), generator=gen)
            nn_ = F.normalize(torch.randn(M, d, generator=gen, dtype=f64), dim=1)
            neg = F.normalize(q[src] + 1.3 * c * nn_, dim=1)
        tid = qid = None
        if masks in ("tid", "both"):
            tid = torch.randint(0, k, (B,), generator=gen)
        if masks == "tid_neg":
            # the negatives' ids range a little wider: some are masked, not all
            tid = torch.cat([torch.randint(0, k, (B,), generator=gen), torch.randint(0, k + 2, (M,), generator=gen)])
        if masks in ("qid", "both", "tid_neg"):
            qid = torch.randint(0, k, (B,), generator=gen)
        dev = torch.device(device)
        tid = None if tid is None else tid.to(dev)
        qid = None if qid is None else qid.to(dev)
        case = Case(
            q=q.to(dev, dtype), t=t.to(dev, dtype), neg=None if neg is None else neg.to(dev, dtype),
            target_ids=tid, query_ids=qid, scale=scale, learnable_scale=learnable_scale, alpha=alpha,
            symmetric=symmetric, reduction=reduction, seed=seed, label=label,
        )
        if min_loss is None:
            return case
        per_row = reference_loss(
            case.q.double(), case.t.double(), logit_scale=scale, alpha=alpha, symmetric=symmetric,
            reduction="none", negatives=None if neg is None else case.neg.double(), target_ids=tid, query_ids=qid,
        )
        if per_row.mean().item() >= min_loss:
            return case
    raise AssertionError(f"could not draw a well-conditioned case: {case.describe()}, per-row loss {per_row}")


def upstream_grad(gen: torch.Generator, case: Case) -> torch.Tensor:
    """A random upstream gradient (float64), never 1; |g| >= 0.5 for a scalar loss."""
    if case.reduction == "none":
        return torch.randn(case.B, generator=gen, dtype=torch.float64)
    g = torch.randn((), generator=gen, dtype=torch.float64)
    return torch.sign(g) * (0.5 + g.abs())


# ---------------------------------------------------------------- runs
@dataclass
class Result:
    out: torch.Tensor  # as returned (its dtype is checked)
    grads: dict  # name -> gradient tensor as returned


def run(case: Case, dtype, upstream, *, backend: str | None, deterministic: bool = False,
        transform=None, **overrides) -> Result:
    """Forward + backward of one evaluation on fresh leaf copies in ``dtype``.

    backend None: ``reference_loss`` called directly (its own autograd); otherwise
    ``hardness_weighted_loss(..., backend=backend)``. ``transform`` may re-lay the inputs
    (non-contiguous views); it gets and returns (q, t, neg) leaves and derived tensors.
    """
    q = case.q.detach().to(dtype).clone().requires_grad_(True)
    t = case.t.detach().to(dtype).clone().requires_grad_(True)
    neg = None if case.neg is None else case.neg.detach().to(dtype).clone().requires_grad_(True)
    leaves = {"dq": q, "dt": t}
    if neg is not None:
        leaves["dneg"] = neg
    if case.learnable_scale:
        sdt = torch.float64 if dtype == torch.float64 else torch.float32
        scale = torch.tensor(case.scale, dtype=sdt, device=case.q.device, requires_grad=True)
        leaves["dscale"] = scale
    else:
        scale = case.scale
    qi, ti, ni = (q, t, neg) if transform is None else transform(q, t, neg)
    kw = dict(
        logit_scale=scale, alpha=case.alpha, symmetric=case.symmetric, reduction=case.reduction,
        negatives=ni, target_ids=case.target_ids, query_ids=case.query_ids,
    )
    kw.update(overrides)
    if backend is None:
        out = reference_loss(qi, ti, **kw)
    else:
        out = hardness_weighted_loss(qi, ti, backend=backend, deterministic=deterministic, **kw)
    names = list(leaves)
    g = upstream.to(device=out.device, dtype=out.dtype).reshape(out.shape)
    grads = torch.autograd.grad(out, [leaves[n] for n in names], g)
    return Result(out.detach(), dict(zip(names, grads)))


def run_truth(case: Case, upstream, **overrides) -> Result:
    return run(case, torch.float64, upstream, backend=None, **overrides)


# ---------------------------------------------------------------- comparison
def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64 (absolute when ref is all zeros); NaN/inf in x -> inf/nan."""
    x = x.detach().to(torch.float64)
    ref = ref.detach().to(torch.float64)
    diff = torch.linalg.vector_norm(x - ref).item()
    den = torch.linalg.vector_norm(ref).item()
    return diff / den if den > 0 else diff


def mismatch_report(name: str, got, ref, lowp=None, *, err=None, bound=None, context: str = "") -> str:
    """A readable account of a mismatch: which tensor, the worst index and the values there."""
    got64 = got.detach().to(torch.float64)
    ref64 = ref.detach().to(torch.float64)
    lines = [f"{name}: mismatch {context}".rstrip()]
    lines.append(f"  shape got {tuple(got.shape)} {got.dtype}, reference {tuple(ref.shape)}")
    if got64.shape == ref64.shape and got64.numel():
        diff = (got64 - ref64).abs()
        diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
        flat = int(torch.argmax(diff.reshape(-1)).item())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), got64.shape)) if got64.dim() else ()
        lines.append(
            f"  worst index {idx}: got {got64.reshape(-1)[flat].item():.9g}, "
            f"float64 reference {ref64.reshape(-1)[flat].item():.9g}"
            + (f", low-precision reference {lowp.detach().double().reshape(-1)[flat].item():.9g}" if lowp is not None
               and lowp.shape == got.shape else "")
            + f", |diff| {diff.reshape(-1)[flat].item():.3g}"
        )
        n_bad = int((~torch.isfinite(got64)).sum().item())
        if n_bad:
            lines.append(f"  {n_bad} non-finite element(s) in the result")
        lines.append(f"  |reference| max {ref64.abs().max().item():.3g}, ||reference|| {ref64.norm().item():.3g}")
    if err is not None:
        lines.append(f"  relative error {err:.3e}" + (f" > bound {bound:.3e}" if bound is not None else ""))
    return "\n".join(lines)


def assert_close_rule(name, got, ref, lowp, margin, *, factor=FACTOR, context="", acc_ref=None, strip_device=None):
    """The tolerance rule for one tensor; returns (err, bound).

    CCE rule: err <= factor * err(eager reference in the same low precision) + margin.
    With ``acc_ref`` (the eager reference run in float32 on the same 16-bit inputs), also
    the accumulation rule, where the fused backends compute in fp32 and round only their
    outputs and the dS strip: err <= factor * (err(acc_ref) + err(truth rounded to the output
    dtype)) + ACC_MARGIN + the strip's unit roundoff (ACC_STRIP_ROUNDING, by device:
    ``strip_device`` overrides the output's). The bf16 eager reference is so coarse (1-4% on
    gradients) that the CCE rule alone would let a dropped mask pass in bf16; this one does not.
    """
    assert got.shape == ref.shape, mismatch_report(name, got, ref, context=context)
    err = rel_err(got, ref)
    err_lowp = rel_err(lowp, ref)
    if not math.isfinite(err_lowp):
        err_lowp = 0.0  # a broken low-precision reference must not widen the bound
    bound = factor * err_lowp + margin
    how = f"low-precision reference error {err_lowp:.3e}, margin {margin:g}, factor {factor:g}"
    if acc_ref is not None:
        err_acc = rel_err(acc_ref, ref)
        err_round = rel_err(ref.to(got.dtype), ref)
        strip = ACC_STRIP_ROUNDING.get((strip_device or got.device.type, got.dtype), 0.0)
        margin_acc = ACC_MARGIN + (strip if name != "loss" else 0.0)
        acc_bound = factor * (err_acc + err_round) + margin_acc
        if acc_bound < bound:
            bound = acc_bound
            how = (f"accumulation rule: float32 reference error {err_acc:.3e}, output rounding {err_round:.3e}, "
                   f"margin {margin_acc:g}, factor {factor:g}")
    assert err <= bound, mismatch_report(name, got, ref, lowp, err=err, bound=bound, context=f"{context}\n  {how}")
    return err, bound


def assert_results_match(got: Result, truth: Result, lowp: Result, margin, context="", acc_ref: Result | None = None,
                         strip_device=None):
    """The rule on the loss and every gradient (the same set of gradients must come back)."""
    assert set(got.grads) == set(truth.grads), f"gradients {sorted(got.grads)} vs {sorted(truth.grads)} {context}"

    def acc(n):
        if acc_ref is None:
            return None
        return acc_ref.out if n == "loss" else acc_ref.grads[n]

    errs = {"loss": assert_close_rule("loss", got.out, truth.out, lowp.out, margin, context=context, acc_ref=acc("loss"),
                                      strip_device=strip_device)}
    for n in truth.grads:
        assert got.grads[n] is not None, f"{n} is None {context}"
        errs[n] = assert_close_rule(n, got.grads[n], truth.grads[n], lowp.grads[n], margin, context=context,
                                    acc_ref=acc(n), strip_device=strip_device)
    return errs


def check_backend(case: Case, backend: str, margin: float, gen: torch.Generator, *,
                  deterministic=False, transform=None, upstream=None, accumulation_rule=None) -> dict:
    """Run truth (fp64), the low-precision eager reference and the backend; apply the rule
    (and, for 16-bit inputs on the CPU, the accumulation rule: see ``assert_close_rule``).

    Also checks the returned dtypes: the loss is float32 for 16/32-bit inputs (float64 for
    float64), gradients come back in the inputs' dtype, and ``reduction='none'`` is (B,).
    """
    dtype = case.q.dtype
    g = upstream_grad(gen, case) if upstream is None else upstream
    truth = run_truth(case, g)
    # guard against a degenerate draw (loss ~1e-12: relative errors would mean nothing)
    assert truth.out.abs().max().item() > 1e-3, f"degenerate inputs, float64 loss {truth.out} {case.describe()}"
    lowp = run(case, dtype, g, backend=None)
    got = run(case, dtype, g, backend=backend, deterministic=deterministic, transform=transform)
    ctx = f"backend={backend} {case.describe()}"
    want_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert got.out.dtype == want_dtype, f"loss dtype {got.out.dtype}, want {want_dtype} {ctx}"
    want_shape = (case.B,) if case.reduction == "none" else ()
    assert tuple(got.out.shape) == want_shape, f"loss shape {tuple(got.out.shape)}, want {want_shape} {ctx}"
    for n, gr in got.grads.items():
        if n != "dscale":
            assert gr.dtype == dtype, f"{n} dtype {gr.dtype}, want {dtype} {ctx}"
    acc_ref = None
    if accumulation_rule is None:
        # on every device: S is fp32 on every path, the one 16-bit intermediate is the dS strip
        accumulation_rule = True
    if accumulation_rule and dtype in (torch.float16, torch.bfloat16):
        acc_ref = run(case, torch.float32, g, backend=None)
    return assert_results_match(got, truth, lowp, margin, context=ctx, acc_ref=acc_ref)


# ---------------------------------------------------------------- parameter grids
def pairwise(axes: dict, valid=lambda combo: True) -> list[dict]:
    """A deterministic greedy all-pairs selection: every pair of values of any two axes that
    can occur together in a valid combination appears in at least one returned combination."""
    names = list(axes)
    all_combos = [dict(zip(names, vals)) for vals in itertools.product(*(axes[n] for n in names))]
    all_combos = [c for c in all_combos if valid(c)]

    def key(v):
        return repr(v)

    def pairs_of(c):
        return {(a, key(c[a]), b, key(c[b])) for a, b in itertools.combinations(names, 2)}

    combo_pairs = [pairs_of(c) for c in all_combos]
    uncovered = set().union(*combo_pairs)
    chosen = []
    while uncovered:
        best = max(range(len(all_combos)), key=lambda i: (len(combo_pairs[i] & uncovered), -i))
        chosen.append(all_combos[best])
        uncovered -= combo_pairs[best]
    return chosen


def combo_id(c: dict) -> str:
    parts = []
    for k, v in c.items():
        if isinstance(v, torch.dtype):
            v = DTYPE_NAMES[v]
        elif isinstance(v, tuple):
            v = "x".join(str(x) for x in v)
        parts.append(f"{k}={v}")
    return "-".join(parts)


# ---------------------------------------------------------------- the command line, in process
def run_cli(capsys, *argv):
    """(exit code, stdout, stderr) of ``llave-fast ARGV`` run in this process (argparse's
    SystemExit included; arguments such as paths are passed as strings)."""
    from llave_fast.cli import main

    # what the test printed before is not the command's: DeepSpeed's import notice ("Setting accelerator to
    # CPU"), printed on stdout when a test's own save_pretrained is the first to import it in this worker
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err
