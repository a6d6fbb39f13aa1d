"""MMEB-eval: the encode-once path of ``llave-fast eval`` against the old per-query re-encoding.

    python benchmarks/bench_eval.py [--queries 64 --candidates 20 --repeats 5]

Both paths alternate in one process on generated data; benchmarks/README.md, "Evaluation".
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from llave_fast.data.mmeb_eval import find_eval_datasets, read_eval_file, write_mmeb_eval  # noqa: E402
from llave_fast.evaluate import encode_all, eval_precision, mmeb_eval  # noqa: E402
from llave_fast.model import LLaVEEmbedder, build_tiny_model  # noqa: E402


@torch.no_grad()
def OLD_candidate_list_eval(model, paths, *, image_dir=None, limit=None, batch: int = 64) -> dict:
    """llave_fast.evaluate's loop before encode-once (commit 597eb65): each query's candidates encoded again."""
    from PIL import Image

    def load(path):  # PIL closes a file it opened once the image is loaded
        return None if path is None else Image.open(path).convert("RGB")

    per_file, encodings = {}, 0
    for path in paths:
        rows = read_eval_file(path, image_dir, limit)
        q = encode_all(model, model.processor, [r.qry_text for r in rows], [load(r.qry_image) for r in rows], batch)
        encodings += len(rows)
        hits = 0
        for r, qe in zip(rows, q):
            c = encode_all(model, model.processor, r.cand_texts, [load(x) for x in r.cand_images], batch)
            encodings += len(r.cand_texts)
            hits += int((c @ qe).argmax().item() == 0)
        per_file[path] = {"p_at_1": hits / max(1, len(rows)), "num_queries": len(rows)}
    return {"per_file": per_file, "encodings": encodings}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = ap.add_argument
    add("--queries", type=int, default=48, help="queries per dataset")
    add("--candidates", type=int, default=16, help="candidates per query (the positive first)")
    add("--pool", type=int, default=64, help="items whose targets form the shared pool")
    add("--tasks", default="i2t,t2i", help="one dataset per synthetic task")
    add("--batch", type=int, default=16, help="inputs per forward pass, both paths")
    add("--repeats", type=int, default=3, help="timed runs of each path, alternating")
    add("--model", default=None, help="a model folder; None: the tiny LLaVE (seed 0)")
    add("--device", default="auto", help="auto, cpu, cuda")
    add("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32")
    add("--threads", type=int, default=None, help="torch CPU threads; None: torch's own")
    add("--out", default=None, help="None: benchmarks/results/<device>/<date>-eval-encode-once.json")
    args = ap.parse_args()
    C.start_script()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev, dt = eval_precision(args.device, args.dtype)
    model = LLaVEEmbedder.from_pretrained(args.model, torch_dtype=dt) if args.model else build_tiny_model(0)
    model = model.to(device=dev, dtype=dt).eval()

    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for k, task in enumerate(args.tasks.split(",")):
            paths += write_mmeb_eval(tmp, f"Synth_{task}", args.queries, num_candidates=args.candidates,
                                     pool=args.pool, task=task, seed=k)[0]
        datasets = find_eval_datasets(paths)
        runs = {"old": lambda **kw: OLD_candidate_list_eval(model, paths, image_dir=tmp, batch=args.batch, **kw),
                "new": lambda **kw: mmeb_eval(model, datasets, image_dir=tmp, batch=args.batch, progress=False, **kw)}
        runs["old"](limit=2)  # warm-up, untimed: a process's first forward passes pay one-off costs
        runs["new"](max_queries=2)
        secs, res = C.alternate(runs, args.repeats, dev)

    names = [d.name for d in datasets]
    p_at_1 = {"old": {n: res["old"]["per_file"][p]["p_at_1"] for n, p in zip(names, paths)},
              "new": {n: res["new"]["datasets"][n]["p_at_1"] for n in names}}
    enc = {"old": res["old"]["encodings"], "new": sum(res["new"]["datasets"][n]["num_encoded"] for n in names)}
    med = {k: C.median(v) for k, v in secs.items()}
    path_rec = {k: {"seconds": secs[k], "median_s": med[k], "encodings": enc[k], "p_at_1": p_at_1[k]} for k in runs}
    result = {"benchmark": "eval-encode-once", "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              **C.run_meta(dev),
              "settings": {"queries_per_dataset": args.queries, "candidates_per_query": args.candidates,
                           "pool": args.pool, "datasets": names, "batch": args.batch, "repeats": args.repeats,
                           "torch_threads": torch.get_num_threads(), "device": str(dev),
                           "model": args.model or "tiny (build_tiny_model, seed 0)", "dtype": str(dt)[6:]},
              "old_per_query_reencode": path_rec["old"], "new_encode_once": path_rec["new"],
              "speedup_median": med["old"] / med["new"], "encodings_ratio": enc["old"] / enc["new"],
              "same_p_at_1": p_at_1["old"] == p_at_1["new"]}
    out = C.write_json(C.result_path(dev, args.out, "-eval-encode-once"), result, indent=2)
    print(f"{len(names)} datasets x {args.queries} queries x {args.candidates} candidates (pool {args.pool}), "
          f"batch {args.batch}, {C.device_name(dev)}, {result['settings']['dtype']}:\n"
          f"  old per-query re-encoding: median {med['old']:.2f} s, {enc['old']} encodings\n"
          f"  new encode-once:           median {med['new']:.2f} s, {enc['new']} encodings\n"
          f"  speed-up {result['speedup_median']:.1f}x (median of {args.repeats}); encodings "
          f"{result['encodings_ratio']:.1f}x fewer; P@1 old {p_at_1['old']} new {p_at_1['new']}\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
