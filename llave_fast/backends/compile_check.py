"""Compile every variant of the Triton kernels for a CUDA architecture, on any machine.

``python -m llave_fast.backends.compile_check 90`` (run with TRITON_INTERPRET unset) runs
Triton's whole compiler (front end, layouts, PTX, ptxas) for sm_90 without a GPU, using
the launch configuration the triton backend uses on CUDA. It catches what the interpreter
cannot: type errors, loop-carried type changes, shared-memory overflow, bad tile shapes.
It does not run anything, so it proves nothing about results or speed.
"""

from __future__ import annotations

import itertools
import os
import sys

import torch

_DTYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}
# shared memory per block on the architectures we target (bytes, opt-in maximum)
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def _compile(fn, types, constexprs, target, num_warps, num_stages):
    import triton
    from triton.compiler import ASTSource

    signature, it = {}, iter(types)
    for name in fn.arg_names:
        signature[name] = "constexpr" if name in constexprs else next(it)
    consts = {(fn.arg_names.index(k),): v for k, v in constexprs.items()}
    # as the launcher specializes the usual call (torch tensors, d a multiple of 16): 16-byte
    # aligned pointers and row stride D % 16 == 0. This enables vectorized async copies, whose
    # pipeline buffers set the shared memory of the 16-bit kernels (3x the unspecialized figure).
    # The dS strip's and the fp32 S's row strides are always multiples of 64 (``ds_row_stride``,
    # ``s_row_stride``): divisible by 16, which is what the launcher's integer specialisation records
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if signature[name].startswith("*") or name in ("D", "DS_STRIDE", "S_STRIDE")}
    src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=target, options={"num_warps": num_warps, "num_stages": num_stages})


def compile_all(arch: int = 90) -> list[str]:
    """Compile the forward, the dS (backward) and the statistics kernels for every dtype and
    flag set (and exact fp32); returns a report, one line per variant."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter replaces the compiler")
    from triton.backends.compiler import GPUTarget

    from llave_fast.backends.triton_backend import ds_dtype, gpu_config
    from llave_fast.kernels.hardness_ds import hardness_ds_kernel
    from llave_fast.kernels.hardness_fwd import hardness_fwd_kernel
    from llave_fast.kernels.hardness_stats import hardness_stats_kernel

    target = GPUTarget("cuda", arch, 32)
    limit = SMEM_LIMIT.get(arch, 99 * 1024)
    report = []
    ids = ["*i64"] * 2 + ["i32"] + ["*i64"] * 2
    for dtype, ptr in _DTYPES.items():
        cfg = gpu_config(dtype)
        prec = "tf32" if dtype == torch.float32 else "ieee"
        for has_tid, has_qid, need_col, need_e in itertools.product([False, True], repeat=4):
            if has_qid and not need_col:
                continue
            types = [ptr, ptr] + ["i32"] * 5 + ["fp32"] * 2 + ids + ["*fp32"] * 6 + ["i32"] * 2
            barriers = {}
            # the column partials per program group (read back behind a barrier) and, where there
            # are column statistics, per row tile (FWD_COL="tile": written once, nothing read back)
            for per_tile in ([False, True] if need_col else [False]):
                k = _compile(hardness_fwd_kernel, types, dict(
                    BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, HAS_TID=has_tid, HAS_QID=has_qid, NEED_COL=need_col,
                    NEED_E=need_e, UPCAST=False, PREC=prec, COL_PER_TILE=per_tile), target, cfg.num_warps,
                    cfg.num_stages)
                barriers[per_tile] = len(_ptx_ops(k, r"bar\.sync|barrier\.sync"))
                what = (f"fwd {ptr} tid={has_tid} qid={has_qid} col={need_col} e={need_e}"
                        + (" FWD_COL=tile" if per_tile else ""))
                _check_smem(k, limit, what, report, f", {barriers[per_tile]} barriers")
            if need_col and k.asm.get("ptx") and barriers[True] >= barriers[False]:
                raise RuntimeError(f"{what}: the per-tile column partials must drop the read-back barrier "
                                   f"({barriers[True]} barriers against {barriers[False]})")
        # the strip backward's dS kernel, strip in ds_dtype's default (bf16 for bf16 inputs,
        # fp16 scaled by sigma for fp16, fp32 for fp32); fp32 inputs also in exact fp32
        # (PREC="ieee", torch's default with TF32 off)
        dsd = ds_dtype(cfg, dtype, torch.device("cuda"))
        for p in ([prec, "ieee"] if dtype == torch.float32 else [prec]):
            for has_tid, has_qid, has_col in itertools.product([False, True], repeat=3):
                if has_qid and not has_col:
                    continue
                k = _compile_ds(hardness_ds_kernel, ptr, _DTYPES[dsd], cfg, has_tid, has_qid, has_col, p,
                                dsd == torch.float16, target)
                _check_smem(k, limit, f"ds {ptr} strip={_DTYPES[dsd]} prec={p} tid={has_tid} qid={has_qid} "
                            f"col={has_col}", report, _check_ds_stores(k))
                if p != prec:
                    continue
                # the S-cache / stream backward: the tile of S read from the fp32 S (CACHED)
                k = _compile_ds(hardness_ds_kernel, ptr, _DTYPES[dsd], cfg, has_tid, has_qid, has_col, p,
                                dsd == torch.float16, target, cached=True)
                what = f"ds cached {ptr} strip={_DTYPES[dsd]} tid={has_tid} qid={has_qid} col={has_col}"
                _check_smem(k, limit, what, report, _check_ds_stores(k) + _check_s_loads(k, what) + _check_no_spill(k, what))
        if dtype != torch.float32:
            # DS_LOWP=False (an fp32 strip for 16-bit inputs, a debugging override): every option on
            k = _compile_ds(hardness_ds_kernel, ptr, "*fp32", cfg, True, True, True, prec, False, target)
            _check_smem(k, limit, f"ds {ptr} strip=*fp32 (DS_LOWP=False) prec={prec} all options", report,
                        _check_ds_stores(k))
        if dtype == torch.float32:
            # the exact-fp32 forward, every option on
            types = [ptr, ptr] + ["i32"] * 5 + ["fp32"] * 2 + ids + ["*fp32"] * 6 + ["i32"] * 2
            k = _compile(hardness_fwd_kernel, types, dict(
                BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, HAS_TID=True, HAS_QID=True, NEED_COL=True, NEED_E=True,
                UPCAST=False, PREC="ieee", COL_PER_TILE=False), target, cfg.num_warps, cfg.num_stages)
            _check_smem(k, limit, f"fwd {ptr} prec=ieee all options", report)
    # the S-cache / stream forward's statistics pass (S is fp32 whatever the inputs)
    cfg = gpu_config(torch.bfloat16)
    for has_tid, has_qid, need_col, need_e in itertools.product([False, True], repeat=4):
        if has_qid and not need_col:
            continue
        types = (["*fp32"] + ["i32"] * 6 + ["fp32"] * 2 + ids + ["*fp32"] * 3 + ["i32"] + ["*fp32"] * 3 + ["i32"])
        k = _compile(hardness_stats_kernel, types, dict(
            BM=cfg.STATS_BM, BN=cfg.STATS_BN, HAS_TID=has_tid, HAS_QID=has_qid, NEED_COL=need_col,
            NEED_E=need_e), target, cfg.STATS_WARPS, 1)
        what = f"stats tid={has_tid} qid={has_qid} col={need_col} e={need_e}"
        _check_smem(k, limit, what, report, _check_s_loads(k, what) + _check_no_spill(k, what))
    return report


def _compile_ds(fn, ptr, ds_ptr, cfg, has_tid, has_qid, has_col, prec, scaled, target, cached=False):
    """hardness_ds_kernel: (q, T, dS, DS_STRIDE, row0, row_end, NT, N_COL, D, offset, s, alpha,
    ids, row_lse, col_lse, g_row, g_col, pos, sigma, S, S_STRIDE, s_row0)."""
    ids = ["*i64"] * 2 + ["i32"] + ["*i64"] * 2
    types = [ptr, ptr, ds_ptr, "i32"] + ["i32"] * 6 + ["fp32"] * 2 + ids + ["*fp32"] * 6 + ["*fp32", "i32", "i32"]
    return _compile(fn, types, dict(
        BM=cfg.DS_BM, BN=cfg.DS_BN, BK=cfg.BK, GROUP_M=cfg.DS_GROUP_M, HAS_TID=has_tid,
        HAS_QID=has_qid, HAS_COL=has_col, UPCAST=False, PREC=prec, SCALED=scaled, CACHED=cached), target,
        cfg.DSC_WARPS if cached else cfg.DS_WARPS, 1 if cached else cfg.DS_STAGES)


def _check_s_loads(kernel, what) -> str:
    """The fp32 S is read with 16-byte vector loads (its row stride is a multiple of 64 and the
    column mask is against it). Returns them for the report."""
    ops = sorted(set(_ptx_ops(kernel, r"ld\.global")))
    wide = [op for op in ops if ".v4." in op and (".f32" in op or ".b32" in op)]
    if not wide:
        raise RuntimeError(f"{what}: S must be read with 16-byte vector loads, the PTX has {ops}")
    return ", " + " ".join(wide)


def _check_no_spill(kernel, what) -> str:
    """No register spills: a stack frame in the cubin's resource usage fails (skipped when
    cuobjdump is not there)."""
    res = _resources(kernel)
    if res and not res.endswith(", 0 B stack"):
        raise RuntimeError(f"{what}: registers spill{res}")
    return ""


def _ptx_ops(kernel, pattern: str) -> list[str]:
    """Instructions of the kernel's PTX matching ``pattern`` (at the start of a line, after
    an optional predicate); empty when the PTX is not there."""
    import re

    ptx = kernel.asm.get("ptx", "") if hasattr(kernel, "asm") else ""
    return re.findall(r"^\s*(?:@!?%p\d+\s+)?(" + pattern + r"[\w.:]*)", ptx, flags=re.M)


def _check_ds_stores(kernel) -> str:
    """The dS kernel's only global stores are the strip's, and they must be 16-byte vectors
    (the padded row stride and the stride-bounded column mask make them so for any NT; a
    mask that can change at any column falls back to 2-byte scalar stores). Returns them."""
    ops = sorted(set(_ptx_ops(kernel, r"st\.global")))
    if not ops or any(".v4." not in op for op in ops):
        raise RuntimeError(f"ds: the dS stores must be 16-byte vectors, the PTX has {ops}")
    return ", " + " ".join(ops)


def _resources(kernel) -> str:
    """Registers and stack-frame bytes per thread from the cubin (Triton ships cuobjdump);
    a stack frame means spilled registers. Empty when cuobjdump is not there."""
    import re
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    cubin = kernel.asm.get("cubin") if hasattr(kernel, "asm") else None
    if not cubin or not os.path.exists(tool):
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return f", {m.group(1)} registers, {m.group(2)} B stack" if m else ""


def _check_smem(kernel, limit, what, report, note=""):
    shared = kernel.metadata.shared
    if shared > limit:
        raise RuntimeError(f"{what}: needs {shared} bytes of shared memory, the architecture allows {limit}")
    report.append(f"{what}: ok, {shared} B shared{_resources(kernel)}{note}")


if __name__ == "__main__":
    archs = [int(a) for a in sys.argv[1:]] or [90]
    for a in archs:
        lines = compile_all(a)
        print(f"sm_{a}: {len(lines)} kernel variants compiled")
        for line in lines:
            print("  " + line)
