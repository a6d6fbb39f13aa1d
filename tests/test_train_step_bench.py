"""Stage T of the prepared GPU run (benchmarks/gpu_check.sh T, benchmarks/bench_train_step.py) on the CPU.

The training loop on a GPU is measured in one short device call; a crash in its bookkeeping there
costs the lease, so the whole stage runs here as a dry run (tiny sizes, CPU, bf16 under ZeRO-3),
and its pieces (the phase clock around GradCache, the FLOP count, the memory search, the data
fallback, a stop at the limit) are checked on their own. Everything that starts DeepSpeed or
torch.distributed runs in a subprocess.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_train_step as B  # noqa: E402

pytestmark = pytest.mark.slow  # processes, ranks, wheel builds or compiles: -m 'not slow' skips them


def _env(tmp_path: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env["TRAIN_STEP_WORK"] = str(tmp_path / "work")
    env.pop("TRITON_INTERPRET", None)
    return env


# ------------------------------------------------------------------------------ the whole stage
def test_gpu_check_stage_T_dry_run(tmp_path):
    """`GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh T`: every step done under its limit, two files
    back (log and results), and the results hold (a)-(d) with the step's phases adding up."""
    out = tmp_path / "out"
    env = dict(_env(tmp_path), OUT=str(out), GPU_CHECK_DRY="1", SETUP_MARKER=str(tmp_path / "setup"))
    t0 = time.time()
    r = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "T"], capture_output=True, text=True, env=env,
                       timeout=900, cwd=ROOT)
    wall = time.time() - t0
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["log_T.txt", "train_step.json"]
    log = (out / "log_T.txt").read_text()
    assert "DRY RUN" in log and "llave_fast from" in log
    assert "STOPPED" not in log and "FAILED" not in log and "KILLED" not in log, log[-3000:]
    # env check, tiny job, the step, eval (and the offline pip resolve when .whl/train is here)
    assert log.count("--- step done") >= 4 + (ROOT / ".whl" / "train").is_dir(), log[-3000:]
    assert "| 1x1 (32 px), median of 2 |" in log and "extrapolated (not run)" in log
    res = json.loads((out / "train_step.json").read_text())
    assert res["dry_run"] is True
    assert res["parts"] == {"env": "ok", "tiny": "ok", "step": "ok", "eval": "ok"}, res["parts"]

    env_ = res["env"]
    assert env_["deepspeed"] and isinstance(env_["deepspeed_prebuilt_ops"], list)
    assert env_["optimizer"]["needs_jit_op"] is False and env_["optimizer"]["ds_config_optimizer"] is None

    tiny = res["tiny_job"]
    assert tiny["status"] == "ok" and tiny["steps"] == 3 and tiny["p_at_1_before"] is not None
    assert tiny["p_at_1_after"] is not None and set(tiny["by_task"]) == {"i2t", "t2i", "vqa"}
    assert "--bf16" in tiny["cmd"] and "llave_fast" in tiny["cmd"] and "train" in tiny["cmd"]

    step = res["step"]
    assert step["status"] == "ok" and step["zero_stage"] == 3 and step["bf16"] is True
    assert step["optimizer"]["inner"] == "torch.optim.adamw.AdamW"
    assert step["optimizer"]["engine"] == "DeepSpeedZeroOptimizer_Stage3"
    g1 = step["grid_1x1"]
    assert len(g1["warmup"]) == 1 and len(g1["timed"]) == 2
    for rec in g1["timed"]:
        assert rec["path"] == "cached (GradCache)" and rec["pairs"] == 16 and rec["tiles"] >= 16
        # the phases partition the step: encode, loss, re-encode forward/backward/other, optimizer
        assert set(rec["phases_s"]) == {"encode", "loss", "reencode_fwd", "reencode_bwd", "reencode_other",
                                        "optimizer"}
        assert sum(rec["phases_s"].values()) == pytest.approx(rec["step_s"], rel=0.05, abs=0.02)
        assert rec["tflop_useful"] < rec["tflop_with_gradcache_forward"] < rec["tflop_executed"]
        assert rec["lm_tokens"] <= rec["lm_tokens_executed"] and rec["pairs_per_s"] > 0
    assert g1["summary"]["median_step_s"] > 0
    g2 = step["grid_2x2"]["step"]
    assert g2["pairs"] == 8 and g2["tiles"] > 8 * 1  # 2x2 images: base view + 4 crops
    ex = step["extrapolated"]
    assert ex["pairs"] == 64 and ex["step_s"] > 0 and ex["measured_from_pairs"] == 16
    enc = step["encode"]
    assert enc["image_text"]["samples"] == 8 and enc["text"]["samples"] == 8
    assert enc["video"].get("videos") == 3, enc["video"]
    mem = step["memory"]
    assert set(mem["gradcache"]) == {"4", "8"} and all("step_s" in v for v in mem["gradcache"].values())
    plain = mem["without_gradcache"]
    assert plain["largest_ok"] == 32 and plain["limited_by"].startswith("b_max")
    assert all(t["path"] == "single pass (no caching)" for t in plain["tries"])

    ev = res["eval_tiny"]
    assert ev["status"] == "ok" and ev["mmeb"]["rc"] == 0 and ev["video"]["rc"] == 0
    assert set(ev["mmeb"]["datasets"]) == {"synthetic_i2t", "synthetic_t2i", "synthetic_vqa"}
    assert ev["mmeb"]["dtype"] == "bfloat16" and 0 <= ev["mmeb"]["p_at_1"] <= 1
    assert ev["video"]["num_videos"] == 3 and ev["video"]["dtype"] == "bfloat16"
    print(f"stage T dry run: {wall:.0f} s")


@pytest.mark.parametrize("stages", ["X", "ABX", "TT", "ABTA", "tb"])
def test_gpu_check_refuses_a_bad_stage_list(stages):
    r = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), stages], capture_output=True, text=True, timeout=60,
                       cwd=ROOT)
    assert r.returncode == 2 and "one to three of A, B, T" in r.stdout, r.stdout + r.stderr


@pytest.mark.slow
def test_gpu_check_runs_the_stages_in_the_order_given(tmp_path):
    """'TB' (the training step first, on a short lease): one set-up, logged at the top of T's log, then
    stage T, then stage B (a dry run with no step named: each stage only says it is done)."""
    env = dict(os.environ, OUT=str(tmp_path), GPU_CHECK_DRY="1", STEPS="none", TRAIN_STEP_WORK=str(tmp_path / "w"),
               SETUP_MARKER=str(tmp_path / "setup"))
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself in a dry run
    r = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "TB"], capture_output=True, text=True, timeout=600,
                       cwd=ROOT, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    out = r.stdout
    assert out.count("] environment\n") == 1, out  # one set-up for both stages
    assert 0 < out.index("stage T done") < out.index("stage B done"), out
    assert "DRY RUN" in (tmp_path / "log_T.txt").read_text() and "DRY RUN" not in (tmp_path / "log_B.txt").read_text()

    # call 2 on the warm machine: the set-up of the call before is kept (no collect_env, no install)
    again = dict(env, OUT=str(tmp_path / "call2"))
    r2 = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "A"], capture_output=True, text=True, timeout=600,
                        cwd=ROOT, env=again)
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-2000:]
    assert "warm machine, the set-up of the call before is kept" in r2.stdout and "llave_fast from" in r2.stdout
    assert "] environment\n" not in r2.stdout and "installing llave-fast" not in r2.stdout, r2.stdout
    # a marker for another tree (or Python) is not reused
    marker = tmp_path / "setup"
    lines = marker.read_text().splitlines()
    marker.write_text("\n".join(["/elsewhere|" + lines[0].split("|", 1)[1]] + lines[1:]) + "\n")
    r3 = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "A"], capture_output=True, text=True, timeout=600,
                        cwd=ROOT, env=dict(again, OUT=str(tmp_path / "call3")))
    assert r3.returncode == 0 and "] environment\n" in r3.stdout and "warm machine" not in r3.stdout, r3.stdout[-3000:]


def test_step_part_keeps_what_it_measured_when_stopped(tmp_path):
    """SIGINT (run_step's limit) during part 'step': exit 130, the steps done are in the file,
    marked interrupted."""
    out = tmp_path / "r.json"
    proc = subprocess.Popen([sys.executable, str(BENCH / "bench_train_step.py"), "step", "--dry", "--out", str(out)],
                            env=_env(tmp_path), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                res = json.loads(out.read_text())
            except (OSError, ValueError):
                res = {}
            if (res.get("step") or {}).get("grid_1x1", {}).get("warmup"):
                break
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            time.sleep(0.2)
        else:
            pytest.fail("no warm-up step within 300 s")
        proc.send_signal(signal.SIGINT)
        text, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, text[-3000:]
    res = json.loads(out.read_text())
    assert res["parts"]["step"] == "interrupted" and res["step"]["status"] == "interrupted"
    assert len(res["step"]["grid_1x1"]["warmup"]) == 1 and "interrupted" in text


# ------------------------------------------------------------------------------ pieces
def test_search_largest_doubles_then_bisects():
    calls = []

    def try_fn(B):
        calls.append(B)
        return {"B": B, "ok": B <= 100, "oom": B > 100, "s": 0.01 * B}

    r = B.search_largest(try_fn, start=16, b_max=4096, max_try_s=60, deadline=None, bisect=2, grain=8)
    assert calls == [16, 32, 64, 128, 96, 112]
    assert r["largest_ok"] == 96 and r["smallest_oom"] == 112 and r["limited_by"] == "memory"
    assert [t.get("bisect", False) for t in r["tries"]] == [False] * 4 + [True] * 2


def test_search_largest_stops_by_time_deadline_limit_and_error():
    def slow(B):
        return {"B": B, "ok": True, "oom": False, "s": 0.1 * B}

    r = B.search_largest(slow, start=16, b_max=4096, max_try_s=5, deadline=None)
    assert r["largest_ok"] == 32 and r["smallest_oom"] is None and r["limited_by"].startswith("time: a try at B=64")

    r = B.search_largest(slow, start=16, b_max=32, max_try_s=60, deadline=None)
    assert r["largest_ok"] == 32 and r["limited_by"].startswith("b_max")

    now = [0.0]

    def ticking(B):
        now[0] += 0.1 * B
        return {"B": B, "ok": True, "oom": False, "s": 0.1 * B}

    r = B.search_largest(ticking, start=16, b_max=4096, max_try_s=60, deadline=6.0, clock=lambda: now[0])
    # 1.6 s + 3.2 s used; the next try (~6.4 s) would end past the deadline
    assert r["largest_ok"] == 32 and r["limited_by"].startswith("deadline")

    def broken(B):
        return {"B": B, "ok": B < 32, "oom": False, "s": 1.0, "error": "RuntimeError: boom"}

    r = B.search_largest(broken, start=16, b_max=4096, max_try_s=60, deadline=None)
    assert r["largest_ok"] == 16 and r["limited_by"] == "error at B=32: RuntimeError: boom"

    # after an out-of-memory try, a bisection try failing otherwise stops (the engine may be unusable)
    def after_oom(B):
        if B == 128:
            return {"B": B, "ok": False, "oom": True}
        if B > 64:
            return {"B": B, "ok": False, "oom": False, "error": "AssertionError: trace"}
        return {"B": B, "ok": True, "oom": False, "s": 0.01}

    r = B.search_largest(after_oom, start=64, b_max=4096, max_try_s=60, deadline=None, bisect=3)
    assert r["largest_ok"] == 64 and r["smallest_oom"] == 128 and "engine unusable" in r["bisect_stopped"]


def test_flops_count_a_batch_by_hand():
    from llave_fast.model import tiny_config

    cfg = tiny_config(vocab_size=300, image_token_index=299)
    F = B.Flops(cfg)
    v, t = cfg.vision_config, cfg.text_config
    n = (v.image_size // v.patch_size) ** 2
    hv, iv, h, i = v.hidden_size, v.intermediate_size, t.hidden_size, t.intermediate_size
    d = t.hidden_size // t.num_attention_heads
    vis = 3 * v.patch_size ** 2 * hv + v.num_hidden_layers * (4 * hv * hv + 2 * hv * iv)
    proj = hv * h + h * h
    lm = t.num_hidden_layers * (h * h + 2 * h * t.num_key_value_heads * d + h * h + 3 * h * i)
    assert (F.vision_params, F.projector_params, F.lm_params) == (vis, proj, lm)
    side = {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]),
            "pixel_values": [torch.zeros(2, 3, v.image_size, v.image_size), None]}
    c = F.side(side, 2)  # one chunk: padded to the longest row, as collated
    assert (c["lm_tokens"], c["lm_tokens_executed"], c["tiles"], c["vision_tokens"]) == (7, 8, 2, 2 * n)
    tile = 2 * n * (vis + proj) + 4 * n * n * hv * v.num_hidden_layers
    attn = 4 * t.num_attention_heads * d * t.num_hidden_layers
    real = 2 * tile + 2 * lm * 7 + 0.5 * attn * (3 ** 2 + 4 ** 2)
    executed = 2 * tile + 2 * (2 * lm * 4 + attn * 4 ** 2)
    assert c["fwd_real"] == pytest.approx(real) and c["fwd_executed"] == pytest.approx(executed)
    # chunks of one row, as training runs them (each chunk cut to its own longest row): 3 + 4 tokens
    one = F.side(side, 1)
    assert (one["lm_tokens"], one["lm_tokens_executed"]) == (7, 7) and one["fwd_real"] == pytest.approx(real)
    assert one["fwd_executed"] == pytest.approx(2 * tile + 2 * lm * 3 + attn * 3 ** 2 + 2 * lm * 4 + attn * 4 ** 2)
    both = F.batch({"query": side, "target": side}, 2)
    tf = B.Flops.step_tflop(both, cached=True, checkpointing=True)
    assert tf["tflop_useful"] == pytest.approx(3 * 2 * real / 1e12)
    assert tf["tflop_with_gradcache_forward"] == pytest.approx(4 * 2 * real / 1e12)
    assert tf["tflop_executed"] == pytest.approx(5 * 2 * executed / 1e12)
    single = B.Flops.step_tflop(both, cached=False, checkpointing=False)
    assert single["tflop_with_gradcache_forward"] == single["tflop_useful"]
    assert single["tflop_executed"] == pytest.approx(3 * 2 * executed / 1e12)


class _FakeEngine:
    """What GradCache and TimedEngine use of a DeepSpeed engine (stage 0), around a plain module."""

    def __init__(self, module):
        self.module = module
        self.backwards = 0
        self.boundaries = []

    def __call__(self, x):
        return torch.nn.functional.normalize(self.module(x), dim=-1)

    def backward(self, loss, scale_wrt_gas=True):
        assert scale_wrt_gas is False
        self.backwards += 1
        loss.backward()

    def step(self):
        pass

    def zero_optimization_stage(self):
        return 0

    def gradient_accumulation_steps(self):
        return 1

    def set_gradient_accumulation_boundary(self, b):
        self.boundaries.append(b)


def _loss(q, t, **kw):
    s = q @ t.T * 10
    return torch.nn.functional.cross_entropy(s, torch.arange(len(q)))


def test_timed_engine_marks_gradcache_phases():
    """The wrappers see GradCache's phases from outside: cached path (encode, loss, re-encode with
    per-chunk forward and backward) and single pass (forward, loss, backward)."""
    from llave_fast import GradCache

    torch.manual_seed(0)
    engine = _FakeEngine(torch.nn.Linear(8, 4))
    clock = B.Clock(torch.device("cpu"))
    q, t = torch.randn(6, 8), torch.randn(6, 8)
    cache = GradCache(B.TimedEngine(engine, clock), B.TimedLoss(_loss, clock), 2)
    clock.reset()
    clock.enter("start")
    cache(q, t)
    clock.enter("end")
    assert [m for m, _ in clock.marks] == ["start", "encode", "loss", "reencode", "end"]
    assert len(clock.sub["fwd"]) == 6 and len(clock.sub["bwd"]) == 6 and engine.backwards == 6
    ph = clock.result()
    assert ph["reencode"] >= ph["reencode_fwd"] + ph["reencode_bwd"] - 1e-6
    assert ph["total"] == pytest.approx(sum(ph[k] for k in ("start", "encode", "loss", "reencode")))
    grads = engine.module.weight.grad.clone()

    # the same gradients through the single pass (chunk holds all 12 samples), phases in its order
    engine.module.weight.grad = None
    engine.module.bias.grad = None
    cache = GradCache(B.TimedEngine(engine, clock), B.TimedLoss(_loss, clock), 12)
    clock.reset()
    clock.enter("start")
    cache(q, t)
    clock.enter("end")
    assert [m for m, _ in clock.marks] == ["start", "reencode", "loss", "backward", "end"]
    torch.testing.assert_close(engine.module.weight.grad, grads, rtol=1e-5, atol=1e-6)


def test_tile_batch_takes_or_repeats_rows():
    side = {"input_ids": torch.arange(6).view(2, 3), "attention_mask": torch.ones(2, 3, dtype=torch.long),
            "pixel_values": [torch.zeros(1, 3, 4, 4), None], "image_sizes": [(4, 4), None]}
    batch = {"query": side, "target": side, "negatives": None, "target_ids": torch.tensor([0, 1])}
    one = B.tile_batch(batch, 1)
    assert one["query"]["input_ids"].tolist() == [[0, 1, 2]] and one["target_ids"] is None
    five = B.tile_batch(batch, 5)
    assert five["query"]["input_ids"][:, 0].tolist() == [0, 3, 0, 3, 0]
    assert [p is None for p in five["target"]["pixel_values"]] == [False, True, False, True, False]
    assert five["query"]["image_sizes"] == [(4, 4), None, (4, 4), None, (4, 4)]


def _stream_rows(step_loader, workers=2):
    """(the rows of each batch batch_stream yields with this step_loader, the rows the order gives): 3 steps
    of 4 pairs at 32 px."""
    from llave_fast import train as T

    fake = SimpleNamespace(step_loader=step_loader, StepBatches=T.StepBatches, BatchOrder=T.BatchOrder)
    stream = B.batch_stream(fake, lambda records: {"rows": [r["row"] for r in records]}, image_size=32, pairs=4,
                            steps=3, seed=0, workers=workers)
    order = T.BatchOrder(12, 4, 0)
    return [b["rows"] for b, wait in stream], [[int(i) for i in order(s)] for s in range(3)]


def test_batches_fall_back_to_threads_when_the_workers_die():
    """A dead DataLoader worker (e.g. a bus error on a small /dev/shm) does not end the run: the
    remaining batches are made by threads, in order."""

    class Dying:
        def __iter__(self):
            return self

        def __next__(self):
            raise RuntimeError("DataLoader worker (pid 123) is killed by signal: Bus error.")

    got, want = _stream_rows(lambda *a, **k: Dying())
    assert got == want


def test_a_small_dev_shm_takes_threads_before_any_worker_starts(monkeypatch, capsys):
    """A worker that cannot write its batch to /dev/shm drops it and the loader waits forever (no worker
    died, so the fallback above never fires): where the batches in flight would not fit, threads make
    them from the start and the loader is never created."""
    # LLaVE-0.5B step: 256 pairs at 384 px, 6 workers, 4 steps -> 4 batches of <= 0.84 GiB, x2
    assert B.shm_shortfall(6, 4, 256, 384, free=64 << 20).startswith("/dev/shm has 0.06 GiB free, 4 batches")
    assert "6.75 GiB" in B.shm_shortfall(6, 4, 256, 384, free=64 << 20)
    assert B.shm_shortfall(6, 4, 256, 384, free=7 << 30) == ""
    assert B.shm_shortfall(0, 4, 256, 384, free=0) == "" and B.shm_shortfall(6, 4, 256, 384, free=None) == ""

    def no_loader(*a, **k):
        raise AssertionError("the loader's workers were started")

    monkeypatch.setattr(B, "dev_shm_free", lambda: 1024)
    got, want = _stream_rows(no_loader)
    assert got == want
    assert "WARNING: /dev/shm has 0.00 GiB free" in capsys.readouterr().out


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H200", 989.0),
                                        ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
                                        ("NVIDIA H200 NVL", 835.0), ("NVIDIA A100-SXM4-80GB", None)])
def test_mfu_peak_by_device_name(name, peak):
    assert B.peak_tflops(name) == peak


def test_fetch_wheels_pins_every_wheel_from_constraints():
    """The wheel script is valid bash and every package it fetches has a version in constraints.txt
    (it reads them from there; a missing pin would stop it on the machine that runs it)."""
    script = (BENCH / "fetch_wheels.sh").read_text()
    r = subprocess.run(["bash", "-n", str(BENCH / "fetch_wheels.sh")], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    names = []
    for arr in ("NEEDED", "FALLBACK"):
        m = re.search(rf"^{arr}=\(([^)]*)\)", script, re.M)
        assert m, arr
        names += m.group(1).split()
    assert {"hjson", "pydantic", "pydantic_core", "annotated-types", "typing-inspection", "av"} <= set(names)
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, ver = line.split("==")
            pins[re.sub(r"[_.]", "-", name.lower())] = ver
    assert "deepspeed" in pins and "DS_BUILD_OPS=0" in script and "pip wheel" in script
    missing = [n for n in names if re.sub(r"[_.]", "-", n.lower()) not in pins]
    assert not missing, f"not pinned in constraints.txt: {missing}"


# ------------------------------------------------------------------------------ the other training benchmarks
def test_distributed_bench_checks_each_variant_then_times_it(tmp_path):
    """bench_distributed.py on 2 gloo ranks at tiny sizes: every loss variant passes its float64 check
    against the per-rank (local) loss, GradCache's gradients equal the plain step's, and the JSON holds
    the timings, peaks and ratios the README's table is made from."""
    out = tmp_path / "d.json"
    r = subprocess.run([sys.executable, str(BENCH / "bench_distributed.py"), "--N", "96", "--d", "16", "--batches",
                        "16", "32", "--chunk", "4", "--hidden", "16", "--in-dim", "8", "--emb-dim", "8", "--repeats",
                        "1", "--warmup", "0", "--threads", "1", "--out", str(out)],
                       capture_output=True, text=True, env=_env(tmp_path), cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["correctness"]["loss"]["passed"] == {"strip": True, "two-strip": True, "eager": True}, r.stdout[-3000:]
    assert res["correctness"]["gradcache"]["passed"] is True and len(res["correctness"]["gradcache"]["runs"]) == 2
    for kind, size, variants in (("loss", "96", ("strip", "two-strip", "eager")),
                                 ("gradcache", "32", ("plain", "gradcache"))):
        for v in variants:
            assert res[kind]["timing"][size]["variants"][v]["median_step_ms"] > 0
            assert res[kind]["memory"][size][v]["status"] == "ok", res[kind]["memory"][size][v]
    (ratios,) = res["ratios"]["loss"]
    assert ratios["N"] == 96 and ratios["strip_over_two_strip_time"] > 0 and ratios["strip_over_eager_time"] > 0
    assert [x["batch"] for x in res["ratios"]["gradcache"]] == [16, 32]


def test_st_bench_ratios_leave_out_what_was_not_measured():
    import bench_st

    rows = {"st_per_direction": {"median_fwd_bwd_ms": 10.0, "peak_mib": 0.0},
            "fused_per_direction": {"median_fwd_bwd_ms": 5.0, "peak_mib": 2.0},
            "st_joint": {"median_fwd_bwd_ms": 8.0}, "fused_joint": {"median_fwd_bwd_ms": 2.0}}
    r = bench_st.ratios_of(rows)
    assert set(r) == {"fused_per_direction / st_per_direction", "fused_joint / st_joint"}
    assert r["fused_per_direction / st_per_direction"] == {"time": 0.5, "memory": None}  # a zero peak: no ratio
    assert r["fused_joint / st_joint"] == {"time": 0.25, "memory": None}  # not measured (--no-memory)


def test_a_tiny_job_stopped_at_its_limit_keeps_what_it_logged_and_saves_checkpoints(tmp_path, monkeypatch):
    """T1 on the GPU: the tiny job gets --save-every (a run stopped at the step's limit still leaves T3 a
    checkpoint), and when the step's SIGINT stops it the results file says so with the steps it logged."""
    cmds = []

    def stopped(jobs, quiet_bars=False):
        cmds.append(jobs[0][1])
        run_dir = tmp_path / "tiny_run"
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "train_log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 9.0 - s}) + "\n"
                                                         for s in range(1, 31)) + '{"step": 31, "lo')  # half written
        raise KeyboardInterrupt

    monkeypatch.setattr(B, "run_clis", stopped)
    res = B.Results(str(tmp_path / "r.json"), False, torch.device("cpu"))
    args = SimpleNamespace(work=str(tmp_path), dry=False, workers=0)
    with pytest.raises(KeyboardInterrupt):
        B.part_tiny(args, res, B.REAL)
    cmd = cmds[0]
    assert cmd[cmd.index("--save-every") + 1] == str(B.REAL["tiny_save_every"]) == "20"
    assert cmd[cmd.index("--steps") + 1] == "80"
    # the job Prediction 14 (a) and its CPU reference ran: warm-up 10, whatever the preset's is now
    assert cmd[cmd.index("--warmup-steps") + 1] == "10"
    saved = json.loads((tmp_path / "r.json").read_text())["tiny_job"]
    assert saved["status"] == "stopped at the step's limit" and saved["steps_logged"] == 30
    assert saved["loss_first_last"] == [8.0, -21.0]
