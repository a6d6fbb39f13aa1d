"""What the question alone gives on the synthetic data's VQA-style task: a predictor that never looks at the image.

For each seed, the held-out split is built as training builds it (the config's options through the training's own
dataset builder), and every VQA-style query of it is answered with the answer given most often to its exact
question text among the VQA-style items of the run's own training split (the ``num_train`` items the model
trains on, every pass the same). Counted per question kind (:data:`llave_fast.data.synthetic.QUESTION_KINDS`, as
``benchmarks/vqa_by_kind.py`` counts the model's hits). A tie between answers: ``hits`` takes the first in
alphabetical order, ``expected_hits`` the mean over the tied answers (a predictor that breaks ties at random, in
expectation). A question never asked in training counts as a miss (``unseen``). Nothing is trained or encoded:
about 4 s per seed of the default job on the 2-core CPU machine.

    python3 benchmarks/question_alone.py --config tiny_cpu.json --seeds 0 1 2 --out FILE.json
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TASK = "vqa"


def answer_counts(train) -> dict[str, collections.Counter]:
    """``{question: Counter(answer)}`` over the VQA-style items of a training split."""
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for i in range(len(train)):
        q = train.question(i)
        if q is not None:
            counts[q[0]][q[1]] += 1
    return counts


def predict(counts: dict[str, collections.Counter], queries) -> dict:
    """``queries``: ``(question, true answer, kind)`` triples. ``{kind: {queries, hits, expected_hits, unseen,
    ties}}`` in :data:`QUESTION_KINDS` order (kinds with no query left out), plus ``"all"``."""
    from llave_fast.data.synthetic import QUESTION_KINDS

    out = {k: {"queries": 0, "hits": 0, "expected_hits": 0.0, "unseen": 0, "ties": 0} for k in QUESTION_KINDS}
    for question, answer, kind in queries:
        row = out[kind]
        row["queries"] += 1
        seen = counts.get(question)
        if not seen:
            row["unseen"] += 1
            continue
        top = max(seen.values())
        best = sorted(a for a, n in seen.items() if n == top)
        row["ties"] += len(best) > 1
        row["hits"] += best[0] == answer
        row["expected_hits"] += (answer in best) / len(best)
    out = {k: v for k, v in out.items() if v["queries"]}
    out["all"] = {key: sum(v[key] for v in out.values()) for key in ("queries", "hits", "expected_hits", "unseen",
                                                                      "ties")}
    for v in out.values():
        v["p_at_1"] = v["hits"] / v["queries"]
        v["expected_p_at_1"] = v["expected_hits"] / v["queries"]
    return out


def heldout_queries(evals, rset) -> list[tuple[str, str, str]]:
    """The VQA-style queries of a held-out split as the evaluation scores them (each against its task's own
    distinct answers): ``(question, true answer, kind)`` per query row, the answer read from the candidates."""
    from llave_fast.data.retrieval import task_name
    from llave_fast.errors import InvalidArgument

    out = []
    for row, subset in enumerate(rset.query_subsets):
        if task_name(subset) != TASK:
            continue
        question, answer, kind = evals.question(row)
        truth = rset.cand_texts[int(rset.positive[row])]
        if truth != answer:
            raise InvalidArgument(f"held-out query {row}: its positive candidate is {truth!r}, the item answers "
                                  f"{answer!r}: the retrieval set's rows are not the split's items")
        out.append((question, answer, kind))
    return out


def score_seed(cfg) -> dict:
    """One seed's question-alone predictor on its held-out VQA-style queries (``cfg``: the run's options)."""
    from llave_fast.data import retrieval_candidates
    from llave_fast.training.loading import _datasets

    train, evals = _datasets(cfg)  # the training's own builder: the items the run trains and evaluates on
    counts = answer_counts(train)
    kinds = predict(counts, heldout_queries(evals, retrieval_candidates(evals)))
    return {"seed": cfg.seed, "num_train": cfg.num_train, "num_eval": cfg.num_eval,
            "training_vqa_items": sum(sum(c.values()) for c in counts.values()),
            "distinct_training_questions": len(counts), TASK: kinds}


def main(argv=None) -> dict:
    from llave_fast.train import TrainConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tiny_cpu.json", help="the run's preset or JSON options (default: the "
                   "default job's, tiny_cpu.json)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="the runs' seeds (default: 0)")
    p.add_argument("--out", required=True, help="the JSON file to write")
    args = p.parse_args(argv)
    runs = []
    for seed in args.seeds:
        cfg = TrainConfig.from_json(args.config)
        cfg.seed = seed
        runs.append(score_seed(cfg))
        a = runs[-1][TASK]["all"]
        kinds = ", ".join(f"{k} {v['hits']}/{v['queries']}" for k, v in runs[-1][TASK].items() if k != "all")
        print(f"seed {seed}: question alone {a['hits']}/{a['queries']} = {a['p_at_1']:.4f} (expected with random "
              f"ties {a['expected_p_at_1']:.4f}); {kinds}")
    out = {"what": "VQA-style precision@1 of a predictor that ignores the image (benchmarks/question_alone.py): each "
                   "held-out query answered with the commonest answer to its exact question among the run's own "
                   "training VQA-style items; ties alphabetical (hits) or at random in expectation (expected_hits)",
           "config": args.config, "machine": C.run_meta(torch.device("cpu")), "runs": runs}
    out["machine"]["load_average"] = [round(x, 2) for x in os.getloadavg()]
    C.write_json(args.out, out)
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
