"""GradCache's single pass against its cached path, on the default job's model and batch.

    python benchmarks/bench_single_pass.py                 # CPU, ~1 min on 2 cores

benchmarks/README.md, "GradCache's single pass".
"""

from __future__ import annotations

import argparse
import sys
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
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--batch", type=int, default=preset.global_batch, help="pairs per step (the preset's global batch)")
    ap.add_argument("--repeats", type=int, default=7, help="timed steps of each path, alternating")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads; None: torch's own")
    ap.add_argument("--out", default=None, help="None: benchmarks/results/<device>/<date>-gradcache-single-pass.json")
    args = ap.parse_args()
    if min(args.batch, args.repeats) < 1:
        ap.error("--batch and --repeats must be >= 1")
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

    def step(single: bool) -> float:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        return GradCache(model, loss_fn, chunk, single_pass=single)(batch["query"], batch["target"], **ids).item()

    def grads(single: bool) -> dict:
        step(single)
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    g1, g0 = grads(True), grads(False)  # also the warm-up, untimed; every step is seeded alike
    times, loss = C.alternate({"single": lambda: step(True), "cached": lambda: step(False)}, args.repeats, dev)
    max_rel = max(C.rel_err(g1[k], g0[k]) for k in g0)
    med1, med0 = C.median(times["single"]), C.median(times["cached"])
    result = {
        "benchmark": "gradcache-single-pass", "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        **C.run_meta(dev), "machine_load": C.machine_load(),
        "settings": {"batch_pairs": args.batch, "chunk_size": chunk, "repeats": args.repeats,
                     "torch_threads": torch.get_num_threads(),
                     "model": f"tiny (build_tiny_model, seed 0, {tiny_model_kwargs(preset)})",
                     "image_size": preset.image_size, "tasks": list(tasks), "loss_backend": "torch",
                     "logit_scale": preset.logit_scale, "alpha": preset.alpha,
                     "what": "zero_grad + GradCache.__call__ (forward + backward of one step), plain module, fp32"},
        "single_pass": {"seconds": times["single"], "median_s": med1, "loss": loss["single"]},
        "cached_path": {"seconds": times["cached"], "median_s": med0, "loss": loss["cached"]},
        "speedup_median": med0 / med1, "max_rel_grad_diff": max_rel,
    }
    out = C.write_json(C.result_path(dev, args.out, "-gradcache-single-pass"), result, indent=2)
    print(f"one step of {args.batch} pairs, tiny LLaVE, {C.device_name(dev)}, {torch.get_num_threads()} threads:\n"
          f"  cached path: median {med0:.3f} s\n  single pass: median {med1:.3f} s\n"
          f"  speed-up {med0 / med1:.2f}x (median of {args.repeats}); largest relative gradient difference "
          f"{max_rel:.1e}; loss {loss['single']:.6f} vs {loss['cached']:.6f}\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
