"""sentence-transformers' ranking loss: its eager computation against llave-fast's fused one.

Two parts, each interleaving both implementations in one run (ABBA order, medians):

1. **The loss on embeddings** (B x d fp32 anchors and positives, every pair of the batch a
   candidate, both directions, hardness_strength 9, scale 20): forward + backward of
   * ``st_*``: sentence-transformers' ``MultipleNegativesRankingLoss(directions=("query_to_doc",
     "doc_to_query"), hardness_mode="in_batch_negatives", hardness_strength=9)``
     ``.compute_loss_from_embeddings`` (its eager B x N matrices), for partition_mode
     "per_direction" and "joint";
   * ``fused_*``: ``llave_fast.integrations.fused_mnrl_loss`` with the same arguments (the same
     numbers: two one-way fused calls, since sentence-transformers puts the hardness term on
     query_to_doc only);
   * ``fused_symmetric_hardness``: ``symmetric_hardness=True``, "per_direction" (LLaVE's loss:
     the hardness term in both directions, one fused call), against ``st_per_direction``'s time.
   Peak memory: the RSS high-water mark of one forward + backward in a fresh process, minus the
   RSS just before it (``_common.cpu_peak_rss_of_call``).
2. **The end-to-end cached step** of a tiny randomly initialised BERT (built here, nothing
   downloaded) on a batch of (anchor, positive, negative) triplets: ``CachedMultipleNegativesRankingLoss``
   against ``FusedCachedMultipleNegativesRankingLoss`` at the same mini_batch_size (the loss
   call plus its backward, as the trainer runs them), with the same arguments as part 1.

    python benchmarks/bench_st.py                     # CPU, B = 4096 and 8192, d = 768 (~10 min on 2 cores)
    python benchmarks/bench_st.py --sizes 1024 --repeats 2 --cached-batch 256   # a quick look

Writes ``benchmarks/results/<device>/<date>-st.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

SCALE = 20.0
STRENGTH = 9.0
BOTH = ("query_to_doc", "doc_to_query")
LOSS_VARIANTS = ("st_per_direction", "fused_per_direction", "st_joint", "fused_joint", "fused_symmetric_hardness")
# each fused variant against the sentence-transformers run it replaces
BASELINE = {"fused_per_direction": "st_per_direction", "fused_joint": "st_joint",
            "fused_symmetric_hardness": "st_per_direction"}
WORDS = ("the a one two cat dog bird fish sat ran flew swam on under near mat rug tree pond red blue green big "
         "small old young house car road sky sea").split()


def loss_fn(variant: str):
    """``fn(q, t) -> scalar loss`` of a part-1 variant."""
    part = "joint" if variant.endswith("joint") else "per_direction"
    kw = dict(scale=SCALE, directions=BOTH, partition_mode=part, hardness_mode="in_batch_negatives",
              hardness_strength=STRENGTH)
    if variant.startswith("st_"):
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

        st = MultipleNegativesRankingLoss(None, **kw)
        return lambda q, t: st.compute_loss_from_embeddings([q, t], None)
    from llave_fast.integrations.sentence_transformers import fused_mnrl_loss

    sym = variant == "fused_symmetric_hardness"
    return lambda q, t: fused_mnrl_loss(q, t, symmetric_hardness=sym, **kw)


# --------------------------------------------------------------------------- the tiny model (part 2)


def tiny_model(folder: str, hidden: int, seed: int = 0):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", model_max_length=32).save_pretrained(folder)
    torch.manual_seed(seed)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=2 * hidden, max_position_embeddings=64)).save_pretrained(folder)
    tr = Transformer(folder)
    return SentenceTransformer(modules=[tr, Pooling(tr.get_embedding_dimension(), "mean")], device="cpu").train()


def triplet_features(model, n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    cols = [[" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) for _ in range(n)] for _ in range(3)]
    return [model.preprocess(c) for c in cols]


def cached_loss(variant: str, model, mini_batch_size: int):
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss

    from llave_fast.integrations import FusedCachedMultipleNegativesRankingLoss

    kw = dict(scale=SCALE, directions=BOTH, partition_mode="per_direction", hardness_mode="in_batch_negatives",
              hardness_strength=STRENGTH, mini_batch_size=mini_batch_size)
    cls = CachedMultipleNegativesRankingLoss if variant == "st_cached" else FusedCachedMultipleNegativesRankingLoss
    return cls(model, **kw)


def cached_step(loss, model, feats, seed: int = 1) -> float:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    value = loss(feats, None)
    value.backward()
    return float(value.detach())


# --------------------------------------------------------------------------- memory (fresh process)


def mem_worker(spec: dict) -> None:
    """Hidden entry point: one forward + backward in this fresh process; prints the peak RSS delta."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if spec["kind"] == "loss":
        fn = loss_fn(spec["variant"])
        for q, t in C.make_pairs(2, 256, 128, dtype=torch.float32, device="cpu", seed=1):  # loads the libraries
            fn(q, t).backward()
        del q, t
        (q, t), = C.make_pairs(1, spec["B"], spec["d"], dtype=torch.float32, device="cpu", seed=spec["seed"])
        gc.collect()
        rec = C.cpu_peak_rss_of_call(fn, q, t)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            model = tiny_model(tmp, spec["hidden"])
        feats = triplet_features(model, spec["batch"], seed=3)
        loss = cached_loss(spec["variant"], model, spec["mini_batch"])
        cached_step(loss, model, triplet_features(model, 2 * spec["mini_batch"], seed=4))  # warm-up, small
        model.zero_grad(set_to_none=True)
        gc.collect()
        # params' gradients are allocated by the step: they count in both variants alike
        torch.manual_seed(1)
        rec = C.cpu_peak_rss_of_call(lambda f, _: loss(f, None), feats, None)
    print("MEMRESULT " + json.dumps(rec), flush=True)


def memory_in_subprocess(spec: dict, timeout: float = 1200) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_mem-worker", json.dumps(spec)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    for line in r.stdout.splitlines():
        if line.startswith("MEMRESULT "):
            return json.loads(line[len("MEMRESULT "):])
    raise RuntimeError(f"memory worker failed (rc {r.returncode}): {r.stderr.strip()[-1500:]}")


# --------------------------------------------------------------------------- main


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--_mem-worker":
        mem_worker(json.loads(sys.argv[2]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192], help="batch sizes B. Default: 4096 8192")
    ap.add_argument("--d", type=int, default=768, help="embedding width. Default: 768")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each loss variant. Default: 3")
    ap.add_argument("--cached-batch", type=int, default=1024, help="triplets per cached step. Default: 1024")
    ap.add_argument("--mini-batch", type=int, default=64, help="mini_batch_size of both cached losses. Default: 64")
    ap.add_argument("--hidden", type=int, default=64, help="the tiny BERT's width. Default: 64")
    ap.add_argument("--cached-repeats", type=int, default=5, help="timed cached steps of each. Default: 5")
    ap.add_argument("--no-memory", action="store_true", help="skip the fresh-process memory runs")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads. Default: torch's own")
    ap.add_argument("--out", default=None, help="result JSON. Default: benchmarks/results/<device>/<date>-st.json")
    args = ap.parse_args()
    for name in ("d", "repeats", "cached_batch", "mini_batch", "hidden", "cached_repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if any(b < 2 for b in args.sizes):
        ap.error(f"--sizes must be >= 2, got {args.sizes}")
    C.start_script()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device("cpu")
    import sentence_transformers
    import transformers

    t_start = time.perf_counter()
    out = {
        "benchmark": "sentence-transformers-mnrl",
        "command": "bench_st.py " + " ".join(sys.argv[1:]),
        **C.now_stamps(),
        "device": C.device_info(dev),
        "machine_load_before": C.machine_load(),
        "versions": {**C.versions(), "sentence_transformers": sentence_transformers.__version__,
                     "transformers": transformers.__version__},
        "git": C.git_info(),
        "settings": {"d": args.d, "sizes": args.sizes, "dtype": "fp32", "scale": SCALE,
                     "hardness_mode": "in_batch_negatives", "hardness_strength": STRENGTH, "directions": list(BOTH),
                     "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
                     "timing": "forward + backward, medians of interleaved (ABBA) runs after one warm-up each",
                     "memory": "peak RSS of one forward + backward in a fresh process minus the RSS before it"},
        "loss": {},
    }
    print(f"machine load before: {out['machine_load_before']}", flush=True)
    for B in args.sizes:
        fns = {v: loss_fn(v) for v in LOSS_VARIANTS}
        pairs = C.make_pairs(2, B, args.d, dtype=torch.float32, device=dev, seed=B)
        tm = C.time_interleaved(fns, pairs, device=dev, warmup=1, repeats=args.repeats)
        rows = {}
        for v in LOSS_VARIANTS:
            r = tm[v]
            rows[v] = {"fwd_bwd_ms": r["raw_ms"]["fwd_bwd"], "median_fwd_bwd_ms": C.median(r["raw_ms"]["fwd_bwd"]),
                       "median_fwd_ms": C.median(r["raw_ms"]["fwd"]), "median_bwd_ms": C.median(r["raw_ms"]["bwd"]),
                       "losses": r["losses"], "error": r["error"]}
        # the same numbers: each fused variant's loss against sentence-transformers' on one input pair
        q, t = (x.detach() for x in pairs[0])
        with torch.no_grad():
            same = {}
            for v in ("fused_per_direction", "fused_joint"):
                want = float(fns[BASELINE[v]](q, t))
                same[v] = {"st": want, "fused": float(fns[v](q, t))}
                same[v]["rel_diff"] = abs(same[v]["fused"] - want) / abs(want)
        del pairs, fns, tm, q, t
        gc.collect()
        if not args.no_memory:
            for v in LOSS_VARIANTS:
                rows[v]["memory"] = memory_in_subprocess(dict(kind="loss", variant=v, B=B, d=args.d, seed=B + 1,
                                                              threads=args.threads))
                rows[v]["peak_mib"] = rows[v]["memory"]["peak_bytes"] / C.MiB
        ratios = {}
        for v, base in BASELINE.items():
            a, b = rows[v], rows[base]
            ratios[f"{v} / {base}"] = {
                "time": a["median_fwd_bwd_ms"] / b["median_fwd_bwd_ms"],
                "memory": (a["peak_mib"] / b["peak_mib"]) if "peak_mib" in a else None,
            }
        out["loss"][str(B)] = {"variants": rows, "ratios": ratios, "same_loss_as_st": same}
        print(f"B = N = {B}, d = {args.d}:", flush=True)
        for v in LOSS_VARIANTS:
            mem = f", peak {rows[v]['peak_mib']:.0f} MiB" if "peak_mib" in rows[v] else ""
            print(f"  {v:26s} {rows[v]['median_fwd_bwd_ms']:9.0f} ms{mem}", flush=True)
        for k, r in ratios.items():
            mem = f", memory {r['memory']:.3f}" if r["memory"] is not None else ""
            print(f"  {k}: time {r['time']:.3f}{mem}", flush=True)
        print("  loss vs sentence-transformers' (relative): "
              + ", ".join(f"{v} {r['rel_diff']:.1e}" for v, r in same.items()), flush=True)

    # part 2: the cached step
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_model(tmp, args.hidden)
    feats = triplet_features(model, args.cached_batch, seed=3)
    losses = {v: cached_loss(v, model, args.mini_batch) for v in ("st_cached", "fused_cached")}
    for v in losses:  # warm-up
        cached_step(losses[v], model, feats)
    times = {v: [] for v in losses}
    values = {v: [] for v in losses}
    order = list(losses)
    for i in range(args.cached_repeats):
        for v in (order if i % 2 == 0 else order[::-1]):
            gc.collect()
            t0 = time.perf_counter()
            values[v].append(cached_step(losses[v], model, feats))
            times[v].append(time.perf_counter() - t0)
    cached = {v: {"seconds": times[v], "median_s": statistics.median(times[v]), "loss": values[v][0]} for v in losses}
    cached["time_ratio"] = cached["fused_cached"]["median_s"] / cached["st_cached"]["median_s"]
    cached["loss_rel_diff"] = abs(values["fused_cached"][0] - values["st_cached"][0]) / abs(values["st_cached"][0])
    if not args.no_memory:
        for v in losses:
            rec = memory_in_subprocess(dict(kind="cached", variant=v, batch=args.cached_batch, hidden=args.hidden,
                                            mini_batch=args.mini_batch, threads=args.threads))
            cached[v]["memory"] = rec
            cached[v]["peak_mib"] = rec["peak_bytes"] / C.MiB
        cached["memory_ratio"] = cached["fused_cached"]["peak_mib"] / cached["st_cached"]["peak_mib"]
    out["cached_step"] = {
        "settings": {"model": f"BERT, 2 layers, hidden {args.hidden}, random init (built in the script)",
                     "triplets": args.cached_batch, "mini_batch_size": args.mini_batch,
                     "partition_mode": "per_direction", "repeats": args.cached_repeats,
                     "what": "loss(features) + loss.backward() of one step (the cached re-encode included)"},
        **cached,
    }
    print(f"cached step, {args.cached_batch} triplets, mini_batch_size {args.mini_batch}: "
          f"sentence-transformers {cached['st_cached']['median_s']:.2f} s, fused {cached['fused_cached']['median_s']:.2f} s "
          f"(ratio {cached['time_ratio']:.3f}; losses differ by {cached['loss_rel_diff']:.1e} relative)"
          + (f", peak {cached['st_cached']['peak_mib']:.0f} vs {cached['fused_cached']['peak_mib']:.0f} MiB"
             if "memory_ratio" in cached else ""), flush=True)

    out["machine_load_after"] = C.machine_load()
    out["total_wall_s"] = time.perf_counter() - t_start
    path = Path(args.out) if args.out else C.default_out_path(dev).with_name(f"{C.now_stamps()['date']}-st.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"machine load after: {out['machine_load_after']}; wall {out['total_wall_s']:.0f} s; wrote {path}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
