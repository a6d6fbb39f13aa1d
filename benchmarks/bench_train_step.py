#!/usr/bin/env python3
"""The training loop on a GPU (stage T of gpu_check.sh): parts env, step, tiny, eval, report.

Each part runs in its own process and adds to one JSON file (``--out``), rewritten after every
sub-step: a part stopped at its limit (SIGINT) keeps what it measured, marked "interrupted".
``--dry``: tiny sizes on the CPU. What each part measures, and the FLOP model behind MFU (peak 989
TFLOP/s dense bf16 on an H100 or H200, or ``--peak-tflops``): benchmarks/README.md, "Stage T".
"""

from __future__ import annotations

import argparse
import gc as pygc
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as C  # noqa: E402

# dense bf16 TFLOP/s, NVIDIA's data sheets; the first name found in the device's name counts (SXM last)
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H200 NVL": 835.0, "H100": 989.0, "H200": 989.0}


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a device by its name (None: not in PEAK_BF16_TFLOPS; --peak-tflops gives one)."""
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)


REAL = dict(
    preset="llave_0.5b_arch.json", chunk=16, pairs_1x1=256, warmup_1x1=1, timed_1x1=3, image_1x1=384,
    pairs_2x2=64, image_2x2=768, extrapolate_pairs=1024, mem_pairs=64, mem_chunks=(16, 32), plain_start=32,
    plain_max=2048, max_try_s=25.0, enc_images=128, enc_texts=256, enc_batch=64, enc_warmup=16, clips=16,
    clip_frames=40, clip_fps=3, video_batch=8, mmeb_queries=200, mmeb_candidates=10, workers=6,
    tiny_save_every=20,  # steps between T1's checkpoints (a tiny ZeRO-3 save takes about a second)
    tiny_steps=80,  # of the default job's 240: at the H200's 0.32-0.38 s a step (ZeRO-2) 240 would not fit T1
)
DRY = dict(REAL, preset=None, chunk=4, pairs_1x1=16, timed_1x1=2, image_1x1=32, pairs_2x2=8, image_2x2=64,
           extrapolate_pairs=64, mem_pairs=8, mem_chunks=(4, 8), plain_start=4, plain_max=32, max_try_s=20.0,
           enc_images=8, enc_texts=8, enc_batch=4, enc_warmup=2, clips=3, clip_frames=8, video_batch=2,
           mmeb_queries=8, mmeb_candidates=4, workers=0)  # plumbing only: no figure of it means anything


def log(msg: str) -> None:
    print(f"[train-step {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def gib(x) -> float | None:
    return None if x is None else round(x / 2 ** 30, 3)


class Results:
    """The JSON file every part adds to, rewritten whole (atomically) on each ``put``."""

    def __init__(self, path: str, dry: bool, device: torch.device):
        self.path, self.data = Path(path), {}
        try:
            self.data = json.loads(self.path.read_text()) if self.path.exists() else {}
        except (OSError, ValueError) as exc:
            log(f"WARNING: {self.path} is not readable JSON ({exc}); starting a new file")
        if not self.data:
            self.data = {"schema": 1, "script": "benchmarks/bench_train_step.py", "dry_run": dry,
                         **C.run_meta(device)}
        self.data.setdefault("parts", {})

    def put(self, key: str | None = None, value=None) -> None:
        if key:
            self.data[key] = value
        self.data["updated"] = C.now_stamps()["local_time"]
        C.write_json(self.path, self.data, indent=2)


class Flops:
    """One forward's FLOPs from the model config (benchmarks/README.md's formulas); ``side`` counts a
    collated batch side: real and executed (padded) tokens, tiles."""

    def __init__(self, config):
        v, t = config.vision_config, config.text_config
        self.n = (v.image_size // v.patch_size) ** 2
        hv, h, heads, kv = v.hidden_size, t.hidden_size, t.num_attention_heads, t.num_key_value_heads
        d = getattr(t, "head_dim", None) or h // heads
        self.vision_params = 3 * v.patch_size ** 2 * hv + v.num_hidden_layers * hv * (4 * hv + 2 * v.intermediate_size)
        self.projector_params = hv * h + h * h
        self.lm_params = t.num_hidden_layers * (2 * h * heads * d + 2 * h * kv * d + 3 * h * t.intermediate_size)
        self.vision_attn = 4 * self.n ** 2 * hv * v.num_hidden_layers  # a tile, the full square
        self.lm_attn_coeff = 4 * heads * d * t.num_hidden_layers  # x T^2 for the full square (causal: half)

    def side(self, inputs: dict, chunk: int) -> dict:
        """Executed tokens as training runs them: rows sorted by length, each GradCache chunk padded
        to its own longest row (llave_fast.training.step.by_length / chunks)."""
        from llave_fast.training.step import by_length, chunks

        width = inputs["attention_mask"].shape[1]
        lengths = inputs["attention_mask"].sum(dim=1).double()
        shapes = [c["attention_mask"].shape for c in chunks(by_length(inputs)[0], chunk)]
        tiles = sum(int(p.shape[0]) for p in inputs.get("pixel_values") or [] if p is not None)
        vis = tiles * (2 * self.n * (self.vision_params + self.projector_params) + self.vision_attn)
        lm_real = 2 * self.lm_params * float(lengths.sum()) + 0.5 * self.lm_attn_coeff * float((lengths ** 2).sum())
        lm_exec = sum(r * (2 * self.lm_params * w + self.lm_attn_coeff * w ** 2) for r, w in shapes)
        return {"width": width, "lm_tokens": int(lengths.sum()), "lm_tokens_executed": sum(r * w for r, w in shapes),
                "tiles": tiles, "vision_tokens": tiles * self.n, "fwd_real": vis + lm_real,
                "fwd_executed": vis + lm_exec}

    def batch(self, batch: dict, chunk: int) -> dict:
        q, t = self.side(batch["query"], chunk), self.side(batch["target"], chunk)
        return dict({k: q[k] + t[k] for k in q if k != "width"}, longest_query_tokens=q["width"],
                    longest_target_tokens=t["width"])

    @staticmethod
    def step_tflop(count: dict, *, cached: bool, checkpointing: bool) -> dict:
        real, ex = count["fwd_real"], count["fwd_executed"]
        return {"tflop_useful": 3 * real / 1e12, "tflop_with_gradcache_forward": (4 if cached else 3) * real / 1e12,
                "tflop_executed": (3 + int(cached) + int(checkpointing)) * ex / 1e12}


class Clock:
    """A step's time points (``C.stamp``): ``enter`` opens a phase until the next; ``sub`` holds the
    (start, end) of each re-encode forward and backward (``timed``)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self):
        self.marks, self.phase, self.sub = [], None, {"fwd": [], "bwd": []}

    def enter(self, phase: str):
        self.phase = phase
        self.marks.append((phase, C.stamp(self.device)))

    def timed(self, kind: str, fn, *args, **kw):
        t0 = C.stamp(self.device)
        out = fn(*args, **kw)
        self.sub[kind].append((t0, C.stamp(self.device)))
        return out

    def result(self) -> dict:
        C.sync(self.device)

        def dt(a, b):
            return C.elapsed_ms(a, b) / 1e3

        out = {}
        for (name, a), (_, b) in zip(self.marks, self.marks[1:]):
            out[name] = out.get(name, 0.0) + dt(a, b)
        out["total"] = dt(self.marks[0][1], self.marks[-1][1])
        return dict(out, **{f"reencode_{k}": sum(dt(a, b) for a, b in v) for k, v in self.sub.items()})


class _Wrapper:
    """Stands in for ``_inner`` (attributes pass through) and marks the step's ``_clock``."""

    def __init__(self, inner, clock: Clock):
        self.__dict__.update(_inner=inner, _clock=clock)

    def __getattr__(self, name):
        return getattr(self.__dict__["_inner"], name)


class TimedEngine(_Wrapper):
    """The engine as GradCache's encoder: a no-grad call opens "encode", a call with grad "reencode"
    (each forward and backward timed); in the single pass a backward after the loss opens "backward"."""

    def __call__(self, chunk):
        clock = self._clock
        if not torch.is_grad_enabled():
            if clock.phase in (None, "start"):
                clock.enter("encode")
            return self._inner(chunk)
        if clock.phase != "reencode":
            clock.enter("reencode")
        return clock.timed("fwd", self._inner, chunk)

    def backward(self, loss, **kw):
        if self._clock.phase == "loss":
            self._clock.enter("backward")
        return self._clock.timed("bwd", self._inner.backward, loss, **kw)


class TimedLoss(_Wrapper):
    """The loss with its call marked "loss" (its forward, and inside GradCache its backward)."""

    def __call__(self, q, t, **kw):
        self._clock.enter("loss")
        return self._inner(q, t, **kw)


def search_largest(try_fn, *, start: int, b_max: int, max_try_s: float, deadline: float | None,
                   bisect: int = 1, grain: int = 8, clock=time.perf_counter) -> dict:
    """The largest B that ``try_fn(B) -> {"ok", "oom", "s", ...}`` runs: doubling from ``start`` until an
    OOM, ``max_try_s`` (predicted linear in B), ``b_max`` or ``deadline``; then ``bisect`` halvings of
    the gap (multiples of ``grain``). Any other failure stops it (after an OOM the engine may be unusable)."""
    out = {"tries": [], "largest_ok": None, "smallest_oom": None, "limited_by": None}

    def no_time(B) -> str | None:
        if out["largest_ok"]:  # a try's time grows linearly with B from the last one that ran
            predicted = next(t["s"] for t in reversed(out["tries"]) if t.get("ok")) * B / out["largest_ok"]
            if predicted > max_try_s:
                return f"time: a try at B={B} would take ~{predicted:.0f} s (> {max_try_s:g} s a try)"
            if deadline is not None and clock() + predicted > deadline:
                return f"deadline: a try at B={B} (~{predicted:.0f} s) would end past the part's deadline"
        return "deadline" if deadline is not None and clock() > deadline else None

    B = start
    while not (why := f"b_max: B={b_max} fits, no larger batch was tried" if B > b_max else no_time(B)):
        r = try_fn(B)
        out["tries"].append(r)
        if not r.get("ok"):
            out["smallest_oom"] = B if r.get("oom") else None
            why = "memory" if r.get("oom") else f"error at B={B}: {r.get('error')}"
            break
        out["largest_ok"], B = B, 2 * B
    out["limited_by"] = why
    for _ in range(bisect):
        lo, hi = out["largest_ok"], out["smallest_oom"]
        mid = None if lo is None or hi is None or hi - lo <= grain else (lo + hi) // 2 // grain * grain
        if mid is None or mid <= lo:
            break
        if why := no_time(mid):
            out["bisect_stopped"] = why
            break
        r = dict(try_fn(mid), bisect=True)
        out["tries"].append(r)
        if not (r.get("ok") or r.get("oom")):
            out["bisect_stopped"] = f"error after an out-of-memory try: {r.get('error')} (engine unusable; not retried)"
            break
        out["largest_ok" if r.get("ok") else "smallest_oom"] = mid
    return out


COLOURS = {"red": (255, 40, 0), "green": (0, 220, 60), "blue": (40, 80, 255), "yellow": (250, 230, 0),
           "purple": (150, 40, 200), "orange": (255, 140, 0), "white": (250, 250, 250), "pink": (255, 120, 200)}


def make_clips(folder: Path, count: int, frames: int, fps: int) -> tuple[list[str], Path]:
    """``count`` mpeg4 clips (a coloured square moving right or left) and MSR-VTT-style captions."""
    from llave_fast.testing import write_clip

    folder.mkdir(parents=True, exist_ok=True)
    paths, rows = [str(folder / f"video{k}.mp4") for k in range(count)], []
    for k, path in enumerate(paths):
        name, right = list(COLOURS)[k % len(COLOURS)], (k // len(COLOURS)) % 2 == 0
        rows.append(f"ret{k},msr{k},video{k},a {name} square moves {'right' if right else 'left'}\n")
        if not os.path.exists(path):
            write_clip(path, frames, fps, COLOURS[name], step=2 if right else -2)
    (ann := folder / "MSRVTT_JSFUSION_test.csv").write_text("key,vid_key,video_id,sentence\n" + "".join(rows))
    return paths, ann


def torch_extension_builds() -> list[str]:
    """Folders of JIT-built extensions (where DeepSpeed builds its ops)."""
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.expanduser("~/.cache/torch_extensions"))
    return sorted(str(p.relative_to(root)) for p in root.glob("*/*") if p.is_dir())


def part_env(args, res: Results, sizes: dict) -> None:
    info = {"python": sys.version.split()[0]}
    try:
        import deepspeed
    except Exception as exc:  # noqa: BLE001 - the report says what is missing
        res.put("env", dict(info, deepspeed_error=f"{type(exc).__name__}: {exc}"))
        raise SystemExit(f"import deepspeed failed: {exc} (bash benchmarks/fetch_wheels.sh here, carry .whl)")
    from deepspeed.git_version_info import installed_ops

    from llave_fast import train as T

    ds = T.deepspeed_config(T.TrainConfig.from_json(sizes["preset"]) if sizes["preset"] else T.TrainConfig(), 1, True)
    offload = ds.get("zero_optimization", {}).get("offload_optimizer")
    info.update(deepspeed=deepspeed.__version__, deepspeed_path=os.path.dirname(deepspeed.__file__),
                deepspeed_prebuilt_ops=sorted(k for k, v in installed_ops.items() if v),
                optimizer={"ds_config_optimizer": ds.get("optimizer"), "offload_optimizer": offload,
                           "client_optimizer": "torch.optim.AdamW (llave_fast.train hands it to deepspeed.initialize)",
                           "needs_jit_op": bool(ds.get("optimizer") or offload)},
                torch_extension_builds=torch_extension_builds(),
                dev_shm_free_gib=None if (free := dev_shm_free()) is None else gib(free))
    for mod in ("av", "pydantic", "pydantic_core", "hjson", "transformers", "accelerate", "triton", "numpy"):
        try:
            info[mod] = getattr(__import__(mod), "__version__", "installed")
        except Exception as exc:  # noqa: BLE001
            info[mod] = f"missing: {type(exc).__name__}: {exc}"
    res.put("env", info)
    log(f"deepspeed {info['deepspeed']}, prebuilt ops {info['deepspeed_prebuilt_ops'] or 'none'}, JIT optimizer op "
        f"needed: {info['optimizer']['needs_jit_op']}; av {info['av']}, pydantic {info['pydantic']}")


class StepRun:
    """Part ``step``'s model, engine (``llave_fast.train``'s AdamW and schedule), loss and data."""

    def __init__(self, args, sizes: dict, device: torch.device):
        from llave_fast import train as T
        from llave_fast.data import PairCollator

        self.T, self.sizes, self.device, self.args = T, sizes, device, args
        if sizes["preset"]:
            cfg = T.TrainConfig.from_json(sizes["preset"])
        else:  # the dry run: the tiny model with 32-px tiles and LLaVE's grid, bf16 on the CPU
            cfg = T.TrainConfig(model="tiny", image_size=sizes["image_1x1"], image_grid="(1x1),...,(2x2)",
                                bf16=True, gradient_checkpointing=True, lr=1e-5, lr_projector=1e-5, lr_vision=2e-6,
                                weight_decay=0.0, warmup_steps=1, steps=4, num_eval=0)
        cfg.chunk_size, cfg.global_batch = sizes["chunk"], sizes["pairs_1x1"]
        self.cfg, self.bf16 = cfg, True if cfg.bf16 is None else cfg.bf16
        T.quiet_known_warnings()
        self.world = T.init_distributed()[1]
        self.ds_config = T.deepspeed_config(cfg, self.world, self.bf16)
        t0 = time.perf_counter()
        self.model = T.build_model(cfg, self.ds_config, self.bf16)
        self.build_s, self.processor = time.perf_counter() - t0, self.model.processor
        self.collator, self.flops = PairCollator(self.processor), Flops(self.model.config)

    def initialize(self) -> None:
        from llave_fast.training.engine import build_engine
        from llave_fast.training.step import build_loss

        cfg, model, m, t0 = self.cfg, self.model, self.model.model, time.perf_counter()
        self.engine = build_engine(model, cfg, self.ds_config)[0]
        init_s, inner = time.perf_counter() - t0, getattr(self.engine.optimizer, "optimizer", None)
        self.info = {
            "model": cfg.model, "preset": self.sizes["preset"], "bf16": self.bf16, "world_size": self.world,
            "zero_stage": self.engine.zero_optimization_stage(), "chunk_size": cfg.chunk_size,
            "gradient_checkpointing": cfg.gradient_checkpointing, "attn_implementation": m.config._attn_implementation,
            "optimizer": {"engine": type(self.engine.optimizer).__name__,
                          "inner": inner and f"{type(inner).__module__}.{type(inner).__name__}",
                          "defaults": inner and {k: inner.defaults.get(k) for k in ("foreach", "fused")}},
            "params": {k: sum(getattr(p, "ds_numel", p.numel()) for p in mod.parameters()) for k, mod in (
                ("vision_tower", m.vision_tower), ("projector", m.multi_modal_projector),
                ("language_model", m.language_model), ("total", model))},
            "build_model_s": round(self.build_s, 2), "deepspeed_initialize_s": round(init_s, 2),
            "grid_pinpoints_hw": [list(p) for p in m.config.image_grid_pinpoints],
            "flops_params": {k: getattr(self.flops, k) for k in ("n", "vision_params", "projector_params",
                                                                  "lm_params")}}
        self.probe, self.clock = build_loss(cfg, self.world), Clock(self.device)  # the training loop's loss

    def step(self, cpu_batch: dict, chunk: int, *, mask_ids: bool = True) -> dict:
        """One training step as ``llave_fast.training.loop`` runs it (rows sorted by length, GradCache
        chunks padded to their own longest row, the loss in the batch's order), then ``engine.step``:
        phases, tokens, FLOPs, MFU, peak memory."""
        from llave_fast import GradCache
        from llave_fast.training.step import by_length, chunks, duplicate_ids

        cuda, clock, peak = self.device.type == "cuda", self.clock, self.args.peak
        count = self.flops.batch(cpu_batch, chunk)
        self.probe.clear()
        pygc.collect()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            at_rest = torch.cuda.memory_allocated()
        batch = self.T._to_device(cpu_batch, self.engine.device)
        input_bytes = torch.cuda.memory_allocated() - at_rest if cuda else None
        cache = GradCache(TimedEngine(self.engine, clock), TimedLoss(self.probe, clock), chunk, split=chunks)
        (q, qo), (t, to), (n, no) = (by_length(batch.get(k), chunk) for k in ("query", "target", "negatives"))
        clock.reset()
        t_wall = time.perf_counter()
        clock.enter("start")
        loss = cache(q, t, n, orders=(qo, to, no), **duplicate_ids(batch, mask_ids))
        clock.enter("optimizer")
        self.engine.step()
        clock.enter("end")
        ph, wall = clock.result(), time.perf_counter() - t_wall
        total, fwd, bwd, start = ph.pop("total"), ph.pop("reencode_fwd"), ph.pop("reencode_bwd"), ph.pop("start", 0.0)
        cached = "encode" in ph
        if cached:  # the phases in order; they add up to the step
            parts = {"encode": ph["encode"] + start, "loss": ph.get("loss", 0.0), "reencode_fwd": fwd,
                     "reencode_bwd": bwd, "reencode_other": max(0.0, ph.get("reencode", 0.0) - fwd - bwd)}
        else:  # GradCache's single pass: one forward with grad, the loss, one backward
            parts = {"forward": ph.get("reencode", 0.0) + start, "loss": ph.get("loss", 0.0),
                     "backward": ph.get("backward", 0.0)}
        parts["optimizer"] = ph.get("optimizer", 0.0)
        count.update(self.flops.step_tflop(count, cached=cached, checkpointing=self.cfg.gradient_checkpointing),
                     tflop_forward_real=count.pop("fwd_real") / 1e12,
                     tflop_forward_executed=count.pop("fwd_executed") / 1e12)
        pairs = cpu_batch["query"]["input_ids"].shape[0]
        rec = {"pairs": pairs, "chunk": chunk, "path": "cached (GradCache)" if cached else "single pass (no caching)",
               "loss": float(loss), "step_s": round(total, 4), "host_wall_s": round(wall, 4),
               "phases_s": {k: round(v, 4) for k, v in parts.items()},
               "shares": {k: round(v / total, 4) for k, v in parts.items()} if total > 0 else {}, **count,
               "pairs_per_s": pairs / total, "lm_tokens_per_s": count["lm_tokens"] / total,
               "vision_tokens_per_s": count["vision_tokens"] / total}
        if cuda:
            rec.update(peak_allocated_gib=gib(torch.cuda.max_memory_allocated()), at_rest_gib=gib(at_rest),
                       peak_reserved_gib=gib(torch.cuda.max_memory_reserved()), batch_on_device_gib=gib(input_bytes))
        if peak:
            rec.update(mfu=count["tflop_useful"] / total / peak, hfu_executed=count["tflop_executed"] / total / peak,
                       mfu_with_gradcache_forward=count["tflop_with_gradcache_forward"] / total / peak)
        if not math.isfinite(rec["loss"]):
            rec["warning"] = "non-finite loss"
        return rec

    def batches(self, image_size: int, pairs: int, steps: int, seed: int = 0):
        return batch_stream(self.T, self.collator, image_size, pairs, steps, seed, self.args.workers)


def dev_shm_free() -> int | None:
    """Bytes free in /dev/shm, where the loader's workers hand their batches over (None: no such folder)."""
    return shutil.disk_usage("/dev/shm").free if os.path.isdir("/dev/shm") else None


def shm_shortfall(workers: int, steps: int, pairs: int, image_size: int, free: int | None) -> str:
    """Why the loader's workers must not be used here, or "": the batches in flight (one step ahead per
    worker) go through /dev/shm, and a worker that cannot write its batch there drops it while the
    loader waits forever (the error stays in the worker's queue thread; only a dead worker is seen).
    Bound: fp32 pixels, a base view and the crops at most twice the image's area, one image a pair, x2."""
    if workers <= 0 or free is None:
        return ""
    need = 2 * min(steps, workers) * pairs * 2 * 3 * image_size ** 2 * 4
    if free >= need:
        return ""
    return (f"/dev/shm has {free / 2 ** 30:.2f} GiB free, {min(steps, workers)} batches of {pairs} pairs at "
            f"{image_size} px in flight need up to {need / 2 ** 30:.2f} GiB")


def batch_stream(T, collator, image_size: int, pairs: int, steps: int, seed: int, workers: int):
    """(batch, data wait s) of ``steps`` steps of synthetic pairs through the training loop's loader,
    its workers started at once; threads in this process instead where /dev/shm is too small for the
    workers' batches (``shm_shortfall``), or for the remaining batches if a worker dies."""
    from llave_fast.data import SyntheticDataset

    dataset = SyntheticDataset(pairs * steps, seed=seed, split="train", image_size=image_size)
    order = T.BatchOrder(len(dataset), pairs, seed)
    if why := shm_shortfall(workers, steps, pairs, image_size, dev_shm_free()):
        log(f"WARNING: {why}: making the batches with {workers} threads in this process")
    loader = None if why else iter(T.step_loader(dataset, collator, order, 0, pairs, 0, steps, workers, 1, seed))

    def threads(start: int):
        make = T.StepBatches(dataset, collator)
        with ThreadPoolExecutor(max(1, workers)) as pool:
            yield from pool.map(make.__getitem__, [(s, order(s)[:pairs]) for s in range(start, steps)])

    def stream():
        it, done, can_fall_back = (threads(0), 0, False) if loader is None else (loader, 0, workers > 0)
        while done < steps:
            t0 = time.perf_counter()
            try:
                item = next(it)
            except (RuntimeError, OSError) as exc:
                if not can_fall_back:
                    raise
                log(f"WARNING: the data loader's workers failed ({type(exc).__name__}: {str(exc)[:200]}); making the "
                    f"remaining batches with {workers} threads in this process")
                it, can_fall_back = threads(done), False
                continue
            if item.get("error"):
                raise RuntimeError(f"bad synthetic batch at step {done}: {item['error']}")
            yield item["batch"], time.perf_counter() - t0
            done += 1

    return stream()


def summarize_steps(recs: list[dict]) -> dict:
    keys = ("step_s", "pairs_per_s", "lm_tokens_per_s", "vision_tokens_per_s", "mfu", "mfu_with_gradcache_forward",
            "hfu_executed", "peak_allocated_gib", "data_wait_s")
    out = {f"median_{k}": C.median([r[k] for r in recs if r.get(k) is not None]) for k in keys}
    out["median_phases_s"] = {k: C.median([r["phases_s"][k] for r in recs]) for k in recs[0]["phases_s"]}
    out["median_shares"] = {k: v / out["median_step_s"] for k, v in out["median_phases_s"].items()}
    return out


def extrapolate(summary: dict, recs: list[dict], pairs: int, target: int, peak: float | None) -> dict:
    ph, k = summary["median_phases_s"], target / pairs
    per_pair = (ph.get("encode", 0.0) + ph.get("reencode_fwd", 0.0) + ph.get("reencode_bwd", 0.0)) / pairs
    fixed, loss = ph.get("optimizer", 0.0) + ph.get("reencode_other", 0.0), ph.get("loss", 0.0) * k ** 2
    t = per_pair * target + fixed + loss
    out = {"pairs": target, "measured_from_pairs": pairs, "step_s": t, "pairs_per_s": target / t,
           "lm_tokens_per_s": C.median([r["lm_tokens"] for r in recs]) * k / t, "encode_reencode_s_per_pair": per_pair,
           "fixed_s": fixed, "loss_s": loss,
           "shares": {"encode_reencode": per_pair * target / t, "loss": loss / t, "fixed": fixed / t},
           "method": "not run: encode + re-encode x pairs, loss x (pairs ratio)^2, optimizer and reduction fixed; "
                     "peak = measured + the larger batch's inputs on the device (GradCache's activations: one chunk's)"}
    if peak:
        useful = C.median([r["tflop_useful"] for r in recs]) * k
        out.update(mfu=useful / t / peak, mfu_with_gradcache_forward=useful * 4 / 3 / t / peak)
    if (last := recs[-1]).get("peak_allocated_gib") is not None:
        out["peak_allocated_gib"] = last["peak_allocated_gib"] + (last.get("batch_on_device_gib") or 0) * (k - 1)
    return out


def show(tag: str, r: dict) -> None:
    mfu = f", MFU {100 * r['mfu']:.1f} %" if r.get("mfu") is not None else ""
    log(f"{tag}: {r['pairs']} pairs in {r['step_s']:.2f} s ({r['pairs_per_s']:.1f} pairs/s, {r['lm_tokens_per_s']:.0f} "
        f"tokens/s{mfu}, peak {r.get('peak_allocated_gib')} GiB); shares: "
        + ", ".join(f"{k} {100 * v:.0f} %" for k, v in r["shares"].items()))


def part_step(args, res: Results, sizes: dict) -> None:
    deadline = args.t_start + args.deadline_s if args.deadline_s else None

    def left() -> float:
        return math.inf if deadline is None else deadline - time.perf_counter()

    jit_before, out = torch_extension_builds(), {"status": "running", "sizes": dict(sizes)}
    res.put("step", out)
    log(f"building {sizes['preset'] or 'the tiny model'} under ZeRO-3 on {args.device.type} ...")
    run = StepRun(args, sizes, args.device)
    n1, warm, chunk = sizes["pairs_1x1"], sizes["warmup_1x1"], sizes["chunk"]
    stream_1x1 = run.batches(sizes["image_1x1"], n1, warm + sizes["timed_1x1"])  # workers start before the engine
    run.initialize()
    out.update(run.info, peak_tflops_bf16=args.peak)
    res.put()
    log(f"built: {run.info['params']['total'] / 1e9:.3f} B parameters, optimizer {run.info['optimizer']['inner']}")
    # (b) 1x1: warm-up, then timed steps while the deadline allows
    g1 = out["grid_1x1"] = {"image_px": sizes["image_1x1"], "pairs": n1, "chunk": chunk, "warmup": [], "timed": []}
    last_1x1 = None
    for k, (batch, wait) in enumerate(stream_1x1):
        if k >= warm and g1["timed"] and left() < 1.2 * g1["timed"][-1]["step_s"] + 5:
            g1["stopped"] = f"deadline: {k - warm} timed steps done"
            break
        r = dict(run.step(batch, chunk), data_wait_s=round(wait, 3))
        (g1["warmup"] if k < warm else g1["timed"]).append(r)
        show(f"1x1 {'warm-up' if k < warm else 'timed'} step {k + 1}", r)
        last_1x1 = batch
        if g1["timed"]:
            g1["summary"] = summarize_steps(g1["timed"])
            out["extrapolated"] = extrapolate(g1["summary"], g1["timed"], n1, sizes["extrapolate_pairs"], args.peak)
        res.put()
    # (b) 2x2: one step
    last = (g1["timed"] or g1["warmup"] or [{"step_s": 0, "pairs": 1}])[-1]
    guess = last["step_s"] / last["pairs"] * sizes["pairs_2x2"] * 2.5
    out["grid_2x2"] = {"skipped": f"deadline ({left():.0f} s left, ~{guess:.0f} s needed)"}
    if left() > guess + 10:
        g2 = out["grid_2x2"] = {"image_px": sizes["image_2x2"], "pairs": sizes["pairs_2x2"], "chunk": chunk}
        for batch, wait in run.batches(sizes["image_2x2"], sizes["pairs_2x2"], 1, seed=1):
            show("2x2 step", g2.setdefault("step", dict(run.step(batch, chunk), data_wait_s=round(wait, 3))))
    res.put()
    # (d) encode throughput without gradients; (c) GradCache at two chunks against the largest batch without it
    out["encode"] = encode_throughput(run, sizes, Path(args.work)) if left() > 20 else {"skipped": "deadline"}
    res.put()
    if last_1x1 is not None and left() > 15:
        out["memory"] = memory_search(run, last_1x1, sizes, deadline, res.put)
    else:
        out["memory"] = {"skipped": "deadline" if last_1x1 is not None else "no 1x1 batch"}
    out.update(jit_builds_during_part=sorted(set(torch_extension_builds()) - set(jit_before)), status="ok")
    res.put()


def tile_batch(cpu_batch: dict, rows: int) -> dict:
    """``rows`` pairs of a collated batch: its first rows, or it repeated (no masking ids)."""
    from llave_fast.training.step import _rows

    idx = torch.arange(rows) % cpu_batch["query"]["input_ids"].shape[0]
    return {"query": _rows(cpu_batch["query"], idx), "target": _rows(cpu_batch["target"], idx), "negatives": None,
            "target_ids": None}


def memory_search(run: StepRun, base: dict, sizes: dict, deadline: float | None, save) -> dict:
    mem = {"gradient_checkpointing": run.cfg.gradient_checkpointing, "pairs_for_gradcache": sizes["mem_pairs"],
           "gradcache": {}, "note": "a try is one training step (forward, loss, backward, AdamW step); peak: "
                                    "torch.cuda.max_memory_allocated (weights, gradients, AdamW state included)"}
    for chunk in sizes["mem_chunks"]:
        if deadline is not None and time.perf_counter() > deadline - 10:
            mem["gradcache"][str(chunk)] = {"skipped": "deadline"}
            continue
        r = mem["gradcache"][str(chunk)] = run.step(tile_batch(base, sizes["mem_pairs"]), chunk, mask_ids=False)
        show(f"GradCache chunk {chunk}", r)
        save()

    def try_plain(B: int) -> dict:
        rec = {"B": B}
        try:  # chunk >= the whole step (queries + targets): GradCache's single pass, i.e. no caching
            r = run.step(tile_batch(base, B), 2 * B, mask_ids=False)
            ok = math.isfinite(r["loss"])
            rec.update(ok=ok, oom=False, s=r["step_s"], pairs_per_s=r["pairs_per_s"], path=r["path"],
                       peak_allocated_gib=r.get("peak_allocated_gib"), **({} if ok else {"error": f"loss {r['loss']}"}))
        except Exception as exc:  # noqa: BLE001 - out of memory is the expected end; others are reported
            oom = isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
            rec.update(ok=False, oom=oom, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        if not rec["ok"]:  # outside the except block: the exception's frames (batch, activations) are gone
            pygc.collect()
            torch.cuda.empty_cache()  # nothing without CUDA
            try:
                run.engine.zero_grad()
            except Exception as exc2:  # noqa: BLE001
                rec["recovery_error"] = f"{type(exc2).__name__}: {exc2}"
        log(f"no GradCache, {B} pairs at once: " + (f"{rec['s']:.2f} s, peak {rec['peak_allocated_gib']} GiB"
                                                    if rec["ok"] else rec["error"]))
        mem.setdefault("plain_tries_so_far", []).append(rec)
        save()
        return rec

    mem["without_gradcache"] = plain = search_largest(try_plain, start=sizes["plain_start"], b_max=sizes["plain_max"],
                                                      max_try_s=sizes["max_try_s"],
                                                      deadline=None if deadline is None else deadline - 3)
    mem.pop("plain_tries_so_far", None)
    log(f"largest batch without GradCache: {plain['largest_ok']} (first out of memory {plain['smallest_oom']}; "
        f"limited by {plain['limited_by']})")
    return mem


def encode_throughput(run: StepRun, sizes: dict, work: Path) -> dict:
    """No-grad samples/s and tokens/s: image+text and text (processor and model apart); videos end to end."""
    import deepspeed

    from llave_fast.data import SyntheticDataset
    from llave_fast.eval_video import encode_videos
    from llave_fast.model.video import video_length_limit

    dev, module, b = run.device, run.engine.module, sizes["enc_batch"]
    ds = SyntheticDataset(3 * max(sizes["enc_images"], sizes["enc_texts"]) + 3 * sizes["enc_warmup"], seed=2,
                          split="eval", image_size=sizes["image_1x1"])
    recs = [ds[i] for i in range(len(ds))]
    imgs = [(r["qry"], r["qry_image"]) for r in recs if r["qry_image"] is not None]
    txts = [(r["pos_text"], None) for r in recs if r["pos_image"] is None and r["pos_text"]]

    def timed(items):
        prep = model_s = 0.0
        tokens = samples = 0
        for lo in range(0, len(items), b):
            t0 = time.perf_counter()
            inputs = run.processor([t for t, _ in items[lo:lo + b]], [im for _, im in items[lo:lo + b]])
            t1 = time.perf_counter()
            inputs = run.T._to_device(inputs, run.engine.device)
            C.sync(dev)
            t2 = time.perf_counter()
            samples += module(inputs).shape[0]
            C.sync(dev)
            prep, model_s = prep + t1 - t0, model_s + time.perf_counter() - t2
            tokens += int(inputs["attention_mask"].sum())
        return {"samples": samples, "tokens": tokens, "processor_s": round(prep, 3), "model_s": round(model_s, 3),
                "model_samples_per_s": samples / model_s, "model_tokens_per_s": tokens / model_s,
                "end_to_end_samples_per_s": samples / (prep + model_s)} if samples else {"samples": 0}

    out = {"batch": b}
    module.eval()  # back to train() at the end; a failure here ends the part
    with torch.no_grad():
        timed(imgs[:sizes["enc_warmup"]])
        for key, items in (("image_text", imgs[:sizes["enc_images"]]), ("text", txts[:sizes["enc_texts"]])):
            out[key] = timed(items)
            log(f"encode {key}: {out[key]}")
        try:
            paths, _ = make_clips(work / "clips", sizes["clips"], sizes["clip_frames"], sizes["clip_fps"])
            C.sync(dev)
            t0 = time.perf_counter()
            # the video path reads image_newline outside any forward, where ZeRO-3 does not gather it itself
            with deepspeed.zero.GatheredParameters([module.model.image_newline], modifier_rank=None):
                infos = encode_videos(module, paths, fps=3, max_frames=32, batch=sizes["video_batch"], workers=2,
                                      max_length=video_length_limit(module.config, 8192), progress=False)[1]
            C.sync(dev)
            dt, frames = time.perf_counter() - t0, sum(len(i["indices"]) for i in infos)
            out["video"] = {"videos": len(paths), "frames": frames, "seconds": round(dt, 3),
                            "videos_per_s": len(paths) / dt, "frames_per_s": frames / dt,
                            "note": "end to end: decoding (2 threads ahead) + processor + model"}
        except Exception as exc:  # noqa: BLE001 - PyAV missing, a codec: reported, the rest goes on
            out["video"] = {"error": f"{type(exc).__name__}: {exc}"}
        log(f"encode video: {out['video']}")
    module.train()
    return out


def run_clis(jobs: list[tuple[str, list[str]]], quiet_bars: bool = False) -> list[dict]:
    """Commands side by side (a thread waits for each): {cmd, rc, wall_s} each; stopped with us when we
    are interrupted. Each is a 1-process run of its own, outside part step's torch.distributed group."""
    group = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in group}
    env.update(PYTHONUNBUFFERED="1", **({"TQDM_DISABLE": "1"} if quiet_bars else {}))
    t0 = time.perf_counter()
    procs = []
    for tag, cmd in jobs:
        log(f"{tag}: {' '.join(cmd)}")
        procs.append(subprocess.Popen(cmd, cwd=str(C.REPO_ROOT), env=env))

    def wait(k: int) -> dict:
        done = {"cmd": jobs[k][1], "rc": procs[k].wait(), "wall_s": round(time.perf_counter() - t0, 2)}
        log(f"{jobs[k][0]}: exit {done['rc']} after {done['wall_s']} s")
        return done

    with ThreadPoolExecutor(len(procs)) as pool:
        try:
            return list(pool.map(wait, range(len(procs))))
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        proc.kill()


def _pick(d: dict, keys: str) -> dict:
    return {k: d.get(k) for k in keys.split()}


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def part_tiny(args, res: Results, sizes: dict) -> None:
    run_dir = Path(args.work) / "tiny_run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    workers = args.workers
    # the default job's 64 pairs of 64-px images a step: its loader's workers hand them over in /dev/shm
    if why := shm_shortfall(workers, sizes["tiny_steps"], 64, 64, dev_shm_free()):
        log(f"WARNING: {why}: the tiny job loads its data in the main process (--num-workers 0)")
        workers = 0
    cmd = [sys.executable, "-m", "llave_fast", "train", "--output-dir", str(run_dir), "--bf16", "true", "--progress",
           "false", "--num-workers", str(workers)]
    if args.dry:
        cmd += ["--steps", "3", "--num-train", "192", "--num-eval", "32", "--global-batch", "32", "--chunk-size", "64",
                "--warmup-steps", "1", "--save-every", "0"]
    else:  # the default job as shipped but shorter, more loader workers (the data order depends on (seed, step))
        # a checkpoint every 20 steps: a run stopped at the step's limit still leaves T3 a model to evaluate
        # the warm-up pinned at 10: the preset's is 48 since 2026-12-07 (a fifth of its 240 steps), which would be
        # 48 of these 80; 10 keeps the job Prediction 14 (a) was made for (NOTES.md) and its CPU reference
        # (amd-epyc-2-cores/2026-12-07-default-job-80-steps.json)
        cmd += ["--steps", str(sizes["tiny_steps"]), "--save-every", str(sizes["tiny_save_every"]), "--warmup-steps", "10"]
    out = {"status": "running", "run_dir": str(run_dir)}
    res.put("tiny_job", out)
    try:
        out.update(run_clis([("tiny default job", cmd)])[0])
    finally:  # stopped at the limit too: what the run logged and saved is kept
        if e := _read(run_dir / "eval.json"):
            out.update(_pick(e, "steps global_batch seconds median_step_s median_data_wait_s p_at_1_before "
                                "p_at_1_after chance num_candidates by_task"))
            out["pairs_per_s"] = e["global_batch"] / e["median_step_s"] if e.get("median_step_s") else None
        if (log_path := run_dir / "train_log.jsonl").exists():
            rows = []
            for line in log_path.read_text().splitlines():
                try:
                    rows.append(json.loads(line))
                except ValueError:  # blank, or the last line half written when the step's SIGINT came
                    continue
            out["steps_logged"] = len(rows)
            out["loss_first_last"] = [rows[0]["loss"], rows[-1]["loss"]] if rows else None
        if "rc" not in out:
            out["status"] = "stopped at the step's limit"
        else:
            out["status"] = "ok" if out["rc"] == 0 else f"failed (exit {out['rc']})"
        res.put()
    log(f"tiny default job: {_pick(out, 'status p_at_1_before p_at_1_after chance median_step_s')}")
    if out["rc"] != 0:
        raise SystemExit(f"the tiny default job failed (exit {out['rc']}): see its output above")


def part_eval(args, res: Results, sizes: dict) -> None:
    from llave_fast.data.mmeb_eval import write_mmeb_eval

    work = Path(args.work)
    run_dir, data, ev_out, v_out = work / "tiny_run", work / "mmeb_eval", work / "eval_out", work / "video_out"
    out = {"status": "running", "model": str(run_dir)}
    res.put("eval_tiny", out)
    if not (run_dir / "checkpoints").is_dir():
        out["status"] = f"skipped: no run folder {run_dir} with checkpoints (part 'tiny' did not finish)"
        res.put()
        raise SystemExit(out["status"])
    for p in (data, ev_out, v_out):
        shutil.rmtree(p, ignore_errors=True)
    files = [f for task in ("i2t", "t2i", "vqa") for f in write_mmeb_eval(
        str(data), f"synthetic_{task}", sizes["mmeb_queries"], num_candidates=sizes["mmeb_candidates"], task=task,
        seed=3, image_size=64)[0]]
    ann = make_clips(work / "clips", sizes["clips"], sizes["clip_frames"], sizes["clip_fps"])[1]
    cli = [sys.executable, "-m", "llave_fast"]
    # side by side: each is mostly start-up (imports, the checkpoint merged in memory) with a tiny model
    out["mmeb"], out["video"] = run_clis([
        ("eval (MMEB-eval files)", cli + ["eval", "--model", str(run_dir), "--data", *files, "--image-dir", str(data),
                                          "--output-dir", str(ev_out), "--batch", "64", "--dtype", "bf16"]),
        ("eval-video (generated clips)", cli + ["eval-video", "--model", str(run_dir), "--videos", str(work / "clips"),
                                                "--annotations", str(ann), "--output-dir", str(v_out), "--batch",
                                                str(sizes["video_batch"]), "--dtype", "bf16"])], quiet_bars=True)
    if e := _read(ev_out / "mmeb_eval.json"):
        out["mmeb"].update(_pick(e, "p_at_1 device dtype"), datasets={
            n: _pick(d, "p_at_1 num_queries num_candidates num_encoded seconds") for n, d in e["datasets"].items()})
    if v := _read(v_out / "video_eval.json"):
        out["video"].update(_pick(v, "t2v v2t num_videos num_captions device dtype frames seconds"))
    failed = [k for k in ("mmeb", "video") if out[k]["rc"] != 0]
    out["status"] = "ok" if not failed else f"failed: {', '.join(failed)}"
    res.put()
    log(f"eval: {out['status']}; P@1 {out['mmeb'].get('p_at_1')}, t2v {out['video'].get('t2v')}")
    if failed:
        raise SystemExit(out["status"])


def _brief(d: dict, keys: str) -> str:
    out = []
    for key in keys.split():
        v = d
        for part in key.split("."):
            v = v.get(part) if isinstance(v, dict) else None
        out.append(f"{key}={round(v, 4) if isinstance(v, float) else v}")
    return ", ".join(out)


def _row(name: str, r: dict, shares: dict) -> str:
    def get(key):  # a step's own figure, or the median over the timed steps
        return r.get(key) if r.get(key) is not None else r.get("median_" + key)

    def f(x, spec=".1f", scale=1):
        return "-" if x is None else format(scale * x, spec)

    cells = [name, r.get("pairs"), f(get("step_s"), ".2f"), f(get("pairs_per_s")), f(get("lm_tokens_per_s"), ".0f"),
             f(get("peak_allocated_gib")), f(get("mfu"), scale=100), f(get("mfu_with_gradcache_forward"), scale=100)]
    cells += [f(shares.get(k), scale=100) + " %" for k in ("encode", "loss", "reencode_fwd", "reencode_bwd",
                                                            "reencode_other", "optimizer")]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def part_report(res: Results) -> None:
    d = res.data
    print(f"Training step (issue 21) on {d['device']['name']}"
          + (" -- DRY RUN on the CPU: plumbing only, no figure means anything" if d.get("dry_run") else "")
          + f"; parts: {d['parts']}")
    s = d.get("step") or {}
    if s.get("grid_1x1"):
        print(f"- (b) {_brief(s, 'model params.total zero_stage bf16 chunk_size gradient_checkpointing')}"
              "\n\n| step | pairs | s/step | pairs/s | tokens/s | peak GiB | MFU % | MFU+GC fwd % | encode | loss "
              "| re-encode fwd | re-encode bwd | reduction etc. | optimizer |\n|---|" + "---:|" * 13)
        g1, g2, e = s["grid_1x1"], (s.get("grid_2x2") or {}).get("step"), s.get("extrapolated")
        if g1.get("summary"):
            print(_row(f"1x1 ({g1['image_px']} px), median of {len(g1['timed'])}",
                       dict(g1["summary"], pairs=g1["pairs"]), g1["summary"]["median_shares"]))
        if g2:
            print(_row(f"2x2 ({s['grid_2x2']['image_px']} px)", g2, g2["shares"]))
        if e:
            print(_row(f"{e['pairs']} pairs, extrapolated (not run)", e, {"loss": e["shares"]["loss"]}))
        print()
        mem = s.get("memory") or {}
        for chunk, r in mem.get("gradcache", {}).items():
            print(f"- (c) GradCache chunk {chunk}: {_brief(r, 'pairs peak_allocated_gib step_s')}")
        if w := mem.get("without_gradcache"):
            top = max((t for t in w["tries"] if t.get("ok")), key=lambda t: t["B"], default={})
            print(f"- (c) without GradCache (one pass with grad): {_brief(w, 'largest_ok smallest_oom limited_by')}, "
                  f"largest's {_brief(top, 'peak_allocated_gib pairs_per_s')}")
        keys = " ".join(f"encode.{k}" for k in ("image_text.model_samples_per_s", "image_text.model_tokens_per_s",
                                                 "image_text.processor_s", "text.model_samples_per_s",
                                                 "text.model_tokens_per_s", "video.frames_per_s", "video.error"))
        print(f"- (d) encode: {_brief(s, keys)}")
    for key, title, keys in (
            ("env", "environment", "deepspeed deepspeed_prebuilt_ops optimizer.needs_jit_op av"),
            ("tiny_job", "(a) tiny default job", "status p_at_1_before p_at_1_after chance steps median_step_s "
                                                 "pairs_per_s wall_s by_task"),
            ("eval_tiny", "(d) eval with the tiny model", "status mmeb.p_at_1 video.t2v.R@1 video.v2t.R@1")):
        if d.get(key):
            print(f"- {title}: {_brief(d[key], keys)}")


PARTS = {"env": part_env, "step": part_step, "tiny": part_tiny, "eval": part_eval}
RECORDS = {"env": "env", "step": "step", "tiny": "tiny_job", "eval": "eval_tiny"}  # each part's key in the file


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parts", nargs="+", choices=("env", "step", "tiny", "eval", "report"), help="what to run, in order")
    ap.add_argument("--out", required=True, help="results JSON (created, or added to)")
    ap.add_argument("--dry", action="store_true", help="tiny sizes on the CPU: the plumbing, no figure means anything")
    ap.add_argument("--work", default=os.environ.get("TRAIN_STEP_WORK", "/tmp/llave_fast_train_step"),
                    help="scratch folder: the tiny run, generated eval files and clips (default %(default)s)")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="part 'step': seconds it may take, its sub-steps planned to end inside (default: none)")
    ap.add_argument("--workers", type=int, default=None, help="data-loading processes (default: 6; dry 0)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="bf16 dense peak for MFU, TFLOP/s (default: 989 on an H100 or H200, none elsewhere)")
    args = ap.parse_args(argv)
    if args.deadline_s is not None and args.deadline_s <= 0 or args.workers is not None and args.workers < 0:
        ap.error("--deadline-s must be positive and --workers >= 0")
    C.start_script()
    args.t_start = time.perf_counter()
    args.device = dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type != "cuda" and not args.dry and set(args.parts) != {"report"}:
        ap.error("no CUDA device here: --dry runs the tiny CPU sizes")
    sizes = DRY if args.dry else REAL
    args.workers = sizes["workers"] if args.workers is None else args.workers
    args.peak = args.peak_tflops or (dev.type == "cuda" and peak_tflops(torch.cuda.get_device_name(dev))) or None
    res = Results(args.out, args.dry, dev)

    def mark(part, status):
        res.data["parts"][part] = status
        if (record := res.data.get(RECORDS[part]) or {}).get("status") == "running":  # the part's own record
            record["status"] = status
        res.put()

    for part in args.parts:
        if part == "report":
            part_report(res)
            continue
        log(f"part {part} ({'dry run, CPU' if args.dry else dev.type})")
        mark(part, "running")
        try:
            PARTS[part](args, res, sizes)
            mark(part, "ok")
        except KeyboardInterrupt:
            mark(part, "interrupted")
            log(f"part {part} interrupted: what it measured is in {args.out}")
            return 130
        except SystemExit as exc:
            mark(part, f"failed: {exc}")
            log(f"part {part} failed: {exc}")
            return 1
        except Exception as exc:
            mark(part, f"error: {type(exc).__name__}: {exc}")
            raise
    log(f"done in {time.perf_counter() - args.t_start:.1f} s: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
