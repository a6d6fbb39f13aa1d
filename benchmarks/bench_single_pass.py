"""GradCache's single pass against its cached path, on the default job's model and batch.

    python benchmarks/bench_single_pass.py                 # CPU, ~1 min on 2 cores

benchmarks/README.md, "GradCache's single pass".
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from llave_fast import FusedHardnessLoss, GradCache  # noqa: E402
from llave_fast.data import PairCollator, SyntheticDataset  # noqa: E402
from llave_fast.model import build_tiny_model  # noqa: E402
from llave_fast.train import TrainConfig, tiny_model_kwargs  # noqa: E402


def main() -> int:
    preset = TrainConfig.from_json("tiny_cpu.json")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=preset.global_batch,
                    help=f"pairs per step. Default: the preset's global batch ({preset.global_batch})")
    ap.add_argument("--repeats", type=int, default=7, help="timed steps of each path, alternating. Default: 7")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads. Default: torch's own")
    ap.add_argument("--out", default=None,
                    help="result JSON. Default: benchmarks/results/<device>/<date>-gradcache-single-pass.json")
    args = ap.parse_args()
    for name in ("batch", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    C.start_script()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device("cpu")

    model = build_tiny_model(0, **tiny_model_kwargs(preset)).train()  # as the default job builds it
    tasks = preset.synthetic_tasks or ("i2t", "t2i", "vqa")
    ds = SyntheticDataset(args.batch, seed=0, split="train", image_size=preset.image_size, tasks=tasks,
                          background=preset.synthetic_background)
    batch = PairCollator(model.processor)([ds[i] for i in range(args.batch)])
    ids = dict(target_ids=batch["target_ids"], query_ids=batch["target_ids"])
    loss_fn = FusedHardnessLoss(preset.logit_scale, preset.alpha, backend="torch")
    chunk = 2 * args.batch  # the whole step in one chunk: what the single pass needs

    def step(single: bool):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        gc = GradCache(model, loss_fn, chunk, single_pass=single)
        t0 = time.perf_counter()
        loss = gc(batch["query"], batch["target"], **ids)
        dt = time.perf_counter() - t0
        return dt, loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    step(True), step(False)  # warm-up, untimed
    times = {True: [], False: []}
    results = {}
    for r in range(args.repeats):
        for single in ((True, False) if r % 2 == 0 else (False, True)):
            dt, loss, grads = step(single)
            times[single].append(dt)
            results[single] = (loss, grads)
        print(f"repeat {r + 1}/{args.repeats}: single {times[True][-1]:.3f} s, cached {times[False][-1]:.3f} s",
              file=sys.stderr)
    g1, g0 = results[True][1], results[False][1]
    max_rel = max(C.rel_err(g1[k], g0[k]) for k in g0)
    med1, med0 = statistics.median(times[True]), statistics.median(times[False])
    result = {
        "benchmark": "gradcache-single-pass", "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        **C.run_meta(dev), "machine_load": C.machine_load(),
        "settings": {"batch_pairs": args.batch, "chunk_size": chunk, "repeats": args.repeats,
                     "torch_threads": torch.get_num_threads(), "model": f"tiny (build_tiny_model, seed 0, {tiny_model_kwargs(preset)})",
                     "image_size": preset.image_size, "tasks": list(tasks), "loss_backend": "torch",
                     "logit_scale": preset.logit_scale, "alpha": preset.alpha,
                     "what": "GradCache.__call__ only (forward + backward of one step), plain module, fp32"},
        "single_pass": {"seconds": times[True], "median_s": med1, "loss": results[True][0]},
        "cached_path": {"seconds": times[False], "median_s": med0, "loss": results[False][0]},
        "speedup_median": med0 / med1, "max_rel_grad_diff": max_rel,
    }
    out = C.write_json(C.result_path(dev, args.out, "-gradcache-single-pass"), result, indent=2)
    print(f"one step of {args.batch} pairs, tiny LLaVE, {C.device_name(dev)}, {torch.get_num_threads()} threads:")
    print(f"  cached path: median {med0:.3f} s\n  single pass: median {med1:.3f} s")
    print(f"  speed-up {med0 / med1:.2f}x (median of {args.repeats}); largest relative gradient difference "
          f"{max_rel:.1e}; loss {results[True][0]:.6f} vs {results[False][0]:.6f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
