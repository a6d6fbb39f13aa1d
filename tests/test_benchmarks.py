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
    assert dS.shape == (8, 64)  # 3-row blocks (padded to 8) and N (to 64), as the fused loss pads its GEMMs' K
    # block r uses dS[: rows of block r, :N] (the padding meets zero rows of t and q)
    want_dq = torch.cat([dS[: min(3, B - r0), :N] @ t.detach() for r0 in range(0, B, 3)])
    want_dt = sum(dS[: min(3, B - r0), :N].t() @ q.detach()[r0:r0 + 3] for r0 in range(0, B, 3))
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


def test_triton_tuned_row_tunes_records_and_renders_the_sweeps(monkeypatch):
    """bench_loss's triton_tuned row (the retired bench_tune.py's job): the one-pass path under the library
    autotuner, its forward and backward both swept, right against float64; the sweeps go into the file
    ("autotune") and report.py prints each choice. The default path tunes nothing unless asked."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        pytest.skip("needs the interpreter (CPU tensors)")
    import bench_loss
    import report
    from llave_fast.backends import launch

    monkeypatch.delenv("LLAVE_FAST_AUTOTUNE", raising=False)
    monkeypatch.setattr(launch, "TUNED", {})
    monkeypatch.setattr(launch, "TUNE_LOG", [])
    g = torch.Generator().manual_seed(3)
    q, t = (torch.nn.functional.normalize(torch.randn(40, 24, generator=g), dim=1).requires_grad_() for _ in "qt")
    kw = dict(alpha=9.0, scale=50.0, symmetric=True, deterministic=False, d=24)
    bench_loss.make_loss_fn("triton", **kw)(q, t).backward()
    assert bench_loss.autotune_records() == []
    q.grad = t.grad = None
    loss = bench_loss.make_loss_fn("triton_tuned", **kw)(q, t)
    loss.backward()
    x64 = [x.detach().double().requires_grad_() for x in (q, t)]
    ref = bench_loss.reference_loss(*x64, logit_scale=50.0, alpha=9.0)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-4 * abs(ref.item())
    for got, want in ((q.grad, x64[0].grad), (t.grad, x64[1].grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-5)
    recs = json.loads(json.dumps(bench_loss.autotune_records()))  # as the file holds them
    assert sorted(r["key"][0] for r in recs) == ["bwd", "fwd"] and all(r["key"][3] == "torch.float32" for r in recs)
    for r in recs:
        n = len(launch.FWD_CANDIDATES_CPU if r["key"][0] == "fwd" else launch.BWD_CANDIDATES_CPU)
        assert len(r["candidates"]) == n and r["ms"] > 0 and r["base_ms"] > 0, r
        assert r["wall_s"] * 1e3 > r["base_ms"] + sum(c["ms"] for c in r["candidates"]), r  # the sweep holds them
    meta = {"device": {"name": "cpu"}, "versions": {}}
    lines = [ln for ln in report.loss_table({"meta": meta, "results": [], "autotune": recs})
             if ln.startswith("Autotune")]
    assert [ln.split()[1] for ln in lines] == [r["key"][0] for r in recs], lines
    for r, ln in zip(recs, lines):
        assert f"{len(r['candidates'])} candidates timed, 0 refused in a {r['wall_s']:.1f} s sweep" in ln, ln
        assert f"(base configuration {r['base_ms']:.3f} ms: {r['base_ms'] / r['ms']:.2f}x)" in ln, ln
        assert all(f"{k}={v}" in ln for k, v in r["choice"].items()) and "{" not in ln, ln


@pytest.mark.slow
def test_loss_bench_deadline_and_caps(tmp_path):
    out = tmp_path / "loss.json"
    r = subprocess.run([sys.executable, str(BENCH / "bench_loss.py"), "--device", "cpu", "--backends", "torch",
                        "reference", "--B", "64", "128", "--d", "32", "--repeats", "2",
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


def test_bench_ms_times_in_milliseconds_on_the_cpu():
    """The CPU side of the shared timer (torch.utils.benchmark): a 20 ms call reads about 20 ms."""
    import time

    import _common as C

    assert 20 <= C.bench_ms(lambda: time.sleep(0.02), torch.device("cpu"), 3) < 200


@pytest.mark.slow
def test_report_renders_every_result_file():
    """Every file under benchmarks/results/ goes through report.py: the loss and tuning files as
    tables (old ones included: a partial run, a removed backend's row), the others named as not
    rendered, none failing."""
    files = sorted((BENCH / "results").glob("*/*.json"))
    junit = sorted((BENCH / "results").glob("*/*tests.xml"))
    rep = subprocess.run([sys.executable, str(BENCH / "report.py"), *map(str, files)]
                         + (["--junit", str(junit[0])] if junit else []), capture_output=True, text=True, timeout=120)
    assert rep.returncode == 0, rep.stderr[-3000:]
    loss = [f for f in files if "results" in json.loads(f.read_text())
            and all("label" in r for r in json.loads(f.read_text())["results"])]
    tune = [f for f in files if "fwd" in json.loads(f.read_text())]
    assert loss and tune
    assert rep.stdout.count("Loss, fwd+bwd median ms") == len(loss)
    assert rep.stdout.count("Tuning at B = N") == len(tune)
    assert rep.stdout.count("not rendered here") == len(files) - len(loss) - len(tune)
    assert "| bf16 | 1536 | 16384 |" in rep.stdout and "| fp32 | 1024 | 8192 |" in rep.stdout


def test_report_says_a_size_stopped_in_its_warm_ups_was_never_timed():
    import report

    rec = {"status": "PARTIAL", "repeats_done": 0, "repeats_planned": 4, "timing": {"partial_median_ms": {}}}
    assert report._cell(rec) == "PARTIAL (stopped before its first of 4 timed runs)"
    rec.update(repeats_done=2, timing={"partial_median_ms": {"fwd_bwd": 3.25}})
    assert report._cell(rec) == "PARTIAL (2 of 4 runs: 3.2 ms)"


def test_report_names_a_file_it_cannot_read(tmp_path):
    """A missing file or one that is no JSON is named in one line (exit 2), not a traceback."""
    (tmp_path / "half.json").write_text('{"results": [')
    for bad, says in ((tmp_path / "none.json", "cannot be read"), (tmp_path / "half.json", "not a JSON file")):
        rep = subprocess.run([sys.executable, str(BENCH / "report.py"), str(bad)], capture_output=True, text=True,
                             timeout=120)
        assert rep.returncode == 2 and f"{bad}: {says}" in rep.stderr and "Traceback" not in rep.stderr, rep.stderr


# --------------------------------------------------------------------------- the GPU run's own rules


def _bench_args(argv):
    import bench_loss

    args = bench_loss.apply_defaults(bench_loss.parse_args(argv), torch.device("cpu"))
    args.t_begin = __import__("time").perf_counter()
    return args


def test_deadline_prediction_uses_per_run_medians_not_wall_time():
    """The next size is predicted from each backend's median per timed run (B^2 d scaling) times
    the runs planned there; a backend never timed gets the dearest scaled figure of the others,
    and torch.compile its measured compile time on top."""
    import bench_loss

    args = _bench_args(["--device", "cpu", "--B", "64", "--d", "32", "--repeats", "10", "--warmup", "1"])
    hist = {"triton_strip": (16384, 1536, 5.0), "reference": (16384, 1536, 10.0)}
    rows = [("triton_strip", "triton_strip", 9.0), ("reference", "reference", 9.0), ("compile", "compile", 9.0)]
    cuda = torch.device("cuda")  # only its .type is read: no CUDA is touched
    pred = bench_loss.predict_rows(rows, hist, 65536, 1536, args, cuda, compile_s=30.0)
    # x16 the work; 1 warm-up + 10 timed runs, memory measured in the warm-up on CUDA
    assert pred["triton_strip"] == pytest.approx(5.0 * 16 * 11 / 1e3)
    assert pred["reference"] == pytest.approx(10.0 * 16 * 11 / 1e3)
    # compile: never timed -> the dearest scaled figure; 3 warm-ups at least; + its compile time
    assert pred["compile"] == pytest.approx(10.0 * 16 * 13 / 1e3 + 30.0)
    # width scales linearly
    pred_d = bench_loss.predict_rows(rows[:1], hist, 16384, 3072, args, cuda)
    assert pred_d["triton_strip"] == pytest.approx(5.0 * 2 * 11 / 1e3)
    # --point-budget-s lowers the timed runs with the same rule as the timing (at least 3)
    args.point_budget_s = 0.5
    per_round = (5.0 + 10.0 + 10.0) * 16
    reps = max(3, int(500 / per_round))
    pred_b = bench_loss.predict_rows(rows, hist, 65536, 1536, args, cuda, compile_s=30.0)
    assert pred_b["triton_strip"] == pytest.approx(5.0 * 16 * (1 + reps) / 1e3)
    # --repeats-for / --warmup-for count per backend; CPU adds the memory worker processes
    args.point_budget_s, args.repeats_for, args.warmup_for = None, {"reference": 1}, {"reference": 0}
    pred_c = bench_loss.predict_rows(rows[:2], hist, 16384, 1536, args, torch.device("cpu"))
    assert pred_c["reference"] == pytest.approx(10.0 * (0 + 1 + 1) / 1e3 + bench_loss.CPU_MEMORY_WORKER_S)
    assert bench_loss.predict_rows(rows, {}, 64, 32, args, cuda) is None
    # triton_tuned: the autotuner's latest forward and backward sweeps on top, for that row only
    args.repeats_for = args.warmup_for = None
    tuned = rows[:2] + [("triton_tuned", "triton_tuned", 9.0)]
    pred_t = bench_loss.predict_rows(tuned, hist, 65536, 1536, args, cuda, compile_s=30.0, tune_s=7.0)
    assert pred_t["triton_tuned"] == pytest.approx(10.0 * 16 * 11 / 1e3 + 7.0)  # never timed: the dearest
    assert pred_t["triton_strip"] == pytest.approx(5.0 * 16 * 11 / 1e3)


def test_tune_allowance_is_the_latest_forward_and_backward_sweeps(monkeypatch):
    import bench_loss
    from llave_fast.backends import launch

    monkeypatch.setattr(launch, "TUNE_LOG", [])
    assert bench_loss.tune_allowance_s() == 0.0
    launch.TUNE_LOG.extend([{"wall_s": 40.0}, {"wall_s": 20.0}, {"wall_s": 3.0}, {"wall_s": 2.0}, {}])
    assert bench_loss.tune_allowance_s() == pytest.approx(2.0)  # the last two; a record without wall_s adds 0
    launch.TUNE_LOG.pop()
    assert bench_loss.tune_allowance_s() == pytest.approx(5.0)


def test_deadline_drops_the_dearest_backends_first():
    import bench_loss

    rows = [("triton_strip", "triton_strip", 9.0), ("compile", "compile", 9.0),
            ("reference", "reference", 9.0), ("gemm3", "gemm3", 9.0)]
    pred = {"triton_strip": 10.0, "compile": 100.0, "reference": 20.0, "gemm3": 5.0}
    m, o = bench_loss.PREDICT_MARGIN, bench_loss.GROUP_OVERHEAD_S
    keep, drop = bench_loss.fit_deadline(rows, pred, 1000.0)
    assert keep == rows and drop == []
    keep, drop = bench_loss.fit_deadline(rows, pred, o + m * 36)  # room for all but the dearest
    assert [r[0] for r in keep] == ["triton_strip", "reference", "gemm3"] and [r[0] for r in drop] == ["compile"]
    keep, drop = bench_loss.fit_deadline(rows, pred, o + m * 12)  # the first row is the last to go
    assert [r[0] for r in keep] == ["triton_strip"]
    keep, drop = bench_loss.fit_deadline(rows, pred, o + m * 9)
    assert keep == [] and len(drop) == 4
    # before anything was timed: run while any time is left
    assert bench_loss.fit_deadline(rows, None, 1.0) == (rows, [])
    assert bench_loss.fit_deadline(rows, None, -1.0) == ([], rows)


def test_planned_repeats_rule():
    import _common as C

    assert C.planned_repeats(10.0, 20) == 20
    assert C.planned_repeats(10.0, 20, budget_s=0.1) == 10
    assert C.planned_repeats(1000.0, 20, budget_s=0.1) == 3  # never below min_repeats
    assert C.planned_repeats(1000.0, 2, budget_s=0.1) == 2
    assert C.planned_repeats(1000.0, 20, budget_s=0.1, time_left_s=1.5) == 1  # a deadline wins, >= 1
    assert C.planned_repeats(100.0, 20, time_left_s=0.55) == 5


class _SlowMotionClock:
    """A stand-in for the ``time`` module: ``perf_counter`` runs at ``rate`` of real time and
    ``sleep`` advances it at once. A fixed cost then counts in full while the real work counts
    at a hundredth, so a deadline test means the same on a loaded machine as on an idle one."""

    def __init__(self, rate: float = 0.01):
        import time as _time

        self._time, self.rate, self.offset = _time, rate, 0.0
        self.t0 = _time.perf_counter()

    def perf_counter(self) -> float:
        return self.t0 + (self._time.perf_counter() - self.t0) * self.rate + self.offset

    def sleep(self, s: float) -> None:
        self.offset += s

    def __getattr__(self, name):
        return getattr(self._time, name)


def _fake_loss_fns(monkeypatch, fixed_cost_s, clock=None):
    """bench_loss backends whose first call per function costs ``fixed_cost_s`` (a compile),
    then a real, tiny loss; the CPU memory worker replaced by a constant. ``clock``: a
    :class:`_SlowMotionClock` that bench_loss and _common read instead of ``time``."""
    import time as _time

    import _common
    import bench_loss

    if clock is not None:
        monkeypatch.setattr(bench_loss, "time", clock)
        monkeypatch.setattr(_common, "time", clock)
    sleep = _time.sleep if clock is None else clock.sleep

    def make(name, **kw):
        first = [True]

        def fn(q, t):
            if first[0]:
                first[0] = False
                sleep(fixed_cost_s)
            return bench_loss.reference_loss(q, t, logit_scale=50.0, alpha=9.0)
        return fn

    monkeypatch.setattr(bench_loss, "make_loss_fn", make)
    monkeypatch.setattr(_common, "peak_in_fresh_process", lambda script, spec: {"peak_bytes": 1 << 20})
    monkeypatch.setattr(bench_loss, "CPU_MEMORY_WORKER_S", 0.0)
    ok = [{"case": "small", "passed": True}, {"case": "moderate-fp32", "passed": True}]
    return {b: {"passed": True, "checks": ok} for b in ("torch", "reference")}


def test_deadline_is_not_fooled_by_fixed_costs(monkeypatch):
    """A first size whose wall time is mostly fixed costs (compiles in the warm-up) must not
    make the next size look unaffordable: the old rule (whole wall time x (B/B_prev)^2)
    predicted 4 x 5 s here and skipped B = 128 under a 14 s deadline. The clock runs the real
    work in slow motion (a hundredth), so a loaded machine cannot eat the margin."""
    import bench_loss

    clock = _SlowMotionClock()
    report = _fake_loss_fns(monkeypatch, fixed_cost_s=2.5, clock=clock)
    args = _bench_args(["--device", "cpu", "--backends", "torch", "reference", "--B", "64", "128", "--d", "16",
                        "--repeats", "1", "--deadline-s", "14"])
    args.t_begin = clock.perf_counter()
    res = bench_loss.run_benchmarks(["torch", "reference"], report, args, torch.device("cpu"))
    st = {(r["label"], r["B"]): r["status"] for r in res}
    assert st == {("torch", 64): "ok", ("reference", 64): "ok", ("torch", 128): "ok", ("reference", 128): "ok"}, st


def test_sequential_mode_writes_after_each_backend(monkeypatch):
    import bench_loss

    report = _fake_loss_fns(monkeypatch, fixed_cost_s=0.0)
    args = _bench_args(["--device", "cpu", "--backends", "torch", "reference", "--B", "64", "--d", "16",
                        "--repeats", "3", "--repeats-for", "reference=1", "--warmup-for", "reference=0",
                        "--sequential"])
    snapshots = []
    res = bench_loss.run_benchmarks(["torch", "reference"], report, args, torch.device("cpu"),
                                    on_progress=lambda r: snapshots.append([(x["label"], x["status"]) for x in r]))
    # one write after each backend (and one after the size): the first holds the first backend alone
    assert snapshots[0] == [("torch", "ok")]
    assert snapshots[1] == [("torch", "ok"), ("reference", "ok")]
    by = {r["label"]: r for r in res}
    assert by["torch"]["timing"]["repeats"] == 3 and len(by["torch"]["timing"]["raw_ms"]["fwd_bwd"]) == 3
    assert by["reference"]["timing"]["repeats"] == 1 and by["reference"]["timing"]["warmup_ms"]["fwd_bwd"] == []


def _wait_for(pred, timeout_s):
    import time as _time

    end = _time.time() + timeout_s
    while _time.time() < end:
        if pred():
            return True
        _time.sleep(0.2)
    return False


def _sigint_ignored():
    """Start a child as a background job of a non-interactive shell starts it: SIGINT ignored
    (inherited, and kept by Python), the case that hid a benchmark's SIGINT handling."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
@pytest.mark.slow
def test_loss_bench_writes_what_it_has_when_stopped(tmp_path, sig):
    """Stopped by a signal in the middle of a sweep, bench_loss still writes its JSON with the
    sizes it finished, marked "interrupted", and exits 130 (SIGINT: gpu_check.sh's limits;
    SIGTERM: a plain `timeout`), also when started with SIGINT ignored (as `cmd &` in a
    script starts it); the size stopped in its timing loop is written PARTIAL with the runs it took."""
    import signal

    out = tmp_path / "loss.json"
    proc = subprocess.Popen([sys.executable, str(BENCH / "bench_loss.py"), "--device", "cpu", "--backends", "torch",
                             "--B", "64", "4096", "8192", "16384", "--d", "256", "--repeats", "50",
                             "--no-plot", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                            preexec_fn=_sigint_ignored)

    def first_size_written():
        try:
            res = json.loads(out.read_text())
        except (OSError, ValueError):
            return False
        return any(r.get("status") == "ok" for r in res.get("results", []))

    try:
        assert _wait_for(first_size_written, 300), "the first size was never written"
        __import__("time").sleep(2)  # into the next size's timing loop (50 runs of B = 4096: ~10 s at least)
        proc.send_signal(getattr(signal, sig))
        stdout, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stdout[-3000:]
    res = json.loads(out.read_text())
    assert res["interrupted"] == ("signal SIGTERM" if sig == "SIGTERM" else "KeyboardInterrupt (SIGINT)"), res["interrupted"]
    ok = [r for r in res["results"] if r["status"] == "ok"]
    assert ok and ok[0]["B"] == 64 and "ratios" in res and "INTERRUPTED" in stdout
    # the size stopped in its timing loop is kept, PARTIAL, with the runs it took (it was lost)
    (cut,) = [r for r in res["results"] if r["B"] == 4096]
    assert cut["status"] == "PARTIAL" and cut["partial"] and cut["repeats_planned"] == 50, cut
    assert len(cut["timing"]["raw_ms"]["fwd_bwd"]) == cut["repeats_done"] < 50 and cut["timing"]["median_ms"] == {}
    rep = subprocess.run([sys.executable, str(BENCH / "report.py"), str(out)], capture_output=True, text=True,
                         timeout=60)
    # under load the stop can land before the size's first timed run: the report then says so (46a1c94)
    said = (f"PARTIAL ({cut['repeats_done']} of 50 runs" if cut["repeats_done"]
            else "PARTIAL (stopped before its first of 50 timed runs)")
    assert said in rep.stdout, rep.stdout


def _bash(script, cwd=ROOT, timeout=300, env=None):
    return subprocess.run(["bash", "-c", script], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env or _env())


def test_run_step_stops_with_sigint_and_reports():
    """run_step's limit sends SIGINT (Python gets KeyboardInterrupt and can write its files),
    then SIGKILL after the grace period to what ignores it."""
    py = ("import time, sys\n"
          "try:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n    print('GOT SIGINT', flush=True)\n    sys.exit(3)\n")
    r = _bash(f"source benchmarks/_steps.sh; GRACE_S=5 run_step 2 {sys.executable} -c \"{py}\"; echo rc=$?")
    assert "GOT SIGINT" in r.stdout and "rc=124" in r.stdout and "STOPPED at its limit of 2 s" in r.stdout, r.stdout
    ignore = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(60)"
    r = _bash(f"source benchmarks/_steps.sh; GRACE_S=2 run_step 1 {sys.executable} -c '{ignore}'; echo rc=$?")
    assert "rc=137" in r.stdout and "KILLED" in r.stdout, r.stdout
    r = _bash(f"source benchmarks/_steps.sh; run_step 20 {sys.executable} -c 'raise SystemExit(4)'; echo rc=$?")
    assert "rc=4" in r.stdout and "FAILED with exit status 4" in r.stdout, r.stdout


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.slow
def test_pytest_stopped_by_run_step_writes_its_junit(tmp_path, workers):
    """What SIGTERM loses (pytest-xdist writes no junit file on SIGTERM), SIGINT keeps."""
    if workers:
        pytest.importorskip("xdist")
    (tmp_path / "test_slow.py").write_text("import time\n\ndef test_quick():\n    assert 1 + 1 == 2\n\n"
                                           "def test_slow():\n    time.sleep(120)\n")
    junit = tmp_path / "j.xml"
    n = f"-n {workers}" if workers else ""
    # 20 s: pytest-xdist's two workers start within it even on a loaded 2-core machine (12 s did not, once)
    r = _bash(f"source {BENCH / '_steps.sh'}; GRACE_S=30 run_step 20 {sys.executable} -m pytest -q {n} "
              f"-p no:cacheprovider -p no:benchmark --junitxml={junit} test_slow.py; echo rc=$?", cwd=tmp_path)
    assert "rc=124" in r.stdout, r.stdout + r.stderr
    assert junit.exists(), r.stdout
    rep = subprocess.run([sys.executable, str(BENCH / "report.py"), "--junit", str(junit)], capture_output=True,
                         text=True, timeout=60)
    assert rep.returncode == 0 and "Compiled-kernel tests (j.xml): 1 passed, 0 failed" in rep.stdout, rep.stdout + rep.stderr


def test_install_falls_back_to_a_copy_when_pip_fails(tmp_path):
    """Where the offline editable install fails, install_package places a copy of the package
    (kernels/ as llave_fast/kernels) first on the path, and says so."""
    fake = tmp_path / "py"
    fake.write_text(f"#!/bin/sh\nif [ \"$1\" = -m ] && [ \"$2\" = pip ]; then echo 'no pip here' >&2; exit 1; fi\n"
                    f"exec {sys.executable} \"$@\"\n")
    fake.chmod(0o755)
    shim = tmp_path / "shim"
    env = {k: v for k, v in _env().items() if k != "PYTHONPATH"}
    r = _bash(f"export SHIM_DIR={shim}; source benchmarks/_steps.sh; install_package {fake} && "
              f"{fake} -c 'import llave_fast.kernels.tile as k; print(\"KERNELS\", k.__file__)'; echo rc=$?", env=env)
    assert "the editable install failed" in r.stdout and "falling back" in r.stdout, r.stdout + r.stderr
    assert f"KERNELS {shim}/llave_fast/kernels/tile.py" in r.stdout and "rc=0" in r.stdout, r.stdout + r.stderr


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(tmp_path):
    """The prepared run's plumbing, stages A and B in one call, with tiny CPU arguments: the
    install and its check, every step under its limit, the files the device call brings back
    (at most 8) and the summaries."""
    out = tmp_path / "out"
    env = dict(_env(), OUT=str(out), GPU_CHECK_DRY="1", SETUP_MARKER=str(tmp_path / "setup"))
    env.pop("TRITON_INTERPRET")  # the script sets it itself in a dry run
    r = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "AB"], capture_output=True, text=True, env=env,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["log_A.txt", "log_B.txt", "loss.json", "loss_262k.json", "loss_variants.json", "probe.json",
                     "tests.xml"], files
    log_a, log_b = (out / "log_A.txt").read_text(), (out / "log_B.txt").read_text()
    assert "DRY RUN" in log_a and "llave_fast from" in log_a and "Compiled-kernel tests" in log_a
    assert log_b.count("--- step done") == 4 and "| fp32 | 32 | 64 |" in log_b and "| fp32 | 16 | 63 |" in log_b
    probe = json.loads((out / "probe.json").read_text())
    assert {k: v["status"] for k, v in probe["steps"].items()} == {"P1": "ok", "P2": "ok", "P5": "ok"}, probe
    assert probe["steps"]["P1"]["N=95"]["dq_padded_ms"] > 0 and probe["steps"]["P2"]["stats_pass_bytes"] > 0
    p5 = probe["steps"]["P5"]  # the fused forward's column statistics every way (NOTES.md, Prediction 15)
    assert all(row[k] > 0 for row in (p5["d=16"], p5["d=32"]) for k in ("col=off_ms", "col=on_ms", "col=on_tile_ms",
                                                                         "col=on_transpose_ms")), p5
    seq = json.loads((out / "loss_262k.json").read_text())
    assert seq["config"]["sequential"] and {r["label"]: r["status"] for r in seq["results"]} == {
        "torch": "ok", "reference": "ok"}


def test_a_failed_backend_does_not_keep_its_tensors_alive():
    """time_interleaved records a backend's error and goes on; the recorded exception must not hold the
    failed run's frames (on a GPU an OOM's tensors would then stay allocated through the group's later
    runs, turning them into OOMs too)."""
    import gc
    import weakref

    import _common as C

    held = []

    def fails(q, t):
        big = torch.empty(1 << 16)
        held.append(weakref.ref(big))
        raise torch.OutOfMemoryError("planted: out of memory")

    def works(q, t):
        return (q * t).sum()

    q, t = (torch.randn(8, 4, requires_grad=True) for _ in "qt")
    out = C.time_interleaved({"fails": fails, "works": works}, [(q, t)], device=torch.device("cpu"), warmup=1,
                             repeats=2)
    gc.collect()
    assert held and held[0]() is None, "the failed run's tensor is still alive"
    assert isinstance(out["fails"]["exception"], torch.OutOfMemoryError)
    assert out["fails"]["error"].startswith("OutOfMemoryError: planted") and out["works"]["error"] is None
    assert len(out["works"]["raw_ms"]["fwd_bwd"]) == 2


# --------------------------------------------------------------------------- bench_distributed's bookkeeping


def _fake_distributed(monkeypatch, stop_at):
    """bench_distributed with its ranks replaced: the timing "ranks" write what rank 0 writes after each size (1.0 ms
    a step, 8 MiB a peak), and the call numbered ``stop_at`` (0: the timing, then one per memory figure) is
    stopped by SIGTERM (KeyboardInterrupt, as start_script makes it) once it has written its first size. Returns
    the list of what the result file held at each call's start."""
    import _common as C
    import bench_distributed as bd

    seen, calls = [], []
    monkeypatch.setattr(C, "start_script", lambda: calls.append("start_script"))
    monkeypatch.setattr(C, "machine_load", lambda seconds=1.0: {"loadavg": [0.0] * 3, "busy_fraction_others": 0.0})

    def spawn(fn, world, spec, path, backend):
        seen.append(json.loads(_OUT[0].read_text()) if _OUT[0].exists() else None)
        n = len(seen) - 1
        if fn is bd.sweep_rank:
            passed = {v: True for v in bd.VARIANTS[spec["kind"]]}
            payload = {"correctness": {"passed": passed}, "timing": {}}
            for size in spec["sizes"]:
                payload["timing"][str(size)] = {"per_rank": bd.rank_sizes(size, world), "variants": {
                    v: {"step_ms": [1.0], "median_step_ms": 1.0, "min_step_ms": 1.0, "max_step_ms": 1.0,
                        "finite": True} for v in passed}}
                C.write_json(path, payload)
                if n == stop_at:
                    raise KeyboardInterrupt("signal SIGTERM")
            return
        if n == stop_at:
            raise KeyboardInterrupt("signal SIGTERM")
        C.write_json(path, {"per_rank": [{"peak_bytes": 8 * C.MiB, "baseline_clean": True}] * world})

    monkeypatch.setattr(bd, "spawn_ranks", spawn)
    return seen, calls


_OUT = [Path("/nonexistent")]


@pytest.mark.parametrize("stop_at", [0, 2])
def test_distributed_bench_writes_as_it_goes_and_keeps_what_it_had_when_stopped(tmp_path, monkeypatch, stop_at):
    """bench_distributed writes its file after the timing sweep and after each memory figure ("partial": true), and
    stopped (SIGINT/SIGTERM) it writes what it measured, the timings rank 0 had written included, marked
    "interrupted", exit status 130. It used to write once, at the end: a stopped run kept nothing."""
    import bench_distributed as bd

    _OUT[0] = out = tmp_path / "d.json"
    seen, calls = _fake_distributed(monkeypatch, stop_at)
    rc = bd.main(["--world", "1", "--N", "64", "128", "--d", "16", "--repeats", "1", "--skip-gradcache",
                  "--out", str(out)])
    assert rc == 130 and calls == ["start_script"]
    res = json.loads(out.read_text())
    assert res["interrupted"] == "signal SIGTERM" and "partial" not in res
    loss = res["loss"]
    if stop_at == 0:  # stopped in the timing ranks after their first size: that size is kept
        assert list(loss["timing"]) == ["64"] and loss["memory"] == {}
        assert loss["timing"]["64"]["variants"]["strip"]["median_step_ms"] == 1.0
        assert res["correctness"]["loss"]["passed"] == {"strip": True, "two-strip": True, "eager": True}
        assert res["ratios"]["loss"][0]["strip_over_two_strip_time"] == 1.0
        assert res["ratios"]["loss"][1]["strip_over_two_strip_time"] is None
        assert res["expected_checks"]["loss"]["pass"] is None
    else:  # stopped in the third process group: the timings and the first memory figure are kept
        assert list(loss["timing"]) == ["64", "128"]
        assert loss["memory"] == {"64": {"strip": {"status": "ok", "peak_bytes_max_over_ranks": 8 << 20,
                                                   "peak_bytes_per_rank": [8 << 20], "baseline_clean_all_ranks": True,
                                                   "per_rank": [{"peak_bytes": 8 << 20, "baseline_clean": True}]}}}
        # the file as it stood when the memory runs started: the timings, then the first figure, marked partial
        assert seen[1]["partial"] is True and list(seen[1]["loss"]["timing"]) == ["64", "128"]
        assert seen[1]["loss"]["memory"] == {}
        assert seen[2]["loss"]["memory"]["64"]["strip"]["peak_bytes_max_over_ranks"] == 8 << 20


@pytest.mark.parametrize("argv,message", [
    (["--repeats", "0"], "--repeats must be >= 1, got 0"), (["--d", "0"], "--d must be >= 1, got 0"),
    (["--chunk", "-4"], "--chunk must be >= 1, got -4"), (["--hidden", "0"], "--hidden must be >= 1, got 0"),
    (["--threads", "0"], "--threads must be >= 1, got 0"), (["--warmup", "-1"], "--warmup must be >= 0, got -1"),
    (["--world", "2", "--N", "64", "1"], "--N must give each of the 2 ranks at least one row, got [64, 1]")])
def test_distributed_bench_refuses_bad_values_naming_them(tmp_path, monkeypatch, capsys, argv, message):
    """A 0 given for --repeats, --d, --chunk, --hidden or --threads was silently replaced by the default, and
    negatives were taken: each is refused up front, by argparse, naming the flag and the value."""
    import bench_distributed as bd

    def spawn(*a, **k):
        raise AssertionError("the benchmark ran")

    monkeypatch.setattr(bd, "spawn_ranks", spawn)
    with pytest.raises(SystemExit) as e:
        bd.main(["--out", str(tmp_path / "d.json"),
                 *(["--skip-loss"] if "--chunk" in argv or "--hidden" in argv else ["--skip-gradcache"]), *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def _distributed_result(comm, peaks, top_ms=None):
    """A bench_distributed loss sweep's result at N = 64, 128: 2.0 / 4.0 / 8.0 ms a step (strip, two-strip,
    eager; ``top_ms`` replaces N = 128's), each variant's peak from ``peaks``."""
    ms = {"strip": 2.0, "two-strip": 4.0, "eager": 8.0}
    timing = {str(n): {"variants": {v: {"median_step_ms": x, "min_step_ms": x, "max_step_ms": x, "finite": True}
                                    for v, x in ((top_ms or ms) if n == 128 else ms).items()}} for n in (64, 128)}
    return {"spec": {"kind": "loss", "sizes": [64, 128], "comm": comm},
            "correctness": {"passed": dict.fromkeys(ms, True)}, "timing": timing,
            "memory": {str(n): {v: {"peak_bytes_max_over_ranks": p} for v, p in peaks.items()} for n in (64, 128)}}


def test_distributed_bench_report_says_na_and_leaves_noise_out_of_the_ratios(capsys):
    """An expected check whose ratio was not measured prints "n/a", not FAIL; a memory ratio of CPU peaks below
    the RSS readings' noise (cpu_peak_rss_of_call's 1 MiB) is null and printed "-", CUDA's exact counters keep
    theirs; the time ratios are the medians' ratios."""
    import _common as C
    import bench_distributed as bd

    kib = {"strip": 4096, "two-strip": 8192, "eager": 16 * C.MiB}
    rep = bd.report(_distributed_result("gloo", kib), 1)
    r64 = rep["ratios"][0]
    assert r64["strip_over_two_strip_time"] == 0.5 and r64["strip_over_eager_time"] == 0.25
    assert r64["strip_over_two_strip_mem"] is None and r64["strip_over_eager_mem"] is None
    assert rep["expected_check"] == {"N": 128, "ratio": 0.5, "expected_max": 0.8, "pass": True}
    assert "strip_over_two_strip_mem -" in capsys.readouterr().out
    mib = {"strip": 2 * C.MiB, "two-strip": 8 * C.MiB, "eager": 16 * C.MiB}
    assert bd.report(_distributed_result("gloo", mib), 1)["ratios"][0]["strip_over_two_strip_mem"] == 0.25
    assert bd.report(_distributed_result("nccl", kib), 1)["ratios"][0]["strip_over_two_strip_mem"] == 0.5
    capsys.readouterr()
    rep = bd.report(_distributed_result("gloo", mib, top_ms={"strip": None, "two-strip": 4.0, "eager": 8.0}), 1)
    assert rep["expected_check"]["pass"] is None
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("strip / two-strip time")]
    assert line == ["strip / two-strip time at N=128: - (expected <= 0.8) n/a (not measured)"], line


def test_distributed_bench_checks_triton_fp32_at_bench_loss_fp32_tolerances():
    """The triton variants' float64 check (fp32 inputs) used 5e-2 for everything, 10x looser than bench_loss's TF32
    rule and 25x its fp32 one: it now takes bench_loss's tolerances, fp32 unless torch allows TF32 matmuls."""
    import bench_distributed as bd

    matmul, was = torch.backends.cuda.matmul, torch.backends.cuda.matmul.allow_tf32  # a flag module: no monkeypatch
    try:
        matmul.allow_tf32 = False
        assert bd.check_tolerance("strip", "triton") == (torch.float32, "fp32", 1e-4, 2e-3)
        assert bd.check_tolerance("two-strip", "triton") == (torch.float32, "fp32", 1e-4, 2e-3)
        assert bd.check_tolerance("eager", "triton") == (torch.float64, "fp64", 1e-10, 1e-10)
        assert bd.check_tolerance("strip", "torch") == (torch.float64, "fp64", 1e-10, 1e-10)
        matmul.allow_tf32 = True
        assert bd.check_tolerance("strip", "triton") == (torch.float32, "tf32", 5e-3, 5e-2)
    finally:
        matmul.allow_tf32 = was


# --------------------------------------------------------------------------- bench_st


def _quiet_st(monkeypatch):
    import _common as C

    monkeypatch.setattr(C, "start_script", lambda: None)
    monkeypatch.setattr(C, "machine_load", lambda seconds=1.0: {"loadavg": [0.0] * 3, "busy_fraction_others": 0.0})


def test_st_bench_checks_every_variant_against_float64_and_times_only_those_that_pass(tmp_path, monkeypatch):
    """Each part-1 variant (loss and both gradients) is checked against llave_fast.reference in float64 on the same
    inputs before anything is timed; a variant that fails is not timed and gets no ratio (one is planted here:
    fused_joint off by 1 %)."""
    import bench_st

    _quiet_st(monkeypatch)
    real = bench_st.loss_fn
    monkeypatch.setattr(bench_st, "loss_fn", lambda v: (lambda q, t: 1.01 * real(v)(q, t)) if v == "fused_joint"
                        else real(v))
    out = tmp_path / "st.json"
    rc = bench_st.main(["--sizes", "64", "--d", "16", "--repeats", "1", "--cached-batch", "8", "--mini-batch", "4",
                        "--hidden", "16", "--cached-repeats", "1", "--no-memory", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    checks = res["correctness"]
    assert {v: c["passed"] for v, c in checks.items()} == {**dict.fromkeys(bench_st.LOSS_VARIANTS, True),
                                                           "fused_joint": False}
    assert checks["fused_joint"]["errors"]["loss"] == pytest.approx(0.01, rel=1e-3)
    assert all(max(c["errors"].values()) < 1e-5 and c["B"] == 64 and c["d"] == 16 for v, c in checks.items()
               if v != "fused_joint")
    rows = res["loss"]["64"]["variants"]
    assert rows["fused_joint"]["status"] == "FAILED" and rows["fused_joint"]["fwd_bwd_ms"] == []
    assert rows["fused_joint"]["median_fwd_bwd_ms"] is None and rows["fused_joint"]["error"].startswith("FAILED")
    assert all(len(r["fwd_bwd_ms"]) == 1 and r["median_fwd_bwd_ms"] > 0 for v, r in rows.items() if v != "fused_joint")
    ratios = res["loss"]["64"]["ratios"]
    assert ratios["fused_joint / st_joint"]["time"] is None
    assert ratios["fused_per_direction / st_per_direction"]["time"] > 0
    assert "fused_joint" not in res["loss"]["64"]["same_loss_as_st"]
    cached = res["cached_step"]  # the cached BERT step, each variant checked before it is timed
    for v in ("st_cached", "fused_cached"):
        c = cached["correctness"][v]
        assert c["passed"] and c["dtype"] == "fp32" and c["triplets"] == 8 and c["params_checked"] > 30, c
        assert c["errors"]["loss"] < 1e-5 and c["errors"]["grad"] < 1e-4
        assert (c["tol_loss"], c["tol_grad"]) == (1e-4, 2e-3)
        assert len(cached[v]["seconds"]) == 1 and cached[v]["error"] is None
    assert cached["time_ratio"] > 0


@pytest.mark.slow
def test_st_bench_checks_the_cached_step_against_float64_and_gives_a_failed_one_no_ratio(tmp_path, monkeypatch):
    """The cached BERT step (part 2) was timed and compared with no check of its result: each variant's loss and
    parameter gradients are now checked against the same loss uncached in float64 on the same batch and recorded; one
    that fails (a 1 % wrong scale planted in the fused cached path) is FAILED, not timed, and gets no time ratio."""
    import bench_st
    from llave_fast.integrations import sentence_transformers as lst

    _quiet_st(monkeypatch)

    def wrong_scale(self, anchor, positive, negatives=None):
        return lst.fused_mnrl_loss(anchor, positive, negatives, **{**self._loss_kwargs(), "scale": 1.01 * self.scale})

    monkeypatch.setattr(lst.FusedCachedMultipleNegativesRankingLoss, "_loss_on_grad_cache", wrong_scale)
    out = tmp_path / "st.json"
    rc = bench_st.main(["--sizes", "8", "--d", "8", "--repeats", "1", "--cached-batch", "8", "--mini-batch", "4",
                        "--hidden", "16", "--cached-repeats", "1", "--no-memory", "--out", str(out)])
    assert rc == 0
    cached = json.loads(out.read_text())["cached_step"]
    st, fused = cached["correctness"]["st_cached"], cached["correctness"]["fused_cached"]
    assert st["passed"] and st["errors"]["loss"] < 1e-5 and st["errors"]["grad"] < 1e-4, st
    assert not fused["passed"] and fused["errors"]["loss"] > fused["tol_loss"], fused
    assert fused["errors"]["grad"] > fused["tol_grad"], fused
    assert fused["truth_loss"] == pytest.approx(st["truth_loss"]) and fused["loss"] != pytest.approx(st["loss"])
    assert len(cached["st_cached"]["seconds"]) == 1 and cached["st_cached"]["median_s"] > 0
    assert cached["fused_cached"]["seconds"] == [] and cached["fused_cached"]["median_s"] is None
    assert cached["fused_cached"]["status"] == "FAILED" and cached["fused_cached"]["error"].startswith("FAILED")
    assert cached["time_ratio"] is None and cached["loss_rel_diff"] is None


@pytest.mark.parametrize("mini_batch, path", [(4, "cached"), (24, "single")])
def test_st_bench_says_when_the_fused_cached_step_took_the_single_pass(tmp_path, monkeypatch, capsys, mini_batch,
                                                                      path):
    """With a mini-batch holding the whole batch (3 x 8 texts in 24) the fused cached loss takes GradCache's single
    pass while sentence-transformers' encodes twice: part 2 then compares unlike steps, which the file and the
    printed line now say (they did not)."""
    import bench_st

    _quiet_st(monkeypatch)
    out = tmp_path / "st.json"
    rc = bench_st.main(["--sizes", "8", "--d", "8", "--repeats", "1", "--cached-batch", "8", "--mini-batch",
                        str(mini_batch), "--hidden", "16", "--cached-repeats", "1", "--no-memory", "--out", str(out)])
    assert rc == 0
    cached = json.loads(out.read_text())["cached_step"]
    assert cached["settings"]["fused_cached_pass"] == path, cached["settings"]
    assert ("NOTE: the fused loss took GradCache's single pass" in capsys.readouterr().out) == (path == "single")


def test_st_bench_stopped_writes_what_it_measured(tmp_path, monkeypatch):
    """SIGINT or SIGTERM (KeyboardInterrupt) in the second size: the file keeps the first, is marked
    "interrupted" with the machine load after, and the exit status is 130 (it was a traceback and no mark)."""
    import _common as C
    import bench_st

    _quiet_st(monkeypatch)
    real, calls = C.time_interleaved, []

    def stop_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("signal SIGTERM")
        return real(*a, **k)

    monkeypatch.setattr(C, "time_interleaved", stop_second)
    out = tmp_path / "st.json"
    rc = bench_st.main(["--sizes", "32", "64", "--d", "16", "--repeats", "1", "--no-memory", "--out", str(out)])
    res = json.loads(out.read_text())
    assert rc == 130 and res["interrupted"] == "signal SIGTERM" and list(res["loss"]) == ["32"]
    assert res["machine_load_after"]["busy_fraction_others"] == 0.0 and "cached_step" not in res


def test_st_bench_stopped_while_timing_a_size_keeps_the_runs_taken(tmp_path, monkeypatch):
    """Stopped (SIGINT/SIGTERM) inside a size's timing loop, the runs already taken were lost: time_interleaved
    fills its ``into`` dict in place for that, and bench_st did not pass one. They are written, the size marked
    stopped, a variant whose timed runs were not all taken marked partial with no median (no ratio)."""
    import bench_st

    _quiet_st(monkeypatch)
    real, calls = bench_st.loss_fn, []

    def loss_fn(v):
        fn = real(v)
        if v != "fused_joint":
            return fn

        def stopping(q, t):
            if q.shape[0] == 64:
                calls.append(1)
                if len(calls) == 3:  # its warm-up and first timed run taken: stopped in the second
                    raise KeyboardInterrupt("signal SIGTERM")
            return fn(q, t)
        return stopping

    monkeypatch.setattr(bench_st, "loss_fn", loss_fn)
    out = tmp_path / "st.json"
    rc = bench_st.main(["--sizes", "32", "64", "--d", "16", "--repeats", "2", "--no-memory", "--out", str(out)])
    res = json.loads(out.read_text())
    assert rc == 130 and res["interrupted"] == "signal SIGTERM" and list(res["loss"]) == ["32", "64"]
    size = res["loss"]["64"]
    assert size["stopped"] is True
    rows = size["variants"]
    assert rows["fused_joint"]["partial"] is True and len(rows["fused_joint"]["fwd_bwd_ms"]) == 1
    assert rows["fused_joint"]["median_fwd_bwd_ms"] is None
    assert len(rows["st_joint"]["fwd_bwd_ms"]) >= 1


@pytest.mark.parametrize("argv,message", [
    (["--sizes", "64", "1"], "--sizes takes integers >= 2, got [64, 1]"),
    (["--sizes", "64", "128", "64"], "--sizes names [64] more than once, got [64, 128, 64]"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--threads", "-2"], "--threads must be >= 1, got -2"),
    (["--mini-batch", "0"], "--mini-batch must be >= 1, got 0"),
    (["--d", "-16"], "--d must be >= 1, got -16")])
def test_st_bench_refuses_bad_arguments_naming_them(capsys, argv, message):
    """One message for every size ("--sizes must be >= 2, the other sizes and counts >= 1") named neither the flag
    nor what it got; a size named twice was timed twice, its second row written over the first; --threads 0 was
    ignored, a negative count failed in torch.set_num_threads after the libraries had loaded."""
    import bench_st

    with pytest.raises(SystemExit) as e:
        bench_st.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_st_bench_refuses_a_folder_as_out_before_any_work(tmp_path, capsys, monkeypatch):
    """--out naming a folder failed when the first results were written, after the float64 checks."""
    import bench_st

    _quiet_st(monkeypatch)
    monkeypatch.setattr(bench_st, "check_variants", lambda *a, **k: pytest.fail("no work before the refusal"))
    with pytest.raises(SystemExit) as e:
        bench_st.main(["--sizes", "8", "--d", "8", "--out", str(tmp_path)])
    assert e.value.code == 2 and f"--out {str(tmp_path)!r} is a folder" in capsys.readouterr().err


def test_st_bench_gives_no_time_ratio_to_a_variant_that_errored():
    """A variant that raised after some timed runs keeps its raw times but gets no median, hence no ratio."""
    import bench_st

    def timing(ms, error=None):
        return {"raw_ms": {"fwd": [1.0] * len(ms), "bwd": [1.0] * len(ms), "fwd_bwd": ms}, "losses": [0.5] * len(ms),
                "error": error}

    rows = bench_st.rows_of({"st_per_direction": timing([10.0, 12.0]),
                             "fused_per_direction": timing([5.0], "RuntimeError: planted")})
    fused = rows["fused_per_direction"]
    assert fused["fwd_bwd_ms"] == [5.0] and fused["median_fwd_bwd_ms"] is None
    assert rows["st_per_direction"]["median_fwd_bwd_ms"] == 11.0
    assert bench_st.ratios_of(rows)["fused_per_direction / st_per_direction"]["time"] is None


# --------------------------------------------------------------------------- bench_loss: arguments, inputs, a stop


@pytest.mark.parametrize("argv,message", [
    (["--B", "64", "0"], "--B takes integers >= 1, got [64, 0]"),
    (["--d", "-16"], "--d takes integers >= 1, got [-16]"),
    (["--B", "64", "128", "64"], "--B names [64] more than once, got [64, 128, 64]"),
    (["--d", "16", "16"], "--d names [16] more than once, got [16, 16]"),
    (["--dtype", "fp32", "bf16", "fp32"], "--dtype names ['fp32'] more than once"),
    (["--backends", "torch", "reference", "torch"], "--backends names ['torch'] more than once"),
    (["--backends", "torch", "--only-B", "reference=64"], "--only-B names ['reference'], not in the backends run"),
    (["--backends", "torch", "--max-B", "compile=64"], "--max-B names ['compile'], not in the backends run"),
    (["--backends", "torch", "--repeats-for", "inf_cl=1"], "--repeats-for names ['inf_cl'], not in the backends run"),
    (["--backends", "torch", "--warmup-for", "gemm3=1"], "--warmup-for names ['gemm3'], not in the backends run"),
    (["--backends", "torch", "inf_cl", "--alpha0-fused", "torch_chunked"],
     "--alpha0-fused torch_chunked is not in the backends run ['torch', 'inf_cl']"),
    (["--deadline-s", "-5"], "--deadline-s must be >= 0 seconds, got -5"),
    (["--point-budget-s", "-0.5"], "--point-budget-s must be >= 0 seconds, got -0.5"),
    (["--backends", "torch", "compile", "--warmup-for", "compile=0"], "--warmup-for compile=0: compile's first run"),
    (["--device", "cpu", "--backends", "triton_tuned", "--warmup", "0"],
     "--warmup 0: triton_tuned's first run autotunes")])
def test_loss_bench_refuses_bad_arguments_naming_them(capsys, argv, message):
    """Sizes below 1, duplicates (a size timed twice), per-backend options naming a backend that is not run (silently
    ignored), negative seconds, and a compile or autotune that would land in a timed run: refused by argparse."""
    import bench_loss

    with pytest.raises(SystemExit) as e:
        bench_loss.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_loss_bench_device_cuda_without_cuda_is_one_line(capsys):
    import bench_loss

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(SystemExit) as e:
        bench_loss.main(["--device", "cuda", "--out", "/nonexistent/never-written.json"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--device cuda: CUDA is not available here" in err and "Traceback" not in err


def test_loss_bench_saves_only_b_as_json_and_takes_a_good_command_line():
    import bench_loss

    args = bench_loss.parse_args(["--backends", "torch", "compile", "--only-B", "torch=128,64", "--warmup-for",
                                  "compile=1", "--max-B", "compile=64"])
    assert json.loads(json.dumps(args.only_B, default=str)) == {"torch": [64, 128]}  # was the string "{64, 128}"
    assert args.max_B == {"compile": 64} and args.warmup_for == {"compile": 1}
    # --warmup 0 leaves compile its 3 warm-ups at least (runs_of): not refused
    args = bench_loss.parse_args(["--backends", "torch", "compile", "--warmup", "0"])
    assert bench_loss.runs_of("compile", args)[0] == 3 and bench_loss.runs_of("torch", args)[0] == 0


def test_loss_bench_records_a_failure_to_build_a_sizes_inputs_and_goes_on(monkeypatch):
    """An OOM while building a size's inputs (make_pairs) was a bare traceback; it is that size's error (OOM) in the
    file, written, and the next size runs."""
    import _common
    import bench_loss

    report = _fake_loss_fns(monkeypatch, fixed_cost_s=0.0)
    real = _common.make_pairs

    def make_pairs(n, B, d, **kw):
        if B == 128:
            raise torch.OutOfMemoryError("planted: out of memory\nmore")
        return real(n, B, d, **kw)

    monkeypatch.setattr(_common, "make_pairs", make_pairs)
    args = _bench_args(["--device", "cpu", "--backends", "torch", "reference", "--B", "64", "128", "256", "--d", "16",
                        "--repeats", "1"])
    writes = []
    res = bench_loss.run_benchmarks(["torch", "reference"], report, args, torch.device("cpu"),
                                    on_progress=lambda r: writes.append({(x["label"], x["B"]): x["status"] for x in r}))
    st = {(r["label"], r["B"]): (r["status"], r.get("error")) for r in res}
    why = "building the inputs: OutOfMemoryError: planted: out of memory"
    assert st == {("torch", 64): ("ok", None), ("reference", 64): ("ok", None), ("torch", 128): ("OOM", why),
                  ("reference", 128): ("OOM", why), ("torch", 256): ("ok", None), ("reference", 256): ("ok", None)}
    assert writes[1] == {("torch", 64): "ok", ("reference", 64): "ok", ("torch", 128): "OOM", ("reference", 128): "OOM"}


def test_loss_bench_stopped_in_a_memory_figure_keeps_the_timed_rows(monkeypatch):
    """CPU: stopped (SIGINT/SIGTERM) while the fresh-process memory figure of a timed row is taken, the size's timed
    rows were dropped; they are kept, written, their memory marked not measured, and the stop is raised on. The
    ratios keep their times and give no memory ratio; the README table shows "-" for the peak."""
    import _common
    import bench_loss
    import report as rp

    report = _fake_loss_fns(monkeypatch, fixed_cost_s=0.0)

    def stopped(script, spec):
        raise KeyboardInterrupt("signal SIGTERM")

    monkeypatch.setattr(_common, "peak_in_fresh_process", stopped)
    args = _bench_args(["--device", "cpu", "--backends", "torch", "reference", "--B", "64", "128", "--d", "16",
                        "--repeats", "2"])
    results, writes = [], []
    with pytest.raises(KeyboardInterrupt):
        bench_loss.run_benchmarks(["torch", "reference"], report, args, torch.device("cpu"), results=results,
                                  on_progress=lambda r: writes.append(len(r)))
    assert [(r["label"], r["B"], r["status"]) for r in results] == [("torch", 64, "ok"), ("reference", 64, "ok")]
    assert writes == [2]
    for r in results:
        assert r["memory"] == {"peak_bytes": None, "not_measured": "the run was stopped before this figure was taken"}
        assert len(r["timing"]["raw_ms"]["fwd_bwd"]) == 2 and r["tflops_useful"]["fwd_bwd"] > 0
    ratio, not_run = bench_loss.compute_ratios(results, ["torch", "reference"], args)
    assert ratio["status"] == "ok" and ratio["mem_ratio"] is None and not_run["status"].startswith("n/a")
    assert ratio["time_ratio"]["fwd_bwd"] == pytest.approx(results[0]["timing"]["median_ms"]["fwd_bwd"]
                                                           / results[1]["timing"]["median_ms"]["fwd_bwd"])
    meta = {"device": {"name": "cpu"}, "versions": {}}
    (row,) = [ln for ln in rp.loss_table({"meta": meta, "results": results}) if ln.startswith("| fp32")]
    assert row.count(" (-)") == 2, row


def test_loss_bench_stopped_in_a_timing_loop_keeps_the_runs_taken_as_partial(monkeypatch):
    """SIGINT (run_step's limit in gpu_check.sh; SIGTERM raises the same KeyboardInterrupt after start_script) in the
    middle of a size's timing loop lost every run of that size (the records were made after the loop). They are kept
    and written before the stop is raised on: a row whose timed runs were not all taken is PARTIAL with the count
    taken, the median of those apart ("partial_median_ms", no "median_ms"), no memory figure, no ratio, and the README
    table says PARTIAL with the count; a row that had taken all its runs (reference, 2 here) stays ok."""
    import signal

    import bench_loss
    import report as rp

    report = _fake_loss_fns(monkeypatch, fixed_cost_s=0.0)
    fake, calls = bench_loss.make_loss_fn, []

    def make(name, **kw):
        fn = fake(name, **kw)

        def run(q, t):
            calls.append((name, q.shape[0]))
            if calls.count(("torch", 64)) == 4:  # its warm-up and two timed runs done: the limit fires
                signal.raise_signal(signal.SIGINT)  # in this thread: the handler raises KeyboardInterrupt now
            return fn(q, t)
        return run

    monkeypatch.setattr(bench_loss, "make_loss_fn", make)
    args = _bench_args(["--device", "cpu", "--backends", "torch", "reference", "--B", "64", "--d", "16",
                        "--repeats", "4", "--repeats-for", "reference=2"])
    results, writes = [], []
    old = signal.signal(signal.SIGINT, signal.default_int_handler)  # as start_script leaves it
    try:
        with pytest.raises(KeyboardInterrupt):
            bench_loss.run_benchmarks(["torch", "reference"], report, args, torch.device("cpu"), results=results,
                                      on_progress=lambda r: writes.append(json.loads(json.dumps(r, default=str))))
    finally:
        signal.signal(signal.SIGINT, old)
    assert [(r["label"], r["B"], r["status"]) for r in results] == [("torch", 64, "PARTIAL"), ("reference", 64, "ok")]
    assert writes[-1] == json.loads(json.dumps(results, default=str))  # written before the stop went on
    cut, ref = results
    assert cut["partial"] is True and (cut["repeats_done"], cut["repeats_planned"]) == (2, 4)
    assert len(cut["timing"]["raw_ms"]["fwd_bwd"]) == 2 and len(cut["timing"]["losses"]) == 3  # the warm-up too
    assert cut["timing"]["median_ms"] == {} and "tflops_useful" not in cut
    assert cut["timing"]["partial_median_ms"]["fwd_bwd"] == pytest.approx(
        sum(cut["timing"]["raw_ms"]["fwd_bwd"]) / 2)
    assert cut["memory"]["peak_bytes"] is None and ref["memory"]["peak_bytes"] is None
    assert len(ref["timing"]["raw_ms"]["fwd_bwd"]) == 2 and ref["timing"]["median_ms"]["fwd_bwd"] > 0
    (ratio,) = bench_loss.compute_ratios(results, ["torch", "reference"], args)
    assert ratio["status"].startswith("n/a") and "time_ratio" not in ratio
    meta = {"device": {"name": "cpu"}, "versions": {}}
    lines = rp.loss_table({"meta": meta, "results": results, "interrupted": "KeyboardInterrupt (SIGINT)"})
    (row,) = [ln for ln in lines if ln.startswith("| fp32 | 16 | 64 |")]
    med = cut["timing"]["partial_median_ms"]["fwd_bwd"]
    assert row.split(" | ")[3] == f"PARTIAL (2 of 4 runs: {med:.1f} ms)" and row.endswith("| - | - |"), row
    assert any("PARTIAL: stopped in its timing loop" in ln for ln in lines), lines


# --------------------------------------------------------------------------- report.py


def test_report_renders_an_empty_file_and_counts_torch_chunked_as_fused():
    """A file with no results said nothing valid (a table header with an empty column); torch_chunked was left out
    of "fused / reference"."""
    import report as rp

    meta = {"device": {"name": "cpu"}, "versions": {}}
    lines = rp.loss_table({"meta": meta, "results": [], "partial": True})
    assert "(no results in this file)" in lines and not any(ln.startswith("|") for ln in lines), lines

    def row(label, ms):
        return {"label": label, "dtype": "fp32", "d": 16, "B": 64, "status": "ok",
                "timing": {"median_ms": {"fwd_bwd": ms}}, "memory": {"peak_bytes": 2 * rp.MiB}}

    lines = rp.loss_table({"meta": meta, "results": [row("torch_chunked", 5.0), row("reference", 20.0)]})
    assert "| fp32 | 16 | 64 | 5.00 (2) | 20.0 (2) | 0.25 (torch_chunked) | - |" in lines, lines


# --------------------------------------------------------------------------- bench_single_pass, bench_data_loading


def _quiet_load(monkeypatch):
    import _common as C

    monkeypatch.setattr(C, "start_script", lambda: None)
    monkeypatch.setattr(C, "machine_load", lambda seconds=1.0: {"loadavg": [0.0] * 3, "busy_fraction_others": 0.0})


def test_single_pass_bench_keeps_one_path_when_the_other_fails(tmp_path, monkeypatch):
    """The cached path failing lost the single pass's figures (one write, at the end): each path is recorded with
    its own error, the other is timed and written, with the commit and the machine load before and after; exit 1."""
    import bench_single_pass as bsp

    _quiet_load(monkeypatch)

    def build_step(preset, batch, settings):
        model = torch.nn.Linear(2, 1)

        def step(single):
            if not single:
                raise RuntimeError("planted: the cached path broke")
            model.zero_grad(set_to_none=True)
            model(torch.ones(1, 2)).sum().backward()
            return 0.5
        step.model = model
        return step

    monkeypatch.setattr(bsp, "build_step", build_step)
    out = tmp_path / "sp.json"
    assert bsp.main(["--batch", "4", "--repeats", "3", "--out", str(out)]) == 1
    res = json.loads(out.read_text())
    assert len(res["single_pass"]["seconds"]) == 3 and res["single_pass"]["median_s"] > 0
    assert res["single_pass"]["loss"] == 0.5 and res["single_pass"]["error"] is None
    assert res["cached_path"] == {"seconds": [], "median_s": None, "loss": None,
                                  "error": "RuntimeError: planted: the cached path broke"}
    assert res["speedup_median"] is None and "max_rel_grad_diff" not in res and "partial" not in res
    assert res["git"]["commit"] and res["machine_load_before"]["busy_fraction_others"] == 0.0
    assert res["machine_load_after"]["busy_fraction_others"] == 0.0


def _data_loading_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_data_loading", ROOT / "scripts" / "bench_data_loading.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_data_loading_bench_writes_each_run_and_the_real_global_batch(tmp_path, monkeypatch):
    """A failed second setting lost the first (one write at the end, a SystemExit in between); the file said
    global batch 64 whatever the runs used. Each run is written as it ends, a failure recorded with its error and
    the others run; the global batch is the run's own (train_config.json); the commit and machine load are in."""
    bdl = _data_loading_module()
    _quiet_load(monkeypatch)
    monkeypatch.setattr(bdl, "write_mmeb_jpeg", lambda folder, n: ("rows.jsonl", "images"))
    written, real_run = [], subprocess.run

    def fake_train(cmd, **kw):  # the one subprocess module: git (run_meta) runs for real
        if "--output-dir" not in cmd:
            return real_run(cmd, **kw)
        out = Path(cmd[cmd.index("--output-dir") + 1])
        written.append(json.loads((tmp_path / "dl.json").read_text())["results"] if (tmp_path / "dl.json").exists()
                       else None)
        if "--data" in cmd and cmd[cmd.index("--num-workers") + 1] == "2":
            return subprocess.CompletedProcess(cmd, 3, "", "planted: the image set broke")
        out.mkdir(parents=True)
        (out / "train_log.jsonl").write_text("".join(json.dumps({"step_time_s": s, "data_wait_s": s / 10}) + "\n"
                                                     for s in (9.0, 0.2, 0.4, 0.3)))
        (out / "train_config.json").write_text(json.dumps({"global_batch": 32}))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(bdl.subprocess, "run", fake_train)
    assert bdl.main(["--steps", "4", "--workers", "0,2", "--out", str(tmp_path / "dl.json")]) == 1
    res = json.loads((tmp_path / "dl.json").read_text())
    got = [(r["dataset"], r["workers"], r.get("global_batch"), r.get("median_step_ms"), r.get("error", "")[:13])
           for r in res["results"]]
    assert got == [("default", 0, 32, pytest.approx(300.0), ""), ("default", 2, 32, pytest.approx(300.0), ""),
                   ("mmeb-jpeg", 0, 32, pytest.approx(300.0), ""),
                   ("mmeb-jpeg", 2, None, None, "RuntimeError:")], got
    failed = res["results"][3]["error"]
    assert "exit status 3" in failed and "planted: the image set broke" in failed
    assert [len(w or []) for w in written] == [0, 1, 2, 3]  # each run found the ones before it written
    assert res["git"]["commit"] and res["machine_load_after"]["busy_fraction_others"] == 0.0 and "partial" not in res
