"""The benchmark scripts' own logic, on the CPU (their GPU figures need a GPU run).

The prepared GPU run (benchmarks/gpu_check.sh) has one short lease to work in: a crash in a
script's bookkeeping there costs the lease, so what can run here runs here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import gemm3  # noqa: E402


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env["TRITON_INTERPRET"] = "1"
    return env


@pytest.mark.parametrize("B,N", [(7, 5), (40, 33)])
def test_gemm3_floor_computes_the_three_products(B, N, monkeypatch):
    """The floor's backward really forms dS T and dS^T q (row blocks with a partial last block)."""
    monkeypatch.setattr(gemm3, "MAX_ELEMS", 3 * N)  # 3-row blocks
    g = torch.Generator().manual_seed(B)
    q = torch.randn(B, 16, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(N, 16, generator=g, dtype=torch.float64, requires_grad=True)
    fn = gemm3.gemm3_fn()
    out = fn(q, t)
    assert out.item() == pytest.approx((q[0] @ t[0]).item())
    out.backward()
    (dS,) = [v for v in fn.__closure__[0].cell_contents.values()][0:1]
    assert dS.shape == (3, N)
    # block r uses dS[: rows of block r]
    want_dq = torch.cat([dS[: min(3, B - r0)] @ t.detach() for r0 in range(0, B, 3)])
    want_dt = sum(dS[: min(3, B - r0)].t() @ q.detach()[r0:r0 + 3] for r0 in range(0, B, 3))
    torch.testing.assert_close(q.grad, want_dq)
    torch.testing.assert_close(t.grad, want_dt)


def test_backward_config_runs_the_strip_backward(monkeypatch):
    """bench_loss's triton_strip row: the backward (run after the forward's context closed)
    goes through the strip backward, and the override is restored afterwards."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        pytest.skip("needs the interpreter (CPU tensors)")
    import bench_loss
    from llave_fast.backends import triton_backend as tb

    calls = []
    real = tb._strip_backward_ds

    def spy(*a, **k):
        calls.append(k.get("n_col"))
        return real(*a, **k)

    monkeypatch.setattr(tb, "_strip_backward_ds", spy)
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(40, 32, generator=g), dim=1).requires_grad_(True)
    t = torch.nn.functional.normalize(torch.randn(40, 32, generator=g), dim=1).requires_grad_(True)
    with tb.kernel_config(BM=16, BN=16, BK=16):
        loss = bench_loss.backward_config(
            bench_loss.hardness_weighted_loss(q, t, backend="triton"), BWD="strip", DS_BM=16, DS_BN=16, BK=16)
        before = tb._CONFIG_OVERRIDE
        loss.backward()
        assert tb._CONFIG_OVERRIDE is before
    assert calls == [40], calls
    ref_q = q.detach().clone().requires_grad_(True)
    ref_t = t.detach().clone().requires_grad_(True)
    bench_loss.reference_loss(ref_q, ref_t, logit_scale=50.0, alpha=9.0).backward()
    torch.testing.assert_close(q.grad, ref_q.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(t.grad, ref_t.grad, rtol=1e-4, atol=1e-6)


def test_tune_script_dry_run(tmp_path):
    out = tmp_path / "tune.json"
    r = subprocess.run([sys.executable, str(BENCH / "bench_tune.py"), "--dry-run-cpu", "--B", "40", "--d", "24",
                        "--dtype", "fp32", "--repeats", "1", "--out", str(out)],
                       capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["fwd"] and res["bwd"]
    assert all(x["status"] == "ok" for x in res["fwd"] + res["bwd"]), [x.get("error") for x in res["fwd"] + res["bwd"]]
    assert {x.get("variant") for x in res["bwd"]} == {"tiles", "strip"}
    s = res["summary"]
    assert s["best_fwd_bwd_ms"] <= s["default_fwd_bwd_ms"] and s["best_over_floor"] > 0


def test_maxb_script_dry_run(tmp_path):
    out = tmp_path / "maxb.json"
    r = subprocess.run([sys.executable, str(BENCH / "bench_maxb.py"), "--device", "cpu", "--backends", "torch",
                        "reference", "triton", "--d", "32", "--start", "64", "--B-max", "256", "--warmup-B", "32",
                        "--out", str(out)],
                       capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(out.read_text())
    by = {x["backend"]: x for x in res["backends"]}
    assert by["triton"]["status"] == "SKIPPED"
    for name in ("torch", "reference"):
        assert [t["B"] for t in by[name]["tries"]] == [64, 128, 256]
        assert by[name]["largest_ok_B"] == 256 and by[name]["limited_by"].startswith("--B-max")
        assert by[name]["model_max_B"] > 256


def test_maxb_search_bisects_after_oom(monkeypatch):
    """The doubling / bisection logic, with out-of-memory simulated above a threshold."""
    import argparse

    import bench_maxb

    tried = []

    def fake(name, B, d, dtype, device, args):
        tried.append(B)
        if B > 5500:
            return {"B": B, "ok": False, "oom": True, "error": "OutOfMemoryError"}
        return {"B": B, "ok": True, "oom": False, "s": 0.01}

    monkeypatch.setattr(bench_maxb, "one_try", fake)
    args = argparse.Namespace(start=1024, B_max=1 << 20, max_try_s=100.0, deadline_s=None, bisect_steps=3,
                              warmup_B=0)
    r = bench_maxb.search("torch", 64, torch.float32, torch.device("cpu"), args, 0.0)
    # doubling until the first OOM (8192), then halving the gap down to one 1024 grain
    assert tried == [1024, 2048, 4096, 8192, 6144, 5120], tried
    assert (r["largest_ok_B"], r["smallest_oom_B"], r["limited_by"]) == (5120, 6144, "memory"), r


def test_maxb_search_stops_by_time(monkeypatch):
    import argparse

    import bench_maxb

    tried = []

    def fake(name, B, d, dtype, device, args):
        tried.append(B)
        return {"B": B, "ok": True, "oom": False, "s": (B / 1024) ** 2}

    monkeypatch.setattr(bench_maxb, "one_try", fake)
    args = argparse.Namespace(start=1024, B_max=1 << 20, max_try_s=20.0, deadline_s=None, bisect_steps=3,
                              warmup_B=512)
    r = bench_maxb.search("triton", 64, torch.float32, torch.device("cpu"), args, 0.0)
    assert tried == [512, 1024, 2048, 4096], tried  # an untimed warm-up, then doubling; 8192 would take ~64 s
    assert r["warmup"]["B"] == 512
    assert r["largest_ok_B"] == 4096 and r["smallest_oom_B"] is None and r["limited_by"].startswith("time"), r


def test_loss_bench_deadline_and_caps(tmp_path):
    out = tmp_path / "loss.json"
    r = subprocess.run([sys.executable, str(BENCH / "bench_loss.py"), "--device", "cpu", "--backends", "torch",
                        "reference", "--B", "64", "128", "--d", "32", "--repeats", "2", "--no-live-memory",
                        "--max-B", "reference=64", "--only-B", "torch=64,128", "--point-budget-s", "0.2",
                        "--no-plot", "--out", str(out)],
                       capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(out.read_text())
    st = {(x["label"], x["B"]): x["status"] for x in res["results"]}
    assert st == {("torch", 64): "ok", ("reference", 64): "ok", ("torch", 128): "ok", ("reference", 128): "SKIPPED"}
    assert all(x["timing"]["repeats"] >= 2 for x in res["results"] if x["status"] == "ok")
    assert "partial" not in res and not out.with_suffix(".png").exists()
    # the README table is made from that file
    rep = subprocess.run([sys.executable, str(BENCH / "report.py"), str(out)], capture_output=True, text=True,
                         timeout=60)
    assert rep.returncode == 0, rep.stderr
    rows = [ln for ln in rep.stdout.splitlines() if ln.startswith("| fp32 |")]
    assert len(rows) == 2 and "SKIPPED" in rows[1] and "(torch)" in rows[0], rep.stdout
