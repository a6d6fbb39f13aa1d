#!/usr/bin/env python3
"""The training loop on a GPU: the tiny default job, the LLaVE-0.5B-size step, memory, evaluation.

Stage T of ``benchmarks/gpu_check.sh`` runs the parts below, each as its own process under its
own time limit; every part merges its results into one JSON file (``--out``), rewritten after
each sub-step, so a part stopped at its limit (SIGINT) keeps what it measured ("interrupted").

    python benchmarks/bench_train_step.py env step tiny eval --out train_step.json
    python benchmarks/bench_train_step.py step --dry --out /tmp/t.json      # tiny sizes, on the CPU

Parts:

* ``env``: DeepSpeed imports (from the carried wheels on a lent machine), its version, the
  ops it holds prebuilt (none: built with DS_BUILD_OPS=0), and the optimizer the project's
  DeepSpeed config leaves to the client (``torch.optim.AdamW``, no JIT-built op); PyAV, pydantic.
* ``step`` (issue 21, 3b-3d): the model of ``configs/llave_0.5b_arch.json`` (``arch:llave-0.5b``:
  LLaVE-0.5B's shapes, random weights, a stand-in tokenizer of Qwen2's size) under DeepSpeed
  ZeRO-3 on one GPU, bf16, GradCache (chunk 16) and torch's AdamW, built and stepped by the
  training loop's own functions (``llave_fast.train``):
  (b) 256 pairs of 384-px images (one 384-px tile + the base view: grid 1x1), one warm-up and
      three timed steps; 64 pairs of 768-px images (2x2), one step: pairs/s, tokens/s, peak
      memory, MFU, and where the step's time goes (CUDA events around GradCache's phases,
      taken from outside: the encoder and the loss are wrapped, gradcache.py is unchanged);
      1024 pairs extrapolated from the measured per-pair cost, not run;
  (d) encode throughput without gradients (images + text, text alone, videos);
  (c) GradCache's peak memory at chunk 16 and 32 against the largest batch that fits without
      it (its single pass: every pair's activations at once), a short doubling search under a
      time limit.
* ``tiny`` (3a): ``python3 -m llave_fast train`` (the default job) on CUDA in bf16 under
  ZeRO-3 + GradCache: precision@1 before and after, step times.
* ``eval`` (3d): ``llave-fast eval`` on generated MMEB-eval files and ``llave-fast eval-video``
  on generated clips, with the tiny model of ``tiny``, on CUDA in bf16 (the two side by side).
* ``report``: the results file as Markdown (no device needed).

FLOPs (multiply-add = 2), one forward, per sequence (see :class:`Flops`):

* vision tower, per tile of n patches: ``2 n (3 p^2 h_v + L_v (4 h_v^2 + 2 h_v i_v)) + 4 n^2 h_v L_v``
  (bidirectional attention, QK^T and PV);
* projector, per patch: ``2 (h_v h + h^2)``;
* language model, T real tokens: ``2 T L (h (h + 2 kv d) + h^2 + 3 h i) + 2 T^2 h L`` (causal: half
  of the 4 T^2 h L square).

Useful FLOPs of a training step = 3 x that forward over every query's and target's real tokens
(forward + backward ~ 6 x params x tokens, plus attention). GradCache runs one more forward
(``with_gradcache_forward`` = 4 x, reported beside); activation checkpointing runs another; and
the language model runs on padded rows (every chunk of a side is as long as that side's
longest sequence): ``executed`` counts all of it. MFU = useful FLOPs / (step time x peak);
peak = 989 TFLOP/s, the dense bf16 figure of the H100 SXM and the H200 (``--peak-tflops``
overrides).
"""

from __future__ import annotations

import argparse
import gc as pygc
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as C  # noqa: E402

ROOT = C.REPO_ROOT
PARTS = ("env", "step", "tiny", "eval", "report")
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16 (SXM), NVIDIA's data sheets
SCHEMA = 1

# sizes: the real run, and the CPU dry run (plumbing only: no figure of it means anything)
REAL = dict(
    preset="llave_0.5b_arch.json", chunk=16, pairs_1x1=256, warmup_1x1=1, timed_1x1=3, image_1x1=384,
    pairs_2x2=64, image_2x2=768, extrapolate_pairs=1024, mem_pairs=64, mem_chunks=(16, 32), plain_start=32,
    plain_max=2048, max_try_s=25.0, enc_images=128, enc_texts=256, enc_batch=64, enc_warmup=16, clips=16,
    clip_frames=40, clip_fps=3, video_batch=8, mmeb_queries=200, mmeb_candidates=10, workers=6,
)
DRY = dict(
    preset=None, chunk=4, pairs_1x1=16, warmup_1x1=1, timed_1x1=2, image_1x1=32, pairs_2x2=8, image_2x2=64,
    extrapolate_pairs=64, mem_pairs=8, mem_chunks=(4, 8), plain_start=4, plain_max=32, max_try_s=20.0,
    enc_images=8, enc_texts=8, enc_batch=4, enc_warmup=2, clips=3, clip_frames=8, clip_fps=3, video_batch=2,
    mmeb_queries=8, mmeb_candidates=4, workers=0,
)


def log(msg: str) -> None:
    print(f"[train-step {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def gib(x) -> float | None:
    return None if x is None else round(x / C.GiB, 3)


# ------------------------------------------------------------------------------ results file
class Results:
    """The JSON file every part adds to: read once, rewritten whole (atomically) on each put."""

    def __init__(self, path: str, dry: bool):
        self.path = Path(path)
        self.data = {}
        if self.path.exists():
            try:
                self.data = json.loads(self.path.read_text())
            except (OSError, ValueError) as exc:
                log(f"WARNING: {self.path} is not readable JSON ({exc}); starting a new file")
        if not self.data:
            dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            self.data = {"schema": SCHEMA, "script": "benchmarks/bench_train_step.py", "dry_run": dry,
                         **C.now_stamps(), "device": C.device_info(dev), "versions": C.versions(),
                         "git": C.git_info(), "parts": {}}
        self.data.setdefault("parts", {})

    def put(self, key: str, value) -> None:
        self.data[key] = value
        self.write()

    def status(self, part: str, status: str) -> None:
        self.data["parts"][part] = status
        self.write()

    def write(self) -> None:
        self.data["updated"] = C.now_stamps()["local_time"]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.path)


# ------------------------------------------------------------------------------ FLOPs
class Flops:
    """One forward's FLOPs per sequence, from the model config (the formulas in the module
    docstring). ``side(batch)`` counts a processed batch side: real and executed tokens, tiles."""

    def __init__(self, config):
        v, t = config.vision_config, config.text_config
        self.tile, self.patch = v.image_size, v.patch_size
        self.n = (v.image_size // v.patch_size) ** 2
        hv, iv, lv = v.hidden_size, v.intermediate_size, v.num_hidden_layers
        h, i, layers = t.hidden_size, t.intermediate_size, t.num_hidden_layers
        heads = t.num_attention_heads
        d = getattr(t, "head_dim", None) or h // heads
        kv = t.num_key_value_heads
        self.vision_params = 3 * self.patch ** 2 * hv + lv * (4 * hv * hv + 2 * hv * iv)
        self.projector_params = hv * h + h * h
        self.lm_params = layers * (h * heads * d + 2 * h * kv * d + heads * d * h + 3 * h * i)
        self.vision_attn = 4 * self.n ** 2 * hv * lv  # per tile, full square
        self.lm_attn_coeff = 4 * heads * d * layers  # x T^2 for the full square; causal: half
        self.formula = {
            "vision_per_tile": "2 n (3 p^2 h_v + L_v (4 h_v^2 + 2 h_v i_v)) + 4 n^2 h_v L_v",
            "projector_per_patch": "2 (h_v h + h^2)",
            "language_per_sequence": "2 T L (h (h + 2 kv d) + h^2 + 3 h i) + 2 T^2 h L (causal half of the square)",
            "useful_step": "3 x forward over real tokens (forward + backward)",
            "with_gradcache_forward": "4 x forward over real tokens (GradCache's extra no-grad forward)",
            "executed": "forward over padded rows x (3 + 1 GradCache + 1 if activation checkpointing)",
            "n": self.n, "patch": self.patch, "tile": self.tile,
            "vision_matmul_params": self.vision_params, "projector_params": self.projector_params,
            "language_matmul_params": self.lm_params,
        }

    def tile_flops(self) -> float:
        return 2 * self.n * (self.vision_params + self.projector_params) + self.vision_attn

    def side(self, inputs: dict) -> dict:
        mask = inputs["attention_mask"]
        rows, width = mask.shape
        lengths = mask.sum(dim=1).double()
        tiles = sum(int(p.shape[0]) for p in inputs.get("pixel_values") or [] if p is not None)
        lm_real = 2 * self.lm_params * float(lengths.sum()) + 0.5 * self.lm_attn_coeff * float((lengths ** 2).sum())
        lm_exec = rows * (2 * self.lm_params * width + self.lm_attn_coeff * width ** 2)
        vis = tiles * self.tile_flops()
        return {"rows": rows, "width": width, "lm_tokens": int(lengths.sum()), "lm_tokens_executed": rows * width,
                "tiles": tiles, "vision_tokens": tiles * self.n, "fwd_real": vis + lm_real, "fwd_executed": vis + lm_exec}

    def batch(self, batch: dict) -> dict:
        """Token counts of a collated batch (queries + targets) and its forward FLOPs: over the real
        tokens (``fwd_real``) and as executed on padded rows (``fwd_executed``)."""
        q, t = self.side(batch["query"]), self.side(batch["target"])
        return {
            "lm_tokens": q["lm_tokens"] + t["lm_tokens"],
            "lm_tokens_executed": q["lm_tokens_executed"] + t["lm_tokens_executed"],
            "vision_tokens": q["vision_tokens"] + t["vision_tokens"],
            "tiles": q["tiles"] + t["tiles"],
            "longest_query_tokens": q["width"], "longest_target_tokens": t["width"],
            "fwd_real": q["fwd_real"] + t["fwd_real"], "fwd_executed": q["fwd_executed"] + t["fwd_executed"],
        }

    @staticmethod
    def step_tflop(count: dict, *, cached: bool, checkpointing: bool) -> dict:
        """The step's TFLOP: useful (3 forwards over real tokens), with GradCache's extra forward
        (cached path only), and executed (padded rows; + the checkpointing recompute)."""
        real, ex = count["fwd_real"], count["fwd_executed"]
        return {"tflop_useful": 3 * real / 1e12,
                "tflop_with_gradcache_forward": (4 if cached else 3) * real / 1e12,
                "tflop_executed": (3 + int(cached) + int(checkpointing)) * ex / 1e12}


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


# ------------------------------------------------------------------------------ step timing
class Clock:
    """Time points of one step, in order: CUDA events on the GPU (the GPU's own timeline, so a
    phase includes the time the GPU waits for the host), perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.reset()

    def reset(self):
        self.marks, self.phase, self.sub, self._open = [], None, {"fwd": [], "bwd": []}, {}

    def _point(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def enter(self, phase: str):
        self.phase = phase
        self.marks.append((phase, self._point()))

    def start(self, kind: str):
        self._open[kind] = self._point()

    def stop(self, kind: str):
        self.sub[kind].append((self._open.pop(kind), self._point()))

    def _dt(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a

    def result(self) -> dict:
        """{phase: seconds} (each phase until the next mark), plus the re-encode's forward and
        backward sums; the last mark ends the step."""
        if self.cuda:
            torch.cuda.synchronize()
        out = {}
        for (name, a), (_, b) in zip(self.marks, self.marks[1:]):
            out[name] = out.get(name, 0.0) + self._dt(a, b)
        out["total"] = self._dt(self.marks[0][1], self.marks[-1][1])
        for kind, pairs in self.sub.items():
            out[f"reencode_{kind}" if kind in ("fwd", "bwd") else kind] = sum(self._dt(a, b) for a, b in pairs)
        return out


class TimedEngine:
    """The DeepSpeed engine as GradCache's encoder, with the step's phases marked: the first
    no-grad call opens "encode", a call with grad opens "reencode" (each forward and
    ``backward`` timed inside it); in GradCache's single pass a ``backward`` after the loss opens
    "backward". Everything else is the engine's (GradCache recognises it as an engine)."""

    def __init__(self, engine, clock: Clock):
        self.__dict__.update(_engine=engine, _clock=clock)

    def __call__(self, chunk):
        clock = self._clock
        if torch.is_grad_enabled():
            if clock.phase != "reencode":
                clock.enter("reencode")
            clock.start("fwd")
            out = self._engine(chunk)
            clock.stop("fwd")
            return out
        if clock.phase in (None, "start"):
            clock.enter("encode")
        return self._engine(chunk)

    def backward(self, loss, **kw):
        clock = self._clock
        if clock.phase == "loss":
            clock.enter("backward")
        clock.start("bwd")
        out = self._engine.backward(loss, **kw)
        clock.stop("bwd")
        return out

    def __getattr__(self, name):
        return getattr(self.__dict__["_engine"], name)


class TimedLoss:
    """The loss with its call marked ("loss": its forward and, inside GradCache, its backward
    until the first re-encode)."""

    def __init__(self, loss_fn, clock: Clock):
        self.__dict__.update(_loss=loss_fn, _clock=clock)

    def __call__(self, q, t, **kw):
        self._clock.enter("loss")
        return self._loss(q, t, **kw)

    def __getattr__(self, name):
        return getattr(self.__dict__["_loss"], name)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def search_largest(try_fn, *, start: int, b_max: int, max_try_s: float, deadline: float | None,
                   bisect: int = 1, grain: int = 8, clock=time.perf_counter) -> dict:
    """The largest batch ``try_fn(B) -> {"ok", "oom", "s", ...}`` runs: B doubles from ``start``
    until a try runs out of memory, would take longer than ``max_try_s`` (predicted linearly
    from the last good try), passes ``b_max`` or the ``deadline`` (a ``clock()`` time); then up
    to ``bisect`` halvings of the gap (multiples of ``grain``). A failure other than memory stops
    the search (after an OOM the engine may be unusable: said so, not retried)."""
    out = {"tries": [], "largest_ok": None, "smallest_oom": None, "limited_by": None}

    def fits_in_time(B) -> str | None:
        ok = out["largest_ok"]
        last = next((t for t in reversed(out["tries"]) if t.get("ok")), None)
        if last is not None and ok:
            predicted = last["s"] * B / ok
            if predicted > max_try_s:
                return f"time: a try at B={B} would take ~{predicted:.0f} s (> {max_try_s:g} s a try)"
            if deadline is not None and clock() + predicted > deadline:
                return f"deadline: a try at B={B} (~{predicted:.0f} s) would end past the part's deadline"
        if deadline is not None and clock() > deadline:
            return "deadline"
        return None

    B = start
    while True:
        if B > b_max:
            out["limited_by"] = f"b_max: B={b_max} fits, no larger batch was tried"
            break
        why = fits_in_time(B)
        if why:
            out["limited_by"] = why
            break
        r = try_fn(B)
        out["tries"].append(r)
        if r.get("ok"):
            out["largest_ok"] = B
            B *= 2
            continue
        if r.get("oom"):
            out["smallest_oom"] = B
            out["limited_by"] = "memory"
        else:
            out["limited_by"] = f"error at B={B}: {r.get('error')}"
        break
    for _ in range(bisect):
        lo, hi = out["largest_ok"], out["smallest_oom"]
        if lo is None or hi is None or hi - lo <= grain:
            break
        mid = (lo + hi) // 2 // grain * grain
        if mid <= lo:
            break
        why = fits_in_time(mid)
        if why:
            out["bisect_stopped"] = why
            break
        r = try_fn(mid)
        r["bisect"] = True
        out["tries"].append(r)
        if r.get("ok"):
            out["largest_ok"] = mid
        elif r.get("oom"):
            out["smallest_oom"] = mid
        else:
            out["bisect_stopped"] = f"error after an out-of-memory try: {r.get('error')} (engine unusable; not retried)"
            break
    return out


# ------------------------------------------------------------------------------ generated data
COLOURS = [("red", (255, 40, 0)), ("green", (0, 220, 60)), ("blue", (40, 80, 255)), ("yellow", (250, 230, 0)),
           ("purple", (150, 40, 200)), ("orange", (255, 140, 0)), ("white", (250, 250, 250)), ("pink", (255, 120, 200))]


def make_clips(folder: Path, count: int, frames: int, fps: int, size: int = 64) -> tuple[list[str], Path]:
    """``count`` clips (a 16-px square of one colour moving right or left over black, mpeg4 in
    .mp4) and an MSR-VTT-style caption file; returns (video paths, annotations path)."""
    import av
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    paths, rows = [], []
    for k in range(count):
        name, rgb = COLOURS[k % len(COLOURS)]
        right = (k // len(COLOURS)) % 2 == 0
        vid = f"video{k}"
        path = folder / f"{vid}.mp4"
        if not path.exists():
            with av.open(str(path), "w") as c:
                s = c.add_stream("mpeg4", rate=fps)
                s.width = s.height = size
                s.pix_fmt = "yuv420p"
                for i in range(frames):
                    img = np.zeros((size, size, 3), np.uint8)
                    x = (i * 2) % (size - 16)
                    x = x if right else size - 16 - x
                    img[24:40, x: x + 16] = rgb
                    for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                        c.mux(p)
                for p in s.encode():
                    c.mux(p)
        paths.append(str(path))
        rows.append(f"ret{k},msr{k},{vid},a {name} square moves {'right' if right else 'left'}\n")
    ann = folder / "MSRVTT_JSFUSION_test.csv"
    ann.write_text("key,vid_key,video_id,sentence\n" + "".join(rows))
    return paths, ann


# ------------------------------------------------------------------------------ part: env
def torch_extension_builds() -> list[str]:
    """Folders of JIT-built extensions (torch.utils.cpp_extension, where DeepSpeed builds its ops)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.expanduser("~/.cache/torch_extensions")
    found = []
    if os.path.isdir(root):
        for dirpath, dirnames, _files in os.walk(root):
            depth = dirpath[len(root):].count(os.sep)
            if depth >= 1:
                found += [os.path.join(dirpath, d)[len(root) + 1:] for d in dirnames]
                dirnames[:] = []
    return sorted(found)


def part_env(args, res: Results, sizes: dict) -> None:
    info = {"python": platform.python_version()}
    t0 = time.perf_counter()
    try:
        import deepspeed
    except Exception as exc:  # noqa: BLE001 - the report says what is missing
        info["deepspeed_error"] = f"{type(exc).__name__}: {exc}"
        res.put("env", info)
        raise SystemExit(f"import deepspeed failed: {exc} (bash benchmarks/fetch_wheels.sh here, carry .whl)")
    info.update(deepspeed=deepspeed.__version__, deepspeed_import_s=round(time.perf_counter() - t0, 2),
                deepspeed_path=os.path.dirname(deepspeed.__file__))
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops

    info["deepspeed_accelerator"] = get_accelerator().device_name()
    info["deepspeed_prebuilt_ops"] = sorted(k for k, v in installed_ops.items() if v)
    from llave_fast import train as T

    cfg = T.TrainConfig.from_json(sizes["preset"]) if sizes["preset"] else T.TrainConfig()
    ds = T.deepspeed_config(cfg, 1, True)
    zero = ds.get("zero_optimization", {})
    info["optimizer"] = {
        "ds_config_optimizer": ds.get("optimizer"),
        "offload_optimizer": zero.get("offload_optimizer"),
        "zero_force_ds_cpu_optimizer": ds.get("zero_force_ds_cpu_optimizer"),
        "zero_allow_untested_optimizer": ds.get("zero_allow_untested_optimizer"),
        "client_optimizer": "torch.optim.AdamW (llave_fast.train builds it and hands it to deepspeed.initialize)",
        "needs_jit_op": bool(ds.get("optimizer")) or bool(zero.get("offload_optimizer")),
    }
    for mod in ("av", "pydantic", "pydantic_core", "hjson", "transformers", "accelerate", "triton", "numpy"):
        try:
            m = __import__(mod)
            info[mod] = getattr(m, "__version__", getattr(m, "VERSION", "installed"))
        except Exception as exc:  # noqa: BLE001
            info[mod] = f"missing: {type(exc).__name__}: {exc}"
    info["torch_extension_builds"] = torch_extension_builds()
    try:
        du = shutil.disk_usage("/dev/shm")
        info["dev_shm_gib"] = {"total": gib(du.total), "free": gib(du.free)}
    except OSError:
        info["dev_shm_gib"] = None
    res.put("env", info)
    log(f"deepspeed {info['deepspeed']} (import {info['deepspeed_import_s']} s, accelerator "
        f"{info['deepspeed_accelerator']}, prebuilt ops: {info['deepspeed_prebuilt_ops'] or 'none'}); optimizer: "
        f"{'a DeepSpeed one (JIT op!)' if info['optimizer']['needs_jit_op'] else 'torch.optim.AdamW, no JIT op'}; "
        f"av {info['av']}, pydantic {info['pydantic']}")


# ------------------------------------------------------------------------------ part: step
class StepRun:
    """The engine, loss and data of part ``step`` (one process, one engine, several batch shapes)."""

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
        cfg.chunk_size = sizes["chunk"]
        cfg.global_batch = sizes["pairs_1x1"]
        self.cfg = cfg
        T.quiet_known_warnings()
        self.rank, self.world = T.init_distributed()
        bf16 = True if cfg.bf16 is None else cfg.bf16
        self.bf16 = bf16
        ds_config = T.deepspeed_config(cfg, self.world, bf16)
        self.ds_config = ds_config
        t0 = time.perf_counter()
        model = T.build_model(cfg, ds_config, bf16)
        self.build_s = time.perf_counter() - t0
        self.model = model
        self.processor = model.processor
        self.collator = PairCollator(self.processor)
        self.flops = Flops(model.config)

    def initialize(self) -> None:
        """deepspeed.initialize with torch's AdamW over the training loop's parameter groups."""
        import deepspeed

        T, cfg, model = self.T, self.cfg, self.model
        t1 = time.perf_counter()
        optimizer = torch.optim.AdamW(T.param_groups(model, cfg), weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: T.warmup_cosine(s, cfg))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config)
        t2 = time.perf_counter()
        inner = getattr(self.engine.optimizer, "optimizer", None)
        params = {}
        for part, mod in (("vision_tower", model.model.vision_tower), ("projector", model.model.multi_modal_projector),
                          ("language_model", model.model.language_model)):
            params[part] = sum(getattr(p, "ds_numel", p.numel()) for p in mod.parameters())
        params["total"] = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        self.info = {
            "model": cfg.model, "preset": self.sizes["preset"], "bf16": self.bf16, "zero_stage": self.engine.zero_optimization_stage(),
            "world_size": self.world, "gradient_checkpointing": cfg.gradient_checkpointing, "chunk_size": cfg.chunk_size,
            "attn_implementation": model.model.config._attn_implementation,
            "optimizer": {"engine": type(self.engine.optimizer).__name__,
                          "inner": None if inner is None else f"{type(inner).__module__}.{type(inner).__name__}",
                          "foreach": None if inner is None else inner.defaults.get("foreach"),
                          "fused": None if inner is None else inner.defaults.get("fused")},
            "params": params, "build_model_s": round(self.build_s, 2), "deepspeed_initialize_s": round(t2 - t1, 2),
            "grid_pinpoints_hw": [list(p) for p in model.model.config.image_grid_pinpoints],
            "flops_formula": self.flops.formula,
        }
        from llave_fast import FusedHardnessLoss

        self.loss_fn = FusedHardnessLoss(cfg.logit_scale, cfg.alpha, backend=cfg.loss_backend, local_loss=True,
                                         gather_with_grad=True, rank=self.rank, world_size=self.world)
        self.clock = Clock(self.device)

    # -- one step -------------------------------------------------------------------------
    def step(self, cpu_batch: dict, chunk: int, *, single_pass: bool = True, mask_ids: bool = True) -> dict:
        from llave_fast import GradCache

        T, device, clock = self.T, self.device, self.clock
        count = self.flops.batch(cpu_batch)
        pygc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            at_rest = torch.cuda.memory_allocated()
        batch = T._to_device(cpu_batch, self.engine.device)
        input_bytes = (torch.cuda.memory_allocated() - at_rest) if device.type == "cuda" else None
        ids = {}
        if mask_ids:
            ids = dict(target_ids=batch["target_ids"], query_ids=batch["target_ids"])
        cache = GradCache(TimedEngine(self.engine, clock), TimedLoss(self.loss_fn, clock), chunk,
                          single_pass=single_pass)
        clock.reset()
        t_wall = time.perf_counter()
        clock.enter("start")
        loss = cache(batch["query"], batch["target"], batch.get("negatives"), **ids)
        clock.enter("optimizer")
        self.engine.step()
        clock.enter("end")
        ph = clock.result()
        wall = time.perf_counter() - t_wall
        total = ph.pop("total")
        fwd, bwd, start = ph.pop("reencode_fwd"), ph.pop("reencode_bwd"), ph.pop("start", 0.0)
        cached = "encode" in ph
        if cached:  # phases in order; they add up to the step
            parts = {"encode": ph["encode"] + start, "loss": ph.get("loss", 0.0), "reencode_fwd": fwd,
                     "reencode_bwd": bwd, "reencode_other": max(0.0, ph.get("reencode", 0.0) - fwd - bwd),
                     "optimizer": ph.get("optimizer", 0.0)}
        else:  # GradCache's single pass: one forward with grad, the loss, one backward
            parts = {"forward": ph.get("reencode", 0.0) + start, "loss": ph.get("loss", 0.0),
                     "backward": ph.get("backward", 0.0), "optimizer": ph.get("optimizer", 0.0)}
        count.update(self.flops.step_tflop(count, cached=cached, checkpointing=self.cfg.gradient_checkpointing))
        for k in ("fwd_real", "fwd_executed"):
            count[k.replace("fwd", "tflop_forward")] = count.pop(k) / 1e12
        rec = {"pairs": cpu_batch["query"]["input_ids"].shape[0], "chunk": chunk,
               "path": "cached (GradCache)" if cached else "single pass (no caching)",
               "loss": float(loss), "step_s": round(total, 4), "host_wall_s": round(wall, 4),
               "phases_s": {k: round(v, 4) for k, v in parts.items()},
               "shares": {k: round(v / total, 4) for k, v in parts.items()} if total > 0 else {},
               **count}
        rec["pairs_per_s"] = rec["pairs"] / total
        rec["lm_tokens_per_s"] = count["lm_tokens"] / total
        rec["vision_tokens_per_s"] = count["vision_tokens"] / total
        if device.type == "cuda":
            rec.update(peak_allocated_gib=gib(torch.cuda.max_memory_allocated()),
                       peak_reserved_gib=gib(torch.cuda.max_memory_reserved()),
                       at_rest_gib=gib(at_rest), batch_on_device_gib=gib(input_bytes))
        peak = self.args.peak
        if peak:
            rec["mfu"] = count["tflop_useful"] / total / peak
            rec["mfu_with_gradcache_forward"] = count["tflop_with_gradcache_forward"] / total / peak
            rec["hfu_executed"] = count["tflop_executed"] / total / peak
        if not math.isfinite(rec["loss"]):
            rec["warning"] = "non-finite loss"
        del batch, loss
        return rec

    # -- data -----------------------------------------------------------------------------
    def batches(self, image_size: int, pairs: int, steps: int, seed: int = 0) -> "Batches":
        workers = self.args.workers if self.args.workers is not None else self.sizes["workers"]
        return Batches(self.T, self.collator, image_size, pairs, steps, seed, workers)


class Batches:
    """(batch, data wait s) for ``steps`` steps of ``pairs`` synthetic pairs at ``image_size`` px,
    through the training loop's loader: its worker processes start at once (made before the
    engine, they prepare the first batches while it is built) and stay ahead of the model. If a
    worker dies (e.g. too little shared memory for the batches: /dev/shm), the remaining batches
    are made by threads in this process."""

    def __init__(self, T, collator, image_size: int, pairs: int, steps: int, seed: int, workers: int):
        from llave_fast.data import SyntheticDataset

        self.T, self.collator, self.pairs, self.steps, self.seed, self.workers = T, collator, pairs, steps, seed, workers
        self.dataset = SyntheticDataset(pairs * steps, seed=seed, split="train", image_size=image_size)
        self.order = T.BatchOrder(len(self.dataset), pairs, seed)
        self.done = 0
        self._it = self._loader(0) if workers > 0 else None

    def _loader(self, start: int):
        return iter(self.T.step_loader(self.dataset, self.collator, self.order, 0, self.pairs, start, self.steps,
                                       self.workers, 1, self.seed))

    def _threads(self, start: int):
        from concurrent.futures import ThreadPoolExecutor

        make = self.T.StepBatches(self.dataset, self.collator)
        with ThreadPoolExecutor(max(1, self.workers)) as pool:
            futures = [pool.submit(make.__getitem__, (s, self.order(s)[: self.pairs])) for s in range(start, self.steps)]
            for f in futures:
                yield f.result()

    def __iter__(self):
        it = self._it if self._it is not None else self._loader(0)
        while self.done < self.steps:
            t0 = time.perf_counter()
            try:
                item = next(it)
            except (RuntimeError, OSError) as exc:
                if self.workers == 0 or getattr(self, "workers_failed", False):
                    raise
                log(f"WARNING: the data loader's workers failed ({type(exc).__name__}: {str(exc)[:200]}); making the "
                    f"remaining batches with {self.workers} threads in this process")
                it = self._threads(self.done)
                self.workers_failed = True
                continue
            wait = time.perf_counter() - t0
            if item.get("error"):
                raise RuntimeError(f"bad synthetic batch at step {self.done}: {item['error']}")
            yield item["batch"], wait
            self.done += 1


def _median(xs):
    xs = sorted(xs)
    return None if not xs else (xs[len(xs) // 2] if len(xs) % 2 else 0.5 * (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]))


def summarize_steps(recs: list[dict]) -> dict:
    keys = ("step_s", "pairs_per_s", "lm_tokens_per_s", "vision_tokens_per_s", "mfu", "mfu_with_gradcache_forward",
            "hfu_executed", "peak_allocated_gib", "data_wait_s")
    out = {f"median_{k}": _median([r[k] for r in recs if r.get(k) is not None]) for k in keys}
    phases = {}
    for r in recs:
        for k, v in r["phases_s"].items():
            phases.setdefault(k, []).append(v)
    out["median_phases_s"] = {k: _median(v) for k, v in phases.items()}
    tot = out["median_step_s"]
    out["median_shares"] = {k: (v / tot if tot else None) for k, v in out["median_phases_s"].items()}
    return out


def extrapolate(summary: dict, recs: list[dict], pairs: int, target: int, peak: float | None) -> dict:
    """A step of ``target`` pairs from the measured ones: encode and re-encode cost per pair (linear),
    the loss quadratic in the pairs (B x N), the optimizer step and the reduction fixed."""
    ph = summary["median_phases_s"]
    per_pair = (ph.get("encode", 0.0) + ph.get("reencode_fwd", 0.0) + ph.get("reencode_bwd", 0.0)) / pairs
    fixed = ph.get("optimizer", 0.0) + ph.get("reencode_other", 0.0)
    loss = ph.get("loss", 0.0) * (target / pairs) ** 2
    t = per_pair * target + fixed + loss
    useful = _median([r["tflop_useful"] for r in recs]) * target / pairs
    out = {"pairs": target, "measured_from_pairs": pairs, "step_s": t, "pairs_per_s": target / t,
           "lm_tokens_per_s": _median([r["lm_tokens"] for r in recs]) * target / pairs / t,
           "encode_reencode_s_per_pair": per_pair, "fixed_s": fixed, "loss_s": loss,
           "shares": {"encode_reencode": per_pair * target / t, "loss": loss / t, "fixed": fixed / t},
           "method": "not run: encode + re-encode forward/backward x pairs (linear), loss x (pairs ratio)^2, "
                     "optimizer step and gradient reduction fixed; peak memory = measured + the larger batch's "
                     "inputs on the device (GradCache's activations are one chunk's)"}
    if peak:
        out["mfu"] = useful / t / peak
        out["mfu_with_gradcache_forward"] = useful * 4 / 3 / t / peak
    peaks = [r for r in recs if r.get("peak_allocated_gib") is not None]
    if peaks:
        r = peaks[-1]
        out["peak_allocated_gib"] = r["peak_allocated_gib"] + (r.get("batch_on_device_gib") or 0) * (target / pairs - 1)
    return out


def part_step(args, res: Results, sizes: dict, device: torch.device, t_start: float) -> None:
    deadline = t_start + args.deadline_s if args.deadline_s else None
    jit_before = torch_extension_builds()
    out = {"status": "running", "sizes": {k: v for k, v in sizes.items()}}
    res.put("step", out)
    log(f"building {'arch:llave-0.5b (configs/' + sizes['preset'] + ')' if sizes['preset'] else 'the tiny model'} "
        f"under ZeRO-3 on {device.type} ...")
    run = StepRun(args, sizes, device)
    # the loader's workers start now and prepare the first batches while the engine is set up
    n1, warm, timed = sizes["pairs_1x1"], sizes["warmup_1x1"], sizes["timed_1x1"]
    stream_1x1 = run.batches(sizes["image_1x1"], n1, warm + timed)
    run.initialize()
    out.update(run.info)
    out["peak_tflops_bf16"] = args.peak
    res.put("step", out)
    p = run.info["params"]
    log(f"built in {run.info['build_model_s']} s + deepspeed.initialize {run.info['deepspeed_initialize_s']} s: "
        f"{p['total'] / 1e9:.3f} B parameters (vision {p['vision_tower'] / 1e6:.0f} M, language "
        f"{p['language_model'] / 1e6:.0f} M), optimizer {run.info['optimizer']['inner']}, attention "
        f"{run.info['attn_implementation']}")

    def left() -> float:
        return math.inf if deadline is None else deadline - time.perf_counter()

    def show(tag, r):
        mem = f", peak {r['peak_allocated_gib']:.1f} GiB" if r.get("peak_allocated_gib") is not None else ""
        mfu = f", MFU {100 * r['mfu']:.1f} %" if r.get("mfu") is not None else ""
        sh = r["shares"]
        log(f"{tag}: {r['pairs']} pairs in {r['step_s']:.2f} s ({r['pairs_per_s']:.1f} pairs/s, "
            f"{r['lm_tokens_per_s']:.0f} tokens/s{mfu}{mem}; data wait {r.get('data_wait_s', 0):.2f} s); shares: "
            + ", ".join(f"{k} {100 * v:.0f} %" for k, v in sh.items()))

    # (b) 1x1: one warm-up, then timed steps
    g1 = {"image_px": sizes["image_1x1"], "pairs": n1, "chunk": sizes["chunk"], "warmup": [], "timed": []}
    out["grid_1x1"] = g1
    last_1x1 = None
    for k, (batch, wait) in enumerate(stream_1x1):
        if k >= warm and g1["timed"] and left() < 1.2 * g1["timed"][-1]["step_s"] + 5:
            g1["stopped"] = f"deadline: {k - warm} timed steps done"
            break
        r = run.step(batch, sizes["chunk"])
        r["data_wait_s"] = round(wait, 3)
        (g1["warmup"] if k < warm else g1["timed"]).append(r)
        show(f"1x1 {'warm-up' if k < warm else 'timed'} step {k + 1}", r)
        last_1x1 = batch
        if g1["timed"]:
            g1["summary"] = summarize_steps(g1["timed"])
            out["extrapolated"] = extrapolate(g1["summary"], g1["timed"], n1, sizes["extrapolate_pairs"], args.peak)
        res.put("step", out)
    if "extrapolated" in out:
        e = out["extrapolated"]
        log(f"extrapolated to {e['pairs']} pairs (not run): {e['step_s']:.1f} s a step, {e['pairs_per_s']:.1f} pairs/s"
            + (f", MFU {100 * e['mfu']:.1f} %" if e.get("mfu") is not None else ""))

    # (b) 2x2: one step
    per_pair = (g1["timed"] or g1["warmup"] or [{"step_s": 0, "pairs": 1}])[-1]
    guess = per_pair["step_s"] / per_pair["pairs"] * sizes["pairs_2x2"] * 2.5
    if left() > guess + 10:
        g2 = {"image_px": sizes["image_2x2"], "pairs": sizes["pairs_2x2"], "chunk": sizes["chunk"]}
        out["grid_2x2"] = g2
        for batch, wait in run.batches(sizes["image_2x2"], sizes["pairs_2x2"], 1, seed=1):
            r = run.step(batch, sizes["chunk"])
            r["data_wait_s"] = round(wait, 3)
            g2["step"] = r
            show("2x2 step", r)
        res.put("step", out)
    else:
        out["grid_2x2"] = {"skipped": f"deadline ({left():.0f} s left, ~{guess:.0f} s needed)"}
        res.put("step", out)

    # (d) encode throughput without gradients
    if left() > 20:
        out["encode"] = encode_throughput(run, sizes, Path(args.work))
        res.put("step", out)
    else:
        out["encode"] = {"skipped": f"deadline ({left():.0f} s left)"}

    # (c) memory: GradCache at two chunk sizes against the largest batch without it
    if last_1x1 is not None and left() > 15:
        out["memory"] = memory_search(run, last_1x1, sizes, deadline, lambda: res.put("step", out))
    else:
        out["memory"] = {"skipped": "deadline" if last_1x1 is not None else "no 1x1 batch"}
    out["jit_builds_during_part"] = sorted(set(torch_extension_builds()) - set(jit_before))
    out["status"] = "ok"
    res.put("step", out)


def tile_batch(cpu_batch: dict, rows: int) -> dict:
    """``rows`` pairs from a collated batch: its first rows, or the batch repeated (no masking ids
    are used with it: repeated pairs are plain negatives)."""
    from llave_fast.gradcache import _take

    n = cpu_batch["query"]["input_ids"].shape[0]
    if rows <= n:
        return {k: _take(v, 0, rows) if k in ("query", "target") else None for k, v in cpu_batch.items()}
    reps = -(-rows // n)

    def rep(side):
        out = {}
        for k, v in side.items():
            if isinstance(v, torch.Tensor):
                out[k] = torch.cat([v] * reps)[:rows]
            elif isinstance(v, (list, tuple)):
                out[k] = (list(v) * reps)[:rows]
            else:
                out[k] = v
        return out

    return {"query": rep(cpu_batch["query"]), "target": rep(cpu_batch["target"]), "negatives": None}


def memory_search(run: StepRun, base: dict, sizes: dict, deadline: float | None, save) -> dict:
    dev = run.device
    mem = {"gradient_checkpointing": run.cfg.gradient_checkpointing, "pairs_for_gradcache": sizes["mem_pairs"],
           "gradcache": {}, "note": "each try is one training step (forward, loss, backward, AdamW step); peak = "
                                    "torch.cuda.max_memory_allocated over it, weights, gradients and AdamW state included"}
    for chunk in sizes["mem_chunks"]:
        if deadline is not None and time.perf_counter() > deadline - 10:
            mem["gradcache"][str(chunk)] = {"skipped": "deadline"}
            continue
        r = run.step(tile_batch(base, sizes["mem_pairs"]), chunk, mask_ids=False)
        mem["gradcache"][str(chunk)] = r
        log(f"GradCache chunk {chunk}, {r['pairs']} pairs: {r['step_s']:.2f} s"
            + (f", peak {r['peak_allocated_gib']:.1f} GiB" if r.get("peak_allocated_gib") is not None else ""))
        save()

    def try_plain(B: int) -> dict:
        rec = {"B": B}
        try:
            # chunk >= the whole step (queries + targets): GradCache's single pass, i.e. no caching
            r = run.step(tile_batch(base, B), 2 * B, mask_ids=False)
            rec.update(ok=math.isfinite(r["loss"]), oom=False, s=r["step_s"], pairs_per_s=r["pairs_per_s"],
                       peak_allocated_gib=r.get("peak_allocated_gib"), path=r["path"])
            if not rec["ok"]:
                rec["error"] = f"non-finite loss {r['loss']}"
        except Exception as exc:  # noqa: BLE001 - out of memory is the expected end; others are reported
            rec.update(ok=False, oom=is_oom(exc), error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        if not rec["ok"]:
            # outside the except block: the exception's frames (holding the batch and activations) are gone
            pygc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            try:
                run.engine.zero_grad()
            except Exception as exc2:  # noqa: BLE001
                rec["recovery_error"] = f"{type(exc2).__name__}: {exc2}"
        log(f"no GradCache, {B} pairs at once: "
            + (f"ok, {rec['s']:.2f} s" + (f", peak {rec['peak_allocated_gib']:.1f} GiB"
                                          if rec.get("peak_allocated_gib") is not None else "")
               if rec["ok"] else ("out of memory" if rec["oom"] else rec.get("error", "failed"))))
        mem.setdefault("plain_tries_so_far", []).append(rec)
        save()
        return rec

    plain = search_largest(try_plain, start=sizes["plain_start"], b_max=sizes["plain_max"],
                           max_try_s=sizes["max_try_s"], deadline=None if deadline is None else deadline - 3)
    mem.pop("plain_tries_so_far", None)
    mem["without_gradcache"] = plain
    log(f"largest batch without GradCache: {plain['largest_ok']} pairs (first out of memory: "
        f"{plain['smallest_oom']}; limited by {plain['limited_by']})")
    return mem


def gathered(params):
    """DeepSpeed's context that gathers ZeRO-3 partitioned parameters (a no-op for plain ones)."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def encode_throughput(run: StepRun, sizes: dict, work: Path) -> dict:
    """Samples/s and tokens/s of the model without gradients (eval mode): image+text queries and
    text alone at the eval command's batch, processor and model timed apart; videos through the
    eval-video path (decoding threads ahead of the model)."""
    from llave_fast.data import SyntheticDataset
    from llave_fast.model.video import video_length_limit
    from llave_fast.video import encode_videos

    T, dev, module = run.T, run.device, run.engine.module
    n_img, n_txt, b = sizes["enc_images"], sizes["enc_texts"], sizes["enc_batch"]
    ds = SyntheticDataset(3 * max(n_img, n_txt) + 3 * sizes["enc_warmup"], seed=2, split="eval",
                          image_size=sizes["image_1x1"])
    recs = [ds[i] for i in range(len(ds))]
    imgs = [(r["qry"], r["qry_image"]) for r in recs if r["qry_image"] is not None]
    txts = [r["pos_text"] for r in recs if r["pos_image"] is None and r["pos_text"]]
    out = {"batch": b}

    def timed(name, items, with_images):
        prep = model_s = 0.0
        tokens = 0
        n = 0
        for lo in range(0, len(items), b):
            chunk = items[lo:lo + b]
            t0 = time.perf_counter()
            if with_images:
                inputs = run.processor([t for t, _ in chunk], [im for _, im in chunk])
            else:
                inputs = run.processor(list(chunk), [None] * len(chunk))
            t1 = time.perf_counter()
            inputs = T._to_device(inputs, run.engine.device)
            C.sync(dev)
            t2 = time.perf_counter()
            emb = module(inputs)
            C.sync(dev)
            t3 = time.perf_counter()
            prep += t1 - t0
            model_s += t3 - t2
            tokens += int(inputs["attention_mask"].sum())
            n += emb.shape[0]
        return {"samples": n, "processor_s": round(prep, 3), "model_s": round(model_s, 3),
                "model_samples_per_s": n / model_s if model_s else None,
                "model_tokens_per_s": tokens / model_s if model_s else None,
                "end_to_end_samples_per_s": n / (prep + model_s) if prep + model_s else None, "tokens": tokens}

    module.eval()
    try:
        with torch.no_grad():
            timed("warm-up", imgs[:sizes["enc_warmup"]], True)
            out["image_text"] = timed("image+text", imgs[:n_img], True)
            out["text"] = timed("text", txts[:n_txt], False)
            for k in ("image_text", "text"):
                r = out[k]
                log(f"encode {k}: {r['samples']} samples, model {r['model_samples_per_s']:.1f} samples/s "
                    f"({r['model_tokens_per_s']:.0f} tokens/s), processor {r['processor_s']:.2f} s")
            try:
                paths, _ann = make_clips(work / "clips", sizes["clips"], sizes["clip_frames"], sizes["clip_fps"])
                limit = video_length_limit(module.config, 8192)
                C.sync(dev)
                t0 = time.perf_counter()
                # the video path reads image_newline outside any module's forward, where ZeRO-3 does not
                # gather a partitioned parameter by itself (the eval-video command loads without ZeRO)
                with gathered([module.model.image_newline]):
                    _emb, infos = encode_videos(module, paths, fps=3, max_frames=32, batch=sizes["video_batch"],
                                                max_length=limit, workers=2, progress=False)
                C.sync(dev)
                dt = time.perf_counter() - t0
                frames = sum(len(i["indices"]) for i in infos)
                out["video"] = {"videos": len(paths), "frames": frames, "seconds": round(dt, 3),
                                "videos_per_s": len(paths) / dt, "frames_per_s": frames / dt,
                                "note": "end to end: decoding (2 threads ahead) + processor + model"}
                log(f"encode video: {len(paths)} clips, {frames} frames in {dt:.2f} s ({frames / dt:.0f} frames/s)")
            except Exception as exc:  # noqa: BLE001 - PyAV missing, a codec: reported, the rest goes on
                out["video"] = {"error": f"{type(exc).__name__}: {exc}"}
                log(f"encode video failed: {out['video']['error']}")
    finally:
        module.train()
    return out


# ------------------------------------------------------------------------------ parts: tiny, eval
def run_clis(jobs: list[tuple[str, list[str]]], *, progress_file: Path | None = None,
             total_steps: int | None = None, quiet_bars: bool = False) -> list[dict]:
    """Run ``llave-fast`` commands side by side (their output goes to ours), printing a progress
    line every 15 s; returns {cmd, rc, wall_s} for each. Interrupted, they are stopped too."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if quiet_bars:
        env["TQDM_DISABLE"] = "1"  # the lines below say how far they are
    t0 = time.perf_counter()
    procs = []
    for tag, cmd in jobs:
        log(f"{tag}: {' '.join(cmd)}")
        procs.append((tag, cmd, subprocess.Popen(cmd, cwd=str(ROOT), env=env)))
    done: dict[int, dict] = {}
    try:
        while len(done) < len(procs):
            time.sleep(0.2)
            for k, (tag, cmd, proc) in enumerate(procs):
                if k not in done and proc.poll() is not None:
                    done[k] = {"cmd": cmd, "rc": proc.returncode, "wall_s": round(time.perf_counter() - t0, 2)}
                    log(f"{tag}: exit {proc.returncode} after {done[k]['wall_s']:.1f} s")
            elapsed = time.perf_counter() - t0
            if len(done) < len(procs) and int(elapsed) // 15 != int(elapsed - 0.2) // 15:
                msg = f"{elapsed:.0f} s: running " + ", ".join(t for k, (t, _, _) in enumerate(procs) if k not in done)
                if progress_file is not None and progress_file.exists():
                    msg += f"; step {sum(1 for _ in progress_file.open())}" + (f" of {total_steps}" if total_steps else "")
                log(msg)
    except BaseException:
        for _tag, _cmd, proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for _tag, _cmd, proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        raise
    return [done[k] for k in range(len(procs))]


def part_tiny(args, res: Results, sizes: dict, dry: bool) -> None:
    work = Path(args.work)
    run_dir = work / "tiny_run"
    shutil.rmtree(run_dir, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "llave_fast", "train", "--output-dir", str(run_dir), "--bf16", "true",
           "--progress", "false"]
    if dry:
        cmd += ["--steps", "3", "--num-train", "192", "--num-eval", "32", "--global-batch", "32", "--chunk-size", "64",
                "--warmup-steps", "1", "--save-every", "0", "--num-workers", "0"]
        steps = 3
    else:
        # the default job (configs/tiny_cpu.json) as shipped; more data-loading workers than its 2 (the lent
        # machine has 16 cores; the data order is a function of (seed, step) alone, so the run is the same)
        cmd += ["--num-workers", str(args.workers if args.workers is not None else sizes["workers"])]
        steps = 240
    out = {"status": "running", "run_dir": str(run_dir)}
    res.put("tiny_job", out)
    out.update(run_clis([("tiny default job", cmd)], progress_file=run_dir / "train_log.jsonl", total_steps=steps)[0])
    ev = run_dir / "eval.json"
    if ev.exists():
        e = json.loads(ev.read_text())
        out.update({k: e.get(k) for k in ("steps", "global_batch", "seconds", "median_step_s", "median_data_wait_s",
                                           "p_at_1_before", "p_at_1_after", "chance", "num_candidates", "by_task")})
        if e.get("median_step_s"):
            out["pairs_per_s"] = e["global_batch"] / e["median_step_s"]
        log(f"tiny default job: P@1 {e.get('p_at_1_before')} -> {e.get('p_at_1_after')} (chance {e.get('chance')}), "
            f"{e.get('seconds', 0):.1f} s of training, median {e.get('median_step_s') or 0:.3f} s/step")
    log_path = run_dir / "train_log.jsonl"
    if log_path.exists():
        rows = [json.loads(x) for x in log_path.read_text().splitlines() if x.strip()]
        out["loss_first_last"] = [rows[0]["loss"], rows[-1]["loss"]] if rows else None
    out["status"] = "ok" if out["rc"] == 0 else f"failed (exit {out['rc']})"
    res.put("tiny_job", out)
    if out["rc"] != 0:
        raise SystemExit(f"the tiny default job failed (exit {out['rc']}): see its output above")


def part_eval(args, res: Results, sizes: dict, dry: bool) -> None:
    from llave_fast.data.mmeb_eval import write_mmeb_eval

    work = Path(args.work)
    run_dir = work / "tiny_run"
    out = {"status": "running", "model": str(run_dir)}
    res.put("eval_tiny", out)
    if not (run_dir / "checkpoints").is_dir():
        out["status"] = f"skipped: no run folder {run_dir} with checkpoints (part 'tiny' did not finish)"
        res.put("eval_tiny", out)
        raise SystemExit(out["status"])
    data = work / "mmeb_eval"
    shutil.rmtree(data, ignore_errors=True)
    files = []
    for task in ("i2t", "t2i", "vqa"):
        f, _image_dir = write_mmeb_eval(str(data), f"synthetic_{task}", sizes["mmeb_queries"],
                                       num_candidates=sizes["mmeb_candidates"], task=task, seed=3, image_size=64)
        files += f
    ev_out, v_out = work / "eval_out", work / "video_out"
    shutil.rmtree(ev_out, ignore_errors=True)
    shutil.rmtree(v_out, ignore_errors=True)
    _clips, ann = make_clips(work / "clips", sizes["clips"], sizes["clip_frames"], sizes["clip_fps"])
    mmeb_cmd = [sys.executable, "-m", "llave_fast", "eval", "--model", str(run_dir), "--data", *files, "--image-dir",
                str(data), "--output-dir", str(ev_out), "--batch", "64", "--dtype", "bf16"]
    video_cmd = [sys.executable, "-m", "llave_fast", "eval-video", "--model", str(run_dir), "--videos",
                 str(work / "clips"), "--annotations", str(ann), "--output-dir", str(v_out), "--batch",
                 str(sizes["video_batch"]), "--dtype", "bf16"]
    # side by side: each is mostly start-up (imports, the checkpoint merged in memory) with a tiny model
    out["mmeb"], out["video"] = run_clis([("eval (MMEB-eval files)", mmeb_cmd),
                                          ("eval-video (generated clips)", video_cmd)], quiet_bars=True)
    p = ev_out / "mmeb_eval.json"
    if p.exists():
        e = json.loads(p.read_text())
        out["mmeb"].update(p_at_1=e.get("p_at_1"), device=e.get("device"), dtype=e.get("dtype"),
                           datasets={n: {k: d.get(k) for k in ("p_at_1", "num_queries", "num_candidates", "num_encoded",
                                                                 "seconds")}
                                     for n, d in e.get("datasets", {}).items()})
        log(f"eval: P@1 {e.get('p_at_1')} over {len(e.get('datasets', {}))} generated datasets "
            f"({sizes['mmeb_queries']} queries, {sizes['mmeb_candidates']} candidates each)")
    p = v_out / "video_eval.json"
    if p.exists():
        v = json.loads(p.read_text())
        out["video"].update({k: v.get(k) for k in ("t2v", "v2t", "num_videos", "num_captions", "device", "dtype",
                                                   "frames", "seconds")})
        log(f"eval-video: t2v R@1 {v['t2v']['R@1']} %, v2t R@1 {v['v2t']['R@1']} % over {v['num_videos']} clips")
    failed = [k for k in ("mmeb", "video") if out[k]["rc"] != 0]
    out["status"] = "ok" if not failed else f"failed: {', '.join(failed)}"
    res.put("eval_tiny", out)
    if failed:
        raise SystemExit(out["status"])


# ------------------------------------------------------------------------------ report
def _f(x, spec=".1f", na="-"):
    return na if x is None else format(x, spec)


def part_report(res: Results) -> None:
    """The results file as Markdown: what a README table is made from."""
    d = res.data
    dev = (d.get("device") or {}).get("name")
    print(f"Training step (issue 21) on {dev}"
          + (" -- DRY RUN on the CPU: plumbing only, no figure means anything" if d.get("dry_run") else "")
          + f"; parts: {d.get('parts')}")
    env = d.get("env") or {}
    if env:
        opt = env.get("optimizer") or {}
        print(f"- DeepSpeed {env.get('deepspeed')} (prebuilt ops: {env.get('deepspeed_prebuilt_ops') or 'none'}), "
              f"optimizer {'torch.optim.AdamW, no JIT op' if not opt.get('needs_jit_op') else 'a DeepSpeed one'}; "
              f"PyAV {env.get('av')}")
    t = d.get("tiny_job") or {}
    if t:
        print(f"- (a) tiny default job: {t.get('status')}; P@1 {_f(t.get('p_at_1_before'), '.3f')} -> "
              f"{_f(t.get('p_at_1_after'), '.3f')} (chance {_f(t.get('chance'), '.4f')}), {t.get('steps')} steps, "
              f"{_f(t.get('seconds'))} s of training, median {_f(t.get('median_step_s'), '.3f')} s/step "
              f"({_f(t.get('pairs_per_s'), '.0f')} pairs/s), {_f(t.get('wall_s'))} s wall")
        for task, v in (t.get("by_task") or {}).items():
            print(f"    {task}: P@1 {v['p_at_1']:.3f} (chance {v['chance']:.4f})")
    s = d.get("step") or {}
    if s:
        p = s.get("params") or {}
        print(f"- (b) {s.get('model')}: {_f((p.get('total') or 0) / 1e9, '.3f')} B parameters, ZeRO-{s.get('zero_stage')}, "
              f"bf16 {s.get('bf16')}, chunk {s.get('chunk_size')}, activation checkpointing "
              f"{s.get('gradient_checkpointing')}, optimizer {(s.get('optimizer') or {}).get('inner')}, "
              f"status {s.get('status')}")
        print()
        print("| step | pairs | s/step | pairs/s | tokens/s | peak GiB | MFU % | MFU+GC fwd % | encode | loss "
              "| re-encode fwd | re-encode bwd | reduction etc. | optimizer |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

        def row(name, r, shares):
            def get(key):  # a step's own figure, or the median over the timed steps
                return r.get(key) if r.get(key) is not None else r.get("median_" + key)

            def pct(x):
                return _f(None if x is None else 100 * x)

            cells = [name, r.get("pairs"), _f(get("step_s"), ".2f"), _f(get("pairs_per_s")),
                     _f(get("lm_tokens_per_s"), ".0f"), _f(get("peak_allocated_gib")), pct(get("mfu")),
                     pct(get("mfu_with_gradcache_forward"))]
            cells += [pct(shares.get(k)) + " %" for k in ("encode", "loss", "reencode_fwd", "reencode_bwd",
                                                           "reencode_other", "optimizer")]
            print("| " + " | ".join(str(c) for c in cells) + " |")

        g1 = s.get("grid_1x1") or {}
        if g1.get("summary"):
            sm = dict(g1["summary"], pairs=g1.get("pairs"))
            row(f"1x1 ({g1.get('image_px')} px), median of {len(g1.get('timed', []))}", sm, sm.get("median_shares") or {})
        g2 = (s.get("grid_2x2") or {}).get("step")
        if g2:
            row(f"2x2 ({s['grid_2x2'].get('image_px')} px)", g2, g2.get("shares") or {})
        e = s.get("extrapolated")
        if e:
            print(f"| {e['pairs']} pairs, extrapolated (not run) | {e['pairs']} | {_f(e['step_s'], '.2f')} "
                  f"| {_f(e['pairs_per_s'])} | {_f(e.get('lm_tokens_per_s'), '.0f')} | {_f(e.get('peak_allocated_gib'))} "
                  f"| {_f(None if e.get('mfu') is None else 100 * e['mfu'])} "
                  f"| {_f(None if e.get('mfu_with_gradcache_forward') is None else 100 * e['mfu_with_gradcache_forward'])} "
                  f"| - | {_f(100 * e['shares']['loss'], '.1f')} % | - | - | - | - |")
        print()
        m = s.get("memory") or {}
        for chunk, r in (m.get("gradcache") or {}).items():
            if "step_s" in r:
                print(f"- (c) GradCache chunk {chunk}, {r['pairs']} pairs: peak {_f(r.get('peak_allocated_gib'))} GiB, "
                      f"{r['step_s']:.2f} s")
        w = m.get("without_gradcache")
        if w:
            ok = [t for t in w["tries"] if t.get("ok")]
            top = max(ok, key=lambda t: t["B"]) if ok else {}
            print(f"- (c) without GradCache (one pass with grad): largest {w.get('largest_ok')} pairs "
                  f"(peak {_f(top.get('peak_allocated_gib'))} GiB, {_f(top.get('pairs_per_s'))} pairs/s), first out of "
                  f"memory {w.get('smallest_oom')}; limited by {w.get('limited_by')}")
        enc = s.get("encode") or {}
        for k in ("image_text", "text"):
            r = enc.get(k)
            if r:
                print(f"- (d) encode {k}: {_f(r.get('model_samples_per_s'))} samples/s, "
                      f"{_f(r.get('model_tokens_per_s'), '.0f')} tokens/s (model only; processor {r.get('processor_s')} s "
                      f"for {r.get('samples')})")
        if enc.get("video"):
            v = enc["video"]
            print(f"- (d) encode video: {v}" if "error" in v else
                  f"- (d) encode video: {v['videos']} clips, {_f(v['frames_per_s'], '.0f')} frames/s end to end")
    ev = d.get("eval_tiny") or {}
    if ev:
        mm, vv = ev.get("mmeb") or {}, ev.get("video") or {}
        per = ", ".join(f"{n} {_f(x.get('p_at_1'), '.3f')}" for n, x in (mm.get("datasets") or {}).items())
        print(f"- (d) eval with the tiny model: {ev.get('status')}; MMEB-style P@1 {_f(mm.get('p_at_1'), '.3f')} ({per}); "
              f"eval-video t2v R@1 {_f((vv.get('t2v') or {}).get('R@1'))} %, "
              f"v2t R@1 {_f((vv.get('v2t') or {}).get('R@1'))} %")


# ------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parts", nargs="+", choices=PARTS, help="what to run, in this order")
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
    if args.deadline_s is not None and args.deadline_s <= 0:
        ap.error(f"--deadline-s must be positive, got {args.deadline_s}")
    if args.workers is not None and args.workers < 0:
        ap.error(f"--workers must be >= 0, got {args.workers}")
    C.start_script()
    t_start = time.perf_counter()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type != "cuda" and not args.dry and any(p != "report" for p in args.parts):
        ap.error("no CUDA device here: --dry runs the tiny CPU sizes")
    sizes = DRY if args.dry else REAL
    args.peak = peak_tflops(dev, args.peak_tflops)
    res = Results(args.out, args.dry)
    for part in args.parts:
        if part == "report":
            part_report(res)
            continue
        log(f"part {part} ({'dry run, CPU' if args.dry else dev.type})")
        res.status(part, "running")
        try:
            if part == "env":
                part_env(args, res, sizes)
            elif part == "step":
                part_step(args, res, sizes, dev, t_start)
            elif part == "tiny":
                part_tiny(args, res, sizes, args.dry)
            elif part == "eval":
                part_eval(args, res, sizes, args.dry)
            res.status(part, "ok")
        except KeyboardInterrupt:
            res.status(part, "interrupted")
            for key in ("step", "tiny_job", "eval_tiny"):
                if isinstance(res.data.get(key), dict) and res.data[key].get("status") == "running":
                    res.data[key]["status"] = "interrupted"
            res.write()
            log(f"part {part} interrupted: what it measured is in {args.out}")
            return 130
        except SystemExit as exc:
            res.status(part, f"failed: {exc}")
            log(f"part {part} failed: {exc}")
            return 1
        except Exception as exc:
            res.status(part, f"error: {type(exc).__name__}: {exc}")
            if isinstance(res.data.get("step"), dict) and res.data["step"].get("status") == "running":
                res.data["step"]["status"] = f"error: {type(exc).__name__}: {exc}"
                res.write()
            raise
    log(f"done in {time.perf_counter() - t_start:.1f} s: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
